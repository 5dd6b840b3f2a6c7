"""FeedForward, norms and the two residual blocks: formulas, options, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F

from resampler.blocks import CrossAttentionBlock, FeedForward, SelfAttentionBlock, make_norm

torch.manual_seed(0)


def test_feedforward_plain_and_gated_formulas():
    x = torch.randn(2, 3, 8)
    ff = FeedForward(8, 2.0)
    expected = F.gelu(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
    torch.testing.assert_close(ff(x), expected)
    gated = FeedForward(8, hidden_dim=5, gated=True, activation="silu", bias=False, out_dim=4)
    gate, up = gated.fc1.weight.split([5, 5])
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ gated.fc2.weight.T
    torch.testing.assert_close(gated(x), expected)
    assert gated(x).shape == (2, 3, 4)


def test_norm_choice():
    assert isinstance(make_norm("layernorm", 4), torch.nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 4), torch.nn.RMSNorm)
    with pytest.raises(ValueError, match="layernorm"):
        make_norm("batchnorm", 4)


def test_cross_attention_block_is_prenorm_residual():
    block = CrossAttentionBlock(8, 6, heads=2, head_dim=4)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = x + block.attn(block.norm_q(x), block.norm_kv(ctx))
    torch.testing.assert_close(block(x, ctx), h + block.ff(block.norm_ff(h)))


def test_cross_attention_block_without_query_residual_and_other_width():
    block = CrossAttentionBlock(8, 6, heads=2, head_dim=4, out_dim=3, query_residual=False)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = block.attn(block.norm_q(x), block.norm_kv(ctx))
    torch.testing.assert_close(block(x, ctx), h + block.ff(block.norm_ff(h)))
    with pytest.raises(ValueError, match="query_residual"):
        CrossAttentionBlock(8, 6, out_dim=3, query_residual=True)


def test_kv_includes_queries_is_the_call_site_concatenation():
    block = CrossAttentionBlock(8, 8, heads=2, head_dim=4, kv_includes_queries=True)
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
    cross = CrossAttentionBlock(8, 6, heads=2, head_dim=4, norm=norm, ff_gated=True, ff_activation="silu")
    selfb = SelfAttentionBlock(8, heads=2, num_kv_heads=1, norm=norm)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    selfb(cross(x, ctx, torch.rand(2, 5) > 0.2)).sum().backward()
    for module in (cross, selfb):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
