"""`FoldedAttention` (queries taken into the context's space) equals `Attention` and the float64 formula."""

import pytest
import torch
from test_attention import MASKS, float64_attention, random_mask

from resampler.models.perceiver import PerceiverEncoder, PerceiverEncoderConfig
from resampler.nn.attention import Attention, AttentionSpec
from resampler.nn.blocks import CrossAttentionBlock, NormSpec
from resampler.nn.folded import FoldedAttention, fold_pays

SHAPES = [
    {},
    {"v_head_dim": 10, "out_dim": 7},  # qk width != v width
    {"num_kv_heads": 2},  # grouped key/value heads: query head i folds through key head i // 2
    {"num_kv_heads": 1, "qkv_bias": False, "out_bias": False},
]


def twins(**kw) -> tuple[FoldedAttention, Attention]:
    """The same weights twice, folded and projected (float64, so differences are the method's)."""
    torch.manual_seed(0)
    defaults = dict(heads=4, head_dim=6, qkv_bias=True)
    defaults.update(kw)
    folded = FoldedAttention(24, 20, **defaults).double()
    projected = Attention(24, 20, **defaults).double()
    projected.load_state_dict(folded.state_dict())
    return folded, projected


def outputs_and_grads(attn: Attention, x, ctx, mask, weight):
    x, ctx = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    out = attn(x, ctx, mask)
    params = [p for _, p in sorted(attn.named_parameters())]
    grads = torch.autograd.grad((out * weight).sum(), [x, ctx, *params])
    return out, grads


@pytest.mark.parametrize("threads", [1, 64])  # 64: B x H < threads, so training takes the matmul kernel
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("kw", SHAPES)
def test_folded_equals_projected_and_float64_formula(kw, mask_kind, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
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


def test_folded_padding_may_hold_nan():
    folded, _ = twins()
    x, ctx = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 9, 20, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    nan_ctx = ctx.clone()
    nan_ctx[:, 6:] = float("nan")
    assert torch.equal(folded(x, nan_ctx, mask), folded(x, ctx.masked_fill(~mask[..., None], 0.0), mask))


def test_dropout_with_a_value_bias_cannot_fold():
    # Dropped probabilities do not sum to 1, so the value bias would not factor out of P v.
    assert not fold_pays(AttentionSpec(heads=1, head_dim=1024, qkv_bias=True, dropout=0.1), 512, 261)
    assert fold_pays(AttentionSpec(heads=1, head_dim=1024, qkv_bias=False, dropout=0.1), 512, 261)
    with pytest.raises(ValueError, match="dropout with a value bias"):
        FoldedAttention(24, 20, heads=2, head_dim=6, qkv_bias=True, dropout=0.5)
    # (P dropped) (x Wv) = ((P dropped) x) Wv holds without a bias: same gradients as projected.
    torch.manual_seed(0)
    folded = FoldedAttention(24, 20, heads=2, head_dim=6, dropout=0.5).double().train()
    projected = Attention(24, 20, heads=2, head_dim=6, dropout=0.5).double().train()
    projected.load_state_dict(folded.state_dict())
    x, ctx = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 9, 20, dtype=torch.float64)
    torch.manual_seed(1)
    a = folded(x, ctx)
    torch.manual_seed(1)
    b = projected(x, ctx)
    assert a.shape == b.shape and torch.isfinite(a).all()  # (dropout masks differ in layout: no equality)


def test_the_choice_is_made_at_construction_by_counting_multiply_adds():
    # A Perceiver encoder's cross-attend (50k pixels x 261 channels, one head): folding does ~1/6 the work.
    assert fold_pays(AttentionSpec(heads=1, head_dim=1024), 512, 261)
    # Self-attention and a decoder's queries over few wide latents: projecting is cheaper.
    assert not fold_pays(AttentionSpec(heads=8, head_dim=64), 512, 512)
    assert not fold_pays(AttentionSpec(heads=8, head_dim=128), 50_176, 1024)
    pixels = PerceiverEncoder(PerceiverEncoderConfig(input_dim=261, num_latents=512, latent_dim=1024))
    assert isinstance(pixels.cross_attends[0].attn, FoldedAttention)
    # 8 heads of 8 over 512 channels: mapping each of the 8 x 16 queries into the input space costs more.
    wide = PerceiverEncoderConfig(
        input_dim=512, num_latents=16, latent_dim=64, cross_heads=8, cross_qk_from="q", self_heads=4
    )
    assert type(PerceiverEncoder(wide).cross_attends[0].attn) is Attention
    reference = PerceiverEncoderConfig(input_dim=261, num_latents=512, latent_dim=1024, use_sdpa=False)
    assert not reference.folds_cross_attention  # the reference kernel checks the projected form
    forced = PerceiverEncoderConfig(
        input_dim=512, num_latents=16, latent_dim=64, cross_heads=8, cross_qk_from="q", fold_cross_attention=True
    )
    assert forced.folds_cross_attention


def test_folded_block_never_projects_the_context(monkeypatch):
    block = CrossAttentionBlock(32, 8, AttentionSpec(heads=1, head_dim=32), fold=True)
    projected = []
    original = Attention.project_kv
    monkeypatch.setattr(Attention, "project_kv", lambda self, *a: projected.append(a) or original(self, *a))
    block(torch.randn(2, 4, 32), torch.randn(2, 300, 8)).sum().backward()
    assert projected == []
    with pytest.raises(ValueError, match="cannot include the queries"):
        CrossAttentionBlock(8, 8, fold=True, kv_includes_queries=True)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("frozen_context", [True, False])
def test_folded_block_takes_its_norm_into_the_weights_and_matches(norm, frozen_context):
    torch.manual_seed(0)
    spec, norm_spec = AttentionSpec(heads=2, head_dim=16, qkv_bias=True), NormSpec(norm)
    folded = CrossAttentionBlock(32, 6, spec, norm=norm_spec, fold=True).double()
    projected = CrossAttentionBlock(32, 6, spec, norm=norm_spec).double()
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
