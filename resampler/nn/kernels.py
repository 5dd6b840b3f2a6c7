"""Attention kernels, and the one policy that picks among them.

Every attention in the library ends in `attend(q, k, v, mask, ...)`. Three kernels compute
``softmax(q kᵀ · scale) v``; they agree to rounding (tests/test_kernels.py):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` — the fast path;
- ``matmul``: matmul + softmax, for CPU training where SDPA's backward wastes work;
- ``reference``: the same formula in fp32 (fp64 for fp64 inputs), the check for the others.

The policy (`choose_kernel`), stated once:

1. ``reference=True`` (a module built with ``use_sdpa=False``) -> ``reference``.
2. CPU, gradients wanted (grad mode on and q, k or v requires grad), and either
   - batch x heads < threads: SDPA's CPU backward parallelises over batch x heads only, so it would
     leave cores idle (its forward also splits query blocks, so inference keeps it), or
   - neither k nor v requires grad: SDPA's backward computes their gradients anyway, autograd
     through matmul skips them
   -> ``matmul``.
3. Otherwise -> ``sdpa``.

Shapes: q (B, H, Q, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv) with Hkv dividing H (grouped-query
attention), mask boolean broadcastable to (B, H, Q, M), True = attend. Every query must keep at least
one key: rows with none are `Attention`'s job (it lets them attend everywhere, then zeroes them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Kernel", "attend", "choose_kernel", "matmul_attention", "reference_attention"]

Kernel = Literal["sdpa", "matmul", "reference"]


def choose_kernel(q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False) -> Kernel:
    """The kernel `attend` uses for these inputs (see the module docstring)."""
    if reference:
        return "reference"
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and training:
        if q.shape[0] * q.shape[1] < torch.get_num_threads():
            return "matmul"
        if not (k.requires_grad or v.requires_grad):
            return "matmul"
    return "sdpa"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float,
    dropout: float = 0.0,
    reference: bool = False,
) -> Tensor:
    """softmax(q kᵀ · scale) v by the kernel `choose_kernel` picks -> (B, H, Q, dv)."""
    kernel = choose_kernel(q, k, v, reference=reference)
    if kernel == "sdpa":
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if kernel == "matmul":
        return matmul_attention(q, k, v, mask, scale=scale, dropout=dropout)
    return reference_attention(q, k, v, mask, scale=scale, dropout=dropout)


def _repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, M, d)


def matmul_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float, dropout: float = 0.0
) -> Tensor:
    """softmax((q · scale) kᵀ) v from matmul + softmax.

    Scales the (Q, dh) queries rather than the (Q, M) scores and masks the scores in place (autograd
    saved q and k for the product, not its output): two fewer passes over the largest tensor.
    """
    k, v = _repeat_kv(q, k, v)
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
    """Plain softmax(q kᵀ · scale) v in fp32 (fp64 for fp64 inputs): the check for the other kernels."""
    k, v = _repeat_kv(q, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)  # never below fp32, never a downcast of fp64
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # (B, H, Q, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
