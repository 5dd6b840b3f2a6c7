"""The field's resampler variants as options of one PerceiverResampler.

IDEFICS v1 against transformers' own module (weights copied by `from_idefics_perceiver`); the
MiniCPM-V / Qwen-VL one-layer resampler against its formula written with torch's
``nn.MultiheadAttention`` (what their remote code calls); per-head q/k norms and positions on
queries and keys only, against float64 formulas.
"""

import math

import pytest
import torch
from torch import nn

from resampler import Attention, AttentionSpec, PerceiverResampler, ResamplerConfig
from resampler.convert import from_idefics_perceiver
from resampler.nn.position import sincos_2d

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


# ------------------------------------------------------------------------------------- IDEFICS v1


def idefics_perceiver(qk_norms: bool, depth: int = 2):
    from transformers import IdeficsConfig
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    config = IdeficsConfig(
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 8, "num_hidden_layers": 1},
        perceiver_config={"qk_layer_norms_perceiver": qk_norms},
    )
    model = IdeficsPerceiverResampler(config, embed_dim=32, depth=depth, n_heads=4, head_dim=8, n_latents=5).eval()
    _randomize(model, seed=int(qk_norms))
    return model


@pytest.mark.parametrize("qk_norms", [False, True])
def test_idefics_perceiver_parity_outputs_and_gradients(qk_norms):
    theirs = idefics_perceiver(qk_norms)
    ours = from_idefics_perceiver(theirs)
    assert ours.config.qk_norm == ("layernorm" if qk_norms else None) and ours.config.ff_activation == "relu"
    context = torch.randn(3, 11, 32)
    torch.testing.assert_close(ours(context)[:, 0], theirs(context), **TOL)  # fp32, as converted
    ours, theirs, context = ours.double(), theirs.double(), context.double()  # gradients, free of fp32 noise
    want, got = theirs(context), ours(context)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(want)
    (want * weight).sum().backward()
    (got * weight).sum().backward()
    pairs = [(ours.latents, theirs.latents), (ours.norm.weight, theirs.layer_norm.weight)]
    pairs.append((ours.layers[0].attn.to_q.weight, theirs.blocks[0][0].q_proj.weight))
    if qk_norms:
        pairs.append((ours.layers[0].attn.k_norm.weight, theirs.blocks[0][0].k_layer_norm.weight))
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_idefics_converter_rejects_other_modules():
    with pytest.raises(TypeError, match="IdeficsPerceiverResampler"):
        from_idefics_perceiver(nn.Linear(2, 2))


# ------------------------------------------------------------------ MiniCPM-V / Qwen-VL resampler


def minicpm_config(kind: str, **kw) -> ResamplerConfig:
    return ResamplerConfig(
        dim=32,
        depth=1,
        num_latents=9,
        heads=4,
        head_dim=8,
        input_dim=24,
        norm_eps=1e-6,
        latents_in_keys=False,
        feed_forward=False,
        query_residual=False,
        qkv_bias=True,
        out_bias=True,
        out_dim=32,
        proj_bias=False,
        sincos_positions=kind,
        **kw,
    )


