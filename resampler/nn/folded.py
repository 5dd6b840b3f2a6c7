"""Cross-attention in the context's own space: the Perceiver encoder's attention over long, narrow inputs.

With keys ``k = x W_kᵀ + b_k`` and values ``v = x W_vᵀ + b_v`` of a context x (M, C), per head

    q kᵀ = (q W_k) xᵀ + q·b_k        (q·b_k is the same for every key: softmax drops it)
    P v  = (P x) W_vᵀ + b_v          (rows of P sum to 1)

so the queries can be mapped into the context's space, ``q W_k`` (Q, C), and attend over the context
itself: every head reads the same keys and values, x, and the heads run as one head of H·Q queries.
That is 2·H·Q·M·C multiply-adds instead of M·C·Hkv·(dh + dv) + H·Q·M·(dh + dv), and no projected
(M, Hkv·(dh + dv)) keys and values to compute, store or differentiate: it pays when M is large and C
small (a Perceiver reading 50k pixels of 261 channels with 512 latents). A norm in front of the
attention leaves its affine to the weights, ``W (x̂·w + b) = (W·w) x̂ + W b``, so a frozen context
needs no gradient at all.

`FoldedAttention` has the weights of `Attention` (``to_q``, ``to_kv``, ``to_out``), computes the same
function, and is chosen when a model is built (`fold_pays`), never per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, AttentionSpec, MaskInfo, zero_unattended
from .kernels import attend
from .norms import normalize_without_affine

__all__ = ["FoldedAttention", "fold_pays"]


def fold_pays(spec: AttentionSpec, num_queries: int, kv_dim: int) -> bool:
    """Whether attending in the context's space takes fewer multiply-adds per context row.

    Per key: projected ``C·Hkv·(dh + dv) + H·Q·(dh + dv)``, folded ``2·H·Q·C`` (the queries' mapping,
    ``H·Q·C·(dh + dv)``, is paid once per call, not per key). Dropout with a value bias cannot fold
    (dropped probabilities no longer sum to 1), nor can a per-head key norm: it never pays then.
    """
    if spec.head_dim is None:
        raise ValueError("fold_pays needs a spec with head_dim set (AttentionSpec.resolved)")
    if (spec.dropout and spec.qkv_bias) or spec.qk_norm is not None:
        return False  # (a per-key norm does not factor through the key projection)
    h, dh = spec.heads, spec.head_dim
    dv = dh if spec.v_head_dim is None else spec.v_head_dim
    hkv = h if spec.num_kv_heads is None else spec.num_kv_heads
    projected = kv_dim * hkv * (dh + dv) + h * num_queries * (dh + dv)
    return 2 * h * num_queries * kv_dim < projected


class FoldedAttention(Attention):
    """`Attention` over ``norm(context)`` computed in the context's space (see the module docstring).

    ``forward(x, context, mask=None, norm=None)``: ``norm`` is the context's LayerNorm/RMSNorm (or None),
    applied here, its affine folded into the weights. No KV cache (there are no keys to cache).
    """

    def __init__(self, q_dim: int, kv_dim: int, spec: AttentionSpec | None = None, **kwargs) -> None:
        super().__init__(q_dim, kv_dim, spec, **kwargs)
        if self.spec.dropout and self.spec.qkv_bias:
            raise ValueError("FoldedAttention: dropout with a value bias cannot fold (dropped rows do not sum to 1)")
        if self.spec.qk_norm is not None:
            raise ValueError("FoldedAttention: a per-head key norm cannot fold into the queries")

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, *, norm: nn.Module | None = None):
        self.check_inputs(x, context)
        b, q_len, _ = x.shape
        info = MaskInfo.of(mask, b, self.heads, q_len, context.shape[1], x.device)
        context = zero_unattended(context, mask, q_len, self.heads)
        scale = shift = None
        if norm is not None:
            context = normalize_without_affine(norm, context)
            scale, shift = norm.weight, getattr(norm, "bias", None)
        out = self._attend_in_context_space(self.project_q(x), context, info, scale, shift)
        return self.merge_heads(out, info)

    def _attend_in_context_space(
        self, q: Tensor, context: Tensor, info: MaskInfo | None, scale: Tensor | None, shift: Tensor | None
    ) -> Tensor:
        """q (B, H, Q, dh), context (B, M, C) -> (B, H, Q, dv), attending to ``context * scale + shift``."""
        b, h, q_len, _ = q.shape
        hkv, groups, c = self.num_kv_heads, self.heads // self.num_kv_heads, context.shape[-1]
        weight, bias = self.to_kv.weight, self.to_kv.bias
        split = hkv * self.head_dim
        v_bias = None if bias is None else bias[split:]  # (the keys' bias: dropped by softmax)
        if shift is not None:  # (the keys' part of the shift only adds a per-query constant: dropped)
            v_shift = F.linear(shift, weight[split:])  # (Hkv*dv,)
            v_bias = v_shift if v_bias is None else v_bias + v_shift
        if scale is not None:
            weight = weight * scale
        w_k, w_v = weight[:split].view(hkv, self.head_dim, c), weight[split:].view(hkv, self.v_head_dim, c)
        q = q.reshape(b, hkv, groups * q_len, self.head_dim) * self.scale  # query head i reads kv head i // G
        q = torch.matmul(q, w_k).view(b, 1, h * q_len, c)  # (B, 1, H*Q, C): queries in the context's space
        mask = None if info is None else info.mask
        if mask is not None and (mask.shape[1] > 1 or mask.shape[2] > 1):
            mask = mask.expand(mask.shape[0], h, q_len, -1).reshape(mask.shape[0], 1, h * q_len, -1)
        keys = context[:, None]  # (B, 1, M, C): the keys and values of every head
        u = attend(
            q,
            keys,
            keys,
            mask,
            scale=1.0,
            dropout=self.spec.dropout if self.training else 0.0,
            reference=not self.spec.use_sdpa,
        )  # (B, 1, H*Q, C)
        out = torch.matmul(u.view(b, hkv, groups * q_len, c), w_v.transpose(1, 2))  # (B, Hkv, G*Q, dv)
        if v_bias is not None:
            out = out + v_bias.view(hkv, 1, self.v_head_dim)
        return out.view(b, h, q_len, self.v_head_dim)
