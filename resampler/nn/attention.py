"""The one attention module: projections around one call into `kernels.attend`.

Encoder cross-attention, latent self-attention, Perceiver IO decoding, causal Perceiver AR attention,
the resampler and the VLM's gated cross-attention all call `Attention`; the Perceiver encoder's
long-context cross-attend uses `FoldedAttention` (same weights, another order of products).

Mask convention everywhere: boolean, True = attend. A query whose keys are all masked gets an output
of exactly zero (never NaN) with finite gradients, and context rows that no query attends to are
zeroed before use (`zero_unattended`), so NaN or inf in padding cannot leak (0 x NaN is NaN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import attend
from .norms import NormSpec, make_norm

__all__ = ["AttentionSpec", "Attention", "KVCache", "causal_mask", "normalize_mask", "zero_unattended", "MaskInfo"]


@dataclass(frozen=True)
class AttentionSpec:
    """The shape and options of one attention; passed whole through blocks and models.

    heads: query heads. head_dim: per-head query/key width (None: the query width / heads).
    v_head_dim: per-head value width (None: head_dim). num_kv_heads: key/value heads, dividing heads
    (grouped-query attention; None: heads). qkv_bias / out_bias: biases of the input / output
    projections. qk_norm: a per-head 'layernorm' or 'rmsnorm' of the queries and keys (of width
    head_dim, shared by the heads; IDEFICS), eps ``qk_norm_eps``. dropout: attention-probability dropout
    in training. use_sdpa: the kernel policy of `resampler.nn.kernels` (False: always the fp32 reference
    kernel, for checking).
    """

    heads: int = 8
    head_dim: int | None = None
    v_head_dim: int | None = None
    num_kv_heads: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    qk_norm: str | None = None
    qk_norm_eps: float | None = None
    dropout: float = 0.0
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        if self.qk_norm is not None:
            NormSpec(self.qk_norm, self.qk_norm_eps)  # validates the kind
        for name in ("heads", "head_dim", "v_head_dim", "num_kv_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        if self.num_kv_heads is not None and self.heads % self.num_kv_heads:
            raise ValueError(f"Attention: num_kv_heads={self.num_kv_heads} must divide heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Attention: dropout must be in [0, 1), got {self.dropout}")

    def replace(self, **changes) -> AttentionSpec:
        return dataclasses.replace(self, **changes)

    def resolved(self, width: int, owner: str = "Attention", field: str = "q_dim") -> AttentionSpec:
        """This spec with every None filled in; ``head_dim`` defaults to ``width // heads``."""
        head_dim = self.head_dim
        if head_dim is None:
            if not isinstance(width, int) or width <= 0 or width % self.heads:
                raise ValueError(f"{owner}: heads={self.heads} must divide {field}={width} (or set head_dim)")
            head_dim = width // self.heads
        return self.replace(
            head_dim=head_dim,
            v_head_dim=head_dim if self.v_head_dim is None else self.v_head_dim,
            num_kv_heads=self.heads if self.num_kv_heads is None else self.num_kv_heads,
        )


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


def zero_unattended(context: Tensor, mask: Tensor | None, q_len: int, heads: int = 1) -> Tensor:
    """context (B, M, C) with the rows no query attends to under ``mask`` set to zero.

    Padding may hold anything (NaN, inf): a masked key's probability is 0, but 0 x NaN is NaN, in the
    output and in the key/value weights' gradients.
    """
    if mask is None:
        return context
    mask = normalize_mask(mask, context.shape[0], heads, q_len, context.shape[1]).to(context.device)
    unused = ~mask.flatten(1, 2).any(dim=1)  # (B|1, M)
    return context.masked_fill(unused[..., None], 0.0)


