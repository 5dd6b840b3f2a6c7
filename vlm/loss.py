"""The VLM's causal-LM loss and the logits it needs.

`causal_lm_loss` (installed in the VLM's language model) is transformers' ``ForCausalLMLoss`` with one
(N, vocab) buffer fewer at the peak of the backward pass; `supervised_logits` keeps the LM head to the
positions that predict a label.

``F.cross_entropy`` keeps its log-softmax output for the backward pass, whose nll and log-softmax
backward then allocate two more (N, vocab) tensors. `LeanCrossEntropy` keeps the logits instead and
computes the gradient, ``(softmax - onehot) * grad / count``, in one new buffer: the same loss and
gradient (to rounding), with the LM's logits the largest activation of a small-LM training step.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from .processor import IGNORE_INDEX

__all__ = ["LeanCrossEntropy", "causal_lm_loss", "install_causal_lm_loss", "supervised_logits"]


class LeanCrossEntropy(torch.autograd.Function):
    """sum over valid rows of (logsumexp(logits) - logits[target]) / divisor; rows whose target is
    ``ignore_index`` add nothing and get a zero gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int, divisor: Tensor) -> Tensor:
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe[:, None])[:, 0]
        ctx.save_for_backward(logits, lse, safe, valid, divisor)
        return torch.where(valid, lse - picked, 0.0).sum() / divisor

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, safe, valid, divisor = ctx.saved_tensors
        out = torch.sub(logits, lse[:, None]).exp_()  # softmax, the one new (N, vocab) buffer
        out.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
        out.mul_((valid.to(out.dtype) * (grad / divisor))[:, None])
        return out, None, None, None


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """``transformers.loss.loss_utils.ForCausalLMLoss``'s signature and result (mean over the label
    tokens, or sum / ``num_items_in_batch``), computed by `LeanCrossEntropy`."""
    logits = logits.float()
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().to(logits.dtype)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=logits.device).to(logits.dtype)
    return LeanCrossEntropy.apply(logits, targets, ignore_index, divisor)


def install_causal_lm_loss(lm: nn.Module) -> bool:
    """Make ``lm`` (a transformers causal LM) compute its loss with `causal_lm_loss`, when it uses
    transformers' default causal-LM loss (a model with its own loss keeps it) -> whether it did."""
    from transformers import PreTrainedModel

    if type(lm).loss_function is not PreTrainedModel.loss_function or "_loss_function" in vars(lm):
        return False
    if getattr(lm, "loss_type", None) not in (None, "ForCausalLM"):
        return False
    lm.loss_function = causal_lm_loss
    return True


@functools.cache
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def supervised_logits(lm: nn.Module, labels: Tensor, lm_kwargs: dict) -> tuple[Tensor, dict]:
    """(labels, LM kwargs) that keep only the logits from the one before the batch's first label on
    (HF ``logits_to_keep``; an explicit ``logits_to_keep`` wins): the LM's loss shifts labels by one,
    so the last k labels pair with the last k logits exactly."""
    if "logits_to_keep" in lm_kwargs or not _keeps_logits(type(lm)):
        return labels, lm_kwargs
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    keep = labels.shape[1] - int(supervised[0]) + 1 if len(supervised) else 0
    if not 0 < keep < labels.shape[1]:  # nothing supervised, or the first position already is
        return labels, lm_kwargs
    # positions as a tensor: the head then gets a contiguous gather of them (a strided slice (B, k, H)
    # goes to a batched matmul with the head's weight expanded, several times slower on CPU)
    positions = torch.arange(labels.shape[1] - keep, labels.shape[1], device=labels.device)
    return labels[:, -keep:], {**lm_kwargs, "logits_to_keep": positions}
