"""Perceiver AR (Hawthorne et al., 2022): the last N positions are the latents.

``tokens (B, L) -> embed + learned absolute positions -> the last N positions cross-attend causally to
all L positions (causal_mask(N, L), bottom-right aligned) -> causal self-attention among the N latents
-> logits for those N positions``. Cost O(L N + depth N^2) instead of O(depth L^2).

Generation with a cache: the cross-attend caches keys/values of every position and each latent
layer caches those of the current latents. A new token becomes one more latent, so during generation
the latent window grows from N; with the cache this is exact because a latent only ever sees earlier
positions. When the window reaches ``max_generation_latents`` it is rebuilt from the last N
positions (a fresh prefill). ``generate(..., use_cache=False)`` recomputes every step with
``forward(sequence, num_latents=<the same window>)`` and gives the same tokens and logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.attention import AttentionSpec, KVCache, causal_mask
from ..nn.blocks import CrossAttentionBlock, FeedForwardSpec, SelfAttentionBlock, make_norm

__all__ = ["PerceiverARConfig", "PerceiverAR", "PerceiverARCache"]


@dataclass
class PerceiverARConfig:
    """Perceiver AR language model.

    Args:
        vocab_size: token ids in [0, vocab_size) (262 for `ByteTokenizer`).
        max_seq_len: longest sequence (prefix + latents) the position table covers.
        num_latents: N, the positions that act as latents (and get logits) in ``forward``.
        dim, depth, heads, head_dim: width, latent self-attention layers, heads, per-head width.
        cross_heads: heads of the causal cross-attend.
        ff_mult: MLP hidden width multiplier.
        max_generation_latents: cap of the growing latent window during generation (default 2N).
    """

    vocab_size: int = 262
    max_seq_len: int = 1024
    num_latents: int = 128
    dim: int = 256
    depth: int = 4
    heads: int = 8
    head_dim: int | None = None
    cross_heads: int | None = None
    ff_mult: float = 4.0
    dropout: float = 0.0
    max_generation_latents: int | None = None
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "num_latents", "dim", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerceiverARConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"PerceiverARConfig.depth must be an int >= 0, got {self.depth!r}")
        if self.num_latents > self.max_seq_len:
            raise ValueError(
                f"PerceiverARConfig: num_latents={self.num_latents} must be <= max_seq_len={self.max_seq_len}"
            )
        if self.head_dim is None:
            if self.dim % self.heads:
                raise ValueError(f"PerceiverARConfig: dim={self.dim} must be divisible by heads={self.heads}")
            self.head_dim = self.dim // self.heads
        if self.cross_heads is None:
            self.cross_heads = self.heads
        if self.max_generation_latents is None:
            self.max_generation_latents = 2 * self.num_latents
        if self.max_generation_latents < self.num_latents:
            raise ValueError(
                f"PerceiverARConfig: max_generation_latents={self.max_generation_latents} must be >= "
                f"num_latents={self.num_latents}"
            )


class PerceiverARCache:
    """Keys/values of the cross-attend (every position) and of each latent layer (current latents)."""

    def __init__(self, depth: int) -> None:
        self.cross = KVCache()
        self.layers = [KVCache() for _ in range(depth)]

    @property
    def length(self) -> int:
        return len(self.cross)

    @property
    def num_latents(self) -> int:
        return len(self.layers[0]) if self.layers else 0


class PerceiverAR(nn.Module):
    """``forward(tokens (B, L), mask=None, num_latents=None) -> logits (B, n, vocab)`` for the last n positions.

    ``mask`` (B, L) bool marks real tokens (left padding = False); positions count real tokens only,
    so a left-padded sequence gives the same logits as the unpadded one. ``num_latents`` overrides N.
    """

    def __init__(self, config: PerceiverARConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim, **factory)
        self.position_embedding = nn.Embedding(c.max_seq_len, c.dim, **factory)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        attn = AttentionSpec(heads=c.heads, head_dim=c.head_dim, dropout=c.dropout, use_sdpa=c.use_sdpa)
        ff = FeedForwardSpec(mult=c.ff_mult, dropout=c.dropout)
        self.cross_attend = CrossAttentionBlock(c.dim, c.dim, attn.replace(heads=c.cross_heads), ff, **factory)
        self.layers = nn.ModuleList(SelfAttentionBlock(c.dim, attn, ff, **factory) for _ in range(c.depth))
        self.norm = make_norm("layernorm", c.dim, **factory)
        self.to_logits = nn.Linear(c.dim, c.vocab_size, bias=False, **factory)

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"PerceiverAR: position {int(positions.max())} is beyond max_seq_len={self.config.max_seq_len}"
            )
        return self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, D)

    def _check(self, tokens: Tensor, mask: Tensor | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[1] == 0:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"PerceiverAR: tokens must be integer ids of shape (B, L) with L >= 1, got {shape}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"PerceiverAR: token ids must lie in [0, {self.config.vocab_size})")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
            raise ValueError(
                f"PerceiverAR: mask must be bool of shape (B, L)={tuple(tokens.shape)}, got {tuple(mask.shape)}"
            )

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        num_latents: int | None = None,
        *,
        cache: PerceiverARCache | None = None,
    ) -> Tensor:
        self._check(tokens, mask)
        if cache is not None and mask is not None:
            raise ValueError("PerceiverAR: a cache needs unpadded sequences (mask=None); positions would disagree")
        b, length = tokens.shape
        n = min(self.config.num_latents if num_latents is None else num_latents, length)
        if n <= 0:
            raise ValueError(f"PerceiverAR: num_latents must be positive, got {num_latents}")
        if mask is None:
            positions = torch.arange(length, device=tokens.device).expand(b, -1)
        else:
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        x = self._embed(tokens, positions)
        cross_mask = causal_mask(n, length, tokens.device)[None]  # (1, n, L)
        self_mask = causal_mask(n, n, tokens.device)[None]  # (1, n, n)
        if mask is not None:
            cross_mask = cross_mask & mask[:, None, :]
            self_mask = self_mask & mask[:, None, length - n :]
        h = self.cross_attend(x[:, length - n :], x, cross_mask, cache=None if cache is None else cache.cross)
        for i, layer in enumerate(self.layers):
            h = layer(h, self_mask, cache=None if cache is None else cache.layers[i])
        return self.to_logits(self.norm(h))  # (B, n, V)

    def _step(self, token: Tensor, cache: PerceiverARCache) -> Tensor:
        """One new token (B, 1) at position cache.length -> its logits (B, V); the window grows by one."""
        positions = torch.full_like(token, cache.length)
        x = self._embed(token, positions)  # (B, 1, D)
        h = self.cross_attend(x, x, cache=cache.cross)  # sees every cached position and itself
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cache=layer_cache)
        return self.to_logits(self.norm(h))[:, -1]

    @torch.no_grad()
    def generate(
        self,
        prefix: Tensor,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ):
        """Extend ``prefix`` (B, L0) by ``max_new_tokens`` tokens: greedy (temperature 0) or sampled.

        Returns (B, L0 + max_new_tokens) tokens, and with ``return_logits`` also the (B, T, V) logits
        each new token was chosen from.
        """
        self._check(prefix, None)
        if max_new_tokens < 0:
            raise ValueError(f"PerceiverAR.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if prefix.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"PerceiverAR.generate: prefix {prefix.shape[1]} + {max_new_tokens} new tokens exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        seq, all_logits = prefix, []
        cache, window = None, min(self.config.num_latents, prefix.shape[1])
        for step in range(max_new_tokens):
            if step > 0:
                window += 1
                if window > self.config.max_generation_latents:
                    window, cache = min(self.config.num_latents, seq.shape[1]), None  # rebuild the window
            if not use_cache:
                logits = self(seq, num_latents=window)[:, -1]
            elif cache is None:
                cache = PerceiverARCache(len(self.layers))
                logits = self(seq, num_latents=window, cache=cache)[:, -1]
            else:
                logits = self._step(seq[:, -1:], cache)
            all_logits.append(logits)
            seq = torch.cat([seq, self._choose(logits, temperature, generator)], dim=1)
        if return_logits:
            stacked = torch.stack(all_logits, dim=1) if all_logits else prefix.new_zeros(prefix.shape[0], 0, 0).float()
            return seq, stacked
        return seq

    @staticmethod
    def _choose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)
