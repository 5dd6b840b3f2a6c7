"""The attention kernels agree, and the one kernel policy picks what its docstring says."""

import pytest
import torch
import torch.nn.functional as F

from resampler.nn import kernels
from resampler.nn.attention import Attention
from resampler.nn.folded import FoldedAttention
from resampler.nn.kernels import choose_kernel, matmul_attention, reference_attention


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernels_match_float64_reference_with_gradients(heads, kv_heads, masked):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 9, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 5, 9) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query keeps a key (all-masked rows are Attention's job)
    weight = torch.randn(2, heads, 5, 12, dtype=torch.float64)
    results = []
    sdpa = lambda *a, scale, dropout: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads
    )
    for kernel in (matmul_attention, reference_attention, sdpa):
        out = kernel(q, k, v, mask, scale=0.25, dropout=0.0)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        results.append((out, grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(results[0][0], out, rtol=0, atol=1e-12)
        for got, want in zip(results[0][1], grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_policy(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    q = torch.randn(2, 1, 3, 8)
    k, v = torch.randn(2, 1, 7, 8), torch.randn(2, 1, 7, 8)
    trainable = [t.clone().requires_grad_() for t in (q, k, v)]
    assert choose_kernel(q, k, v, reference=True) == "reference"
    assert choose_kernel(q, k, v) == "sdpa"  # inference keeps SDPA whatever the shape
    assert choose_kernel(*trainable) == "matmul"  # training, B x H = 2 < 4 threads
    with torch.no_grad():
        assert choose_kernel(*trainable) == "sdpa"
    wide = [torch.randn(2, 2, 3, 8, requires_grad=True), *trainable[1:]]
    assert choose_kernel(*wide) == "sdpa"  # B x H = 4 >= 4 threads
    assert choose_kernel(wide[0], k, v) == "matmul"  # keys and values need no gradient: SDPA would compute it
    assert choose_kernel(*(t.to("meta") for t in wide)) == "sdpa"  # not CPU


def _count_kernels(monkeypatch) -> dict[str, int]:
    calls = {"sdpa": 0, "matmul": 0}
    sdpa, matmul = F.scaled_dot_product_attention, kernels.matmul_attention

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_matmul(*args, **kwargs):
        calls["matmul"] += 1
        return matmul(*args, **kwargs)

    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(kernels, "matmul_attention", counting_matmul)
    return calls


def test_modules_follow_the_policy(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    calls = _count_kernels(monkeypatch)
    attn = Attention(16, 8, heads=1, head_dim=32)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 11, 8)
    with torch.no_grad():
        attn(x, ctx)
    assert calls == {"sdpa": 1, "matmul": 0}
    attn(x, ctx).sum().backward()  # B x H = 2 < 4 threads
    assert calls == {"sdpa": 1, "matmul": 1}
    Attention(16, 8, heads=2, head_dim=8)(x, ctx).sum().backward()  # B x H = 4
    assert calls == {"sdpa": 2, "matmul": 1}
    # Folded (keys = values = the context): the heads attend as one head of H*Q queries, so B x 1 = 4
    # here; a frozen context needs no gradient, so training takes the matmul kernel.
    folded = FoldedAttention(16, 8, heads=2, head_dim=8)
    x, ctx = torch.randn(4, 3, 16), torch.randn(4, 11, 8)
    folded(x, ctx).sum().backward()
    assert calls == {"sdpa": 2, "matmul": 2}
    folded(x, ctx.requires_grad_()).sum().backward()
    assert calls == {"sdpa": 3, "matmul": 2}


def test_both_kernels_give_the_same_training_step(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(16, 8, heads=1, head_dim=32, num_kv_heads=1).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 13, 8, dtype=torch.float64)
    mask = torch.rand(1, 13) > 0.4
    mask[0, 0] = True
    grads = []
    for threads in (1, 8):  # 1 thread: SDPA; 8 threads: the matmul kernel
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        out = attn(x, ctx, mask)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (x, *attn.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
