"""The one attention module of the library.

Encoder cross-attention, latent self-attention, Perceiver IO decoding, causal Perceiver AR
attention, the Flamingo resampler and the VLM's gated cross-attention all call `Attention`.

Mask convention everywhere: boolean, True = attend. A query whose keys are all masked gets an
output of exactly zero (never NaN), and its gradients stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "KVCache", "causal_mask", "normalize_mask", "reference_attention"]


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """(Q, M) boolean mask in which query i sits at position k_len - q_len + i and sees keys <= it.

    Bottom-right aligned, as Perceiver AR needs: the queries are the *last* q_len positions.
    """
    if q_len > k_len:
        raise ValueError(f"causal_mask needs q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def normalize_mask(mask: Tensor, batch: int, heads: int, q_len: int, k_len: int) -> Tensor:
    """Validate a boolean mask and return it as a broadcastable 4-D (B|1, H|1, Q|1, M) tensor.

    Accepted: (B, M) key padding, (B, Q, M) or (B, H, Q, M) full masks; any leading dimension may
    be 1 to broadcast.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    expected = {
        2: ("(B, M)", (batch, k_len)),
        3: ("(B, Q, M)", (batch, q_len, k_len)),
        4: ("(B, H, Q, M)", (batch, heads, q_len, k_len)),
    }
    if mask.dim() not in expected:
        raise ValueError(
            f"mask must have shape (B, M)=({batch}, {k_len}), (B, Q, M)=({batch}, {q_len}, "
            f"{k_len}) or (B, H, Q, M)=({batch}, {heads}, {q_len}, {k_len}); got {tuple(mask.shape)}"
        )
    name, dims = expected[mask.dim()]
    for got, want in zip(mask.shape, dims):
        if got != want and got != 1:
            raise ValueError(f"mask must have shape {name}={dims}, got {tuple(mask.shape)}")
    if mask.shape[-1] != k_len:
        raise ValueError(f"mask must cover all {k_len} keys in its last dimension, got {tuple(mask.shape)}")
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        return mask[:, None, :, :]
    return mask


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is not None:
            key = torch.cat([self.key, key], dim=-2)
            value = torch.cat([self.value, value], dim=-2)
        self.key, self.value = key, value
        return key, value


