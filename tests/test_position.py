"""Fourier features against an independent numpy computation of DeepMind's formula."""

import numpy as np
import pytest
import torch

from resampler.nn.position import (
    FourierPositionEncoding,
    LearnedPositionEncoding,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
)


def numpy_fourier(index_dims, num_bands, max_resolution, concat_pos, sine_only):
    """The formula written out per position, per axis, per band, in float64."""
    axes = [np.linspace(-1.0, 1.0, n) for n in index_dims]
    rows = []
    for idx in np.ndindex(*index_dims):
        pos = [axes[a][i] for a, i in enumerate(idx)]
        sines, cosines = [], []
        for a, x in enumerate(pos):
            freqs = np.linspace(1.0, max_resolution[a] / 2.0, num_bands)
            sines += [np.sin(np.pi * f * x) for f in freqs]
            cosines += [np.cos(np.pi * f * x) for f in freqs]
        row = (list(pos) if concat_pos else []) + sines + ([] if sine_only else cosines)
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize(
    "index_dims, num_bands, max_res, concat_pos, sine_only",
    [
        ((17,), 5, (17,), True, False),
        ((6, 7), 4, (6, 7), True, False),
        ((6, 7), 4, (32, 20), False, False),
        ((3, 4, 5), 3, (3, 4, 5), True, True),
        ((4, 5), 6, (224, 224), False, True),
    ],
)
def test_grid_features_match_numpy(index_dims, num_bands, max_res, concat_pos, sine_only):
    expected = numpy_fourier(index_dims, num_bands, max_res, concat_pos, sine_only)
    # The formula itself, in float64: exact to rounding.
    pos64 = linear_positions(index_dims, dtype=torch.float64).flatten(0, -2)
    exact = fourier_features(pos64, num_bands, max_res, concat_pos=concat_pos, sine_only=sine_only)
    np.testing.assert_allclose(exact.numpy(), expected, atol=1e-12)
    # The module computes in float32 (as DeepMind and Hugging Face do): sin/cos of an argument up to
    # pi * max_res / 2 carry that argument's float32 rounding, |arg| * 2^-24 per step, a few steps.
    enc = FourierPositionEncoding(
        index_dims, num_bands, max_resolution=max_res, concat_pos=concat_pos, sine_only=sine_only
    )
    got = enc(batch_size=2)
    assert got.shape == (2, int(np.prod(index_dims)), enc.out_dim)
    assert enc.out_dim == fourier_feature_dim(len(index_dims), num_bands, concat_pos, sine_only) == expected.shape[1]
    fp32_bound = 4 * np.pi * max(max_res) / 2 * np.finfo(np.float32).eps
    np.testing.assert_allclose(got[1].numpy(), expected, atol=fp32_bound)


def test_per_example_coordinates_for_point_clouds():
    pos = torch.rand(3, 11, 3) * 2 - 1
    enc = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8, 8))
    got = enc(pos=pos)
    freqs = torch.linspace(1, 4, 4)
    expected_sin = torch.sin(torch.pi * pos[..., :, None] * freqs).flatten(-2)
    torch.testing.assert_close(got[..., :3], pos)
    torch.testing.assert_close(got[..., 3:15], expected_sin)
    with pytest.raises(ValueError, match="3 axes"):
        enc(pos=torch.rand(3, 11, 2))


def test_linear_positions_grid():
    grid = linear_positions((2, 3))
    assert grid.shape == (2, 3, 2)
    assert grid[0, 0].tolist() == [-1.0, -1.0] and grid[1, 2].tolist() == [1.0, 1.0]
    assert grid[0, 1].tolist() == [-1.0, 0.0]


def test_learned_positions():
    enc = LearnedPositionEncoding(5, 4, init_std=1.0)
    out = enc(3)
    assert out.shape == (3, 5, 4)
    out.sum().backward()
    assert enc.weight.grad is not None
    with pytest.raises(ValueError):
        LearnedPositionEncoding(0, 4)
    with pytest.raises(ValueError, match="axes"):
        fourier_features(torch.zeros(4, 2), 3, (8,))
