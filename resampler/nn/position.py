"""Position encodings: DeepMind's Fourier features, learned embeddings, fixed 2D sin-cos tables.

Fourier features (Perceiver, Jaegle et al. 2021): positions scaled to [-1, 1] per axis; for each
axis K bands with frequencies linearly spaced from 1 to max_resolution / 2; features laid out as
``[pos (d), sin(pi f x) (d*K, axis-major), cos(pi f x) (d*K)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "linear_positions",
    "fourier_features",
    "fourier_feature_dim",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "sincos_2d",
]


def linear_positions(
    index_dims: Sequence[int],
    output_range: tuple[float, float] = (-1.0, 1.0),
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Regular grid of positions, shape (*index_dims, len(index_dims)), 'ij' ordering."""
    axes = [torch.linspace(*output_range, steps=n, device=device, dtype=dtype) for n in index_dims]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1)


def fourier_feature_dim(num_axes: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False) -> int:
    per_axis = num_bands * (1 if sine_only else 2) + (1 if concat_pos else 0)
    return num_axes * per_axis


def fourier_features(
    pos: Tensor,
    num_bands: int,
    max_resolution: Sequence[int],
    *,
    concat_pos: bool = True,
    sine_only: bool = False,
) -> Tensor:
    """pos (..., d) in [-1, 1] -> Fourier features (..., fourier_feature_dim(d, num_bands, ...))."""
    d = pos.shape[-1]
    if len(max_resolution) != d:
        raise ValueError(f"max_resolution has {len(max_resolution)} entries but positions have {d} axes")
    if num_bands <= 0:
        raise ValueError(f"num_bands must be positive, got {num_bands}")
    freqs = torch.stack(
        [torch.linspace(1.0, res / 2, steps=num_bands, device=pos.device, dtype=pos.dtype) for res in max_resolution]
    )  # (d, K)
    scaled = (pos[..., :, None] * freqs).flatten(-2) * math.pi  # (..., d*K), axis-major
    feats = [torch.sin(scaled)] if sine_only else [torch.sin(scaled), torch.cos(scaled)]
    if concat_pos:
        feats.insert(0, pos)
    return torch.cat(feats, dim=-1)


class FourierPositionEncoding(nn.Module):
    """Fourier features of a regular grid (``forward(batch_size)``) or of given positions.

    ``forward(batch_size)`` returns (B, prod(index_dims), C) for the grid ``index_dims``;
    ``forward(pos=coords)`` encodes per-example coordinates (B, M, d) already scaled to [-1, 1]
    (point clouds), in which case ``max_resolution`` must be given.
    """

    def __init__(
        self,
        index_dims: Sequence[int] | None = None,
        num_bands: int = 64,
        *,
        max_resolution: Sequence[int] | None = None,
        concat_pos: bool = True,
        sine_only: bool = False,
    ) -> None:
        super().__init__()
        if index_dims is None and max_resolution is None:
            raise ValueError("FourierPositionEncoding needs index_dims or max_resolution")
        self.index_dims = None if index_dims is None else tuple(index_dims)
        self.max_resolution = tuple(max_resolution if max_resolution is not None else index_dims)
        self.num_bands = num_bands
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.num_axes = len(self.max_resolution)
        if self.index_dims is not None and len(self.index_dims) != self.num_axes:
            raise ValueError(f"index_dims {self.index_dims} and max_resolution {self.max_resolution} differ in axes")
        self.out_dim = fourier_feature_dim(self.num_axes, num_bands, concat_pos, sine_only)

    def forward(self, batch_size: int | None = None, *, pos: Tensor | None = None, device=None, dtype=None) -> Tensor:
        if pos is None:
            if self.index_dims is None or batch_size is None:
                raise ValueError("FourierPositionEncoding: give batch_size for the grid, or pos=(B, M, d)")
            pos = linear_positions(self.index_dims, device=device).flatten(0, -2)  # (M, d)
            pos = pos.expand(batch_size, *pos.shape)
        elif pos.shape[-1] != self.num_axes:
            raise ValueError(
                f"FourierPositionEncoding: pos must have {self.num_axes} axes, got shape {tuple(pos.shape)}"
            )
        feats = fourier_features(
            pos.float(), self.num_bands, self.max_resolution, concat_pos=self.concat_pos, sine_only=self.sine_only
        )
        return feats.to(dtype) if dtype is not None else feats


class LearnedPositionEncoding(nn.Module):
    """A trainable (N, dim) table, broadcast over the batch: ``forward(batch_size) -> (B, N, dim)``."""

    def __init__(self, num_positions: int, dim: int, *, init_std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        if num_positions <= 0 or dim <= 0:
            raise ValueError(f"LearnedPositionEncoding: sizes must be positive, got ({num_positions}, {dim})")
        self.weight = nn.Parameter(torch.empty(num_positions, dim, device=device, dtype=dtype))
        self.init_std = init_std
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, batch_size: int) -> Tensor:
        return self.weight.expand(batch_size, *self.weight.shape)


def sincos_2d(height: int, width: int, dim: int, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2D sin-cos positions of a (height, width) grid, row-major -> (height * width, dim).

    The MAE / Qwen-VL / MiniCPM-V table: the first half of the channels encodes the column index, the
    second half the row index; each half is ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim/4))``,
    i < dim / 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    if height <= 0 or width <= 0:
        raise ValueError(f"sincos_2d needs a non-empty grid, got ({height}, {width})")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega  # (H*W, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (H*W, D/2)

    return torch.cat([encode(cols), encode(rows)], dim=-1).to(device=device, dtype=dtype)  # (H*W, D)
