"""Input adapters: raw modalities -> (B, M, C) features (+ (B, M) mask) for the Perceiver encoder.

Every preprocessor returns a `Preprocessed`: ``features`` (B, M, C), ``mask`` (B, M) bool or None,
``without_pos`` (the features before position encodings were added), ``index_dims`` (the grid the
M inputs came from) and, for the multimodal one, ``modality_sizes``. ``out_dim`` is C.

- `ImagePreprocessor`: pixels, space-to-depth patches, 1x1 conv or a conv stem, + 2D/3D Fourier or
  learned positions (concatenated or added).
- `AudioPreprocessor`: waveform patches + 1D Fourier positions.
- `TextPreprocessor`: byte embeddings + learned positions (see `tokenizer.ByteTokenizer`).
- `PointCloudPreprocessor`: per-example 3D Fourier features of the coordinates, padding masks.

The multimodal ones (one-hot labels, several modalities in one array) are in `multimodal.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.position import fourier_feature_dim, fourier_features, linear_positions

__all__ = [
    "Preprocessed",
    "space_to_depth",
    "ImagePreprocessor",
    "AudioPreprocessor",
    "TextPreprocessor",
    "PointCloudPreprocessor",
    "pad_point_clouds",
]


@dataclass
class Preprocessed:
    features: Tensor  # (B, M, C)
    mask: Tensor | None = None  # (B, M) bool, True = real input
    without_pos: Tensor | dict | None = None
    index_dims: tuple[int, ...] | None = None
    modality_sizes: dict[str, int] | None = None


def _check_mask(name: str, mask: Tensor | None, shape: tuple[int, int]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name}: mask must be a bool tensor of shape (B, M)={tuple(shape)}, got {got}")


def space_to_depth(frames: Tensor, temporal_block: int = 1, spatial_block: int = 1) -> Tensor:
    """(B, C, H, W) -> (B, H/s, W/s, s*s*C), or (B, T, C, H, W) -> (B, T/t, H/s, W/s, t*s*s*C).

    Channels-first in, channels-last out; block entries ordered (t, s_h, s_w, C) as in the official code.
    """
    s, t = spatial_block, temporal_block
    if frames.dim() == 4:
        b, c, h, w = frames.shape
        if h % s or w % s:
            raise ValueError(f"space_to_depth: H={h}, W={w} must be multiples of spatial_block={s}")
        x = frames.view(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)  # (B, H/s, W/s, s, s, C)
        return x.reshape(b, h // s, w // s, s * s * c)
    if frames.dim() == 5:
        b, tt, c, h, w = frames.shape
        if tt % t or h % s or w % s:
            raise ValueError(f"space_to_depth: T={tt}, H={h}, W={w} must be multiples of blocks t={t}, s={s}")
        x = frames.view(b, tt // t, t, c, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 5, 7, 3)
        return x.reshape(b, tt // t, h // s, w // s, t * s * s * c)  # (B, T/t, H/s, W/s, t*s*s*C)
    raise ValueError(f"space_to_depth: frames must be (B, C, H, W) or (B, T, C, H, W), got {tuple(frames.shape)}")


class _Positions(nn.Module):
    """Fourier features of a grid, or a learned (M, C) table; optionally projected to ``project_dim``."""

    def __init__(
        self,
        kind: str,
        *,
        num_bands: int = 64,
        max_resolution: Sequence[int] | None = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_positions: int | None = None,
        learned_dim: int | None = None,
        project_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if kind not in ("fourier", "learned"):
            raise ValueError(f"position encoding must be 'fourier' or 'learned', got {kind!r}")
        self.kind = kind
        self.num_bands, self.concat_pos, self.sine_only = num_bands, concat_pos, sine_only
        self.max_resolution = None if max_resolution is None else tuple(max_resolution)
        if kind == "fourier":
            if self.max_resolution is None:
                raise ValueError("Fourier positions need max_resolution (one entry per axis)")
            raw = fourier_feature_dim(len(self.max_resolution), num_bands, concat_pos, sine_only)
            self.table = None
        else:
            if not num_positions or not learned_dim:
                raise ValueError("learned positions need num_positions and learned_dim")
            self.table = nn.Parameter(torch.randn(num_positions, learned_dim, device=device, dtype=dtype) * 0.02)
            raw = learned_dim
        self.projection = None if project_dim is None else nn.Linear(raw, project_dim, device=device, dtype=dtype)
        self.dim = raw if project_dim is None else project_dim

    def forward(self, batch: int, index_dims: Sequence[int], device, dtype, pos: Tensor | None = None) -> Tensor:
        if self.kind == "learned":
            m = math.prod(index_dims)
            if m != self.table.shape[0]:
                raise ValueError(f"learned positions cover {self.table.shape[0]} inputs, got {m} ({tuple(index_dims)})")
            enc = self.table.expand(batch, -1, -1)
        else:
            if pos is None:
                if len(index_dims) != len(self.max_resolution):
                    raise ValueError(
                        f"Fourier positions: input grid {tuple(index_dims)} has {len(index_dims)} axes, "
                        f"max_resolution {self.max_resolution} has {len(self.max_resolution)}"
                    )
                pos = linear_positions(index_dims, device=device).reshape(1, -1, len(index_dims))  # (1, M, d)
            enc = fourier_features(
                pos, self.num_bands, self.max_resolution, concat_pos=self.concat_pos, sine_only=self.sine_only
            ).to(dtype)
            enc = enc.expand(batch, -1, -1)
        return enc if self.projection is None else self.projection(enc)


class _PositionMixin(nn.Module):
    concat: bool

    def _with_positions(self, x: Tensor, index_dims: Sequence[int], pos: Tensor | None = None) -> Tensor:
        enc = self.positions(x.shape[0], index_dims, x.device, x.dtype, pos)  # (B, M, P)
        if self.concat:
            return torch.cat([x, enc], dim=-1)
        if enc.shape[-1] != x.shape[-1]:
            raise ValueError(f"'add' positions need equal widths: features {x.shape[-1]}, positions {enc.shape[-1]}")
        return x + enc


class ImagePreprocessor(_PositionMixin):
    """Images (B, C, H, W) or videos (B, T, C, H, W), channels first -> (B, M, out_dim).

    Args:
        prep_type: 'pixels' (every pixel one input, optional stride ``spatial_downsample``),
            'patches' (space-to-depth blocks of ``temporal_downsample`` x ``spatial_downsample``^2),
            'conv1x1' (1x1 conv to ``out_channels`` with stride ``spatial_downsample``), or
            'conv' (7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem to ``out_channels``: 4x downsampling).
        conv_after_patching: a linear map of each patch to ``out_channels`` (the flow model).
        position: 'fourier' (``num_bands``, ``max_resolution`` per axis of the feature grid,
            default = that grid) or 'learned' (``num_positions`` x ``learned_pos_dim``).
        project_pos_dim: project the position encoding to this width.
        concat_pos_to_input: concatenate positions to the features (else add them).
    """

    def __init__(
        self,
        in_channels: int = 3,
        prep_type: str = "pixels",
        *,
        spatial_downsample: int = 1,
        temporal_downsample: int = 1,
        out_channels: int = 64,
        conv_after_patching: bool = False,
        conv_batchnorm: bool = True,
        position: str = "fourier",
        num_bands: int = 64,
        max_resolution: Sequence[int] | None = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_positions: int | None = None,
        learned_pos_dim: int | None = None,
        project_pos_dim: int | None = None,
        concat_pos_to_input: bool = True,
        video: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if prep_type not in ("pixels", "patches", "conv1x1", "conv"):
            raise ValueError(f"ImagePreprocessor: prep_type must be pixels/patches/conv1x1/conv, got {prep_type!r}")
        if prep_type in ("conv1x1", "conv") and temporal_downsample != 1:
            raise ValueError(f"ImagePreprocessor: {prep_type} does not downsample time; temporal_downsample must be 1")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.prep_type = in_channels, prep_type
        self.spatial_downsample, self.temporal_downsample = spatial_downsample, temporal_downsample
        self.concat = concat_pos_to_input
        if max_resolution is None and position == "fourier":
            raise ValueError("ImagePreprocessor: Fourier positions need max_resolution, e.g. (H, W) or (T, H, W)")
        self.positions = _Positions(
            position,
            num_bands=num_bands,
            max_resolution=max_resolution,
            concat_pos=concat_pos,
            sine_only=sine_only,
            num_positions=num_positions,
            learned_dim=learned_pos_dim,
            project_dim=project_pos_dim,
            **factory,
        )
        self.stem = None
        if prep_type == "conv":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False, **factory),
                nn.BatchNorm2d(out_channels, **factory) if conv_batchnorm else nn.Identity(),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2),
            )
            feat_dim = out_channels
        elif prep_type == "conv1x1":
            self.stem = nn.Conv2d(in_channels, out_channels, 1, stride=spatial_downsample, **factory)
            feat_dim = out_channels
        elif prep_type == "patches":
            feat_dim = in_channels * spatial_downsample**2 * (temporal_downsample if video else 1)
        else:
            feat_dim = in_channels
        self.patch_proj = None
        if conv_after_patching:
            if prep_type != "patches":
                raise ValueError("ImagePreprocessor: conv_after_patching needs prep_type='patches'")
            self.patch_proj = nn.Linear(feat_dim, out_channels, **factory)
            feat_dim = out_channels
        self.feature_dim = feat_dim
        self.out_dim = feat_dim + self.positions.dim if self.concat else self.positions.dim

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Preprocessed:
        if not isinstance(images, Tensor) or images.dim() not in (4, 5):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"ImagePreprocessor: images must be (B, C, H, W) or (B, T, C, H, W), got {shape}")
        channel_axis = 1 if images.dim() == 4 else 2
        if images.shape[channel_axis] != self.in_channels:
            raise ValueError(
                f"ImagePreprocessor: expected {self.in_channels} channels at dim {channel_axis} (channels first), "
                f"got shape {tuple(images.shape)}"
            )
        x = self._features(images)  # (B, *index_dims, C)
        b, index_dims = x.shape[0], tuple(x.shape[1:-1])
        x = x.reshape(b, -1, x.shape[-1])  # (B, M, C)
        _check_mask("ImagePreprocessor", mask, x.shape[:2])
        return Preprocessed(self._with_positions(x, index_dims), mask, x, index_dims)

    def _features(self, images: Tensor) -> Tensor:
        s, t = self.spatial_downsample, self.temporal_downsample
        if self.prep_type == "patches":
            x = space_to_depth(images, t, s)
            if x.dim() == 5 and x.shape[1] == 1:  # two frames folded into one: an image grid (flow)
                x = x.squeeze(1)
            return x if self.patch_proj is None else self.patch_proj(x)
        if self.prep_type == "pixels":
            x = images[..., ::s, ::s]
            if x.dim() == 5:
                x = x[:, ::t]
        elif images.dim() == 4:
            x = self.stem(images)
        else:  # per-frame 2D stem
            b, tt = images.shape[:2]
            x = self.stem(images.flatten(0, 1))
            x = x.view(b, tt, *x.shape[1:])
        return x.movedim(-3, -1)  # channels last: (B, [T,] H, W, C)


class AudioPreprocessor(_PositionMixin):
    """Waveform (B, S) -> patches of ``samples_per_patch`` samples (B, S/spp, spp) + 1D Fourier positions.

    ``max_resolution`` defaults to the number of samples S (the official audio setting). A mask is
    per patch (B, S/spp).
    """

    def __init__(
        self,
        samples_per_patch: int = 16,
        *,
        num_bands: int = 192,
        max_resolution: int | None = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        num_samples: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if samples_per_patch <= 0:
            raise ValueError(f"AudioPreprocessor: samples_per_patch must be positive, got {samples_per_patch}")
        resolution = max_resolution if max_resolution is not None else num_samples
        if resolution is None:
            raise ValueError("AudioPreprocessor: give max_resolution (or num_samples) for the Fourier frequencies")
        self.samples_per_patch = samples_per_patch
        self.concat = True
        self.positions = _Positions(
            "fourier", num_bands=num_bands, max_resolution=(resolution,), concat_pos=concat_pos, sine_only=sine_only
        )
        self.out_dim = samples_per_patch + self.positions.dim

    def forward(self, audio: Tensor, mask: Tensor | None = None) -> Preprocessed:
        if audio.dim() == 3 and audio.shape[-1] == 1:
            audio = audio.squeeze(-1)
        if audio.dim() != 2 or audio.shape[1] % self.samples_per_patch:
            raise ValueError(
                f"AudioPreprocessor: audio must be (B, S) with S a multiple of {self.samples_per_patch}, "
                f"got {tuple(audio.shape)}"
            )
        x = audio.reshape(audio.shape[0], -1, self.samples_per_patch)  # (B, S/spp, spp)
        _check_mask("AudioPreprocessor", mask, x.shape[:2])
        return Preprocessed(self._with_positions(x, (x.shape[1],)), mask, x, (x.shape[1],))


class TextPreprocessor(nn.Module):
    """Token ids (B, L) -> token embedding + learned position embedding (B, L, dim)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(max_positions, dim, device=device, dtype=dtype)
        self.vocab_size, self.max_positions, self.out_dim = vocab_size, max_positions, dim

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Preprocessed:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"TextPreprocessor: tokens must be integer ids of shape (B, L), got {shape}")
        if tokens.shape[1] > self.max_positions:
            raise ValueError(
                f"TextPreprocessor: sequence length {tokens.shape[1]} > max_positions={self.max_positions}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"TextPreprocessor: token ids must lie in [0, {self.vocab_size})")
        _check_mask("TextPreprocessor", mask, tokens.shape)
        emb = self.token_embedding(tokens)  # (B, L, dim)
        pos = self.position_embedding(torch.arange(tokens.shape[1], device=tokens.device))
        return Preprocessed(emb + pos, mask, emb, (tokens.shape[1],))


def pad_point_clouds(clouds: Sequence[Tensor], features: Sequence[Tensor] | None = None):
    """Ragged clouds [(P_i, 3)] -> points (B, P_max, 3), mask (B, P_max) [, features (B, P_max, F)]."""
    if not clouds:
        raise ValueError("pad_point_clouds: give at least one cloud")
    p_max = max(c.shape[0] for c in clouds)
    points = clouds[0].new_zeros(len(clouds), p_max, 3)
    mask = torch.zeros(len(clouds), p_max, dtype=torch.bool, device=clouds[0].device)
    for i, c in enumerate(clouds):
        if c.dim() != 2 or c.shape[1] != 3:
            raise ValueError(f"pad_point_clouds: cloud {i} must be (P, 3), got {tuple(c.shape)}")
        points[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    if features is None:
        return points, mask
    feats = features[0].new_zeros(len(clouds), p_max, features[0].shape[-1])
    for i, f in enumerate(features):
        feats[i, : f.shape[0]] = f
    return points, mask, feats


class PointCloudPreprocessor(nn.Module):
    """Points (B, P, 3) in [-1, 1] [+ features (B, P, F)] -> [features, Fourier(points)] (B, P, C).

    Each example's own coordinates are encoded (no grid), so the encoder is permutation invariant
    over points. ``normalize=True`` rescales each cloud into [-1, 1] (centre of its bounding box,
    largest half-extent), using only the real points of the mask.
    """

    def __init__(
        self,
        num_bands: int = 64,
        *,
        max_resolution: int = 64,
        feature_dim: int = 0,
        concat_pos: bool = True,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.num_bands, self.max_resolution, self.concat_pos = num_bands, (max_resolution,) * 3, concat_pos
        self.feature_dim, self.normalize = feature_dim, normalize
        self.out_dim = feature_dim + fourier_feature_dim(3, num_bands, concat_pos)

    def forward(self, points: Tensor, mask: Tensor | None = None, features: Tensor | None = None) -> Preprocessed:
        if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[-1] != 3:
            shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
            raise ValueError(f"PointCloudPreprocessor: points must have shape (B, P, 3), got {shape}")
        _check_mask("PointCloudPreprocessor", mask, points.shape[:2])
        if (features is None) != (self.feature_dim == 0) or (
            features is not None and tuple(features.shape) != (*points.shape[:2], self.feature_dim)
        ):
            got = None if features is None else tuple(features.shape)
            raise ValueError(
                f"PointCloudPreprocessor: features must be (B, P, {self.feature_dim})"
                f"{' or None' if self.feature_dim == 0 else ''}, got {got}"
            )
        if self.normalize:
            points = self._normalize(points, mask)
        enc = fourier_features(points.float(), self.num_bands, self.max_resolution, concat_pos=self.concat_pos)
        enc = enc.to(points.dtype)
        x = enc if features is None else torch.cat([features, enc], dim=-1)
        return Preprocessed(x, mask, features, (points.shape[1],))

    @staticmethod
    def _normalize(points: Tensor, mask: Tensor | None) -> Tensor:
        m = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device) if mask is None else mask
        big = torch.finfo(points.dtype).max
        lo = points.masked_fill(~m[..., None], big).amin(dim=1, keepdim=True)
        hi = points.masked_fill(~m[..., None], -big).amax(dim=1, keepdim=True)
        centre, half = (lo + hi) / 2, ((hi - lo) / 2).amax(dim=-1, keepdim=True).clamp(min=1e-6)
        return ((points - centre) / half).masked_fill(~m[..., None], 0.0)
