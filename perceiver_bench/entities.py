"""B10: entity sets (a StarCraft II entity-encoder stand-in): a variable-size set in, one output per entity.

Each set holds between ``min_entities`` and ``length`` entities; an entity is [type one-hot (4),
x, y, value]. Its label: is its value above the mean value of the entities *of its type* in the
same set (ties and singletons -> 0)? The answer depends on the whole set, so it must come from
the latents. Sets are padded to ``length`` and masked (mask (B, M), True = real entity); the
entities themselves are the decoder's queries (``PerceiverIO(queries_from_inputs=True)``).

Metric: per-entity accuracy over real entities; baseline: the majority label. Also checked: an
entity's output does not change when the padding grows, or when the set is shuffled.

Options: ``min_entities`` (3), ``types`` (4), ``reference`` ('type', or 'set': compare with the
mean of the whole set instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.perceiver_io import PerceiverIO

from .common import RunContext, TaskResult, save_curve_plot, train_model, training_facts
from .config import BenchConfig
from .models import encoder_config, make_decoder

TARGET = ">= 90% per-entity accuracy with variable set sizes"


def make_sets(cfg: BenchConfig, count: int, seed: int) -> dict[str, Tensor]:
    """entities (E, M, types + 3), mask (E, M), labels (E, M) (-1 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    m, types = cfg.data.length, int(cfg.data.options.get("types", 4))
    lo = int(cfg.data.options.get("min_entities", 3))
    sizes = torch.randint(lo, m + 1, (count,), generator=gen)
    mask = torch.arange(m)[None, :] < sizes[:, None]
    kind = torch.randint(0, types, (count, m), generator=gen)
    xy = torch.rand(count, m, 2, generator=gen) * 2 - 1
    value = torch.rand(count, m, generator=gen)
    onehot = F.one_hot(kind, types).float() * mask[..., None]  # (E, M, types)
    sums = torch.einsum("emt,em->et", onehot, value)  # per-type sums over real entities
    counts = onehot.sum(1)  # (E, types)
    if cfg.data.options.get("reference", "type") == "set":
        ref = ((value * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).expand(-1, m)  # (E, M): set mean
    else:
        ref = (sums / counts.clamp(min=1)).gather(1, kind)  # (E, M): mean of the entity's own type
    labels = (value > ref + 1e-6).long()
    labels = torch.where(mask, labels, torch.full_like(labels, -1))
    entities = torch.cat([onehot, xy, value[..., None]], dim=-1) * mask[..., None]
    return {"entities": entities, "mask": mask, "labels": labels}


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    mc = cfg.model
    train = make_sets(cfg, cfg.data.num_train, cfg.seed)
    test = make_sets(cfg, cfg.data.num_test, cfg.seed + 1)
    dim = train["entities"].shape[-1]
    decoder = make_decoder(mc, dim, 2)
    model = PerceiverIO(encoder_config(mc, dim), decoder, queries_from_inputs=True)
    gen = torch.Generator().manual_seed(cfg.seed)

    def logits_of(part: dict[str, Tensor], idx: Tensor) -> Tensor:
        return model(part["entities"][idx], part["mask"][idx])  # (B, M, 2)

    def loss_fn(idx: Tensor) -> Tensor:
        return F.cross_entropy(logits_of(train, idx).flatten(0, 1), train["labels"][idx].flatten(), ignore_index=-1)

    def test_accuracy() -> float:
        with torch.no_grad():
            pred = torch.cat(
                [
                    logits_of(test, torch.arange(s, min(s + cfg.train.eval_batch_size, cfg.data.num_test))).argmax(-1)
                    for s in range(0, cfg.data.num_test, cfg.train.eval_batch_size)
                ]
            )
        real = test["mask"]
        return float((pred[real] == test["labels"][real]).float().mean())

    stats = train_model(model, loss_fn, cfg.data.num_train, cfg.train, gen, lambda: {"accuracy": test_accuracy()})
    acc = test_accuracy()
    real_labels = test["labels"][test["mask"]]
    baseline = float(max((real_labels == 0).float().mean(), (real_labels == 1).float().mean()))
    pad_diff, shuffle_diff = _invariances(model, test, min(32, cfg.data.num_test), gen)
    fig = save_curve_plot(
        stats.curve, "accuracy", f"B10 entity sets ({cfg.size})", ctx.figure_path(f"B10-entities-{cfg.size}.png")
    )
    return TaskResult(
        metric_name="per-entity accuracy",
        metric=acc,
        baseline_name="majority",
        baseline=baseline,
        target=TARGET,
        target_met=acc >= 0.90,
        **training_facts(model, stats, [fig]),
        extra={
            "set_sizes": [int(cfg.data.options.get("min_entities", 3)), cfg.data.length],
            "max_diff_with_extra_padding": pad_diff,
            "max_diff_under_shuffle": shuffle_diff,
        },
    )


def _invariances(model, part: dict[str, Tensor], count: int, gen: torch.Generator) -> tuple[float, float]:
    """Max |output change| on real entities when 8 more padding slots (with garbage) are added / the set is shuffled."""
    x, mask = part["entities"][:count], part["mask"][:count]
    with torch.no_grad():
        base = model(x, mask)
        garbage = torch.randn(count, 8, x.shape[-1], generator=gen) * 10
        padded = model(torch.cat([x, garbage], 1), torch.cat([mask, torch.zeros(count, 8, dtype=torch.bool)], 1))
        perm = torch.randperm(x.shape[1], generator=gen)
        shuffled = model(x[:, perm], mask[:, perm])
    real = mask[..., None]
    pad_diff = float(((padded[:, : x.shape[1]] - base) * real).abs().max())
    unshuffled = torch.empty_like(shuffled)
    unshuffled[:, perm] = shuffled
    shuffle_diff = float(((unshuffled - base) * real).abs().max())
    return pad_diff, shuffle_diff


RUNNERS = {"entities": run}
