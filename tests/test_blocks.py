"""FeedForward, norms and the two residual blocks: formulas, options, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resampler.nn.attention import AttentionSpec
from resampler.nn.blocks import (
    CrossAttentionBlock,
    FeedForward,
    FeedForwardSpec,
    NormSpec,
    SelfAttentionBlock,
    make_norm,
)

torch.manual_seed(0)


def test_feedforward_plain_and_gated_formulas():
    x = torch.randn(2, 3, 8)
    ff = FeedForward(8, FeedForwardSpec(mult=2.0))
    expected = F.gelu(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
    torch.testing.assert_close(ff(x), expected)
    gated = FeedForward(8, FeedForwardSpec(hidden_dim=5, gated=True, activation="silu", bias=False), out_dim=4)
    gate, up = gated.fc1.weight.split([5, 5])
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ gated.fc2.weight.T
    torch.testing.assert_close(gated(x), expected)
    assert gated(x).shape == (2, 3, 4)
    relu2 = FeedForward(8, FeedForwardSpec(mult=1.0, activation="relu2"))
    expected = F.relu(x @ relu2.fc1.weight.T + relu2.fc1.bias).square() @ relu2.fc2.weight.T + relu2.fc2.bias
    torch.testing.assert_close(relu2(x), expected)


def test_norm_choice():
    assert isinstance(make_norm("layernorm", 4), torch.nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 4), torch.nn.RMSNorm)
    assert make_norm(NormSpec("rmsnorm", 1e-3), 4).eps == 1e-3
    with pytest.raises(ValueError, match="layernorm"):
        make_norm("batchnorm", 4)


def test_cross_attention_block_is_prenorm_residual():
    block = CrossAttentionBlock(8, 6, AttentionSpec(heads=2, head_dim=4))
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = x + block.attn(block.norm_q(x), block.norm_kv(ctx))
    torch.testing.assert_close(block(x, ctx), h + block.ff(block.norm_ff(h)))


def test_cross_attention_block_without_query_residual_and_other_width():
    block = CrossAttentionBlock(8, 6, AttentionSpec(heads=2, head_dim=4), out_dim=3, query_residual=False)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = block.attn(block.norm_q(x), block.norm_kv(ctx))
    torch.testing.assert_close(block(x, ctx), h + block.ff(block.norm_ff(h)))
    with pytest.raises(ValueError, match="query_residual"):
        CrossAttentionBlock(8, 6, out_dim=3, query_residual=True)


def test_kv_includes_queries_is_the_call_site_concatenation():
    block = CrossAttentionBlock(8, 8, AttentionSpec(heads=2, head_dim=4), kv_includes_queries=True)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) > 0.3
    q = block.norm_q(x)
    kv = torch.cat([block.norm_kv(ctx), q], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    h = x + block.attn(q, kv, full_mask)
    torch.testing.assert_close(block(x, ctx, mask), h + block.ff(block.norm_ff(h)))
    # A context with every key masked still leaves the queries to attend to themselves: no zeros, no NaN.
    out = block(x, ctx, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_every_block_parameter_gets_a_gradient(norm):
    cross = CrossAttentionBlock(
        8, 6, AttentionSpec(heads=2, head_dim=4), FeedForwardSpec(gated=True, activation="silu"), NormSpec(norm)
    )
    selfb = SelfAttentionBlock(8, AttentionSpec(heads=2, num_kv_heads=1), norm=NormSpec(norm))
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    selfb(cross(x, ctx, torch.rand(2, 5) > 0.2)).sum().backward()
    for module in (cross, selfb):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _plain_projection(block, context, key_pos=None):
    return block.attn.project_kv(block.norm_kv(context), key_pos=key_pos)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("includes_queries", [False, True])
def test_frozen_context_is_projected_without_an_input_gradient(monkeypatch, norm, includes_queries):
    """A context that needs no gradient gets the norm's affine folded into to_kv: the same outputs and
    weight gradients as norm-then-project, with fewer backward FLOPs (no input gradient of that product)."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(
        16, 16, AttentionSpec(heads=2, head_dim=8), norm=NormSpec(norm), kv_includes_queries=includes_queries
    ).double()
    with torch.no_grad():  # non-trivial affines
        block.norm_kv.weight.normal_()
        if norm == "layernorm":
            block.norm_kv.bias.normal_()
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 40, 16, dtype=torch.float64)
    mask = torch.rand(2, 40) > 0.2

    def step():
        block.zero_grad()
        with FlopCounterMode(display=False) as flops:
            block(x, ctx, mask).square().sum().backward()
        return flops.get_total_flops(), [p.grad.clone() for p in block.parameters()]

    folded_flops, folded = step()
    monkeypatch.setattr(CrossAttentionBlock, "project_context", _plain_projection)
    plain_flops, plain = step()
    for got, want in zip(folded, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert folded_flops < plain_flops
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(block(x, ctx, mask), _reference_block(block, x, ctx, mask), rtol=1e-10, atol=1e-12)


def _reference_block(block, x, ctx, mask):
    q = block.norm_q(x)
    kv = block.norm_kv(ctx)
    if block.kv_includes_queries:
        kv, mask = torch.cat([kv, q], dim=1), torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    h = x + block.attn(q, kv, mask)
    return h + block.ff(block.norm_ff(h))
