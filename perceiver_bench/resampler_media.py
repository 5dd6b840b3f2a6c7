"""B12: the Flamingo Perceiver Resampler over ragged, multi-frame media.

Data (fixed seed): each example holds T in [1, max_media] media items; each item has F frames of
P patches (P varies per item, padded to ``length`` and masked). Every item has a class; its patches
are drawn from that class's mixture over a shared bank of prototype vectors plus noise, so a single
patch says little and the class lives in the bag of patches.

The resampler (with a linear head on its mean latent) trains briefly on the item classes; then a
logistic-regression probe on the frozen, mean-pooled latents of the training items is scored on the
test items. Reported next to it: the majority-class baseline and, for context, the same probe on
mean-pooled raw patches. Pad-invariance: a padded, masked batch against each item run alone without
padding (max |difference| of the latents), for the SDPA and the reference attention paths, and in
float64 (where it drops to ~1e-16: the fp32 differences are summation-order rounding).

Options: ``max_media`` (3), ``frames`` (2), ``min_patches`` (4), ``feature_dim`` (32),
``prototypes`` (16), ``noise`` (1.0).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resampler.models.resampler import PerceiverResampler, ResamplerConfig

from .common import RunContext, TaskResult, predict_in_batches, train_model, training_facts
from .config import BenchConfig

TARGET = "linear-probe accuracy reported (> majority baseline); pad-invariance max diff <= 1e-5"


def make_media(cfg: BenchConfig, num_examples: int, seed: int) -> dict[str, Tensor]:
    """Ragged media batch: x (E, T, F, P, D), mask (E, T, F, P), media_mask (E, T), labels (E, T)."""
    opts = cfg.data.options
    max_media, frames = int(opts.get("max_media", 3)), int(opts.get("frames", 2))
    min_p, max_p = int(opts.get("min_patches", 4)), cfg.data.length
    dim, num_protos = int(opts.get("feature_dim", 32)), int(opts.get("prototypes", 16))
    noise, k = float(opts.get("noise", 1.0)), cfg.data.num_classes
    bank_gen = torch.Generator().manual_seed(cfg.seed + 12345)  # the task itself: same for train and test
    prototypes = torch.randn(num_protos, dim, generator=bank_gen)
    class_mix = torch.softmax(2.0 * torch.randn(k, num_protos, generator=bank_gen), dim=-1)  # (K, protos)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (num_examples, max_media), generator=gen)
    num_media = torch.randint(1, max_media + 1, (num_examples,), generator=gen)
    media_mask = torch.arange(max_media)[None, :] < num_media[:, None]  # (E, T)
    patches = torch.randint(min_p, max_p + 1, (num_examples, max_media), generator=gen)
    mask = torch.arange(max_p)[None, None, :] < patches[:, :, None]  # (E, T, P)
    mask = (mask & media_mask[:, :, None])[:, :, None, :].expand(-1, -1, frames, -1).contiguous()  # (E, T, F, P)
    probs = class_mix[labels]  # (E, T, protos)
    draws = torch.multinomial(probs.reshape(-1, num_protos), frames * max_p, replacement=True, generator=gen)
    x = prototypes[draws].view(num_examples, max_media, frames, max_p, dim)
    x = x + noise * torch.randn(x.shape, generator=gen)
    x = torch.where(mask[..., None], x, 100.0 * torch.randn(x.shape, generator=gen))  # garbage in padding
    return {"x": x, "mask": mask, "media_mask": media_mask, "labels": labels}


def _majority_accuracy(train_labels: Tensor, test_labels: Tensor) -> float:
    majority = torch.bincount(train_labels).argmax()
    return float((test_labels == majority).float().mean())


def _probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def pad_invariance(model: PerceiverResampler, data: dict[str, Tensor], count: int) -> float:
    """Max |latents(padded batch) - latents(item alone, unpadded)| over the first ``count`` examples' media."""
    with torch.no_grad():
        batched = model(data["x"][:count], data["mask"][:count], data["media_mask"][:count])  # (E, T, N, D)
        worst = 0.0
        for e in range(count):
            for t in range(data["x"].shape[1]):
                if not data["media_mask"][e, t]:
                    worst = max(worst, float(batched[e, t].abs().max()))  # absent media must be zero
                    continue
                p = int(data["mask"][e, t, 0].sum())
                alone = model(data["x"][e : e + 1, t : t + 1, :, :p])  # (1, 1, F, p, D), no mask at all
                worst = max(worst, float((alone[0, 0] - batched[e, t]).abs().max()))
    return worst


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    opts, mc = cfg.data.options, cfg.model
    dim = int(opts.get("feature_dim", 32))
    train = make_media(cfg, cfg.data.num_train, cfg.seed)
    test = make_media(cfg, cfg.data.num_test, cfg.seed + 1)
    model = PerceiverResampler(
        ResamplerConfig(
            dim=dim,
            depth=mc.num_self_attends,
            num_latents=mc.num_latents,
            heads=mc.self_heads,
            head_dim=max(1, dim // mc.self_heads),
            ff_mult=mc.widening,
            max_frames=int(opts.get("frames", 2)),
        )
    )
    head = nn.Linear(dim, cfg.data.num_classes)
    both = nn.ModuleDict({"resampler": model, "head": head})

    def features(part: dict[str, Tensor], idx: Tensor) -> Tensor:
        return model(part["x"][idx], part["mask"][idx], part["media_mask"][idx]).mean(dim=2)  # (B, T, D)

    def loss_fn(idx: Tensor) -> Tensor:
        logits = head(features(train, idx))  # (B, T, K)
        keep = train["media_mask"][idx]
        return F.cross_entropy(logits[keep], train["labels"][idx][keep])

    def flat(part: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
        feats = predict_in_batches(lambda i: features(part, i), len(part["x"]), cfg.train.eval_batch_size)
        keep = part["media_mask"]
        return feats[keep].numpy(), part["labels"][keep].numpy()

    def evaluate() -> dict[str, float]:
        logits = head(predict_in_batches(lambda i: features(test, i), len(test["x"]), cfg.train.eval_batch_size))
        keep = test["media_mask"]
        return {"head_accuracy": float((logits[keep].argmax(-1) == test["labels"][keep]).float().mean())}

    gen = torch.Generator().manual_seed(cfg.seed)
    random_train, random_test = flat(train), flat(test)
    random_probe = _probe(*random_train, *random_test)
    stats = train_model(both, loss_fn, cfg.data.num_train, cfg.train, gen, evaluate)
    probe = _probe(*flat(train), *flat(test))

    raw = []
    for part in (train, test):
        m = part["mask"][..., None].float()
        pooled = (part["x"] * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1)  # (E, T, D): mean of real patches
        raw += [pooled[part["media_mask"]].numpy(), part["labels"][part["media_mask"]].numpy()]
    raw_probe = _probe(*raw)
    baseline = _majority_accuracy(train["labels"][train["media_mask"]], test["labels"][test["media_mask"]])

    count = min(16, cfg.data.num_test)
    pad_sdpa = pad_invariance(model, test, count)
    for module in model.modules():
        if hasattr(module, "use_sdpa"):
            module.use_sdpa = False
    pad_reference = pad_invariance(model, test, count)
    for module in model.modules():
        if hasattr(module, "use_sdpa"):
            module.use_sdpa = True
    # In float64 the same comparison shows the fp32 differences are rounding, not leakage from padding.
    test64 = {k: v.double() if v.is_floating_point() else v for k, v in test.items()}
    pad_float64 = pad_invariance(copy.deepcopy(model).double(), test64, count)

    met = probe > baseline + 0.1 and max(pad_sdpa, pad_reference) <= 1e-5
    return TaskResult(
        metric_name="linear-probe top-1",
        metric=probe,
        baseline_name="majority",
        baseline=baseline,
        target=TARGET,
        target_met=met,
        **training_facts(model, stats),
        extra={
            "probe_before_training": random_probe,
            "probe_on_mean_pooled_raw_patches": raw_probe,
            "trained_head_accuracy": stats.curve[-1].get("head_accuracy") if stats.curve else None,
            "pad_invariance_max_abs_diff_sdpa": pad_sdpa,
            "pad_invariance_max_abs_diff_reference": pad_reference,
            "pad_invariance_max_abs_diff_float64": pad_float64,
            "test_media_items": int(test["media_mask"].sum()),
        },
    )


RUNNERS = {"resampler_media": run}
