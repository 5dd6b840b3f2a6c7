"""Flamingo gated cross-attention injected into a pretrained decoder without renaming its weights.

A forward pre-hook on chosen decoder layers rewrites that layer's input hidden states:

    y = y + tanh(a) * XAttn(norm(y), media)     # a = 0 at init
    y = y + tanh(b) * FF(norm(y))               # b = 0 at init

so at init the LM computes exactly what it computed before, and the LM's state dict is untouched
(the new blocks live in ``GatedCrossAttention.blocks``). The block is built from the core's
`Attention`, `FeedForward` and norms, with the options of `vlm.config.InjectionConfig`: the variants of
OpenFlamingo (LayerNorm, GELU MLP, scalar gates, no biases, blocks before layers i with (i + 1) % k == 0)
and IDEFICS (RMSNorm, SwiGLU MLP, per-channel gates, per-head q/k RMSNorm, layers i with i % k == 0).

Which image a token sees is recomputed at every LM call from that call's ``input_ids`` (a forward
pre-hook on the LM): the latest ``<image>`` at or before it (optionally none after an eos until the
next image, IDEFICS); a token with no image gets a zero attention output (IDEFICS'
``cross_attention_gate``). A call that continues a KV cache holds only new tokens: they see what the
last prompt token saw (OpenFlamingo and IDEFICS do the same). Media are attached only inside
``attach`` (the VLM's forward / generate): a plain call of the LM afterwards is the text-only LM.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from resampler import Attention, AttentionSpec, FeedForward, FeedForwardSpec, NormSpec, make_norm
from resampler.nn.attention import zero_unattended

__all__ = ["GatedCrossAttentionBlock", "GatedCrossAttention", "latest_image_index"]


class GatedCrossAttentionBlock(nn.Module):
    """Gated residual cross-attention then gated residual MLP, both pre-norm, gates tanh(0) = 0.

    ``gate``: 'scalar' (one value per gate) or 'vector' (one per channel). ``ff_scope``: 'all' (the FF
    branch updates every token) or 'after_image' (only tokens that see an image).
    """

    def __init__(
        self,
        dim: int,
        media_dim: int,
        attn: AttentionSpec,
        ff: FeedForwardSpec,
        norm: NormSpec,
        *,
        gate: str = "scalar",
        ff_scope: str = "all",
    ) -> None:
        super().__init__()
        if gate not in ("scalar", "vector"):
            raise ValueError(f"gate must be 'scalar' or 'vector', got {gate!r}")
        if ff_scope not in ("all", "after_image"):
            raise ValueError(f"ff_scope must be 'all' or 'after_image', got {ff_scope!r}")
        self.ff_scope = ff_scope
        gate_shape = (1,) if gate == "scalar" else (dim,)
        self.norm_attn = make_norm(norm, dim)
        self.attn = Attention(dim, media_dim, attn)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.norm_ff = make_norm(norm, dim)
        self.ff = FeedForward(dim, ff)
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape))

    def forward(
        self, x: Tensor, media: Tensor | None, mask: Tensor | None, has_media: Tensor, kv: tuple | None = None
    ) -> Tensor:
        """x (B, L, dim), media (B, M, media_dim) or None (no image in the batch), mask (B, L, M) True =
        attend, has_media (B, L, 1) the tokens that see an image -> (B, L, dim). ``kv``: the media's
        keys and values, projected earlier (`media_kv`), used instead of projecting ``media`` again."""
        h = x.float()
        if media is not None:  # a token whose mask row is empty gets exactly 0 from the attention
            normed = self.norm_attn(h)
            attended = self.attn(normed, media, mask) if kv is None else self.attn.attend_kv(normed, *kv, mask)
            h = h + torch.tanh(self.attn_gate) * attended
        ff = self.ff(self.norm_ff(h))
        if self.ff_scope == "after_image":
            ff = ff * has_media
        h = h + torch.tanh(self.ff_gate) * ff
        return x + (h - x.float()).to(x.dtype)  # exactly x where the gates are 0

    def media_kv(self, media: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of ``media`` (B, M, media_dim) for queries under ``mask`` (B, L, M), rows
        no query attends to zeroed first (what ``forward`` does): valid for any later mask within it."""
        return self.attn.project_kv(zero_unattended(media, mask, mask.shape[1], self.attn.heads))


def latest_image_index(input_ids: Tensor, image_token_id: int, reset_token_id: int | None = None) -> Tensor:
    """(B, L) ids -> (B, L) index of the latest image at or before each token among its sample's images,
    -1 for none. ``reset_token_id``: a token after it (eos, IDEFICS) sees no image until the next one."""
    is_image = input_ids == image_token_id
    index = is_image.long().cumsum(dim=-1) - 1
    if reset_token_id is None:
        return index
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_image = torch.where(is_image, pos, -1).cummax(dim=-1).values
    last_reset = torch.where(input_ids == reset_token_id, pos, -1).cummax(dim=-1).values
    before = torch.cat([last_reset.new_full((input_ids.shape[0], 1), -1), last_reset[:, :-1]], dim=1)
    return index.masked_fill(before > last_image, -1)  # a reset strictly before the token, after its image


