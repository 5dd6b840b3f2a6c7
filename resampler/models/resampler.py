"""The Perceiver Resampler (Flamingo, Alayrac et al., 2022) and the field's variants: any number of patches -> N latents.

    media = [in_proj](media) + learned frame / media-time / patch embeddings
    latents = learned (N, D)
    for block in layers:                       # CrossAttentionBlock(kv_includes_queries=latents_in_keys)
        latents = block(latents, media, mask)  # keys/values: cat(norm_kv(media), norm_q(latents))
    return norm(latents) [@ proj]

Media items (T) are batch-like: each is resampled on its own; its frames (F) are flattened into one
sequence of F*P patches. Absent media (``media_mask`` False) are not computed and come out as zeros.

The variants are options of the same config: Flamingo / OpenFlamingo (the defaults), IDEFICS
(``qk_norm``, ReLU MLP), Idefics2 (RMSNorm, SwiGLU, grouped kv heads), and the MiniCPM-V / Qwen-VL
one-layer resampler (``depth=1, feed_forward=False, query_residual=False, latents_in_keys=False``,
fixed 2D sin-cos ``sincos_positions`` on the keys (and queries) but not the values, biases on,
``input_dim`` for its ``kv_proj``, ``proj_bias=False`` for its output matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..nn.attention import AttentionSpec
from ..nn.blocks import CrossAttentionBlock, FeedForwardSpec
from ..nn.norms import NormSpec, make_norm
from ..nn.position import sincos_2d

__all__ = ["ResamplerConfig", "PerceiverResampler"]


@dataclass
class ResamplerConfig:
    """Shape of a `PerceiverResampler` (no biases anywhere by default, as in Flamingo).

    dim: width of the media features and of the latents (None only in a VLM config, where it is the
    vision tower's width). depth: layers. num_latents: output tokens per media item (64 in Flamingo
    and Idefics2). heads, head_dim, num_kv_heads: attention shape (grouped key/value heads with fewer
    kv heads). ff_mult, ff_activation, ff_gated: the MLP (GELU MLP; SwiGLU = 'silu' + gated).
    norm, norm_eps: 'layernorm' or 'rmsnorm'. max_frames / max_media / num_patch_positions: sizes of
    learned frame, media-time and patch-position embeddings (None: none), initialised with std
    ``pos_init_std`` (a small std makes position hard to learn). latent_init_std: the latents' init
    std. out_dim: a final linear projection to this width (None: none), with a bias if ``proj_bias``.
    use_sdpa: see `AttentionSpec`.

    Variants: latents_in_keys (the latents attend to themselves too; False in MiniCPM-V / Qwen-VL);
    feed_forward (an MLP after each attention); query_residual (``latents +`` around the attention);
    qk_norm ('layernorm' / 'rmsnorm' per head on queries and keys, IDEFICS); qkv_bias, out_bias (the
    attention's biases); ff_hidden_dim (the MLP's width instead of ``ff_mult``); input_dim (the media's
    width when it differs from ``dim``: a bias-free input projection first); sincos_positions ('keys':
    a fixed 2D sin-cos table of the actual patch grid added to the keys' input; 'queries_and_keys':
    also one of the latents' square grid to the queries').
    """

    dim: int | None = None
    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    head_dim: int = 64
    num_kv_heads: int | None = None
    ff_mult: float = 4.0
    ff_activation: str = "gelu"
    ff_gated: bool = False
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float | None = None
    max_frames: int | None = None
    max_media: int | None = None
    num_patch_positions: int | None = None
    pos_init_std: float = 1.0
    latent_init_std: float = 1.0
    out_dim: int | None = None
    proj_bias: bool = True
    use_sdpa: bool = True
    latents_in_keys: bool = True
    feed_forward: bool = True
    query_residual: bool = True
    qk_norm: Literal["layernorm", "rmsnorm"] | None = None
    qk_norm_eps: float | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    ff_hidden_dim: int | None = None
    input_dim: int | None = None
    sincos_positions: Literal["none", "keys", "queries_and_keys"] = "none"

    def __post_init__(self) -> None:
        for name in ("depth", "num_latents", "heads", "head_dim"):
            _check_positive(name, getattr(self, name))
        if self.sincos_positions not in ("none", "keys", "queries_and_keys"):
            raise ValueError(
                f"resampler.sincos_positions must be 'none', 'keys' or 'queries_and_keys', got {self.sincos_positions!r}"
            )
        if self.sincos_positions == "queries_and_keys" and math.isqrt(self.num_latents) ** 2 != self.num_latents:
            raise ValueError(
                f"resampler.sincos_positions='queries_and_keys' puts the latents on a square grid: "
                f"num_latents={self.num_latents} is not a square"
            )
        for name in (
            "dim",
            "num_kv_heads",
            "max_frames",
            "max_media",
            "num_patch_positions",
            "out_dim",
            "ff_hidden_dim",
            "input_dim",
        ):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.num_kv_heads is not None and self.heads % self.num_kv_heads:
            raise ValueError(f"resampler.num_kv_heads={self.num_kv_heads} must divide resampler.heads={self.heads}")
        if isinstance(self.ff_mult, bool) or not self.ff_mult > 0:
            raise ValueError(f"resampler.ff_mult must be positive, got {self.ff_mult!r}")
        self.block_specs()  # validates activation and norm names

    def block_specs(self) -> tuple[AttentionSpec, FeedForwardSpec, NormSpec]:
        """The attention, MLP and norm of every layer."""
        attn = AttentionSpec(
            heads=self.heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            qk_norm=self.qk_norm,
            qk_norm_eps=self.qk_norm_eps,
            use_sdpa=self.use_sdpa,
        )
        ff = FeedForwardSpec(
            mult=self.ff_mult,
            hidden_dim=self.ff_hidden_dim,
            activation=self.ff_activation,
            gated=self.ff_gated,
            bias=False,
        )
        return attn, ff, NormSpec(self.norm, self.norm_eps)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"resampler.{name} must be positive (an int), got {value!r}")


class PerceiverResampler(nn.Module):
    """(B, T, F, P, D), (B, T, P, D) or (B, P, D) media features -> (B, T, num_latents, out_dim)."""

    def __init__(self, config: ResamplerConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, ResamplerConfig):
            raise TypeError(f"PerceiverResampler takes a ResamplerConfig, got {type(config).__name__}")
        if config.dim is None:
            raise ValueError("PerceiverResampler: config.dim (the media width) must be set")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.dim, self.depth, self.num_latents = c.dim, c.depth, c.num_latents
        self.out_dim = c.dim if c.out_dim is None else c.out_dim
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim, **factory) * c.latent_init_std)

        def embedding(n: int | None) -> nn.Parameter | None:
            return None if n is None else nn.Parameter(torch.randn(n, c.dim, **factory) * c.pos_init_std)

        self.frame_embeddings = embedding(c.max_frames)
        self.media_time_embeddings = embedding(c.max_media)
        self.patch_position_embeddings = embedding(c.num_patch_positions)
        self.in_dim = c.dim if c.input_dim is None else c.input_dim
        self.in_proj = None if c.input_dim is None else nn.Linear(c.input_dim, c.dim, bias=False, **factory)
        attn, ff, norm = c.block_specs()
        self.layers = nn.ModuleList(
            CrossAttentionBlock(
                c.dim,
                c.dim,
                attn,
                ff,
                norm,
                query_residual=c.query_residual,
                kv_includes_queries=c.latents_in_keys,
                feed_forward=c.feed_forward,
                **factory,
            )
            for _ in range(c.depth)
        )
        self.norm = make_norm(norm, c.dim, **factory)
        self.proj = None if c.out_dim is None else nn.Linear(c.dim, c.out_dim, bias=c.proj_bias, **factory)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        media_mask: Tensor | None = None,
        *,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Resample media features.

        Args:
            x: (B, P, D), (B, T, P, D) or (B, T, F, P, D) (D = ``input_dim`` when set).
            mask: boolean patch mask, True = real patch; same leading shape as ``x`` without D.
                A media item with every patch masked still gets a defined output.
            media_mask: (B, T) boolean, True = a real media item; absent media are skipped and
                their outputs are exactly zero.
            grid: the (rows, columns) of the P patches, for ``sincos_positions`` (default: square).

        Returns:
            (B, T, num_latents, out_dim) (T = 1 for 3-D input).
        """
        x5, mask5 = self._as_5d(x, mask)
        b, t, f, p, _ = x5.shape
        if self.in_proj is not None:
            x5 = self.in_proj(x5)
        positions = self._sincos_positions(f, p, grid, x5)
        media = self._embed(x5).reshape(b * t, f * p, self.dim)  # (B*T, F*P, D): each media item alone
        flat_mask = None if mask5 is None else mask5.reshape(b * t, f * p)  # (B*T, F*P)
        if media_mask is None:
            out = self.resample(media, flat_mask, *positions)
            return out.view(b, t, self.num_latents, self.out_dim)
        if not isinstance(media_mask, Tensor) or media_mask.dtype != torch.bool or media_mask.shape != (b, t):
            got = f"{media_mask.dtype} {tuple(media_mask.shape)}" if isinstance(media_mask, Tensor) else media_mask
            raise ValueError(f"PerceiverResampler: media_mask must be boolean of shape (B, T)=({b}, {t}), got {got}")
        present = media_mask.reshape(b * t).to(media.device)  # (B*T,)
        out = media.new_zeros(b * t, self.num_latents, self.out_dim)
        if bool(present.any()):
            sub_mask = None if flat_mask is None else flat_mask[present]
            out = out.index_put((present,), self.resample(media[present], sub_mask, *positions))
        return out.view(b, t, self.num_latents, self.out_dim)

    def resample(
        self,
        media: Tensor,
        mask: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
    ) -> Tensor:
        """media (M, S, D) with embeddings added, mask (M, S) or None, fixed positions of the latents
        (N, D) and of the media's keys (S, D) or None -> (M, num_latents, out_dim)."""
        latents = self.latents.expand(media.shape[0], -1, -1)  # (M, N, D)
        for layer in self.layers:
            latents = layer(latents, media, mask, query_pos=query_pos, key_pos=key_pos)
        out = self.norm(latents)
        return out if self.proj is None else self.proj(out)

    def _sincos_positions(self, f: int, p: int, grid: tuple[int, int] | None, like: Tensor):
        """(query positions (N, D) or None, key positions (F*P, D) or None) for ``sincos_positions``."""
        kind = self.config.sincos_positions
        if kind == "none":
            if grid is not None:
                raise ValueError("PerceiverResampler: grid is only used with sincos_positions")
            return None, None
        rows, cols = grid if grid is not None else (math.isqrt(p), math.isqrt(p))
        if rows * cols != p:
            raise ValueError(
                f"PerceiverResampler: {p} patches do not form the grid {(rows, cols)}: pass grid=(rows, columns)"
            )
        factory = {"device": like.device, "dtype": like.dtype}
        keys = sincos_2d(rows, cols, self.dim, **factory).repeat(f, 1)  # (F*P, D): every frame the same grid
        side = math.isqrt(self.num_latents)
        queries = sincos_2d(side, side, self.dim, **factory) if kind == "queries_and_keys" else None
        return queries, keys

    def _embed(self, x: Tensor) -> Tensor:
        """x (B, T, F, P, D) plus the learned frame (F), media-time (T) and patch-position (P) embeddings."""
        b, t, f, p, d = x.shape
        for table, count, what in [(self.frame_embeddings, f, "frames"), (self.media_time_embeddings, t, "media")]:
            if table is not None and count > table.shape[0]:
                raise ValueError(f"PerceiverResampler: got {count} {what}, the embedding table has {table.shape[0]}")
        if self.patch_position_embeddings is not None and p != self.patch_position_embeddings.shape[0]:
            raise ValueError(
                f"PerceiverResampler: got {p} patches, num_patch_positions is {self.patch_position_embeddings.shape[0]}"
            )
        if self.media_time_embeddings is not None:
            x = x + self.media_time_embeddings[:t].view(1, t, 1, 1, d)
        if self.frame_embeddings is not None:
            x = x + self.frame_embeddings[:f].view(1, 1, f, 1, d)
        if self.patch_position_embeddings is not None:
            x = x + self.patch_position_embeddings.view(1, 1, 1, p, d)
        return x

    def _as_5d(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"PerceiverResampler: x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"PerceiverResampler: x must be floating point, got {x.dtype}")
        if x.dim() not in (3, 4, 5) or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"PerceiverResampler: x must be (B, P, D), (B, T, P, D) or (B, T, F, P, D) with "
                f"D={self.in_dim}, got {tuple(x.shape)}"
            )
        if x.shape[-2] == 0:
            raise ValueError(f"PerceiverResampler: x has no patches (P=0), got {tuple(x.shape)}")
        if x.device != self.latents.device:
            raise ValueError(f"PerceiverResampler: x is on {x.device} but the weights are on {self.latents.device}")
        if x.dtype != self.latents.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"PerceiverResampler: x has dtype {x.dtype} but the weights are {self.latents.dtype}: cast one, "
                "or run under torch.autocast"
            )
        if mask is not None and (
            not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:-1]
        ):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"PerceiverResampler: mask must be boolean of shape {tuple(x.shape[:-1])} (x's shape without D), got {got}"
            )
        if x.dim() == 3:
            x, mask = x[:, None, None], None if mask is None else mask[:, None, None]  # (B, 1, 1, P, D)
        elif x.dim() == 4:
            x, mask = x[:, :, None], None if mask is None else mask[:, :, None]  # (B, T, 1, P, D)
        return x, mask
