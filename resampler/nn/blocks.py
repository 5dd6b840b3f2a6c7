"""Norms, the feed-forward MLP, and the two pre-norm residual blocks every model is built from.

    x = x + attn(norm_q(x), norm_kv(context))      # CrossAttentionBlock
    x = x + ff(norm_ff(x))

    x = x + attn(norm_attn(x))                     # SelfAttentionBlock
    x = x + ff(norm_ff(x))

Options travel whole: an `AttentionSpec`, a `FeedForwardSpec` and a `NormSpec` per block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, AttentionSpec, KVCache, zero_unattended
from .folded import FoldedAttention
from .norms import NormSpec, make_norm, normalize_without_affine

__all__ = [
    "NormSpec",
    "FeedForwardSpec",
    "make_norm",
    "FeedForward",
    "CrossAttentionBlock",
    "SelfAttentionBlock",
]

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (Primer)
}


@dataclass(frozen=True)
class FeedForwardSpec:
    """The MLP of a block: ``fc2(act(fc1(x)))``, or gated ``fc2(act(gate) * up)`` (SwiGLU: 'silu', gated).

    Hidden width ``hidden_dim``, or ``int(width * mult)``. Activations: gelu, gelu_tanh, silu, relu,
    relu2 (squared ReLU).
    """

    mult: float = 4.0
    hidden_dim: int | None = None
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ValueError(f"FeedForward: hidden_dim must be positive, got {self.hidden_dim}")
        if self.mult <= 0:
            raise ValueError(f"FeedForward: mult must be positive, got {self.mult}")

    def replace(self, **changes) -> FeedForwardSpec:
        return dataclasses.replace(self, **changes)


class FeedForward(nn.Module):
    """``dim -> hidden -> out_dim`` MLP. In the gated form ``fc1`` holds the gate rows first, then the up rows."""

    def __init__(
        self, dim: int, spec: FeedForwardSpec | None = None, *, out_dim: int | None = None, device=None, dtype=None
    ) -> None:
        super().__init__()
        spec = FeedForwardSpec() if spec is None else spec
        hidden = int(dim * spec.mult) if spec.hidden_dim is None else spec.hidden_dim
        out_dim = dim if out_dim is None else out_dim
        if dim <= 0 or hidden <= 0 or out_dim <= 0:
            raise ValueError(f"FeedForward: widths must be positive, got dim={dim}, hidden={hidden}, out={out_dim}")
        self.spec = spec
        self.fc1 = nn.Linear(dim, hidden * (2 if spec.gated else 1), bias=spec.bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_dim, bias=spec.bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.spec.activation]
        h = self.fc1(x)
        if self.spec.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return self.fc2(self.dropout(h))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then MLP, both residual: ``block(x (B, N, q_dim), context (B, M, kv_dim), mask)``.

    ``query_residual=False`` drops the ``x +`` around the attention (Perceiver IO decoders, whose
    outputs differ in kind from their queries). ``kv_includes_queries=True`` appends the normed queries
    to the keys/values (context first, then queries): the Flamingo resampler's latents attend to the
    media and to themselves. ``fold=True`` attends in the context's own space (`FoldedAttention`), for
    long narrow contexts; same weights, same function. ``feed_forward=False`` drops the MLP (and its
    norm): one attention layer, as the MiniCPM-V / Qwen-VL resampler.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        attn: AttentionSpec | None = None,
        ff: FeedForwardSpec | None = None,
        norm: NormSpec | None = None,
        *,
        out_dim: int | None = None,
        query_residual: bool = True,
        kv_includes_queries: bool = False,
        fold: bool = False,
        feed_forward: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        attn = AttentionSpec(heads=1) if attn is None else attn
        norm = NormSpec() if norm is None else norm
        out_dim = q_dim if out_dim is None else out_dim
        if query_residual and out_dim != q_dim:
            raise ValueError(f"CrossAttentionBlock: query_residual needs out_dim == q_dim, got {out_dim} != {q_dim}")
        if kv_includes_queries and kv_dim != q_dim:
            raise ValueError(f"CrossAttentionBlock: kv_includes_queries needs kv_dim == q_dim, got {kv_dim} != {q_dim}")
        if fold and kv_includes_queries:
            raise ValueError("CrossAttentionBlock: fold attends in the context's space; it cannot include the queries")
        factory = {"device": device, "dtype": dtype}
        self.query_residual, self.kv_includes_queries, self.fold = query_residual, kv_includes_queries, fold
        self.norm_q = make_norm(norm, q_dim, **factory)
        self.norm_kv = make_norm(norm, kv_dim, **factory)
        attention = FoldedAttention if fold else Attention
        self.attn = attention(q_dim, kv_dim, attn.resolved(q_dim, "CrossAttentionBlock"), out_dim=out_dim, **factory)
        self.norm_ff = make_norm(norm, out_dim, **factory) if feed_forward else None
        self.ff = FeedForward(out_dim, ff, **factory) if feed_forward else None

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
    ) -> Tensor:
        """``cache``: keys/values of earlier context positions (incremental decoding, Perceiver AR).
        ``query_pos`` (N, q_dim) and ``key_pos`` (M, kv_dim): positions added to the normed queries
        and context where they enter the query and key projections, never the values (DETR-style;
        with ``kv_includes_queries`` the queries' keys get ``query_pos``)."""
        _check_width("CrossAttentionBlock", "x", x, self.norm_q.normalized_shape[0])
        _check_width("CrossAttentionBlock", "context", context, self.norm_kv.normalized_shape[0])
        q = self.norm_q(x)
        if self.fold:
            if cache is not None or query_pos is not None or key_pos is not None:
                raise ValueError("CrossAttentionBlock: a folded block takes no cache and no positions")
            h = self.attn(q, context, mask, norm=self.norm_kv)
        else:
            if cache is None:
                context = zero_unattended(context, mask, q.shape[1], self.attn.heads)
            k, v = self.project_context(context, key_pos)
            if self.kv_includes_queries:
                if cache is not None:
                    raise ValueError("CrossAttentionBlock: a cache cannot be combined with kv_includes_queries")
                k_q, v_q = self.attn.project_kv(q, key_pos=query_pos)
                k, v = torch.cat([k, k_q], dim=-2), torch.cat([v, v_q], dim=-2)  # context first, then queries
                if mask is not None:
                    mask = _extend_mask_with_queries(mask, q.shape[-2])
            if cache is not None:
                k, v = cache.update(k, v)
            h = self.attn.attend_kv(q, k, v, mask, query_pos=query_pos)
        x = x + h if self.query_residual else h
        return x if self.ff is None else x + self.ff(self.norm_ff(x))

    def project_context(self, context: Tensor, key_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values of ``norm_kv(context)``.

        A context that needs no gradient (frozen features) is projected with the norm's affine folded
        into ``to_kv``: ``W (x̂·w + b) + c = x̂ (W·w)ᵀ + (W b + c)``. The product's input x̂ then carries
        no gradient, so backward computes only the weight gradient of this product, not the input
        gradient that would otherwise flow back into the norm's affine.
        """
        norm, proj = self.norm_kv, self.attn.to_kv
        frozen = not (torch.is_grad_enabled() and context.requires_grad)
        if not frozen or type(proj) is not nn.Linear or norm.weight is None:
            return self.attn.project_kv(norm(context), key_pos=key_pos)
        weight, bias, shift = proj.weight * norm.weight, proj.bias, getattr(norm, "bias", None)
        if shift is not None:
            shift = F.linear(shift, proj.weight)  # W b: (Hkv*(dh+dv),)
            bias = shift if bias is None else bias + shift
        return self.attn.project_kv(normalize_without_affine(norm, context), weight, bias, key_pos=key_pos)


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention then MLP, both residual; optional KV cache for decoding."""

    def __init__(
        self,
        dim: int,
        attn: AttentionSpec | None = None,
        ff: FeedForwardSpec | None = None,
        norm: NormSpec | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        attn = AttentionSpec() if attn is None else attn
        norm = NormSpec() if norm is None else norm
        factory = {"device": device, "dtype": dtype}
        self.norm_attn = make_norm(norm, dim, **factory)
        self.attn = Attention(dim, spec=attn.resolved(dim, "SelfAttentionBlock", "dim"), **factory)
        self.norm_ff = make_norm(norm, dim, **factory)
        self.ff = FeedForward(dim, ff, **factory)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        _check_width("SelfAttentionBlock", "x", x, self.norm_attn.normalized_shape[0])
        x = x + self.attn(self.norm_attn(x), mask=mask, cache=cache)
        return x + self.ff(self.norm_ff(x))


def _check_width(owner: str, name: str, t: Tensor, width: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{owner}: {name} must have shape (B, N, {width}), got {shape}")


def _extend_mask_with_queries(mask: Tensor, num_queries: int) -> Tensor:
    """Mask over M context keys -> mask over M + N keys, where every query may see every query."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    ones = mask.new_ones(*mask.shape[:-1], num_queries)  # the queries-to-queries block is all True
    return torch.cat([mask, ones], dim=-1)