class Attention(nn.Module):
    """Multi-head attention with separate query/key and value widths and grouped key/value heads.

    Args:
        q_dim: width of the queries' input.
        kv_dim: width of the context (defaults to ``q_dim``: self-attention).
        heads: number of query heads.
        head_dim: per-head query/key width (the official Perceiver's ``qk_channels / heads``).
        v_head_dim: per-head value width (``v_channels / heads``); defaults to ``head_dim``.
        num_kv_heads: key/value heads (grouped-query attention); must divide ``heads``.
        out_dim: output width; defaults to ``q_dim``.
        qkv_bias / out_bias: biases of the input and output projections.
        dropout: attention-probability dropout (training only).
        use_sdpa: ``scaled_dot_product_attention`` (fast path) or the plain reference path.
        query_chunk_size: process queries in chunks of this size to bound memory on huge inputs.
        fold_kv: attend in the context's own space (see `Attention.attend_folded`): True whenever
            possible, False never, None (default) when it takes fewer multiply-adds than projecting
            the context. Only the fast path folds; ``use_sdpa=False`` always projects.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int | None = None,
        *,
        heads: int = 8,
        head_dim: int = 64,
        v_head_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        use_sdpa: bool = True,
        query_chunk_size: int | None = None,
        fold_kv: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kv_dim = q_dim if kv_dim is None else kv_dim
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_kv_heads = heads if num_kv_heads is None else num_kv_heads
        out_dim = q_dim if out_dim is None else out_dim
        for name, value in [
            ("q_dim", q_dim),
            ("kv_dim", kv_dim),
            ("heads", heads),
            ("head_dim", head_dim),
            ("v_head_dim", v_head_dim),
            ("num_kv_heads", num_kv_heads),
            ("out_dim", out_dim),
        ]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        if heads % num_kv_heads:
            raise ValueError(f"Attention: num_kv_heads={num_kv_heads} must divide heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Attention: dropout must be in [0, 1), got {dropout}")
        if query_chunk_size is not None and query_chunk_size <= 0:
            raise ValueError(f"Attention: query_chunk_size must be positive, got {query_chunk_size}")
        if fold_kv not in (None, True, False):
            raise ValueError(f"Attention: fold_kv must be True, False or None (automatic), got {fold_kv!r}")
        factory = {"device": device, "dtype": dtype}
        self.q_dim, self.kv_dim, self.out_dim = q_dim, kv_dim, out_dim
        self.heads, self.num_kv_heads = heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.query_chunk_size = query_chunk_size
        self.fold_kv = fold_kv
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(q_dim, heads * head_dim, bias=qkv_bias, **factory)
        # Keys and values in one matmul: rows [0, Hkv*dh) are keys, the rest values.
        self.to_kv = nn.Linear(kv_dim, num_kv_heads * (head_dim + v_head_dim), bias=qkv_bias, **factory)
        self.to_out = nn.Linear(heads * v_head_dim, out_dim, bias=out_bias, **factory)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, sdpa={self.use_sdpa}"
        )

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Context (B, M, kv_dim) -> keys (B, Hkv, M, dh) and values (B, Hkv, M, dv)."""
        return self.split_kv(self.to_kv(context))

    def split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Projected (B, M, Hkv*(dh+dv)) rows [keys; values] -> keys (B, Hkv, M, dh), values (B, Hkv, M, dv)."""
        b, m, _ = kv.shape
        k, v = kv.split([self.num_kv_heads * self.head_dim, self.num_kv_heads * self.v_head_dim], dim=-1)
        k = k.view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, M, dh)
        v = v.view(b, m, self.num_kv_heads, self.v_head_dim).transpose(1, 2)  # (B, Hkv, M, dv)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
        context_affine: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> Tensor:
        """x (B, Q, q_dim), context (B, M, kv_dim) or None for self-attention -> (B, Q, out_dim).

        ``prefix_kv``: keys (B, Hkv, M0, dh) and values (B, Hkv, M0, dv) projected elsewhere, placed
        before the context's keys/values (the mask then covers M0 + M keys). The Flamingo resampler
        projects its media this way, once per layer, without an input gradient.

        ``context_affine``: (weight, bias), either may be None: the context attended to is
        ``context * weight + bias``, a norm's affine left out of a normalised context. The folded
        path takes it into its weights, so a frozen context needs no gradient at all.
        """
        self._check_inputs(x, context)
        context = x if context is None else context
        b, q_len, _ = x.shape
        q = self.to_q(x).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Q, dh)
        folded = prefix_kv is None and cache is None and self._folds(q_len, context.shape[1])
        if folded:
            k = v = None
            k_len = context.shape[1]
        else:
            if context_affine is not None:
                context = _apply_affine(context, *context_affine)
            k, v = self.project_kv(context)
            if prefix_kv is not None:
                self._check_prefix(prefix_kv, b)
                k = torch.cat([prefix_kv[0], k], dim=-2)  # (B, Hkv, M0 + M, dh)
                v = torch.cat([prefix_kv[1], v], dim=-2)  # (B, Hkv, M0 + M, dv)
            if cache is not None:
                k, v = cache.update(k, v)
            k_len = k.shape[-2]

        has_key = None
        if mask is not None:
            mask = normalize_mask(mask, b, self.heads, q_len, k_len).to(x.device)
            rows = mask.any(dim=-1, keepdim=True)  # (B|1, H|1, Q|1, 1)
            if not bool(rows.all()):
                # Rows with no valid key would softmax over nothing (NaN): let them attend to all
                # keys, then zero their output, which also zeroes their gradients.
                mask = mask | ~rows
                has_key = rows

        if folded:
            out = self.attend_folded(q, context, mask, context_affine)  # (B, H, Q, dv)
        else:
            out = self._attend_chunked(q, k, v, mask, self.scale)  # (B, H, Q, dv)
        if has_key is not None:
            out = out * has_key.to(out.dtype)
        out = out.transpose(1, 2).reshape(b, q_len, self.heads * self.v_head_dim)
        out = self.to_out(out)
        if has_key is not None:  # a query with no key in any head outputs exactly zero, bias included
            out = out * has_key.any(dim=1).to(out.dtype)  # (B|1, Q|1, 1)
        return out

    def _folds(self, q_len: int, k_len: int) -> bool:
        """Whether to attend in the context's space (`attend_folded`) rather than project the context."""
        foldable = type(self.to_kv) is nn.Linear or getattr(type(self.to_kv), "folds_like_linear", False)
        if self.fold_kv is False or not self.use_sdpa or not foldable:
            return False  # (a LoRA-wrapped to_kv has no single weight to fold)
        if self.dropout and self.training and self.to_kv.bias is not None:
            return False  # dropped probabilities no longer sum to 1, so the value bias would not factor out
        if self.fold_kv:
            return True
        h, hkv, dh, dv, c = self.heads, self.num_kv_heads, self.head_dim, self.v_head_dim, self.kv_dim
        projected = k_len * c * hkv * (dh + dv) + h * q_len * k_len * (dh + dv)
        folded = h * q_len * c * (dh + dv) + 2 * h * q_len * k_len * c
        return folded < projected

    def attend_folded(
        self,
        q: Tensor,
        context: Tensor,
        mask: Tensor | None,
        context_affine: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> Tensor:
        """softmax(q k^T) v without projecting the context: q (B, H, Q, dh), context (B, M, C) -> (B, H, Q, dv).

        With k = context Wk^T + bk and v = context Wv^T + bv, per head
        ``q k^T = (q Wk) context^T + q.bk`` and ``P v = (P context) Wv^T + bv`` (rows of P sum to 1).
        ``q.bk`` is the same for every key, so softmax drops it. Every head then attends over the same
        keys and values, the normed context itself, as one head of H*Q queries: 2*H*Q*M*C
        multiply-adds instead of M*C*Hkv*(dh+dv) + H*Q*M*(dh+dv). That pays when the context is
        long and narrow, as in a Perceiver's encoder (M = 50k pixels, C = 261, one head of 261 or 1024),
        and it leaves no projected (M, Hkv*(dh+dv)) keys/values to store or differentiate. A norm's
        affine (``context_affine``) goes into the weights, ``W (x̂ w + b) = (W w) x̂ + W b``, so the
        context itself never needs a gradient when it is frozen: training then runs the matmul
        kernel, whose backward skips the keys' and values' gradients (SDPA's computes them anyway).
        """
        b, h, q_len, _ = q.shape
        hkv, groups, c = self.num_kv_heads, self.heads // self.num_kv_heads, context.shape[-1]
        weight, bias = self.to_kv.weight, self.to_kv.bias
        v_bias = None if bias is None else bias[hkv * self.head_dim :]  # (the keys' bias: dropped by softmax)
        if context_affine is not None:
            scale, shift = context_affine
            if shift is not None:  # (keys' part of the shift only adds a per-query constant: dropped)
                shift = F.linear(shift, weight[hkv * self.head_dim :])  # (Hkv*dv,)
                v_bias = shift if v_bias is None else v_bias + shift
            if scale is not None:
                weight = weight * scale
        w_k, w_v = weight.split([hkv * self.head_dim, hkv * self.v_head_dim])
        w_k = w_k.view(hkv, self.head_dim, c)  # query head i uses key/value head i // groups
        w_v = w_v.view(hkv, self.v_head_dim, c)
        q = q.reshape(b, hkv, groups * q_len, self.head_dim) * self.scale
        q = torch.matmul(q, w_k).view(b, 1, h * q_len, c)  # (B, 1, H*Q, C): queries in context space
        if mask is not None and (mask.shape[1] > 1 or mask.shape[2] > 1):
            mask = mask.expand(mask.shape[0], h, q_len, -1).reshape(mask.shape[0], 1, h * q_len, -1)
        context = context[:, None]  # (B, 1, M, C): keys and values of every head
        math = torch.is_grad_enabled() and not context.requires_grad
        u = self._attend_chunked(q, context, context, mask, 1.0, math=math)  # (B, 1, H*Q, C)
        out = torch.matmul(u.view(b, hkv, groups * q_len, c), w_v.transpose(1, 2))  # (B, Hkv, G*Q, dv)
        if v_bias is not None:
            out = out + v_bias.view(hkv, 1, self.v_head_dim)
        return out.view(b, h, q_len, self.v_head_dim)

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.q_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Attention: x must have shape (B, Q, q_dim={self.q_dim}), got {shape}")
        self._check_dtype_device("x", x)
        if context is None:
            if self.kv_dim != self.q_dim:
                raise ValueError(f"Attention: context is required since kv_dim={self.kv_dim} != q_dim={self.q_dim}")
            return
        if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != self.kv_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"Attention: context must have shape (B, M, kv_dim={self.kv_dim}), got {shape}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"Attention: x and context must share the batch size, got {x.shape[0]} and {context.shape[0]}"
            )
        self._check_dtype_device("context", context)

    def _check_dtype_device(self, name: str, t: Tensor) -> None:
        """A clear error instead of a matmul failure deep in torch (autocast may mix float dtypes)."""
        weight = self.to_q.weight
        if not t.is_floating_point():
            raise ValueError(f"Attention: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"Attention: {name} is on {t.device} but the weights are on {weight.device}: move one")
        if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
            raise ValueError(
                f"Attention: {name} has dtype {t.dtype} but the weights are {weight.dtype}: cast one, or run "
                "under torch.autocast"
            )

    def _check_prefix(self, prefix_kv: tuple[Tensor, Tensor], batch: int) -> None:
        if not isinstance(prefix_kv, (tuple, list)) or len(prefix_kv) != 2:
            raise ValueError("Attention: prefix_kv must be a (keys, values) pair")
        k, v = prefix_kv
        hkv = self.num_kv_heads
        if (
            not isinstance(k, Tensor)
            or k.dim() != 4
            or k.shape[0] != batch
            or k.shape[1] != hkv
            or k.shape[3] != self.head_dim
        ):
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(
                f"Attention: prefix keys must have shape (B={batch}, Hkv={hkv}, M0, dh={self.head_dim}), got {shape}"
            )
        if not isinstance(v, Tensor) or tuple(v.shape) != (batch, hkv, k.shape[2], self.v_head_dim):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"Attention: prefix values must have shape (B={batch}, Hkv={hkv}, M0={k.shape[2]}, "
                f"dv={self.v_head_dim}), got {shape}"
            )

    def _attend_chunked(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, *, math: bool = False
    ) -> Tensor:
        chunk = self.query_chunk_size
        q_len = q.shape[-2]
        if chunk is None or q_len <= chunk:
            return self._attend(q, k, v, mask, scale, math=math)
        outs = []
        for start in range(0, q_len, chunk):
            stop = min(start + chunk, q_len)
            sub_mask = None
            if mask is not None:
                sub_mask = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
            outs.append(self._attend(q[..., start:stop, :], k, v, sub_mask, scale, math=math))
        return torch.cat(outs, dim=-2)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, *, math: bool = False
    ) -> Tensor:
        """``math``: prefer the matmul kernel in training (its backward skips gradients nobody needs)."""
        dropout = self.dropout if self.training else 0.0
        groups = q.shape[1] // k.shape[1]
        if self.use_sdpa and not math and not _sdpa_backward_is_slow(q, k, v):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=groups > 1
            )
        if self.use_sdpa:
            return _math_attention(q, k, v, mask, scale=scale, dropout=dropout)
        return reference_attention(q, k, v, mask, scale=scale, dropout=dropout)


