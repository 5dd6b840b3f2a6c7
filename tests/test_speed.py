"""The performance work's correctness: the training attention kernel, the kernel choice, peak memory, goals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resampler import attention as attention_module
from resampler.attention import Attention, _math_attention, reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import peak_memory_mb  # noqa: E402


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_math_kernel_matches_float64_reference_with_gradients(heads, kv_heads, masked):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 9, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 5, 9) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query keeps a key (all-masked rows are Attention's job)
    weight = torch.randn(2, heads, 5, 12, dtype=torch.float64)
    results = []
    for kernel in (_math_attention, reference_attention):
        out = kernel(q, k, v, mask, scale=0.25, dropout=0.0)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _count_kernels(monkeypatch) -> dict[str, int]:
    calls = {"sdpa": 0, "math": 0}
    sdpa, math = F.scaled_dot_product_attention, attention_module._math_attention

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_math(*args, **kwargs):
        calls["math"] += 1
        return math(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(attention_module, "_math_attention", counting_math)
    return calls


def test_kernel_choice_math_only_for_training_with_few_batch_heads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    calls = _count_kernels(monkeypatch)
    attn = Attention(16, 8, heads=1, head_dim=32, fold_kv=False)  # keys and values projected
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 11, 8)
    with torch.no_grad():  # inference keeps SDPA whatever the shape
        attn(x, ctx)
    assert calls == {"sdpa": 1, "math": 0}
    attn(x, ctx).sum().backward()  # training, B x H = 2 < 4 threads: math kernel
    assert calls == {"sdpa": 1, "math": 1}
    wide = Attention(16, 8, heads=2, head_dim=8, fold_kv=False)
    wide(x, ctx).sum().backward()  # B x H = 4 >= 4 threads: SDPA
    assert calls == {"sdpa": 2, "math": 1}
    # Folded (keys = values = the context): a frozen context trains with the matmul kernel whatever
    # B x H, since its backward then skips the context's gradient; a context that needs one goes by the
    # rule above (the folded heads attend as one head: B x 1 = 4 >= 4 threads here, so SDPA).
    folded = Attention(16, 8, heads=2, head_dim=8, fold_kv=True)
    x, ctx = torch.randn(4, 3, 16), torch.randn(4, 11, 8)
    with torch.no_grad():
        folded(x, ctx)
    assert calls == {"sdpa": 3, "math": 1}
    folded(x, ctx).sum().backward()
    assert calls == {"sdpa": 3, "math": 2}
    folded(x, ctx.requires_grad_()).sum().backward()
    assert calls == {"sdpa": 4, "math": 2}


def test_both_kernels_give_the_same_training_step(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(16, 8, heads=1, head_dim=32, num_kv_heads=1).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 13, 8, dtype=torch.float64)
    mask = torch.rand(1, 13) > 0.4
    mask[0, 0] = True
    grads = []
    for threads in (1, 8):  # 1 thread: SDPA; 8 threads: the math kernel
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        out = attn(x, ctx, mask)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (x, *attn.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_peak_memory_counts_allocations():
    def allocate() -> torch.Tensor:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # another 4 MiB while a is alive
        return b.sum()

    peak = peak_memory_mb(allocate)
    assert 7.9 <= peak <= 8.5, peak


def test_goals_table_marks_met_and_missed():
    import speed

    results = {
        "perceiver_io": {
            "ratios": {
                "transformers": {"train_speedup": 1.6, "forward_memory_ratio_at_memory_inputs": 0.6},
                "perceiver-pytorch": {"train_speedup": 1.2},
            }
        },
        "qlora": {"rows": {"4bit": {"total_ratio": 0.2, "linear_ratio": 0.14}}},
    }
    rows = {r["goal"]: r["met"] for r in speed.goals(results)}
    assert rows == {
        "Perceiver IO fwd+bwd vs transformers": True,
        "Perceiver IO fwd+bwd vs perceiver-pytorch": False,
        "Perceiver IO peak memory at 256k inputs vs transformers": False,
        "4-bit LM weights vs fp32": True,
    }
