"""vlm.loss: the lean causal-LM loss equals transformers' ForCausalLMLoss (value and gradient) and
holds one (N, vocab) buffer fewer; the VLM installs it only over the default loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from vlm.loss import causal_lm_loss, install_causal_lm_loss
from vlm.testing import tiny_lm, tiny_tokenizer, tiny_vlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _case(seed=0, b=3, length=7, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (b, length), generator=gen)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return logits, labels


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": 11}, {"shift_labels": "given"}, {"ignore_index": 3}])
def test_lean_loss_equals_transformers_loss_and_gradient(kwargs):
    logits, labels = _case()
    if kwargs.get("shift_labels") == "given":
        kwargs = {"shift_labels": torch.roll(labels, 1, dims=1)}
    if "ignore_index" in kwargs:
        labels = labels.masked_fill(labels == -100, kwargs["ignore_index"])
    results = []
    for fn in (ForCausalLMLoss, causal_lm_loss):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, labels, vocab_size=50, **kwargs)
        (loss * 1.7).backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-9)


def test_nothing_supervised_gives_nan_like_transformers():
    logits, labels = _case()
    labels[:] = -100
    assert torch.isnan(ForCausalLMLoss(logits, labels, 50)) and torch.isnan(causal_lm_loss(logits, labels, 50))


def test_lean_loss_holds_one_logits_sized_buffer_fewer():
    from common import peak_memory_mb

    n, vocab = 256, 4096
    logits = torch.randn(1, n, vocab)
    labels = torch.randint(0, vocab, (1, n))
    buffer_mib = n * vocab * 4 / 2**20  # 4 MiB

    def step(fn):
        x = logits.clone().requires_grad_(True)
        fn(x * 1.0, labels, vocab_size=vocab).backward()  # x * 1.0: logits made (and freed) inside, as a head's

    peaks = {fn.__name__: peak_memory_mb(lambda fn=fn: step(fn)) for fn in (ForCausalLMLoss, causal_lm_loss)}
    assert peaks["causal_lm_loss"] <= peaks["ForCausalLMLoss"] - 0.9 * buffer_mib, peaks


def test_the_vlm_installs_it_over_the_default_loss_only():
    model = tiny_vlm("llama")
    assert model.language_model.loss_function is causal_lm_loss
    lm = tiny_lm("llama", tiny_tokenizer())
    lm.loss_function = ForCausalLMLoss  # a loss set by the user stays
    assert not install_causal_lm_loss(lm) and lm.loss_function is ForCausalLMLoss