def minicpm_reference(ours: PerceiverResampler, x, grid, key_padding_mask=None, query_positions=True):
    """The MiniCPM-V / Qwen-VL formula, with nn.MultiheadAttention holding our weights."""
    layer = ours.layers[0]
    d = ours.dim
    mha = nn.MultiheadAttention(d, ours.config.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.attn.to_q.weight, layer.attn.to_kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([layer.attn.to_q.bias, layer.attn.to_kv.bias]))
        mha.out_proj.weight.copy_(layer.attn.to_out.weight)
        mha.out_proj.bias.copy_(layer.attn.to_out.bias)
    kv = layer.norm_kv(x @ ours.in_proj.weight.T)  # kv_proj, then ln_kv
    q = layer.norm_q(ours.latents).expand(x.shape[0], -1, -1)  # ln_q(query)
    side = math.isqrt(ours.num_latents)
    if query_positions:
        q = q + sincos_2d(side, side, d)
    out = mha(q, kv + sincos_2d(*grid, d), kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
    return ours.norm(out) @ ours.proj.weight.T  # ln_post, x @ proj


@pytest.mark.parametrize("kind, grid", [("queries_and_keys", (4, 4)), ("keys", (3, 5)), ("keys", (1, 7))])
def test_minicpm_qwen_resampler_is_its_formula(kind, grid):
    torch.manual_seed(0)
    ours = PerceiverResampler(minicpm_config(kind)).eval()
    _randomize(ours, seed=3)
    x = torch.randn(2, grid[0] * grid[1], 24)
    mask = torch.ones(2, x.shape[1], dtype=torch.bool)
    mask[1, -3:] = False  # the second image's last patches are padding
    want = minicpm_reference(ours, x, grid, ~mask, query_positions=kind == "queries_and_keys")
    got = ours(x, mask, grid=grid)[:, 0]
    torch.testing.assert_close(got, want, **TOL)


def test_minicpm_positions_reach_keys_but_never_values():
    """With identical patch features, only the positions tell patches apart: the keys differ, the
    values do not, so any attention mixture returns the same value, and the output cannot depend
    on where the patches sit. With distinct features it does depend on the grid."""
    torch.manual_seed(0)
    ours = PerceiverResampler(minicpm_config("keys")).eval()
    same = torch.randn(1, 1, 24).expand(2, 12, 24)
    a, b = ours(same, grid=(3, 4)), ours(same, grid=(2, 6))
    torch.testing.assert_close(a, b, **TOL)
    distinct = torch.randn(1, 12, 24)
    assert not torch.allclose(ours(distinct, grid=(3, 4)), ours(distinct, grid=(2, 6)), atol=1e-4)
    # Latents are not among the keys: with every patch masked there is nothing to attend to, the
    # attention gives exactly zero and the output is the norm of zero, whatever the latents are.
    empty = ours(distinct, torch.zeros(1, 12, dtype=torch.bool), grid=(3, 4))
    torch.testing.assert_close(empty, ours.proj(ours.norm(torch.zeros(1, 9, 32)))[:, None], **TOL)


def test_sincos_needs_a_grid_that_fits():
    ours = PerceiverResampler(minicpm_config("keys"))
    with pytest.raises(ValueError, match="do not form the grid"):
        ours(torch.randn(1, 12, 24))  # 12 patches are not square: say the grid
    with pytest.raises(ValueError, match="not a square"):
        minicpm_config("queries_and_keys").__class__(dim=8, num_latents=8, sincos_positions="queries_and_keys")


# --------------------------------------------------------------------- attention options, formulas


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_per_head_qk_norm_matches_float64_formula(kind):
    torch.manual_seed(0)
    attn = Attention(16, 12, AttentionSpec(heads=2, head_dim=8, qk_norm=kind)).double()
    _randomize(attn, seed=1)
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    q = (x @ attn.to_q.weight.T).view(2, 3, 2, 8).transpose(1, 2)
    k, v = (ctx @ attn.to_kv.weight.T).split([16, 16], dim=-1)
    k, v = k.view(2, 5, 2, 8).transpose(1, 2), v.view(2, 5, 2, 8).transpose(1, 2)

    def norm(t, module):
        if kind == "layernorm":
            t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + module.eps)
            return t * module.weight + module.bias
        return t / torch.sqrt(t.square().mean(-1, keepdim=True) + module.eps) * module.weight

    q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = (probs @ v).transpose(1, 2).reshape(2, 3, 16) @ attn.to_out.weight.T + attn.to_out.bias
    torch.testing.assert_close(attn(x, ctx), want, rtol=1e-10, atol=1e-12)


def test_positions_enter_queries_and_keys_only():
    torch.manual_seed(0)
    attn = Attention(16, 12, AttentionSpec(heads=2, head_dim=8, qkv_bias=True)).double()
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    qp, kp = torch.randn(3, 16, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    w_k, w_v = attn.to_kv.weight.split([16, 16])
    b_k, b_v = attn.to_kv.bias.split([16, 16])
    q = ((x + qp) @ attn.to_q.weight.T + attn.to_q.bias).view(2, 3, 2, 8).transpose(1, 2)
    k = ((ctx + kp) @ w_k.T + b_k).view(2, 5, 2, 8).transpose(1, 2)
    v = (ctx @ w_v.T + b_v).view(2, 5, 2, 8).transpose(1, 2)  # no positions in the values
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = (probs @ v).transpose(1, 2).reshape(2, 3, 16) @ attn.to_out.weight.T + attn.to_out.bias
    torch.testing.assert_close(attn(x, ctx, query_pos=qp, key_pos=kp), want, rtol=1e-10, atol=1e-12)
