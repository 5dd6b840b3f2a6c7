"""Folded attention (queries taken into the context's space) equals projected attention and the formula."""

import pytest
import torch
from test_attention import MASKS, float64_attention, random_mask
from torch import nn

from resampler import attention as attention_module
from resampler.attention import Attention
from resampler.blocks import CrossAttentionBlock

SHAPES = [
    {},
    {"v_head_dim": 10, "out_dim": 7},  # qk width != v width
    {"num_kv_heads": 2},  # grouped key/value heads: query head i folds through key head i // 2
    {"num_kv_heads": 1, "qkv_bias": False, "out_bias": False},
]


def twins(**kw) -> tuple[Attention, Attention]:
    """The same weights twice: one always folds, one never does (float64, so differences are the method's)."""
    torch.manual_seed(0)
    defaults = dict(heads=4, head_dim=6, qkv_bias=True)
    defaults.update(kw)
    folded = Attention(24, 20, fold_kv=True, **defaults).double()
    projected = Attention(24, 20, fold_kv=False, **defaults).double()
    projected.load_state_dict(folded.state_dict())
    return folded, projected


def outputs_and_grads(attn: Attention, x, ctx, mask, weight):
    x, ctx = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    out = attn(x, ctx, mask)
    params = [p for _, p in sorted(attn.named_parameters())]
    grads = torch.autograd.grad((out * weight).sum(), [x, ctx, *params])
    return out, grads


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("kw", SHAPES)
def test_folded_equals_projected_and_float64_formula(kw, mask_kind, kernel, monkeypatch):
    if kernel == "math":  # the training kernel Attention picks when batch x heads < threads
        monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    folded, projected = twins(**kw)
    x, ctx = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(3, 9, 20, dtype=torch.float64)
    mask = MASKS[mask_kind](3, folded.heads, 5, 9)
    weight = torch.randn(3, 5, folded.out_dim, dtype=torch.float64)
    out_f, grads_f = outputs_and_grads(folded, x, ctx, mask, weight)
    out_p, grads_p = outputs_and_grads(projected, x, ctx, mask, weight)
    torch.testing.assert_close(out_f, float64_attention(folded, x, ctx, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=1e-12)
    # Inputs and every weight, the key bias included: its true gradient is zero (softmax ignores a
    # per-query constant); the folded form never uses it, the projected one gets rounding noise.
    for got, want in zip(grads_f, grads_p):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_fold_in_float32_matches_projected_at_1e5():
    folded, projected = twins(num_kv_heads=2)
    folded, projected = folded.float(), projected.float()
    x, ctx = torch.randn(2, 16, 24), torch.randn(2, 300, 20)
    mask = random_mask((2, 300))
    torch.testing.assert_close(folded(x, ctx, mask), projected(x, ctx, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("full_mask", [False, True])
def test_folded_fully_masked_rows_are_zero_with_finite_gradients(full_mask):
    folded, projected = twins()
    x, ctx = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(3, 7, 20, dtype=torch.float64)
    mask = random_mask((3, 5, 7)) if full_mask else random_mask((3, 7))
    if full_mask:
        mask[1, 2] = False  # one query of one example sees nothing
        dead = (1, 2)
    else:
        mask[1] = False  # a whole example without keys
        dead = (1, slice(None))
    weight = torch.randn(3, 5, 24, dtype=torch.float64)
    out, grads = outputs_and_grads(folded, x, ctx, mask, weight)
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert all(torch.isfinite(g).all() for g in grads)
    out_p, grads_p = outputs_and_grads(projected, x, ctx, mask, weight)
    torch.testing.assert_close(out, out_p, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_p):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_folded_query_chunking_equals_unchunked():
    folded, _ = twins(num_kv_heads=2)
    x, ctx = torch.randn(2, 37, 24, dtype=torch.float64), torch.randn(2, 50, 20, dtype=torch.float64)
    for mask in [None, random_mask((2, 50)), random_mask((2, 37, 50)), random_mask((2, 4, 37, 50))]:
        folded.query_chunk_size = None
        whole = folded(x, ctx, mask)
        folded.query_chunk_size = 8  # chunks of the H*Q folded rows
        torch.testing.assert_close(folded(x, ctx, mask), whole, rtol=0, atol=1e-12)


def test_dropout_with_a_value_bias_folds_only_at_inference():
    attn = Attention(24, 20, heads=2, head_dim=6, qkv_bias=True, dropout=0.5, fold_kv=True)
    assert not attn.train()._folds(5, 9)  # dropped probabilities do not sum to 1: the bias would be wrong
    assert attn.eval()._folds(5, 9)
    no_bias = Attention(24, 20, heads=2, head_dim=6, qkv_bias=False, dropout=0.5, fold_kv=True)
    assert no_bias.train()._folds(5, 9)  # (P dropped) (x Wv) = ((P dropped) x) Wv holds without a bias


def test_automatic_choice_counts_multiply_adds():
    # A Perceiver encoder's cross-attend (50k pixels x 261 channels, one head): folding does ~1/6 the work.
    encoder = CrossAttentionBlock(1024, 261, heads=1, head_dim=1024).attn
    assert encoder._folds(512, 50_176)
    # Self-attention and the decoder's queries over few wide latents: projecting is cheaper.
    assert not Attention(512, heads=8, head_dim=64)._folds(512, 512)
    assert not Attention(512, 1024, heads=8, head_dim=128)._folds(50_176, 512)
    # Switched off, on the reference path, or when to_kv is not a plain Linear (LoRA, int8).
    assert not Attention(1024, 261, heads=1, head_dim=1024, fold_kv=False)._folds(512, 50_176)
    assert not Attention(1024, 261, heads=1, head_dim=1024, use_sdpa=False)._folds(512, 50_176)
    wrapped = Attention(1024, 261, heads=1, head_dim=1024)
    wrapped.to_kv = nn.Sequential(wrapped.to_kv)
    assert not wrapped._folds(512, 50_176)


def test_folded_path_never_projects_the_context(monkeypatch):
    attn = Attention(32, 8, heads=1, head_dim=32)  # long, narrow context: chosen automatically
    projected = []
    monkeypatch.setattr(attn, "project_kv", lambda ctx: projected.append(ctx) or Attention.project_kv(attn, ctx))
    attn(torch.randn(2, 4, 32), torch.randn(2, 300, 8)).sum().backward()
    assert projected == []
    attn.fold_kv = False
    attn(torch.randn(2, 4, 32), torch.randn(2, 300, 8))
    assert len(projected) == 1


def test_kv_cache_and_prefix_keys_use_the_projected_path(monkeypatch):
    calls = []
    monkeypatch.setattr(Attention, "attend_folded", lambda *a: calls.append(a))
    attn = Attention(16, 8, heads=2, head_dim=8, fold_kv=True)
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 5, 8)
    attn(x, ctx, cache=attention_module.KVCache())
    prefix = (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    attn(x, ctx, prefix_kv=prefix)
    assert calls == []


@pytest.mark.parametrize("kw", SHAPES)
def test_context_affine_equals_applying_it(kw):
    folded, projected = twins(**kw)
    x, ctx = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 9, 20, dtype=torch.float64)
    scale = torch.randn(20, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(20, dtype=torch.float64, requires_grad=True)
    mask = random_mask((2, 9))
    weight = torch.randn(2, 5, folded.out_dim, dtype=torch.float64)
    results = []
    for attn, affine in [(folded, (scale, shift)), (projected, (scale, shift)), (folded, None)]:
        out = attn(x, ctx, mask, context_affine=affine) if affine else attn(x, ctx * scale + shift, mask)
        results.append((out, torch.autograd.grad((out * weight).sum(), [scale, shift, *attn.parameters()])))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=1e-12)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("frozen_context", [True, False])
def test_cross_attention_block_folds_its_norm_and_matches(norm, frozen_context):
    torch.manual_seed(0)
    kw = dict(heads=2, head_dim=16, norm=norm, qkv_bias=True)
    folded = CrossAttentionBlock(32, 6, fold_kv=True, **kw).double()
    projected = CrossAttentionBlock(32, 6, fold_kv=False, **kw).double()
    with torch.no_grad():  # affines away from (1, 0), so that folding them matters
        for p in folded.parameters():
            p.add_(0.3 * torch.randn_like(p))
    projected.load_state_dict(folded.state_dict())
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    ctx = torch.randn(3, 40, 6, dtype=torch.float64, requires_grad=not frozen_context)
    mask = random_mask((3, 40))
    weight = torch.randn(3, 4, 32, dtype=torch.float64)
    results = []
    for block in (folded, projected):
        out = block(x, ctx, mask)
        inputs = [*block.parameters()] + ([] if frozen_context else [ctx])
        results.append((out, torch.autograd.grad((out * weight).sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
