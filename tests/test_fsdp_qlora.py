"""QLoRA under ``train.distributed=fsdp``: the 4-bit LM's packed weights are sharded with their layers
and two ranks train the same LoRA and connector as one process (bitsandbytes' CPU 4-bit kernels)."""

from __future__ import annotations

import pytest
import torch
from test_fsdp import assert_same, make, one_process, torchrun, trained

from vlm.testing import tiny_clip, tiny_lm, tiny_tokenizer


@pytest.fixture
def qlora_parts(tmp_path):
    """A tiny Llama (hidden 64: bitsandbytes' CPU 4-bit blocks need in_features >= 64) and tower on disk."""
    tok = tiny_tokenizer()
    tiny_lm("llama", tok, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    clip, _ = tiny_clip()
    torch.save(clip.state_dict(), tmp_path / "vision.pt")
    return tmp_path


def test_qlora_model_stores_4bit_weights_as_float32(qlora_parts):
    import bitsandbytes as bnb

    model, _ = make(qlora=str(qlora_parts))
    packed = [m.weight for m in model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(w.dtype == torch.float32 and w.quant_state.quant_type == "nf4" for w in packed)


@pytest.mark.slow
def test_qlora_fsdp_two_ranks_match_one_process(qlora_parts, tmp_path):
    root = str(qlora_parts)
    ranks = torchrun(tmp_path, [("fsdp", "prefix", 2, {"distributed": "fsdp"}, {"qlora": root})])
    assert any(n.endswith("q_proj.base_layer.weight") for n in ranks["fsdp"][0]["sharded"])  # 4-bit, sharded
    model, _ = one_process(tmp_path, "single", qlora=root)
    want = trained(model)
    assert any(".lora_" in n for n in want)
    for r in range(2):
        assert_same(ranks["fsdp"][r]["params"], want, f"qlora fsdp rank {r}")
