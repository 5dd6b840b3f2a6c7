"""B11: mirrored copy with Perceiver AR and its KV cache (Perceiver AR's copy / long-context test).

A sequence is ``[BOS] x_1 ... x_n [SEP] x_n ... x_1`` with n = ``length`` random symbols from a
vocabulary of ``num_classes``; the model must emit the prefix reversed. ``PerceiverAR`` uses its last
N = n + 1 positions as latents (they predict the mirrored half) and cross-attends causally to
everything before them. Exact match: greedy ``generate(prefix, n, use_cache=True)`` reproduces the
whole mirrored half; checked as well: cached and uncached generation give the same tokens and logits.

Trivial baseline: exact match of always predicting the most frequent symbol (about 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.perceiver_ar import PerceiverAR, PerceiverARConfig

from .common import RunContext, TaskResult, save_curve_plot, train_model, training_facts
from .config import BenchConfig

TARGET = ">= 99% exact match (length >= 256); cached == uncached"
BOS, SEP, OFFSET = 0, 1, 2


def make_sequences(cfg: BenchConfig, count: int, seed: int) -> Tensor:
    """(count, 2n + 2) token ids: BOS, n symbols, SEP, the symbols reversed."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg.data.length
    x = torch.randint(OFFSET, OFFSET + cfg.data.num_classes, (count, n), generator=gen)
    bos, sep = torch.full((count, 1), BOS), torch.full((count, 1), SEP)
    return torch.cat([bos, x, sep, x.flip(1)], dim=1)


def build_model(cfg: BenchConfig) -> PerceiverAR:
    mc, n = cfg.model, cfg.data.length
    return PerceiverAR(
        PerceiverARConfig(
            vocab_size=OFFSET + cfg.data.num_classes,
            max_seq_len=2 * n + 2,
            num_latents=n + 1,
            dim=mc.latent_dim,
            depth=mc.num_self_attends,
            heads=mc.self_heads,
            cross_heads=mc.cross_heads,
            ff_mult=mc.widening,
            dropout=mc.dropout,
        )
    )


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    n = cfg.data.length
    train = make_sequences(cfg, cfg.data.num_train, cfg.seed)
    test = make_sequences(cfg, cfg.data.num_test, cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(idx: Tensor) -> Tensor:
        seq = train[idx]
        logits = model(seq[:, :-1])  # (B, n + 1, V): positions SEP-1+1 ... predict the mirrored half
        return F.cross_entropy(logits[:, 1:].flatten(0, 1), seq[:, n + 2 :].flatten())

    def teacher_forced_accuracy() -> float:
        with torch.no_grad():
            logits = model(test[:, :-1])
        return float((logits[:, 1:].argmax(-1) == test[:, n + 2 :]).float().mean())

    stats = train_model(
        model, loss_fn, len(train), cfg.train, gen, lambda: {"token_accuracy": teacher_forced_accuracy()}
    )
    prefix = test[:, : n + 2]
    with torch.no_grad():
        generated, logits_cached = model.generate(prefix, n, use_cache=True, return_logits=True)
        k = min(8, len(test))
        uncached, logits_uncached = model.generate(prefix[:k], n, use_cache=False, return_logits=True)
    exact = float((generated[:, n + 2 :] == test[:, n + 2 :]).all(dim=1).float().mean())
    same_tokens = bool((uncached == generated[:k]).all())
    logit_diff = float((logits_uncached - logits_cached[:k]).abs().max())
    majority = torch.bincount(train[:, 1 : n + 1].flatten()).argmax()
    baseline = float((test[:, n + 2 :] == majority).all(dim=1).float().mean())
    fig = save_curve_plot(
        stats.curve,
        "token_accuracy",
        f"B11 mirrored copy ({cfg.size})",
        ctx.figure_path(f"B11-mirror-copy-{cfg.size}.png"),
    )
    return TaskResult(
        metric_name="exact match (greedy, cached)",
        metric=exact,
        baseline_name="majority symbol",
        baseline=baseline,
        target=TARGET,
        target_met=exact >= 0.99 and same_tokens and 2 * n + 2 >= 256,
        **training_facts(model, stats, [fig]),
        extra={
            "sequence_length": 2 * n + 2,
            "token_accuracy_teacher_forced": teacher_forced_accuracy(),
            "cached_equals_uncached_tokens": same_tokens,
            "max_logit_diff_cached_vs_uncached": logit_diff,
        },
    )


RUNNERS = {"mirror_copy": run}
