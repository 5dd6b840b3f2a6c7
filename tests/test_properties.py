"""Property tests (hypothesis) of the masks and padding contracts of `Attention`, `CrossAttentionBlock`
and `PerceiverResampler`: random shapes, random masks and random padding give finite outputs of the
promised shape, exactly-zero rows for queries without keys, and the same result for the real tokens
whatever the padding holds. Float64 makes "the same" mean equal to ~1e-12, not "close-ish".

Bounded and reproducible: every test draws a fixed number of derandomized examples, no deadline.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resampler import Attention, AttentionSpec, CrossAttentionBlock, PerceiverResampler, ResamplerConfig

PROPS = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _insert_padding(
    x: torch.Tensor, mask: torch.Tensor, pads: int, gen: torch.Generator, dim: int, mask_dim=None, fill=None
):
    """Insert ``pads`` garbage positions (large random values, or ``fill``) at random places along ``dim``
    of x and ``mask_dim`` (default ``dim``) of the mask; returns padded x and mask (False at the pads)."""
    n = x.shape[dim]
    real_slots = torch.randperm(n + pads, generator=gen)[:n].sort().values  # where real positions land

    def spread(t: torch.Tensor, d: int, fill: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        shape[d] = n + pads
        return fill.reshape(-1)[: torch.Size(shape).numel()].reshape(shape).index_copy(d, real_slots, t)

    garbage = torch.randn(x.numel() // n * (n + pads), generator=gen, dtype=x.dtype) * 1e4
    if fill is not None:
        garbage = torch.full_like(garbage, fill)
    no = torch.zeros(mask.numel() // n * (n + pads), dtype=torch.bool)
    return spread(x, dim, garbage), spread(mask, dim if mask_dim is None else mask_dim, no)


# ----------------------------------------------------------------------------------------------
# Attention


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return {
        "b": draw(st.integers(1, 3)),
        "q": draw(st.integers(1, 6)),
        "m": draw(st.integers(1, 7)),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": draw(st.sampled_from([1, 3, 8])),
        "q_dim": draw(st.integers(1, 12)),
        "kv_dim": draw(st.integers(1, 12)),
        "mask_rank": draw(st.sampled_from([None, 2, 3, 4])),
        "broadcast": draw(st.booleans()),
        "p_keep": draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        "sdpa": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _attention(case) -> Attention:
    torch.manual_seed(case["seed"])
    return Attention(
        case["q_dim"],
        case["kv_dim"],
        heads=case["heads"],
        head_dim=case["head_dim"],
        num_kv_heads=case["kv_heads"],
        qkv_bias=True,
        use_sdpa=case["sdpa"],
        dtype=F64,
    )


def _random_mask(case, gen, m=None) -> torch.Tensor | None:
    b, q, h, m = case["b"], case["q"], case["heads"], case["m"] if m is None else m
    if case["mask_rank"] is None:
        return None
    shape = {2: (b, m), 3: (b, q, m), 4: (b, h, q, m)}[case["mask_rank"]]
    if case["broadcast"] and case["mask_rank"] > 2:
        shape = (shape[0], 1, *shape[2:]) if case["mask_rank"] == 4 else (shape[0], 1, m)
    return torch.rand(shape, generator=gen) < case["p_keep"]


@PROPS
@given(attention_cases())
def test_attention_shapes_finiteness_and_empty_rows(case):
    gen = _gen(case["seed"])
    attn = _attention(case)
    x = torch.randn(case["b"], case["q"], case["q_dim"], generator=gen, dtype=F64)
    ctx = torch.randn(case["b"], case["m"], case["kv_dim"], generator=gen, dtype=F64, requires_grad=True)
    mask = _random_mask(case, gen)
    out = attn(x, ctx, mask)
    assert out.shape == (case["b"], case["q"], case["q_dim"]) and out.dtype == F64
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(ctx.grad).all()
    if mask is not None:
        full = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None] if mask.dim() == 3 else mask
        full = full.expand(case["b"], case["heads"], case["q"], case["m"])
        empty = ~full.any(-1).any(1)  # (B, Q): no key in any head
        assert torch.all(out[empty] == 0)
    # chunked or not, SDPA or the plain path: the same function, masks included
    for sdpa in (True, False):
        other = _attention({**case, "sdpa": sdpa, "chunk": None})
        other.load_state_dict(attn.state_dict())
        torch.testing.assert_close(other(x, ctx, mask), out, **TOL)


@PROPS
@given(attention_cases(), st.integers(1, 5))
def test_attention_padding_anywhere_changes_nothing(case, pads):
    case = {**case, "mask_rank": 2 if case["mask_rank"] in (None, 2) else 3, "broadcast": False}
    gen = _gen(case["seed"])
    attn = _attention(case)
    x = torch.randn(case["b"], case["q"], case["q_dim"], generator=gen, dtype=F64)
    ctx = torch.randn(case["b"], case["m"], case["kv_dim"], generator=gen, dtype=F64)
    mask = _random_mask(case, gen)  # (B, M) key padding or (B, Q, M) per query
    padded, pmask = _insert_padding(ctx, mask, pads, gen, dim=1, mask_dim=mask.dim() - 1)
    torch.testing.assert_close(attn(x, padded, pmask), attn(x, ctx, mask), **TOL)


# ----------------------------------------------------------------------------------------------
# CrossAttentionBlock


@PROPS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 5),
    m=st.integers(1, 7),
    pads=st.integers(0, 5),
    includes_queries=st.booleans(),
    p_keep=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cross_attention_block_padding_and_empty_contexts(b, n, m, pads, includes_queries, p_keep, seed):
    gen = _gen(seed)
    torch.manual_seed(seed)
    dim = 8
    spec = AttentionSpec(heads=2, head_dim=4)
    block = CrossAttentionBlock(dim, dim, spec, kv_includes_queries=includes_queries, dtype=F64)
    x = torch.randn(b, n, dim, generator=gen, dtype=F64)
    ctx = torch.randn(b, m, dim, generator=gen, dtype=F64)
    mask = torch.rand(b, m, generator=gen) < p_keep
    out = block(x, ctx, mask)
    assert out.shape == (b, n, dim) and torch.isfinite(out).all()
    padded, pmask = _insert_padding(ctx, mask, pads, gen, dim=1)
    torch.testing.assert_close(block(x, padded, pmask), out, **TOL)
    if not includes_queries:  # no key at all: the attention adds exactly nothing, only the MLP acts
        empty = ~mask.any(-1)
        h = x[empty]
        torch.testing.assert_close(out[empty], h + block.ff(block.norm_ff(h)), **TOL)


# ----------------------------------------------------------------------------------------------
# PerceiverResampler


@st.composite
def resampler_cases(draw):
    return {
        "rank": draw(st.sampled_from([3, 4, 5])),
        "b": draw(st.integers(1, 2)),
        "t": draw(st.integers(1, 3)),
        "f": draw(st.integers(1, 2)),
        "p": draw(st.integers(1, 6)),
        "latents": draw(st.integers(1, 4)),
        "depth": draw(st.integers(1, 2)),
        "heads": draw(st.sampled_from([1, 2])),
        "out_dim": draw(st.sampled_from([None, 5])),
        "p_keep": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _resampler(case, dim=8, **kw) -> PerceiverResampler:
    torch.manual_seed(case["seed"])
    config = ResamplerConfig(
        dim=dim,
        depth=case["depth"],
        num_latents=case["latents"],
        heads=case["heads"],
        head_dim=4,
        out_dim=case["out_dim"],
        norm=case["norm"],
        **kw,
    )
    return PerceiverResampler(config, dtype=F64)


def _media(case, gen, dim=8):
    lead = {3: (case["b"], case["p"]), 4: (case["b"], case["t"], case["p"]), 5: tuple(case[k] for k in "btfp")}
    shape = lead[case["rank"]]
    x = torch.randn(*shape, dim, generator=gen, dtype=F64)
    return x, torch.rand(shape, generator=gen) < case["p_keep"]


@PROPS
@given(resampler_cases(), st.integers(1, 4), st.sampled_from([None, float("nan"), float("inf")]))
def test_resampler_shape_contract_finiteness_and_padding(case, pads, fill):
    gen = _gen(case["seed"])
    model = _resampler(case)
    x, mask = _media(case, gen)
    out = model(x, mask)
    t = 1 if case["rank"] == 3 else case["t"]
    assert out.shape == (case["b"], t, case["latents"], case["out_dim"] or 8)
    assert torch.isfinite(out).all()  # media with every patch masked still give defined latents
    # pad the patch axis, with garbage or non-finite values (uninitialised memory): nothing leaks
    padded, pmask = _insert_padding(x, mask, pads, gen, dim=x.dim() - 2, fill=fill)
    torch.testing.assert_close(model(padded, pmask), out, **TOL)


@PROPS
@given(resampler_cases())
def test_resampler_patch_order_and_absent_media(case):
    case = {**case, "rank": 4}
    gen = _gen(case["seed"])
    model = _resampler(case)
    x, mask = _media(case, gen)
    out = model(x, mask)
    perm = torch.randperm(case["p"], generator=gen)  # no position embeddings: a set of patches
    torch.testing.assert_close(model(x[:, :, perm], mask[:, :, perm]), out, **TOL)
    present = torch.rand(case["b"], case["t"], generator=gen) < 0.5
    gated = model(x, mask, media_mask=present)
    assert torch.all(gated[~present] == 0)
    torch.testing.assert_close(gated[present], out[present], **TOL)