def _apply_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    x = x if weight is None else x * weight
    return x if bias is None else x + bias


def _sdpa_backward_is_slow(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when SDPA's CPU backward would leave cores idle: it parallelises over batch x heads only.

    Measured on 2 cores (fwd+bwd, 512 queries x 8k keys): 1 head x 1024 SDPA 16.7 s vs matmul+softmax
    3.2 s, 1 x 128 12 s vs 0.6 s; from batch x heads >= cores on, the two are on par (8 x 128: SDPA
    faster). The forward parallelises over query blocks as well, so inference always keeps SDPA.
    """
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return q.shape[0] * q.shape[1] < torch.get_num_threads()


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, dropout: float) -> Tensor:
    """softmax((q * scale) k^T) v from matmul + softmax: the training kernel where SDPA's backward is slow.

    Scales the (Q, dh) queries rather than the (Q, M) scores, and masks the scores in place (autograd
    saved q and k for the product, not its output): two fewer passes over the largest tensor.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, M, dh)
        v = v.repeat_interleave(groups, dim=1)  # (B, H, M, dv)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Q, M)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)  # (B, H, Q, dv)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, dropout: float = 0.0
) -> Tensor:
    """Plain softmax(q k^T * scale) v, computed in fp32 (fp64 for fp64 inputs); the check for the SDPA path."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)  # never below fp32, never a downcast of fp64
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # (B, H, Q, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
