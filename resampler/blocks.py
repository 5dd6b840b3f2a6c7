"""Norms, the feed-forward MLP and the two pre-norm residual blocks every model is built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, KVCache

__all__ = ["FeedForward", "make_norm", "normalize_without_affine", "CrossAttentionBlock", "SelfAttentionBlock"]

_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


def make_norm(kind: str, dim: int, eps: float | None = None, *, device=None, dtype=None) -> nn.Module:
    """'layernorm' (eps 1e-5 by default) or 'rmsnorm' (eps 1e-6 by default)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-5 if eps is None else eps, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6 if eps is None else eps, device=device, dtype=dtype)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """MLP: fc2(act(fc1(x))), or with ``gated=True`` fc2(act(gate) * up) (SwiGLU when act='silu').

    The hidden width is ``hidden_dim`` or ``int(dim * mult)``. In the gated form ``fc1`` holds the
    gate rows first, then the up rows.
    """

    def __init__(
        self,
        dim: int,
        mult: float = 4.0,
        *,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        gated: bool = False,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        hidden_dim = int(dim * mult) if hidden_dim is None else hidden_dim
        out_dim = dim if out_dim is None else out_dim
        if activation not in _ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if dim <= 0 or hidden_dim <= 0 or out_dim <= 0:
            raise ValueError(f"FeedForward: widths must be positive, got dim={dim}, hidden={hidden_dim}, out={out_dim}")
        self.gated = gated
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim * (2 if gated else 1), bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return self.fc2(self.dropout(h))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then MLP, both residual.

    ``x = x + attn(norm_q(x), norm_kv(context))`` (or without the ``x +`` when
    ``query_residual=False``), then ``x = x + ff(norm_ff(x))``.

    With ``kv_includes_queries=True`` the normed queries are appended to the keys/values
    (context first, then queries), as in the Flamingo resampler where latents also attend to
    themselves.

    ``fold_kv`` (see `Attention`): when the attention folds, ``norm_kv``'s affine goes into the
    key/value weights and the context enters only normalised, so a frozen context needs no gradient.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        *,
        heads: int = 1,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_dim: int | None = None,
        ff_mult: float = 4.0,
        ff_hidden_dim: int | None = None,
        ff_gated: bool = False,
        ff_activation: str = "gelu",
        ff_bias: bool = True,
        norm: str = "layernorm",
        norm_eps: float | None = None,
        query_residual: bool = True,
        kv_includes_queries: bool = False,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        use_sdpa: bool = True,
        query_chunk_size: int | None = None,
        fold_kv: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        out_dim = q_dim if out_dim is None else out_dim
        head_dim = _head_dim("CrossAttentionBlock", "q_dim", q_dim, heads, head_dim)
        if query_residual and out_dim != q_dim:
            raise ValueError(f"CrossAttentionBlock: query_residual needs out_dim == q_dim, got {out_dim} != {q_dim}")
        if kv_includes_queries and kv_dim != q_dim:
            raise ValueError(f"CrossAttentionBlock: kv_includes_queries needs kv_dim == q_dim, got {kv_dim} != {q_dim}")
        factory = {"device": device, "dtype": dtype}
        self.query_residual = query_residual
        self.kv_includes_queries = kv_includes_queries
        self.norm_q = make_norm(norm, q_dim, norm_eps, **factory)
        self.norm_kv = make_norm(norm, kv_dim, norm_eps, **factory)
        self.attn = Attention(
            q_dim,
            kv_dim,
            heads=heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
            num_kv_heads=num_kv_heads,
            out_dim=out_dim,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            dropout=dropout,
            use_sdpa=use_sdpa,
            query_chunk_size=query_chunk_size,
            fold_kv=fold_kv,
            **factory,
        )
        self.norm_ff = make_norm(norm, out_dim, norm_eps, **factory)
        self.ff = FeedForward(
            out_dim,
            ff_mult,
            hidden_dim=ff_hidden_dim,
            gated=ff_gated,
            activation=ff_activation,
            bias=ff_bias,
            dropout=dropout,
            **factory,
        )

    def forward(
        self, x: Tensor, context: Tensor, mask: Tensor | None = None, *, cache: KVCache | None = None
    ) -> Tensor:
        """``cache``: keys/values of earlier context positions (incremental decoding, Perceiver AR)."""
        _check_width("CrossAttentionBlock", "x", x, self.norm_q.normalized_shape[0])
        _check_width("CrossAttentionBlock", "context", context, self.norm_kv.normalized_shape[0])
        q = self.norm_q(x)
        if not self.kv_includes_queries and cache is None and self.attn._folds(q.shape[1], context.shape[1]):
            # Attending in the context's own space: the norm's affine goes into the key/value weights,
            # so a frozen context (pixels, features) carries no gradient through this block.
            affine = (self.norm_kv.weight, getattr(self.norm_kv, "bias", None))
            h = self.attn(q, normalize_without_affine(self.norm_kv, context), mask, context_affine=affine)
        else:
            kv = self.norm_kv(context)
            if self.kv_includes_queries:
                if cache is not None:
                    raise ValueError("CrossAttentionBlock: a cache cannot be combined with kv_includes_queries")
                kv = torch.cat([kv, q], dim=-2)  # (B, M + N, D): context first, then the queries
                if mask is not None:
                    mask = _extend_mask_with_queries(mask, q.shape[-2])
            h = self.attn(q, kv, mask, cache=cache)
        x = x + h if self.query_residual else h
        return x + self.ff(self.norm_ff(x))


def normalize_without_affine(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm``'s normalisation (a `make_norm` LayerNorm or RMSNorm) of x, without its weight and bias."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, eps=norm.eps)
    raise TypeError(f"unsupported norm {type(norm).__name__}: expected LayerNorm or RMSNorm")


def _head_dim(owner: str, field: str, dim: int, heads: int, head_dim: int | None) -> int:
    """``head_dim`` or, when None, ``dim // heads`` — which then must divide exactly."""
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"{owner}: heads must be a positive int, got {heads!r}")
    if head_dim is not None:
        return head_dim
    if not isinstance(dim, int) or dim <= 0 or dim % heads:
        raise ValueError(f"{owner}: heads={heads} must divide {field}={dim} (or pass head_dim explicitly)")
    return dim // heads


def _check_width(owner: str, name: str, t: Tensor, width: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{owner}: {name} must have shape (B, N, {width}), got {shape}")


def _extend_mask_with_queries(mask: Tensor, num_queries: int) -> Tensor:
    """Mask over M context keys -> mask over M + N keys, where every query may see every query."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    if mask.dim() == 2:  # (B, M)
        return torch.cat([mask, mask.new_ones(mask.shape[0], num_queries)], dim=-1)
    # (B, Q, M) or (B, H, Q, M): queries-to-queries block is all True
    ones = mask.new_ones(*mask.shape[:-1], num_queries)
    return torch.cat([mask, ones], dim=-1)


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention then MLP, both residual; optional KV cache for decoding."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        num_kv_heads: int | None = None,
        ff_mult: float = 4.0,
        ff_hidden_dim: int | None = None,
        ff_gated: bool = False,
        ff_activation: str = "gelu",
        ff_bias: bool = True,
        norm: str = "layernorm",
        norm_eps: float | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        use_sdpa: bool = True,
        query_chunk_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        head_dim = _head_dim("SelfAttentionBlock", "dim", dim, heads, head_dim)
        factory = {"device": device, "dtype": dtype}
        self.norm_attn = make_norm(norm, dim, norm_eps, **factory)
        self.attn = Attention(
            dim,
            heads=heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
            num_kv_heads=num_kv_heads,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            dropout=dropout,
            use_sdpa=use_sdpa,
            query_chunk_size=query_chunk_size,
            **factory,
        )
        self.norm_ff = make_norm(norm, dim, norm_eps, **factory)
        self.ff = FeedForward(
            dim,
            ff_mult,
            hidden_dim=ff_hidden_dim,
            gated=ff_gated,
            activation=ff_activation,
            bias=ff_bias,
            dropout=dropout,
            **factory,
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        _check_width("SelfAttentionBlock", "x", x, self.norm_attn.normalized_shape[0])
        x = x + self.attn(self.norm_attn(x), mask=mask, cache=cache)
        return x + self.ff(self.norm_ff(x))