class GatedCrossAttention(nn.Module):
    """Owns the gated blocks and the hooks that run them before the chosen decoder layers.

    ``layers``: the LM's decoder-layer list; ``placement``: 'first' (layers i % every_k == 0) or 'last'
    ((i + 1) % every_k == 0). The VLM calls the LM inside ``attach(media)``; what the hooks read stays
    set after the call, so gradient checkpointing can recompute the layers during backward, until the
    next LM call made outside ``attach``, which clears it.
    """

    def __init__(
        self,
        lm: nn.Module,
        layers: nn.ModuleList,
        dim: int,
        media_dim: int,
        specs: tuple[AttentionSpec, FeedForwardSpec, NormSpec],
        *,
        every_k: int,
        placement: str = "first",
        gate: str = "scalar",
        ff_scope: str = "all",
        image_token_id: int,
        reset_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if placement not in ("first", "last"):
            raise ValueError(f"placement must be 'first' or 'last', got {placement!r}")
        offset = 0 if placement == "first" else 1
        self.layer_indices = [i for i in range(len(layers)) if (i + offset) % every_k == 0]
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, media_dim, *specs, gate=gate, ff_scope=ff_scope) for _ in self.layer_indices
        )
        self.image_token_id, self.reset_token_id = image_token_id, reset_token_id
        self._active = False
        self._media: Tensor | None = None
        self._media_index: Tensor | None = None
        self._token_image: Tensor | None = None  # (B_call, L) of the current LM call; None: blocks off
        self._end_state: Tensor | None = None  # (B_call,) what the last prompt token sees
        self._kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (block, batch) -> media K/V, no-grad calls
        self._handles = [lm.register_forward_pre_hook(_LMPreHook(self), with_kwargs=True)]
        self._handles += [
            layers[i].register_forward_pre_hook(_PreHook(self, block), with_kwargs=True)
            for i, block in zip(self.layer_indices, self.blocks)
        ]

    @contextmanager
    def attach(self, media: Tensor | None):
        """Run LM calls with ``media`` (B, T, N, D) per-sample images (zero-padded), or None for a batch
        without images (the blocks then run without attention)."""
        if media is None:
            self._media = self._media_index = None
        else:
            b, t, n, d = media.shape
            self._media = media.reshape(b, t * n, d)  # (B, T*N, D)
            self._media_index = torch.arange(t, device=media.device).repeat_interleave(n)  # (T*N,)
        self._active, self._end_state, self._kv = True, None, {}
        try:
            yield
        finally:
            self._active = False

    def on_lm_call(self, input_ids: Tensor | None, past_length: int) -> None:
        """Set which image each token of this LM call sees (the LM pre-hook calls it)."""
        if not self._active:
            self._media = self._media_index = self._token_image = self._end_state = None
            self._kv = {}
            return
        if input_ids is None:
            raise ValueError("gated cross-attention needs input_ids (it finds the <image> tokens in them)")
        if past_length == 0 or self._end_state is None:
            token_image = latest_image_index(input_ids, self.image_token_id, self.reset_token_id)  # (B, L)
            self._end_state, self._kv = token_image[:, -1], {}
        else:  # decoding with a KV cache: the new tokens follow the prompt
            token_image = self._end_state[:, None].expand(-1, input_ids.shape[1])
        self._token_image = token_image

    def run_block(self, block: GatedCrossAttentionBlock, hidden: Tensor) -> Tensor:
        """The gated block on a decoder layer's input hidden states (B, L, dim)."""
        token_image = self._token_image
        b = hidden.shape[0]
        if token_image.shape != hidden.shape[:2]:
            raise ValueError(
                f"gated cross-attention: the layer got hidden states {tuple(hidden.shape)} but the LM call's "
                f"input_ids are {tuple(token_image.shape)}"
            )
        has_media = (token_image >= 0)[:, :, None].to(hidden.device)  # (B, L, 1)
        media = mask = None
        if self._media is not None:
            media = self._media
            if media.shape[0] != b:  # beam search / num_return_sequences expand the batch
                media = media.repeat_interleave(b // media.shape[0], dim=0)
            mask = token_image[:, :, None] == self._media_index[None, None, :]  # (B, L, T*N)
            media, mask = media.to(hidden.device), mask.to(hidden.device)
        kv = None
        if media is not None and not torch.is_grad_enabled():  # generation: project the media once per prompt
            key = (id(block), b)
            if key not in self._kv:  # the prompt's call: later calls' tokens see what its last token sees
                self._kv[key] = block.media_kv(media, mask)
            kv = self._kv[key]
        return block(hidden, media, mask, has_media, kv=kv)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


class _LMPreHook:
    """Forward pre-hook of the LM: reads each call's input_ids. Objects rather than closures, so
    ``copy.deepcopy`` and pickling of the whole VLM map them to the copied modules."""

    def __init__(self, owner: GatedCrossAttention) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.owner.on_lm_call(input_ids, _past_length(kwargs))


class _PreHook:
    """Forward pre-hook of one decoder layer: runs its gated block on the layer's input."""

    def __init__(self, owner: GatedCrossAttention, block: GatedCrossAttentionBlock) -> None:
        self.owner, self.block = owner, block

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.owner._token_image is None:
            return None
        if args:
            return (self.owner.run_block(self.block, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.owner.run_block(self.block, kwargs["hidden_states"])}
