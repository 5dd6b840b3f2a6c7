"""The Flamingo Perceiver Resampler (Alayrac et al., 2022): any number of patches -> N latents.

Each layer is a shared `CrossAttentionBlock` whose keys/values are ``cat(norm(media),
norm(latents))``: latents attend to the media and to themselves. Media items (T) and frames (F)
are batch-like for the attention: every media item is resampled on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import CrossAttentionBlock, make_norm

__all__ = ["PerceiverResampler"]


class PerceiverResampler(nn.Module):
    """(B, T, F, P, D), (B, T, P, D) or (B, P, D) media features -> (B, T, num_latents, out_dim).

    Args:
        dim: width of the media features and of the latents.
        depth: number of resampler layers.
        num_latents: output tokens per media item (64 in Flamingo and Idefics2).
        heads, head_dim, num_kv_heads: attention shape (grouped key/value heads if fewer kv heads).
        ff_mult, ff_gated, ff_activation: the MLP (GELU MLP, or SwiGLU with gated=True, 'silu').
        norm, norm_eps: 'layernorm' or 'rmsnorm'.
        max_frames: if set, learned frame embeddings (max_frames, dim) are added per frame F.
        max_media: if set, learned media-time embeddings (max_media, dim) are added per media T.
        num_patch_positions: if set, learned patch position embeddings (P, dim) are added.
        pos_init_std: init std of those embeddings (a small std makes position hard to learn).
        out_dim: if set, a final linear projection to this width (e.g. an LM's hidden size).
        latent_init_std: init std of the learned latents.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        num_latents: int = 64,
        *,
        heads: int = 8,
        head_dim: int = 64,
        num_kv_heads: int | None = None,
        ff_mult: float = 4.0,
        ff_gated: bool = False,
        ff_activation: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float | None = None,
        max_frames: int | None = None,
        max_media: int | None = None,
        num_patch_positions: int | None = None,
        pos_init_std: float = 1.0,
        out_dim: int | None = None,
        latent_init_std: float = 1.0,
        use_sdpa: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in [("dim", dim), ("depth", depth), ("num_latents", num_latents)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerceiverResampler: {name} must be a positive int, got {value!r}")
        if out_dim is not None and out_dim <= 0:
            raise ValueError(f"PerceiverResampler: out_dim must be positive, got {out_dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.depth, self.num_latents = dim, depth, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim, **factory) * latent_init_std)

        def embedding(n: int | None) -> nn.Parameter | None:
            return None if n is None else nn.Parameter(torch.randn(n, dim, **factory) * pos_init_std)

        self.frame_embeddings = embedding(max_frames)
        self.media_time_embeddings = embedding(max_media)
        self.patch_position_embeddings = embedding(num_patch_positions)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(
                dim,
                dim,
                heads=heads,
                head_dim=head_dim,
                num_kv_heads=num_kv_heads,
                ff_mult=ff_mult,
                ff_gated=ff_gated,
                ff_activation=ff_activation,
                ff_bias=False,
                norm=norm,
                norm_eps=norm_eps,
                kv_includes_queries=True,
                qkv_bias=False,
                out_bias=False,
                use_sdpa=use_sdpa,
                **factory,
            )
            for _ in range(depth)
        )
        self.norm = make_norm(norm, dim, norm_eps, **factory)
        self.proj = None if out_dim is None else nn.Linear(dim, out_dim, **factory)
        self.out_dim = dim if out_dim is None else out_dim

    def forward(self, x: Tensor, mask: Tensor | None = None, media_mask: Tensor | None = None) -> Tensor:
        """Resample media features.

        Args:
            x: (B, P, D), (B, T, P, D) or (B, T, F, P, D).
            mask: boolean patch mask, True = real patch; same leading shape as ``x`` without D.
            media_mask: (B, T) boolean, True = a real media item; outputs of absent media are zero.

        Returns:
            (B, T, num_latents, out_dim) (T = 1 for 3-D input).
        """
        x5, mask5 = self._as_5d(x, mask)
        b, t, f, p, d = x5.shape
        if self.frame_embeddings is not None:
            if f > self.frame_embeddings.shape[0]:
                raise ValueError(f"PerceiverResampler: got {f} frames, max_frames is {self.frame_embeddings.shape[0]}")
            x5 = x5 + self.frame_embeddings[:f, None, :]  # (F, 1, D)
        if self.media_time_embeddings is not None:
            if t > self.media_time_embeddings.shape[0]:
                raise ValueError(
                    f"PerceiverResampler: got {t} media, max_media is {self.media_time_embeddings.shape[0]}"
                )
            x5 = x5 + self.media_time_embeddings[:t, None, None, :]  # (T, 1, 1, D)
        if self.patch_position_embeddings is not None:
            if p != self.patch_position_embeddings.shape[0]:
                raise ValueError(
                    f"PerceiverResampler: got {p} patches, num_patch_positions is "
                    f"{self.patch_position_embeddings.shape[0]}"
                )
            x5 = x5 + self.patch_position_embeddings
        media = x5.reshape(b * t, f * p, d)  # (B*T, F*P, D): each media item resampled alone
        flat_mask = None if mask5 is None else mask5.reshape(b * t, f * p)
        latents = self.latents.expand(b * t, -1, -1)  # (B*T, N, D)
        for layer in self.layers:
            latents = layer(latents, media, flat_mask)
        out = self.norm(latents)
        if self.proj is not None:
            out = self.proj(out)
        out = out.view(b, t, self.num_latents, self.out_dim)
        if media_mask is not None:
            if media_mask.shape != (b, t) or media_mask.dtype != torch.bool:
                raise ValueError(
                    f"PerceiverResampler: media_mask must be boolean of shape (B, T)=({b}, {t}), "
                    f"got {media_mask.dtype} {tuple(media_mask.shape)}"
                )
            out = out * media_mask[:, :, None, None].to(out.dtype)
        return out

    def _as_5d(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"PerceiverResampler: x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"PerceiverResampler: x must be floating point, got {x.dtype}")
        if x.dim() not in (3, 4, 5) or x.shape[-1] != self.dim:
            raise ValueError(
                f"PerceiverResampler: x must be (B, P, D), (B, T, P, D) or (B, T, F, P, D) with "
                f"D={self.dim}, got {tuple(x.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(
                f"PerceiverResampler: mask must be boolean of shape {tuple(x.shape[:-1])} "
                f"(x's shape without D), got {mask.dtype} {tuple(mask.shape)}"
            )
        if x.dim() == 3:
            x, mask = x[:, None, None], None if mask is None else mask[:, None, None]
        elif x.dim() == 4:
            x, mask = x[:, :, None], None if mask is None else mask[:, :, None]
        return x, mask
