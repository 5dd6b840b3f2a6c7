"""One parameter-group rule for the README's ``model.param_groups`` and the trainer's optimizer.

The two used to disagree: ``param_groups`` found LoRA by the ``lm.`` prefix and decayed every 2-D
tensor (the resampler's latents and position embeddings included), while the trainer skipped decay for
``embed``/``latents`` names but still decayed the token-embedding rows added for ``<image>``.
"""

from __future__ import annotations

import pytest
import torch

from vlm import InjectionConfig, ResamplerConfig, TrainConfig
from vlm.testing import tiny_vlm
from vlm.training import build_optimizer, param_groups

WD, LR, LORA_LR = 0.1, 3e-3, 5e-4


@pytest.fixture(scope="module")
def model():
    """A tiny VLM with every kind of trainable tensor: resampler latents, media-time and patch-position
    embeddings, norms, biases, gated cross-attention (tanh gates), LoRA, and unfrozen token embeddings
    (input and untied output rows, both holding the new ``<image>`` row)."""
    m = tiny_vlm(
        "llama",
        resampler=ResamplerConfig(
            depth=1, num_latents=8, heads=2, head_dim=16, ff_mult=2.0, max_media=2, num_patch_positions=16
        ),
        injection=InjectionConfig(mode="cross_attention", every_k_layers=1, xattn_heads=2, xattn_head_dim=8),
    )
    lm = m.language_model
    lm.get_input_embeddings().weight.requires_grad_(True)
    lm.get_output_embeddings().weight.requires_grad_(True)
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight  # untied: two tables
    assert m.new_token_ids  # the <image> row was added to both
    return m


def _by_param(groups: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter sits in two groups"
            out[id(p)] = group
    return out


def test_every_trainable_parameter_lands_in_exactly_one_group(model):
    groups = _by_param(model.param_groups(LR, LORA_LR, WD))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(groups) == trainable
    names = {g["name"] for g in groups.values()}
    assert names == {"connector", "connector_no_decay", "lora"}  # LoRA matrices are all 2-D and decayed


def test_no_decay_on_latents_embeddings_biases_norms_gates_and_new_token_rows(model):
    groups = _by_param(model.param_groups(LR, LORA_LR, WD))
    named = dict(model.named_parameters())
    lm = model.language_model
    must_not_decay = {
        "resampler.latents": named["resampler.latents"],
        "resampler.media_time_embeddings": named["resampler.media_time_embeddings"],
        "resampler.patch_position_embeddings": named["resampler.patch_position_embeddings"],
        "input token rows (incl. <image>)": lm.get_input_embeddings().weight,
        "output token rows (incl. <image>)": lm.get_output_embeddings().weight,
    }
    for name, p in named.items():
        if p.requires_grad and (p.dim() < 2 or name.endswith(("_gate", ".bias")) or ".norm" in name):
            must_not_decay[name] = p
    assert any(n.endswith("attn_gate") for n in must_not_decay) and any(".bias" in n for n in must_not_decay)
    assert any("norm" in n for n in must_not_decay)
    for name, p in must_not_decay.items():
        assert groups[id(p)]["weight_decay"] == 0.0, name
        assert groups[id(p)]["name"].endswith("_no_decay"), name
    decayed = [n for n, p in named.items() if p.requires_grad and groups[id(p)]["weight_decay"] == WD]
    assert "resampler.layers.0.attn.to_q.weight" in decayed and "projector.0.weight" in decayed
    assert "xattn.blocks.0.attn.to_kv.weight" in decayed


def test_lora_gets_lora_lr_and_everything_else_the_connector_lr(model):
    groups = _by_param(model.param_groups(LR, LORA_LR, WD))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lora = ".lora_A." in name or ".lora_B." in name
        assert groups[id(p)]["lr"] == (LORA_LR if lora else LR), name
        assert groups[id(p)]["name"].startswith("lora" if lora else "connector"), name
    # the unfrozen LM embeddings live under "lm." but are not LoRA: the connector's learning rate
    assert groups[id(model.language_model.get_input_embeddings().weight)]["lr"] == LR
    assert all(g["lr"] == LR for g in model.param_groups(LR, None, WD))  # lora_lr defaults to lr


def test_model_and_trainer_give_identical_groups(model):
    config = TrainConfig(lr=LR, lora_lr=LORA_LR, weight_decay=WD)
    from_model = model.param_groups(LR, LORA_LR, WD)
    from_trainer = build_optimizer(model, config).param_groups
    from_rule = param_groups(model, LR, LORA_LR, WD)
    for groups in (from_trainer, from_rule):
        assert len(groups) == len(from_model)
        for a, b in zip(from_model, groups):
            assert (a["name"], a["lr"], a["weight_decay"]) == (b["name"], b["lr"], b["weight_decay"])
            assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


def test_frozen_parameters_are_in_no_group():
    m = tiny_vlm("gpt2")
    grouped = {id(p) for g in m.param_groups(LR, LORA_LR, WD) for p in g["params"]}
    assert grouped == {id(p) for p in m.parameters() if p.requires_grad}
    assert all(id(p) not in grouped for p in m.vision.parameters())
    assert torch.is_tensor(m.resampler.latents) and id(m.resampler.latents) in grouped


def test_the_trainer_adamw_is_fused_where_it_can_be_and_matches_the_per_tensor_loop(model):
    """CPU AdamW runs one tensor at a time unless asked otherwise (48 ms per step for the stand-in ViT,
    2.5 ms fused): `adamw` asks for the fused kernel for plain CPU parameters, and its steps match
    torch's default update to float rounding."""
    from vlm.training.optim import adamw

    optimizer = build_optimizer(model, TrainConfig(lr=LR, lora_lr=LORA_LR, weight_decay=WD))
    assert all(group["fused"] for group in optimizer.param_groups)

    torch.manual_seed(0)
    start = [torch.randn(5, 4) for _ in range(3)]
    grads = [[torch.randn(5, 4) for _ in start] for _ in range(4)]
    results = []
    for make in (adamw, torch.optim.AdamW):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make([{"params": params, "lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.98), eps=1e-6)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    assert results[0] is not results[1]
    for fused, loop in zip(*results):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], start[0])  # the steps moved the weights

    class Sharded(torch.Tensor):  # stands for FSDP2's DTensor parameters: a tensor subclass keeps the default
        pass

    sharded = torch.nn.Parameter(torch.zeros(2).as_subclass(Sharded))
    assert type(sharded) is Sharded
    assert not adamw([{"params": [sharded, torch.nn.Parameter(torch.zeros(2))]}]).param_groups[0]["fused"]
