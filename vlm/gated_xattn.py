"""Flamingo gated cross-attention injected into a pretrained decoder without renaming its weights.

A forward pre-hook on every k-th decoder layer rewrites that layer's input hidden states:

    y = y + tanh(a) * XAttn(LN(y), media)       # a = 0 at init
    y = y + tanh(b) * FF(LN(y))                 # b = 0 at init

so at init the LM computes exactly what it computed before, and the LM's state dict is untouched
(the new blocks live in ``GatedCrossAttention.blocks``). Each text token attends only to the latents
of the latest ``<image>`` at or before it; tokens before any image get no update at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resampler import Attention, AttentionSpec, FeedForward, FeedForwardSpec, make_norm

__all__ = ["GatedCrossAttentionBlock", "GatedCrossAttention"]


class GatedCrossAttentionBlock(nn.Module):
    """Gated residual cross-attention then gated residual MLP, both pre-norm, gates tanh(0) = 0."""

    def __init__(self, dim: int, media_dim: int, *, heads: int, head_dim: int, ff_mult: float) -> None:
        super().__init__()
        self.norm_attn = make_norm("layernorm", dim)
        self.attn = Attention(dim, media_dim, AttentionSpec(heads=heads, head_dim=head_dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm_ff = make_norm("layernorm", dim)
        self.ff = FeedForward(dim, FeedForwardSpec(mult=ff_mult))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, media: Tensor, mask: Tensor, has_media: Tensor) -> Tensor:
        """x (B, L, dim), media (B, M, media_dim), mask (B, L, M), has_media (B, L, 1) -> (B, L, dim)."""
        h = x.float()
        h = h + torch.tanh(self.attn_gate) * self.attn(self.norm_attn(h), media, mask)
        h = h + torch.tanh(self.ff_gate) * self.ff(self.norm_ff(h)) * has_media
        return x + (h - x.float()).to(x.dtype)  # exactly x where the gates are 0


class GatedCrossAttention(nn.Module):
    """Owns the gated blocks and the hooks that run them before every ``every_k``-th decoder layer.

    Call ``set_media`` before each LM call (forward or generate); the hooks read it. It is kept
    until the next call so gradient checkpointing can recompute the layers during backward.
    """

    def __init__(
        self, layers: nn.ModuleList, dim: int, *, every_k: int, heads: int, head_dim: int, ff_mult: float
    ) -> None:
        super().__init__()
        self.layer_indices = [i for i in range(len(layers)) if i % every_k == 0]
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, dim, heads=heads, head_dim=head_dim, ff_mult=ff_mult)
            for _ in self.layer_indices
        )
        self._media: Tensor | None = None
        self._token_image: Tensor | None = None
        self._handles = [
            layers[i].register_forward_pre_hook(_PreHook(self, block), with_kwargs=True)
            for i, block in zip(self.layer_indices, self.blocks)
        ]

    def set_media(self, media: Tensor | None, image_positions: Tensor | None = None) -> None:
        """media (B, T, N, D) per-sample images (zero-padded), image_positions (B, L) bool marks of
        the ``<image>`` tokens; None for a text-only call."""
        if media is None:
            self._media = self._token_image = None
            return
        b, t, n, d = media.shape
        self._media = media.reshape(b, t * n, d)  # (B, T*N, D)
        self._media_index = torch.arange(t, device=media.device).repeat_interleave(n)  # (T*N,)
        self._token_image = image_positions.long().cumsum(dim=-1) - 1  # (B, L): latest image, -1 = none
        self._last_image = self._token_image[:, -1]  # what generated tokens attend to

    def _mask_for(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        b, length = hidden.shape[:2]
        token_image = self._token_image
        if token_image.shape[1] != length:  # decoding with a KV cache: new tokens follow every image
            token_image = self._last_image[:, None].expand(-1, length)
        if b != token_image.shape[0]:  # beam search / num_return_sequences expand the batch
            token_image = token_image.repeat_interleave(b // token_image.shape[0], dim=0)
        mask = token_image[:, :, None] == self._media_index[None, None, :]  # (B, L, T*N)
        return mask, (token_image >= 0)[:, :, None]

    def run_block(self, block: GatedCrossAttentionBlock, hidden: Tensor) -> Tensor:
        """The gated block on a decoder layer's input hidden states (B, L, dim), using the set media."""
        media = self._media
        if media.shape[0] != hidden.shape[0]:
            media = media.repeat_interleave(hidden.shape[0] // media.shape[0], dim=0)
        mask, has_media = self._mask_for(hidden)
        return block(hidden, media.to(hidden.device), mask.to(hidden.device), has_media.to(hidden.device))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _PreHook:
    """Forward pre-hook of one decoder layer. An object rather than a closure, so ``copy.deepcopy`` and
    pickling of the whole VLM map it to the copied blocks instead of the original ones."""

    def __init__(self, owner: GatedCrossAttention, block: GatedCrossAttentionBlock) -> None:
        self.owner, self.block = owner, block

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.owner._media is None:
            return None
        if args:
            return (self.owner.run_block(self.block, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.owner.run_block(self.block, kwargs["hidden_states"])}
