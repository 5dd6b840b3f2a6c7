"""Caption evaluation: CIDEr, BLEU-1..4 and ROUGE-L through pycocoevalcap (METEOR too when Java is
present), per-attribute accuracy for the synthetic world, predictions + metrics as JSON, and a PNG grid
of sample images with generated vs reference captions.

Tokenization: ``"ptb"`` is pycocoevalcap's Stanford PTBTokenizer (needs Java), ``"simple"`` a
pure-Python equivalent for plain captions (lowercase, punctuation removed, split on spaces); ``"auto"``
uses PTB when Java is on the PATH.

    predictions, references, meta, pixels = generate_captions(model, loader)
    metrics = evaluate_captions(predictions, references, meta, synthetic=SyntheticConfig())
    write_results("eval/results.json", predictions, references, metrics)
    metrics = score_coco_results("test.coco_results.json", "captions_val2014.json", meteor=False)
    save_caption_grid("eval/samples.png", pixels[:8], ...)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .data.synthetic import SyntheticConfig, parse_caption
from .io import atomic_write

__all__ = [
    "ATTRIBUTES",
    "java_available",
    "simple_tokenize",
    "tokenize_captions",
    "caption_metrics",
    "attribute_accuracy",
    "evaluate_captions",
    "generate_captions",
    "score_coco_results",
    "write_results",
    "save_caption_grid",
]

ATTRIBUTES = ("colour", "shape", "size", "position")
HEADLINE_ATTRIBUTES = ("colour", "shape", "position")  # the attribute-accuracy target
# pycocoevalcap's PTBTokenizer drops these tokens after tokenizing.
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
Tokenizer = Literal["auto", "ptb", "simple"]


@lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working ``java`` is on the PATH (PTB tokenizer and METEOR need it)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def simple_tokenize(text: str) -> str:
    """Java-free tokenization: lowercase, split off punctuation and drop it (like PTB + its filter)."""
    text = re.sub(r"([^\w\s'])", r" \1 ", text.lower())
    text = re.sub(r"'(s|re|ve|ll|d|m|t)\b", r" '\1", text)  # PTB splits clitics: "dog's" -> "dog 's"
    return " ".join(t for t in text.split() if t not in _PTB_PUNCTUATION)


def _resolve_tokenizer(tokenizer: Tokenizer) -> str:
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if tokenizer == "auto":
        return "ptb" if java_available() else "simple"
    if tokenizer == "ptb" and not java_available():
        raise ValueError("tokenizer='ptb' needs Java on the PATH; use tokenizer='simple' (pure Python)")
    return tokenizer


def tokenize_captions(captions: Mapping[str, Sequence[str]], tokenizer: Tokenizer = "auto") -> dict[str, list[str]]:
    """{key: [caption, ...]} -> {key: [tokenized caption, ...]} with the chosen tokenizer."""
    if _resolve_tokenizer(tokenizer) == "simple":
        return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not predictions:
        raise ValueError("predictions is empty: expected {key: generated caption}")
    missing = [k for k in predictions if k not in references or not references[k]]
    if missing:
        raise ValueError(f"references must hold >= 1 caption for every prediction key; missing for {missing[:5]}")
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"predictions must be strings; not for keys {bad[:5]}")


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """BLEU-1..4, CIDEr (pycocoevalcap's CIDEr-D) and ROUGE-L; METEOR when ``meteor`` (default: Java found).

    ``predictions`` {key: caption}, ``references`` {key: [caption, ...]}; only keys of ``predictions`` count.
    ``progress`` shows a tqdm bar over the steps (tokenization, each scorer).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from tqdm.auto import tqdm

    _check_inputs(predictions, references)
    use_meteor = meteor if meteor is not None else java_available()
    if use_meteor and not java_available():
        raise ValueError("METEOR needs Java on the PATH; set eval.meteor=false (or meteor=False) to skip it")
    steps = ["tokenize", "BLEU", "CIDEr", "ROUGE-L"] + (["METEOR"] if use_meteor else [])
    bar = tqdm(total=len(steps), desc="metrics", unit="step", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(0 if name == steps[0] else 1)

    keys = list(predictions)
    try:
        step("tokenize")
        refs = tokenize_captions({k: list(references[k]) for k in keys}, tokenizer)
        preds = tokenize_captions({k: [predictions[k]] for k in keys}, tokenizer)
        preds = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in preds.items()}  # scorers reject ""
        step("BLEU")
        bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
        metrics = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
        step("CIDEr")
        metrics["CIDEr"] = float(Cider().compute_score(refs, preds)[0])
        step("ROUGE-L")
        metrics["ROUGE-L"] = float(Rouge().compute_score(refs, preds)[0])
        if use_meteor:
            step("METEOR")
            metrics["METEOR"] = _meteor_score(refs, preds)
        bar.update(1)
    finally:
        bar.close()
    return metrics


_METEOR: list[Any] = []  # the one METEOR scorer (Java process) of this Python process, started on first use


def _meteor_score(refs: dict, preds: dict) -> float:
    """Corpus METEOR through one long-lived pycocoevalcap scorer: starting its Java process and loading
    its paraphrase tables takes seconds, scoring a few hundred captions a fraction of one, and the scorer
    keeps no state between calls (each EVAL line carries its own statistics)."""
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR and _METEOR[0].meteor_p.poll() is not None:
        _close_meteor()  # its process died: start a new one
    if not _METEOR:
        _METEOR.append(Meteor())
    try:
        return float(_METEOR[0].compute_score(refs, preds)[0])
    except BaseException:
        _close_meteor()  # a failed or interrupted call leaves the pipe out of step
        raise


@atexit.register
def _close_meteor() -> None:
    """Stop the METEOR Java process (pycocoevalcap leaves it running until garbage collection)."""
    while _METEOR:
        process = _METEOR.pop().meteor_p
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------------------------
# Per-attribute accuracy (synthetic world)


def _match(truth: list[dict[str, Any]], parsed: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each true object, the parsed object assigned to it (one-to-one, most attributes agreeing)."""
    slots: list[dict[str, Any] | None] = list(parsed) + [None] * len(truth)
    best, best_score = [None] * len(truth), -1
    for chosen in itertools.permutations(range(len(slots)), len(truth)):
        score = sum(
            slots[j] is not None and slots[j].get(a) == obj[a] for obj, j in zip(truth, chosen) for a in ATTRIBUTES
        )
        if score > best_score:
            best, best_score = [slots[j] for j in chosen], score
    return best


def attribute_accuracy(
    predictions: Mapping[str, str], objects: Mapping[str, Sequence[Mapping[str, Any]]], config: SyntheticConfig
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy of generated captions against the synthetic world's ground truth.

    Each true object is matched one-to-one to a parsed object of the caption (the assignment that
    agrees on most attributes); an attribute counts as right when the matched object states it.
    Missing objects count as wrong on every attribute. Returns ``{"1": {...}, "2": {...}, "3": {...},
    "all": {...}}`` (by number of objects in the image) with ``colour``, ``shape``, ``size``,
    ``position``, ``attributes`` (mean of colour, shape and position), ``object_count`` (the caption
    names exactly as many objects as the image has) and ``images``.
    """
    groups: dict[str, dict[str, list[float]]] = {}
    for key, caption in predictions.items():
        if key not in objects:
            raise ValueError(f"no ground-truth objects for prediction key {key!r}")
        truth = [dict(o) for o in objects[key]]
        parsed = parse_caption(caption, config)
        matched = _match(truth, parsed)
        for group in (str(len(truth)), "all"):
            stats = groups.setdefault(group, {a: [] for a in (*ATTRIBUTES, "object_count")})
            for obj, got in zip(truth, matched):
                for a in ATTRIBUTES:
                    stats[a].append(float(got is not None and got.get(a) == obj[a]))
            stats["object_count"].append(float(len(parsed) == len(truth)))
    result = {}
    for group, stats in sorted(groups.items()):
        row = {a: float(np.mean(v)) for a, v in stats.items()}
        row["attributes"] = float(np.mean([row[a] for a in HEADLINE_ATTRIBUTES]))
        row["images"] = len(stats["object_count"])
        result[group] = row
    return result


def evaluate_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    meta: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    synthetic: SyntheticConfig | None = None,
    tokenizer: Tokenizer = "auto",
    meteor: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Caption metrics, plus per-attribute accuracy when ``meta`` holds the synthetic ``objects`` and
    metrics per NoCaps ``domain`` (each scored on its own images) when ``meta`` holds one."""
    metrics: dict[str, Any] = caption_metrics(
        predictions, references, tokenizer=tokenizer, meteor=meteor, progress=progress
    )
    domains = sorted({str(meta[k]["domain"]) for k in predictions if meta and "domain" in meta.get(k, {})})
    if domains:
        metrics["by_domain"] = {
            d: caption_metrics(
                {k: p for k, p in predictions.items() if str(meta.get(k, {}).get("domain")) == d},
                references, tokenizer=tokenizer, meteor=meteor,
            )
            for d in domains
        }  # fmt: skip
    if meta is not None and synthetic is not None:
        objects = {k: meta[k]["objects"] for k in predictions if k in meta and "objects" in meta[k]}
        if objects:
            metrics["attribute_accuracy"] = attribute_accuracy({k: predictions[k] for k in objects}, objects, synthetic)
    metrics["num_images"] = len(predictions)
    metrics["tokenizer"] = _resolve_tokenizer(tokenizer)
    return metrics


# ----------------------------------------------------------------------------------------------
# Generation, results, grids


@torch.no_grad()
def generate_captions(
    model: Any,
    batches: Iterable[Any],
    *,
    prompt: str | None = None,
    ablate_images: bool = False,
    max_images: int | None = None,
    progress: bool = False,
    **generation_kwargs: Any,
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, dict], dict[str, np.ndarray]]:
    """Caption every image of ``batches`` (a `CaptionLoader` with ``train=False``) with ``model.generate``.

    ``ablate_images=True`` generates from the prompt alone (the no-image ablation). Returns
    ``(predictions, references, meta, pixels)`` keyed by sample key (pixels only with ``keep_pixels``).
    ``progress`` shows a tqdm bar over the images.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=max_images, desc="no-image" if ablate_images else "captions", unit="img", disable=not progress)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    meta: dict[str, dict] = {}
    pixels: dict[str, np.ndarray] = {}
    try:
        for batch in batches:
            keys = batch.sample_keys
            if max_images is not None and len(predictions) >= max_images:
                break
            prompts = [prompt if prompt is not None else model.config.caption_prompt] * len(keys)
            if ablate_images:
                texts = model.generate(None, prompts, **generation_kwargs)
            elif "image_features" in batch:
                texts = model.generate(None, prompts, image_features=batch["image_features"], **generation_kwargs)
            else:
                texts = model.generate(batch["images"], prompts, **generation_kwargs)
            for i, key in enumerate(keys):
                predictions[key], references[key], meta[key] = texts[i], batch.references[i], batch.meta[i]
                if getattr(batch, "pixels", None) is not None:
                    pixels[key] = batch.pixels[i]
            bar.update(len(keys))
    finally:
        bar.close()
        if was_training:
            model.train()
    if max_images is not None:
        keep = list(predictions)[:max_images]
        predictions = {k: predictions[k] for k in keep}
    return predictions, references, meta, pixels


def score_coco_results(
    results_file: str | Path,
    annotations_file: str | Path,
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a COCO results file against a COCO-layout annotations file, as ``COCOEvalCap`` does with
    ``params["image_id"] = cocoRes.getImgIds()``: every image of the results, against all its references.

    An image of the results missing from the annotations is an error; annotated images without a
    prediction are counted (``images_without_prediction``: Karpathy test is 5,000 of val2014's 40,504).
    """
    from .data.coco import coco_references, read_coco_results

    predictions = read_coco_results(results_file)
    references = coco_references(annotations_file)
    unknown = [i for i in predictions if i not in references]
    if unknown:
        raise ValueError(
            f"{len(unknown)} image ids of results file {results_file} have no reference in {annotations_file} "
            f"(e.g. {unknown[:5]}): is it the annotations file of the same split?"
        )
    metrics = evaluate_captions(
        {str(i): c for i, c in predictions.items()},
        {str(i): references[i] for i in predictions},
        tokenizer=tokenizer,
        meteor=meteor,
        progress=progress,
    )
    metrics["images_without_prediction"] = len(references) - len(predictions)
    return metrics


def write_results(
    path: str | Path,
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """``{"metrics": ..., "predictions": [{"key", "prediction", "references"}, ...], **extra}`` as JSON."""
    rows = [{"key": k, "prediction": p, "references": list(references.get(k, []))} for k, p in predictions.items()]
    payload = {"metrics": dict(metrics), **dict(extra or {}), "predictions": rows}
    return atomic_write(path, json.dumps(payload, indent=1, ensure_ascii=False))


def save_caption_grid(
    path: str | Path,
    images: Sequence[np.ndarray],
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    titles: Sequence[str] | None = None,
    columns: int = 4,
    width: int = 34,
) -> Path:
    """A PNG grid: each image with its generated caption (green when it matches a reference) and one reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0 or len(predictions) != n or len(references) != n:
        raise ValueError(
            f"save_caption_grid needs as many predictions and references as images (>= 1); got "
            f"{n} images, {len(predictions)} predictions, {len(references)} references"
        )
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, pred, refs) in enumerate(zip(images, predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        ax = axes.flat[i]
        ax.imshow(np.asarray(image), interpolation="nearest")
        hit = simple_tokenize(pred) in {simple_tokenize(r) for r in refs}
        text = "gen: " + textwrap.fill(pred, width) + "\nref: " + textwrap.fill(refs[0] if refs else "", width)
        ax.set_title(text, fontsize=7, loc="left", color="darkgreen" if hit else "black")
        if titles is not None:
            ax.text(0, -0.02, titles[i], transform=ax.transAxes, fontsize=6, va="top")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
