"""The shared attention core against a float64 formula, plus masks, GQA, chunking, cache and errors."""

import math

import pytest
import torch

from resampler.nn.attention import Attention, KVCache, causal_mask

torch.manual_seed(0)


def float64_attention(attn: Attention, x, context, mask=None):
    """softmax(q k^T / sqrt(dh)) v straight from the weights, in float64, heads by hand."""
    x, context = x.double(), context.double()
    wq, wkv, wo = attn.to_q.weight.double(), attn.to_kv.weight.double(), attn.to_out.weight.double()
    bq = attn.to_q.bias.double() if attn.to_q.bias is not None else 0
    bkv = attn.to_kv.bias.double() if attn.to_kv.bias is not None else 0
    bo = attn.to_out.bias.double() if attn.to_out.bias is not None else 0
    h, hkv, dh, dv = attn.heads, attn.num_kv_heads, attn.head_dim, attn.v_head_dim
    q = x @ wq.T + bq
    kv = context @ wkv.T + bkv
    k, v = kv[..., : hkv * dh], kv[..., hkv * dh :]
    b, nq, nk = x.shape[0], x.shape[1], context.shape[1]
    outs = []
    for head in range(h):
        g = head // (h // hkv)  # the kv head this query head reads
        qh = q[..., head * dh : (head + 1) * dh]
        kh = k[..., g * dh : (g + 1) * dh]
        vh = v[..., g * dv : (g + 1) * dv]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(dh)  # (B, Q, M)
        if mask is not None:
            m = mask
            if m.dim() == 2:
                m = m[:, None, :]
            elif m.dim() == 4:
                m = m[:, head]
            m = m.expand(b, nq, nk)
            scores = scores.masked_fill(~m, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(probs @ vh)
    return torch.cat(outs, dim=-1) @ wo.T + bo


def make(q_dim=24, kv_dim=20, **kw):
    defaults = dict(heads=4, head_dim=6, qkv_bias=True)
    defaults.update(kw)
    return Attention(q_dim, kv_dim, **defaults)


def random_mask(shape, p=0.6):
    mask = torch.rand(shape) < p
    mask[..., 0] = True  # every row keeps at least one key here
    return mask


MASKS = {
    "none": lambda b, h, q, m: None,
    "key_padding": lambda b, h, q, m: random_mask((b, m)),
    "full": lambda b, h, q, m: random_mask((b, q, m)),
    "per_head": lambda b, h, q, m: random_mask((b, h, q, m)),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"v_head_dim": 10, "out_dim": 7},  # separate qk / v widths (Perceiver qk_channels != v_channels)
        {"num_kv_heads": 2},  # grouped key/value heads
        {"num_kv_heads": 1, "qkv_bias": False, "out_bias": False},
    ],
)
def test_sdpa_and_reference_match_float64_formula(mask_kind, kw):
    attn = make(**kw)
    x, ctx = torch.randn(3, 5, 24), torch.randn(3, 9, 20)
    mask = MASKS[mask_kind](3, attn.heads, 5, 9)
    expected = float64_attention(attn, x, ctx, mask)
    fast = attn(x, ctx, mask)
    reference = make(use_sdpa=False, **kw)
    reference.load_state_dict(attn.state_dict())
    slow = reference(x, ctx, mask)
    torch.testing.assert_close(fast.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_gqa_equals_repeated_heads():
    gqa = make(heads=6, num_kv_heads=2)
    full = make(heads=6, num_kv_heads=6)
    with torch.no_grad():
        full.to_q.load_state_dict(gqa.to_q.state_dict())
        full.to_out.load_state_dict(gqa.to_out.state_dict())
        k_w, v_w = gqa.to_kv.weight.split([2 * 6, 2 * 6])
        k_b, v_b = gqa.to_kv.bias.split([2 * 6, 2 * 6])

        def repeat(t):  # (2 kv heads * 6, ...) -> (6 heads * 6, ...), head h reads kv head h // 3
            return t.view(2, 6, *t.shape[1:]).repeat_interleave(3, dim=0).reshape(36, *t.shape[1:])

        full.to_kv.weight.copy_(torch.cat([repeat(k_w), repeat(v_w)]))
        full.to_kv.bias.copy_(torch.cat([repeat(k_b), repeat(v_b)]))
    x, ctx = torch.randn(2, 4, 24), torch.randn(2, 11, 20)
    mask = random_mask((2, 11))
    torch.testing.assert_close(gqa(x, ctx, mask), full(x, ctx, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_appending_masked_keys_changes_nothing(use_sdpa):
    attn = make(use_sdpa=use_sdpa)
    x, ctx = torch.randn(2, 5, 24), torch.randn(2, 7, 20)
    mask = random_mask((2, 7))
    base = attn(x, ctx, mask)
    padded_ctx = torch.cat([ctx, 100 * torch.randn(2, 13, 20)], dim=1)  # garbage in the padding
    padded_mask = torch.cat([mask, torch.zeros(2, 13, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(attn(x, padded_ctx, padded_mask), base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("full_mask", [False, True])
def test_fully_masked_rows_are_zero_with_finite_gradients(use_sdpa, full_mask):
    attn = make(use_sdpa=use_sdpa)
    x = torch.randn(3, 5, 24, requires_grad=True)
    ctx = torch.randn(3, 7, 20, requires_grad=True)
    if full_mask:
        mask = random_mask((3, 5, 7))
        mask[1, 2] = False  # one query of one example sees nothing
        dead = (1, 2)
    else:
        mask = random_mask((3, 7))
        mask[1] = False  # a whole example without keys
        dead = (1, slice(None))
    out = attn(x, ctx, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    out.square().sum().backward()
    for t in [x.grad, ctx.grad, *(p.grad for p in attn.parameters())]:
        assert torch.isfinite(t).all()
    # The live rows are unaffected by the dead one.
    live = attn(x[:1], ctx[:1], mask[:1])
    torch.testing.assert_close(out[:1], live, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("layout", ["key_padding", "full", "per_head"])
def test_nan_and_inf_in_padding_never_leak(use_sdpa, layout):
    """Context rows no query attends to may hold anything: the output and every gradient are exactly
    those of zero padding (today a plain softmax(q k^T) v gives NaN: probability 0 x NaN value)."""
    attn = make(use_sdpa=use_sdpa)
    x = torch.randn(2, 5, 24)
    ctx = torch.randn(2, 9, 20)
    padded = torch.zeros(2, 9, dtype=torch.bool)
    padded[0, 6:], padded[1, 3:] = True, True
    mask = {
        "key_padding": ~padded,
        "full": (~padded)[:, None, :].expand(2, 5, 9).clone(),
        "per_head": (~padded)[:, None, None, :].expand(2, attn.heads, 5, 9).clone(),
    }[layout]
    if layout != "key_padding":
        mask[0, 1, 0] = False  # some keys masked for one query only: still attended by the others
    results = []
    for fill in (0.0, float("nan"), float("inf"), -float("inf"), 1e30):
        attn.zero_grad()
        c = ctx.masked_fill(padded[..., None], fill).requires_grad_()
        out = attn(x, c, mask)
        out.square().sum().backward()
        grads = [c.grad[~padded], *(p.grad.clone() for p in attn.parameters())]
        results.append((out, grads))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for got, want in zip(grads, results[0][1]):
            assert torch.equal(got, want)
    assert torch.isfinite(results[0][0]).all()


def test_every_parameter_gets_a_gradient():
    attn = make(num_kv_heads=2, dropout=0.1)
    attn.train()
    x, ctx = torch.randn(2, 5, 24), torch.randn(2, 7, 20)
    attn(x, ctx, random_mask((2, 7))).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_self_attention_and_causal_mask():
    attn = Attention(16, heads=2, head_dim=8)
    x = torch.randn(2, 6, 16)
    mask = causal_mask(6, 6)
    out = attn(x, mask=mask[None])
    # position i must not depend on positions > i
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)
    torch.testing.assert_close(attn(x2, mask=mask[None])[:, :4], out[:, :4])
    # bottom-right alignment: the last 2 of 6 positions as queries
    assert causal_mask(2, 6).tolist() == [[True] * 5 + [False], [True] * 6]


def test_kv_cache_incremental_equals_full_causal():
    attn = Attention(16, heads=4, head_dim=4, num_kv_heads=2)
    x = torch.randn(2, 7, 16)
    full = attn(x, mask=causal_mask(7, 7)[None])
    cache = KVCache()
    prefix = attn(x[:, :4], mask=causal_mask(4, 4)[None], cache=cache)
    steps = [prefix]
    for i in range(4, 7):
        steps.append(attn(x[:, i : i + 1], cache=cache))
    assert len(cache) == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a: a(torch.randn(2, 5, 23), torch.randn(2, 7, 20)), r"\(B, Q, q_dim=24\)"),
        (lambda a: a(torch.randn(2, 5, 24), torch.randn(2, 7, 21)), r"\(B, M, kv_dim=20\)"),
        (lambda a: a(torch.randn(5, 24), torch.randn(2, 7, 20)), r"\(B, Q, q_dim=24\)"),
        (lambda a: a(torch.randn(2, 5, 24), torch.randn(3, 7, 20)), "batch size"),
        (lambda a: a(torch.randn(2, 5, 24)), "context is required"),
        (lambda a: a(torch.randn(2, 5, 24), torch.randn(2, 7, 20), torch.ones(2, 8, dtype=torch.bool)), r"\(2, 7\)"),
        (lambda a: a(torch.randn(2, 5, 24), torch.randn(2, 7, 20), torch.ones(2, 7)), "boolean"),
        (
            lambda a: a(torch.randn(2, 5, 24), torch.randn(2, 7, 20), torch.ones(2, 4, 7, dtype=torch.bool)),
            r"\(2, 5, 7\)",
        ),
        (
            lambda a: a(torch.randn(2, 5, 24), torch.randn(2, 7, 20), torch.ones(7, dtype=torch.bool)),
            "mask must have shape",
        ),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(make())


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"heads": 0}, "heads"),
        ({"head_dim": -4}, "head_dim"),
        ({"heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_construction_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        make(**kw)