@dataclass
class MaskInfo:
    """A validated mask, ready for a kernel: ``mask`` (B|1, H|1, Q|1, M) lets keyless query rows
    attend everywhere; ``has_key`` (B|1, H|1, Q|1, 1) marks the rows that had a key (None: all had)."""

    mask: Tensor
    has_key: Tensor | None

    @classmethod
    def of(cls, mask: Tensor | None, batch: int, heads: int, q_len: int, k_len: int, device) -> MaskInfo | None:
        if mask is None:
            return None
        mask = normalize_mask(mask, batch, heads, q_len, k_len).to(device)
        rows = mask.any(dim=-1, keepdim=True)  # (B|1, H|1, Q|1, 1)
        if bool(rows.all()):
            return cls(mask, None)
        # Rows with no valid key would softmax over nothing (NaN): let them attend to all keys,
        # then zero their output, which also zeroes their gradients.
        return cls(mask | ~rows, rows)


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
    """Multi-head attention: ``attn(x (B, Q, q_dim), context (B, M, kv_dim) = x, mask) -> (B, Q, out_dim)``.

    Weights: ``to_q``, ``to_kv`` (rows [keys; values]: one product for both) and ``to_out``. Options
    come whole as an `AttentionSpec`; keyword arguments are a shorthand for its fields, so
    ``Attention(64, heads=4)`` is ``Attention(64, spec=AttentionSpec(heads=4))``.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int | None = None,
        spec: AttentionSpec | None = None,
        *,
        out_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **spec_fields,
    ) -> None:
        super().__init__()
        kv_dim = q_dim if kv_dim is None else kv_dim
        out_dim = q_dim if out_dim is None else out_dim
        for name, value in [("q_dim", q_dim), ("kv_dim", kv_dim), ("out_dim", out_dim)]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        spec = AttentionSpec(**spec_fields) if spec is None else spec.replace(**spec_fields)
        self.spec = spec = spec.resolved(q_dim)
        self.q_dim, self.kv_dim, self.out_dim = q_dim, kv_dim, out_dim
        self.heads, self.num_kv_heads = spec.heads, spec.num_kv_heads
        self.head_dim, self.v_head_dim = spec.head_dim, spec.v_head_dim
        self.scale = spec.head_dim**-0.5
        factory = {"device": device, "dtype": dtype}
        kv_width = spec.num_kv_heads * (spec.head_dim + spec.v_head_dim)
        self.to_q = nn.Linear(q_dim, spec.heads * spec.head_dim, bias=spec.qkv_bias, **factory)
        self.to_kv = nn.Linear(kv_dim, kv_width, bias=spec.qkv_bias, **factory)
        self.to_out = nn.Linear(spec.heads * spec.v_head_dim, out_dim, bias=spec.out_bias, **factory)
        qk_norm = None if spec.qk_norm is None else NormSpec(spec.qk_norm, spec.qk_norm_eps)
        self.q_norm = None if qk_norm is None else make_norm(qk_norm, spec.head_dim, **factory)
        self.k_norm = None if qk_norm is None else make_norm(qk_norm, spec.head_dim, **factory)

    def extra_repr(self) -> str:
        s = self.spec
        return f"heads={s.heads}, kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, v_head_dim={s.v_head_dim}"

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
    ) -> Tensor:
        """``cache``: keys/values of earlier positions, extended by this call's (incremental decoding);
        ``mask`` then covers the cached keys too. ``query_pos`` (Q, q_dim) / ``key_pos`` (M, kv_dim):
        position encodings added to the queries' and the keys' inputs, never to the values'."""
        self.check_inputs(x, context)
        context = x if context is None else context
        if cache is None:
            context = zero_unattended(context, mask, x.shape[1], self.heads)
        k, v = self.project_kv(context, key_pos=key_pos)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.attend_kv(x, k, v, mask, query_pos=query_pos)

    def attend_kv(
        self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, query_pos: Tensor | None = None
    ) -> Tensor:
        """x (B, Q, q_dim) attends to keys (B, Hkv, M, dh) and values (B, Hkv, M, dv) projected by the
        caller (`project_kv`) -> (B, Q, out_dim). Keys/values no query attends to must be finite."""
        info = MaskInfo.of(mask, x.shape[0], self.heads, x.shape[1], k.shape[-2], x.device)
        out = attend(
            self.project_q(x, query_pos),
            k,
            v,
            None if info is None else info.mask,
            scale=self.scale,
            dropout=self.spec.dropout if self.training else 0.0,
            reference=not self.spec.use_sdpa,
        )
        return self.merge_heads(out, info)

    def project_q(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """x (B, Q, q_dim) [+ positions (Q, q_dim)] -> queries (B, H, Q, dh)."""
        b, q_len, _ = x.shape
        q = self.to_q(x if pos is None else x + pos).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        return q if self.q_norm is None else self.q_norm(q)

    def project_kv(
        self,
        context: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        key_pos: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """context (B, M, kv_dim) -> keys (B, Hkv, M, dh) and values (B, Hkv, M, dv); ``weight`` and
        ``bias`` replace ``to_kv``'s (the same rows [keys; values]) when given. ``key_pos`` (M, kv_dim):
        positions added to the keys' input only, ``k = W_k (context + pos)``."""
        b, m, _ = context.shape
        split = self.num_kv_heads * self.head_dim
        kv = self.to_kv(context) if weight is None else F.linear(context, weight, bias)
        k, v = kv.split([split, self.num_kv_heads * self.v_head_dim], dim=-1)
        if key_pos is not None:
            k = k + F.linear(key_pos, self.to_kv.weight[:split])  # (M, Hkv*dh), shared by the batch
        k = k.view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, M, dh)
        v = v.view(b, m, self.num_kv_heads, self.v_head_dim).transpose(1, 2)  # (B, Hkv, M, dv)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def merge_heads(self, out: Tensor, info: MaskInfo | None) -> Tensor:
        """Per-head outputs (B, H, Q, dv) -> ``to_out`` (B, Q, out_dim); keyless queries give exactly 0."""
        has_key = None if info is None else info.has_key
        if has_key is not None:
            out = out * has_key.to(out.dtype)
        b, _, q_len, _ = out.shape
        out = self.to_out(out.transpose(1, 2).reshape(b, q_len, self.heads * self.v_head_dim))
        if has_key is not None:  # a query with no key in any head outputs exactly zero, bias included
            out = out * has_key.any(dim=1).to(out.dtype)  # (B|1, Q|1, 1)
        return out

    def check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        """Clear errors for wrong shapes, dtypes and devices, instead of a failure deep in torch."""
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
