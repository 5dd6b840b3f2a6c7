"""The training loop on a small stand-in model: overfit, schedule, groups, accumulation, precision, logs."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlm.training import EpochLoader, TrainConfig, build_optimizer, latest_checkpoint, train, warmup_cosine


class ToyAdapter(nn.Module):
    """A frozen 'backbone', a trainable 'connector' and a LoRA-named pair: the shapes of a VLM's groups."""

    def __init__(self, dim: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = nn.Linear(dim, dim)
        self.backbone.requires_grad_(False)
        self.connector = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, dim))
        self.lora_A = nn.Parameter(torch.randn(2, dim) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(dim, 2))

    def forward(self, x, y):
        h = self.backbone(x)
        h = h + self.connector(h) + h @ self.lora_A.T @ self.lora_B.T
        per_sample = ((h - y) ** 2).mean(-1)
        return SimpleNamespace(loss=per_sample.mean())


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(dim, dim, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make(seed=0, dropout=0.0, batch=8, n=64):
    torch.manual_seed(seed)
    return ToyAdapter(dropout=dropout), EpochLoader(ToyData(n), batch, collate, seed=seed)


def quiet(**kw) -> TrainConfig:
    base = dict(progress=False, tensorboard=False, plot=False, lr=1e-2, lora_lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def test_overfits_small_dataset(tmp_path):
    model, loader = make(n=16)
    frozen = model.backbone.weight.clone()
    result = train(model, loader, quiet(max_steps=300, warmup_steps=10, lr=3e-2, lora_lr=3e-2), tmp_path)
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-5:]) / 5
    assert last < 0.02 * first, (first, last)
    assert torch.equal(model.backbone.weight, frozen)  # frozen weights bit-identical


def test_warmup_cosine_matches_formula():
    f = warmup_cosine(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_separate_learning_rates_for_connector_and_lora():
    model = ToyAdapter()
    opt = build_optimizer(model, TrainConfig(lr=3e-3, lora_lr=5e-4, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    lora_ids = {id(model.lora_A), id(model.lora_B)}
    for name, group in by_name.items():
        ids = {id(p) for p in group["params"]}
        if name.startswith("lora"):
            assert ids <= lora_ids and group["lr"] == 5e-4
        else:
            assert not ids & lora_ids and group["lr"] == 3e-3
        assert group["weight_decay"] == (0.1 if "no_decay" not in name else 0.0)
    assert all(id(p) != id(model.backbone.weight) for g in opt.param_groups for p in g["params"])
    # biases of the connector are not decayed
    assert any(id(model.connector[0].bias) == id(p) for p in by_name["connector_no_decay"]["params"])


def test_gradient_accumulation_equals_big_batch(tmp_path):
    big, loader_big = make(batch=8)
    small, loader_small = make(batch=4)
    train(big, loader_big, quiet(max_steps=6, max_grad_norm=None), tmp_path / "a")
    train(small, loader_small, quiet(max_steps=6, grad_accum_steps=2, max_grad_norm=None), tmp_path / "b")
    for (n, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_clipping_bounds_the_update(tmp_path):
    model, loader = make()
    result = train(model, loader, quiet(max_steps=3, max_grad_norm=1e-3), tmp_path)
    assert result.history[0]["grad_norm"] > 1e-3  # the pre-clip norm is what gets logged


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_and_learns(tmp_path, precision):
    model, loader = make()
    result = train(model, loader, quiet(max_steps=40, precision=precision), tmp_path)
    assert result.losses[-1] < result.losses[0]
    assert model.connector[0].weight.dtype == torch.float32  # master weights stay fp32


def test_logs_csv_tensorboard_and_plot(tmp_path):
    model, loader = make()
    train(model, loader, TrainConfig(max_steps=12, log_every=4, progress=False), tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    assert latest_checkpoint(tmp_path).name == "step_0000012"


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    model, loader = make()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, loader, quiet(max_steps=1), tmp_path)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="train.max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="train.min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)


def test_epoch_loader_covers_each_epoch_once_and_reshuffles():
    loader = EpochLoader(list(range(20)), 5, lambda xs: xs, seed=3)
    it = iter(loader)
    first = [x for _ in range(4) for x in next(it)]
    second = [x for _ in range(4) for x in next(it)]
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second


def _tiny_vlm_data(model, n=8):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 16, model.vision.width, generator=g)
    captions = ["a small red circle on the left", "a large blue square on the right"] * (n // 2)
    items = []
    for i in range(n):
        ex = model.processor.build_inputs("", captions[i], num_images=1)
        items.append({"image_features": feats[i], **ex})

    def collate_vlm(batch):
        out = model.processor.pad([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        out["image_features"] = torch.stack([b["image_features"] for b in batch])
        return out

    return items, collate_vlm


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    from vlm.testing import tiny_vlm

    runs = []
    for checkpointing in (False, True):
        model = tiny_vlm("llama", seed=0)
        items, collate_vlm = _tiny_vlm_data(model)
        loader = EpochLoader(items, 4, collate_vlm, seed=0)
        cfg = quiet(max_steps=3, gradient_checkpointing=checkpointing)
        result = train(model, loader, cfg, tmp_path / str(checkpointing))
        assert model.language_model.is_gradient_checkpointing == checkpointing
        runs.append((result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(runs[1][0]), rtol=1e-5, atol=1e-6)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=1e-5, atol=1e-6, msg=name)
