"""B3: procedural point clouds (a ModelNet40 stand-in): 10 shape classes, rotated, scaled and jittered.

Each cloud samples ``length`` points on the surface of one shape (sphere, cube, cylinder, cone, torus,
square pyramid, tetrahedron, disk, helix, dumbbell), then applies a per-axis scale in [0.8, 1.2], a
uniformly random 3D rotation and Gaussian jitter. Inputs: the library's ``PointCloudPreprocessor``
(cloud normalised into [-1, 1], xyz + 3D Fourier features); the Perceiver sees an unordered set.

Options: ``jitter`` (0.02), ``max_resolution`` (Fourier, 16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.preprocessors import PointCloudPreprocessor

from .common import (
    RunContext,
    TaskResult,
    accuracy,
    majority_baseline,
    predict_in_batches,
    save_curve_plot,
    train_model,
    training_facts,
)
from .config import BenchConfig
from .models import make_classifier

TARGET = ">= 90% top-1"
SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "tetrahedron", "disk", "helix", "dumbbell")


def _triangles(vertices: Tensor, faces: list[tuple[int, int, int]], n: int, gen: torch.Generator) -> Tensor:
    """n points uniformly on the surface of the triangles (area-weighted)."""
    tri = vertices[torch.tensor(faces)]  # (T, 3, 3)
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1)
    pick = torch.multinomial(area, n, replacement=True, generator=gen)
    u, v = torch.rand(n, 1, generator=gen), torch.rand(n, 1, generator=gen)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    t = tri[pick]
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def sample_shape(shape: str, n: int, gen: torch.Generator) -> Tensor:
    """(n, 3) points on the surface of ``shape`` (canonical pose, roughly in [-1, 1])."""
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    if shape == "sphere":
        p = torch.randn(n, 3, generator=gen)
        return p / p.norm(dim=-1, keepdim=True)
    if shape == "cube":
        p = rand(n, 3) * 2 - 1
        axis = torch.randint(0, 3, (n,), generator=gen)
        p[torch.arange(n), axis] = torch.where(rand(n) < 0.5, -1.0, 1.0)
        return p
    angle = rand(n) * 2 * math.pi
    if shape in ("cylinder", "cone", "disk"):
        side = rand(n) < (2 / 3 if shape == "cylinder" else 0.7)
        if shape == "disk":
            side = torch.zeros(n, dtype=torch.bool)
        r_cap = rand(n).sqrt()
        if shape == "cylinder":
            z_side, r_side = rand(n) * 2 - 1, torch.ones(n)
            z_cap = torch.where(rand(n) < 0.5, -1.0, 1.0)
        elif shape == "cone":
            frac = rand(n).sqrt()  # distance from the apex, area-uniform
            z_side, r_side = 1 - 2 * frac, frac
            z_cap = torch.full((n,), -1.0)
        else:
            z_side, r_side, z_cap = torch.zeros(n), torch.ones(n), 0.05 * (rand(n) * 2 - 1)
        r, z = torch.where(side, r_side, r_cap), torch.where(side, z_side, z_cap)
        return torch.stack([r * angle.cos(), r * angle.sin(), z], dim=-1)
    if shape == "torus":
        phi = rand(n) * 2 * math.pi
        big, small = 0.75, 0.25
        ring = big + small * phi.cos()
        return torch.stack([ring * angle.cos(), ring * angle.sin(), small * phi.sin()], dim=-1)
    if shape == "pyramid":
        v = torch.tensor([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [0, 0, 1]], dtype=torch.float32)
        return _triangles(v, [(0, 1, 2), (0, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)], n, gen)
    if shape == "tetrahedron":
        v = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32)
        return _triangles(v, [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)], n, gen)
    if shape == "helix":
        t = rand(n) * 4 * math.pi
        return torch.stack([t.cos(), t.sin(), t / (2 * math.pi) - 1], dim=-1) + 0.03 * torch.randn(n, 3, generator=gen)
    if shape == "dumbbell":
        p = torch.randn(n, 3, generator=gen)
        p = 0.45 * p / p.norm(dim=-1, keepdim=True)
        p[:, 2] += torch.where(rand(n) < 0.5, -0.6, 0.6)
        return p
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def random_rotation(gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_clouds(cfg: BenchConfig, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """points (count, P, 3), labels (count,): classes balanced, order shuffled."""
    gen = torch.Generator().manual_seed(seed)
    k = min(cfg.data.num_classes, len(SHAPES))
    jitter = float(cfg.data.options.get("jitter", 0.02))
    labels = torch.randperm(count, generator=gen) % k
    clouds = []
    for label in labels.tolist():
        p = sample_shape(SHAPES[label], cfg.data.length, gen)
        p = p * (0.8 + 0.4 * torch.rand(1, 3, generator=gen))
        p = p @ random_rotation(gen).T + jitter * torch.randn(p.shape, generator=gen)
        clouds.append(p)
    return torch.stack(clouds), labels


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    train_p, train_y = make_clouds(cfg, cfg.data.num_train, cfg.seed)
    test_p, test_y = make_clouds(cfg, cfg.data.num_test, cfg.seed + 1)
    pre = PointCloudPreprocessor(
        cfg.model.num_bands, max_resolution=int(cfg.data.options.get("max_resolution", 16)), normalize=True
    )
    train_x, test_x = pre(train_p).features, pre(test_p).features
    k = int(train_y.max()) + 1
    model = make_classifier(cfg.model, pre.out_dim, k)

    def test_logits() -> Tensor:
        return predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size)

    gen = torch.Generator().manual_seed(cfg.seed)
    stats = train_model(
        model,
        lambda idx: F.cross_entropy(model(train_x[idx]), train_y[idx]),
        len(train_x),
        cfg.train,
        gen,
        lambda: {"accuracy": accuracy(test_logits(), test_y)},
    )
    logits = test_logits()
    acc = accuracy(logits, test_y)
    perm = torch.randperm(test_x.shape[1], generator=gen)
    with torch.no_grad():
        shuffled = model(test_x[:64, perm])
    per_class = {
        SHAPES[c]: float((logits.argmax(-1)[test_y == c] == c).float().mean()) for c in range(k) if (test_y == c).any()
    }
    fig = save_curve_plot(
        stats.curve, "accuracy", f"B3 point clouds ({cfg.size})", ctx.figure_path(f"B3-point-clouds-{cfg.size}.png")
    )
    return TaskResult(
        metric_name="test top-1",
        metric=acc,
        baseline_name="majority",
        baseline=majority_baseline(train_y, test_y),
        target=TARGET,
        target_met=acc >= 0.90,
        **training_facts(model, stats, [fig]),
        extra={
            "classes": k,
            "points_per_cloud": cfg.data.length,
            "per_class_accuracy": per_class,
            "max_logit_diff_under_point_shuffle": float((shuffled - logits[:64]).abs().max()),
        },
    )


RUNNERS = {"point_clouds": run}
