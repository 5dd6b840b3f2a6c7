"""``train.distributed=fsdp`` (FSDP2) and ``ddp`` on two CPU processes (torchrun, gloo) against one process.

The tiny VLM (frozen tower and LM, LoRA, trainable resampler and projector) trains the same global
batch three ways: one process with batch 4, two ranks of batch 2 with ``ddp``, and two with ``fsdp``.
Every trainable weight must agree in fp32 (1e-5). Every caption has the same number of tokens, so the
mean of the two ranks' mean losses is the one-process mean loss (the loop averages per-rank losses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vlm import VisionLanguageModel
from vlm.config import InjectionConfig, LMConfig, VisionConfig
from vlm.testing import register_tiny_clip, tiny_images, tiny_vlm, tiny_vlm_config
from vlm.training import EpochLoader, TrainConfig, train

TESTS = Path(__file__).parent
STEPS = 4

XATTN = InjectionConfig(mode="cross_attention", every_k_layers=1, xattn_heads=2, xattn_head_dim=8, xattn_ff_mult=2.0)
_CANDIDATES = [
    f"a {size} {colour} {shape} on the {side}"
    for size in ("small", "large")
    for colour in ("red", "blue", "green", "yellow")
    for shape in ("circle", "square", "triangle", "star")
    for side in ("left", "right")
]


class CaptionData(torch.utils.data.Dataset):
    """Random tiny images with captions that all tokenize to the same length."""

    def __init__(self, tokenizer, n: int = 32) -> None:
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in _CANDIDATES]
        common = max(set(lengths), key=lengths.count)
        self.captions = [c for c, n_tok in zip(_CANDIDATES, lengths) if n_tok == common]
        self.images = tiny_images(n, seed=3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": self.captions[i % len(self.captions)]}


class SlowLoader(EpochLoader):
    """An EpochLoader that waits before each batch: a run slow enough to be killed mid-way."""

    delay = 0.0

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


def make(mode: str = "prefix", batch: int = 4, delay: float = 0.0, qlora: str | None = None):
    """(model, loader) of one case; the same seeds on every rank and in every process. ``qlora``: a
    directory with ``lm/`` and ``vision.pt`` (see test_fsdp_qlora.py): its LM loaded in 4-bit."""
    injection = XATTN if mode == "cross_attention" else InjectionConfig()
    if qlora is None:
        model = tiny_vlm("llama", injection=injection)
    else:
        torch.manual_seed(1)
        model = VisionLanguageModel(qlora_config(Path(qlora), injection))
    prompt = "Caption:" if mode == "prefix" else "<image>Caption:"

    def collate(items):
        text = model.processor([prompt] * len(items), captions=[it["caption"] for it in items], num_images=1)
        return {"images": torch.stack([it["image"] for it in items]), **text}

    loader = SlowLoader(CaptionData(model.tokenizer), batch, collate, seed=0)
    loader.delay = delay
    return model, loader


def qlora_config(root: Path, injection: InjectionConfig):
    """The tiny VLM over ``root/lm`` loaded in 4-bit nf4 with fp32 quant storage (fp32 on CPU)."""
    lm = LMConfig(name_or_path=str(root / "lm"), quantization="4bit", bnb_4bit_quant_storage="float32")
    vision = VisionConfig(name=register_tiny_clip(), pretrained=str(root / "vision.pt"))
    return tiny_vlm_config("llama", lm=lm, vision=vision, injection=injection)


def config(**kw) -> TrainConfig:
    base = dict(
        max_steps=STEPS, lr=3e-3, lora_lr=3e-3, max_grad_norm=0.05, progress=False, tensorboard=False, plot=False
    )
    base.update(kw)
    return TrainConfig(**base)


def trained(model) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable weights, also from a sharded model."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


WORKER = textwrap.dedent(
    """
    import sys, torch, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, {tests!r})
    import test_fsdp as t
    from vlm.distributed import init_distributed
    from vlm.training.fsdp import export_adapter
    rank, world = init_distributed()
    assert world == 2, world
    open({out!r} + f"/pid{{rank}}", "w").write(str(__import__("os").getpid()))  # torchrun gives workers own sessions
    for name, mode, batch, kw, train_kw in {jobs!r}:
        model, loader = t.make(mode, batch, train_kw.pop("delay", 0.0), train_kw.pop("qlora", None))
        export = train_kw.pop("export", False)
        if train_kw.pop("perturb", False) and rank == 1:  # the trainer must start every rank from rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.5)
        result = t.train(model, loader, t.config(**kw), {out!r} + "/" + name, **train_kw)
        if export:
            export_adapter(model, {out!r} + "/" + name + "/adapter")
        record = {{"params": t.trained(model), "losses": result.losses, "history": result.history}}
        record["sharded"] = sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")
        record["env"] = {{k: __import__("os").environ.get(k) for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}}
        record["tower_whole"] = all(type(p).__name__ != "DTensor" for p in model.vision.parameters())
        torch.save(record, {out!r} + f"/{{name}}-rank{{rank}}.pt")
    """
)


def torchrun_command(tmp_path: Path, jobs: list, script: str = "worker.py") -> list[str]:
    """The torchrun command of ``jobs`` (name, mode, per-rank batch, TrainConfig overrides, train() kwargs
    plus an optional per-batch ``delay``) on 2 ranks; results go to ``tmp_path/<name>-rank<r>.pt``."""
    path = tmp_path / script
    path.write_text(WORKER.format(tests=str(TESTS), jobs=jobs, out=str(tmp_path)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path)]


def torchrun(tmp_path: Path, jobs: list, timeout: int = 600) -> dict[str, list[dict]]:
    cmd = torchrun_command(tmp_path, jobs)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)] for name, *_ in jobs}


def env() -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1")
    out["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), out.get("PYTHONPATH", "")])
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == want.keys(), label
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=f"{label}: {name}")


def one_process(tmp_path: Path, name: str, mode: str = "prefix", qlora: str | None = None, **kw):
    model, loader = make(mode, batch=4, qlora=qlora)
    result = train(model, loader, config(**kw), tmp_path / name)
    return model, result


@pytest.fixture(scope="module")
def prefix_runs(tmp_path_factory):
    """One launch: ddp and fsdp for STEPS steps, and fsdp stopped after 2 steps (a sharded checkpoint)."""
    tmp = tmp_path_factory.mktemp("fsdp_prefix")
    jobs = [
        ("ddp", "prefix", 2, {}, {}),
        ("fsdp", "prefix", 2, {"distributed": "fsdp"}, {"export": True, "perturb": True}),
        ("cut", "prefix", 2, {"distributed": "fsdp"}, {"stop_after": 2}),
    ]
    return tmp, torchrun(tmp, jobs)


def test_two_ranks_fsdp_and_ddp_match_one_process(prefix_runs, tmp_path):
    _, ranks = prefix_runs
    model, single = one_process(tmp_path, "single")
    want = trained(model)
    assert any(".lora_" in n for n in want) and any(n.startswith("resampler.") for n in want)
    assert all(row["grad_norm"] > 0.05 for row in single.history)  # clipping acts on every step
    sharded = ranks["fsdp"][0]["sharded"]
    assert not ranks["ddp"][0]["sharded"] and ranks["fsdp"][0]["tower_whole"]  # the frozen tower is not sharded
    assert set(want) <= set(sharded) and any(".layers.1.mlp" in n for n in sharded)  # trainable and frozen LM
    for kind in ("ddp", "fsdp"):
        for r in range(2):
            assert_same(ranks[kind][r]["params"], want, f"{kind} rank {r}")
        torch.testing.assert_close(
            torch.tensor(ranks[kind][0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6
        )


def test_two_rank_sharded_checkpoint_resumes_on_one_process(prefix_runs, tmp_path):
    import shutil

    from vlm.training.sharded import is_sharded_checkpoint

    tmp, ranks = prefix_runs
    ckpt = tmp / "cut" / "checkpoints" / "step_0000002"
    assert is_sharded_checkpoint(ckpt) and len(list((ckpt / "shards").glob("*.distcp"))) == 2  # one shard per rank
    shutil.copytree(tmp / "cut", tmp_path / "cut")
    model, loader = make("prefix", batch=4)  # one process, the same global batch
    resumed = train(model, loader, config(distributed="fsdp"), tmp_path / "cut")
    assert resumed.resumed_from == 2 and len(resumed.losses) == STEPS - 2
    reference, single = one_process(tmp_path, "single")
    assert_same(trained(model), trained(reference), "2 ranks -> 1 process")
    torch.testing.assert_close(
        torch.tensor(ranks["cut"][0]["losses"] + resumed.losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_cross_attention_and_checkpointing_match_one_process(tmp_path):
    jobs = [
        ("ddp", "cross_attention", 2, {}, {}),
        ("fsdp", "cross_attention", 2, {"distributed": "fsdp"}, {}),
        (
            "fsdp_ckpt",
            "cross_attention",
            1,
            {"distributed": "fsdp", "gradient_checkpointing": True, "grad_accum_steps": 2},
            {},
        ),
    ]
    ranks = torchrun(tmp_path, jobs)
    model, _ = one_process(tmp_path, "single", "cross_attention")
    want = trained(model)
    assert any(n.startswith("xattn.") for n in want)
    for kind, *_ in jobs:
        assert_same(ranks[kind][0]["params"], want, kind)
        assert_same(ranks[kind][1]["params"], want, kind)


def test_fsdp_refuses_fp16():
    with pytest.raises(ValueError, match="train.precision=bf16"):
        TrainConfig(distributed="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="train.distributed"):
        TrainConfig(distributed="deepspeed")


def test_adapter_exported_from_sharded_model_loads_in_one_process(prefix_runs, tmp_path):
    from vlm.checkpoint import read_weights
    from vlm.testing import tiny_parts

    tmp, ranks = prefix_runs
    model, _ = one_process(tmp_path, "single")
    model.save_adapter(tmp_path / "single_adapter")
    exported, want = read_weights(tmp / "fsdp" / "adapter"), read_weights(tmp_path / "single_adapter")
    assert_same(exported, want, "exported adapter")  # same tensors, names and shapes as the ordinary format
    clip, preprocess, lm, tokenizer = tiny_parts("llama")
    loaded = VisionLanguageModel.load_adapter(tmp / "fsdp" / "adapter", clip, lm, tokenizer, preprocess=preprocess)
    assert_same(trained(loaded), trained(model), "loaded adapter")


def test_trainable_weights_of_a_sharded_checkpoint_load_into_a_plain_model(prefix_runs):
    from vlm.training.sharded import load_weights

    tmp, ranks = prefix_runs
    model, _ = make("prefix")
    assert load_weights(tmp / "cut" / "checkpoints" / "step_0000002", model) == 2
    assert_same(trained(model), ranks["cut"][0]["params"], "load_weights")  # the 2-rank run's state at step 2
    with pytest.raises(ValueError, match="train.distributed=fsdp"):
        load_weights(tmp / "ddp" / "checkpoints" / "step_0000004", model)  # a ddp checkpoint is not sharded
