"""Caption metrics against float64 reference formulas and known values, attribute accuracy, outputs."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data import SyntheticConfig, generate_scene
from vlm.evaluation import (
    attribute_accuracy,
    caption_metrics,
    evaluate_captions,
    generate_captions,
    java_available,
    save_caption_grid,
    simple_tokenize,
    tokenize_captions,
    write_results,
)

CFG = SyntheticConfig()
needs_java = pytest.mark.skipif(not java_available(), reason="Java not installed")

REFS = {
    "a": ["a large red circle on the left", "there is a large red circle on the left"],
    "b": ["a small blue square at the top and a large green cross on the right", "two shapes in the picture"],
    "c": ["a small yellow triangle in the center", "one small yellow triangle in the center"],
}
PREDS = {
    "a": "a large red circle on the right",
    "b": "a small blue square at the top",
    "c": "a yellow triangle in the center of it",
}


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def reference_bleu(preds: dict, refs: dict, n_max: int = 4) -> list[float]:
    """Corpus BLEU (Papineni et al.): clipped n-gram precisions, closest-reference brevity penalty."""
    match, total = np.zeros(n_max), np.zeros(n_max)
    hyp_len = ref_len = 0
    for key, pred in preds.items():
        hyp = pred.split()
        references = [r.split() for r in refs[key]]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in references)[1]
        for n in range(1, n_max + 1):
            counts = _ngrams(hyp, n)
            best = Counter()
            for r in references:
                best |= _ngrams(r, n)
            match[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return [bp * math.exp(np.mean(np.log(match[:n] / total[:n]))) for n in range(1, n_max + 1)]


def reference_cider_d(preds: dict, refs: dict, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al.; pycocoevalcap's variant): tf-idf n-gram cosine, clipped, length penalty, x10."""
    keys = list(preds)
    df = Counter()
    for key in keys:
        df.update({g for r in refs[key] for n in range(1, 5) for g in _ngrams(r.split(), n)})
    log_n = math.log(len(keys))

    def vec(words):
        out = [{g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()} for n in range(1, 5)]
        return out, [math.sqrt(sum(v * v for v in d.values())) for d in out], len(words)

    scores = []
    for key in keys:
        hv, hn, hl = vec(preds[key].split())
        per_ref = []
        for r in refs[key]:
            rv, rn, rl = vec(r.split())
            total = 0.0
            for n in range(4):
                val = sum(min(v, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, v in hv[n].items())
                if hn[n] and rn[n]:
                    val /= hn[n] * rn[n]
                total += val * math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            per_ref.append(total / 4)
        scores.append(10 * np.mean(per_ref))
    return float(np.mean(scores))


def test_bleu_and_cider_match_reference_formulas():
    metrics = caption_metrics(PREDS, REFS, tokenizer="simple", meteor=False)
    expected = reference_bleu(PREDS, REFS)
    for n in range(4):
        assert metrics[f"BLEU-{n + 1}"] == pytest.approx(expected[n], rel=1e-6)
    assert metrics["CIDEr"] == pytest.approx(reference_cider_d(PREDS, REFS), rel=1e-9)
    assert 0 < metrics["BLEU-4"] < metrics["BLEU-1"] < 1 and 0 < metrics["ROUGE-L"] < 1


def test_identical_captions_score_perfectly_and_unrelated_ones_do_not():
    refs = {k: [v[0]] for k, v in REFS.items()}
    preds = {k: v[0] for k, v in refs.items()}
    metrics = caption_metrics(preds, refs, tokenizer="simple", meteor=False)
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ROUGE-L"] == pytest.approx(1.0)
    assert metrics["CIDEr"] == pytest.approx(10.0)  # cosine 1 for every n, no length penalty, x10
    junk = caption_metrics({k: "zebra xylophone quartz" for k in refs}, refs, tokenizer="simple", meteor=False)
    assert junk["CIDEr"] == 0.0 and junk["BLEU-1"] < 1e-6
    empty = caption_metrics({k: "" for k in refs}, refs, tokenizer="simple", meteor=False)  # no crash on ""
    assert empty["CIDEr"] == 0.0


def test_simple_tokenizer_follows_ptb_on_plain_captions():
    assert simple_tokenize("A Red circle, on the LEFT.") == "a red circle on the left"
    assert simple_tokenize("two shapes: a dog's ball!") == "two shapes a dog 's ball"


@needs_java
def test_ptb_and_simple_tokenizers_agree():
    captions = {k: [*REFS[k], PREDS[k] + ".", "Two shapes: a RED circle, and a square!"] for k in REFS}
    assert tokenize_captions(captions, "ptb") == tokenize_captions(captions, "simple")


@needs_java
@pytest.mark.slow
def test_ptb_path_metrics_and_meteor():
    ptb = caption_metrics(PREDS, REFS, tokenizer="ptb", meteor=True)
    simple = caption_metrics(PREDS, REFS, tokenizer="simple", meteor=False)
    assert {k: ptb[k] for k in simple} == pytest.approx(simple)
    perfect = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS, tokenizer="ptb", meteor=True)
    assert 0 < ptb["METEOR"] < perfect["METEOR"] and perfect["METEOR"] > 0.9


@needs_java
@pytest.mark.slow
def test_meteor_scorer_is_reused_and_scores_like_a_fresh_one():
    from pycocoevalcap.meteor.meteor import Meteor

    from vlm import evaluation

    refs = {k: [" ".join(c.split()) for c in v] for k, v in REFS.items()}
    corpora = [{k: [v] for k, v in PREDS.items()}, {k: [v[0]] for k, v in refs.items()}]
    fresh = []
    for preds in corpora:  # what pycocoevalcap gives with a new Java process per call
        scorer = Meteor()
        fresh.append(scorer.compute_score(refs, preds)[0])
        evaluation._close_meteor()  # (no shared scorer yet; this only checks the helper tolerates that)
        scorer.meteor_p.kill()
    shared = [evaluation._meteor_score(refs, p) for p in corpora + corpora[::-1]]
    assert shared == [fresh[0], fresh[1], fresh[1], fresh[0]] and fresh[0] < fresh[1]
    process = evaluation._METEOR[0].meteor_p
    assert evaluation._meteor_score(refs, corpora[0]) == fresh[0] and evaluation._METEOR[0].meteor_p is process
    process.kill()
    process.wait()
    assert evaluation._meteor_score(refs, corpora[1]) == fresh[1]  # a dead process is replaced
    assert evaluation._METEOR[0].meteor_p is not process
    evaluation._close_meteor()
    assert evaluation._METEOR == [] and process.poll() is not None


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="predictions is empty"):
        caption_metrics({}, REFS, tokenizer="simple")
    with pytest.raises(ValueError, match="missing for"):
        caption_metrics({"zz": "x"}, REFS, tokenizer="simple")
    with pytest.raises(ValueError, match="tokenizer must be"):
        caption_metrics(PREDS, REFS, tokenizer="spacy")


# ----------------------------------------------------------------------------------------------
# Attribute accuracy


def _objects(*specs: str) -> list[dict]:
    keys = ("size", "colour", "shape", "position")
    return [dict(zip(keys, spec.split())) for spec in specs]


def test_attribute_accuracy_by_hand():
    objects = {
        "one": _objects("large red circle left"),
        "two": _objects("small blue square top", "large green cross right"),
        "miss": _objects("small blue square top", "large green cross right"),
    }
    predictions = {
        "one": "a large red circle on the left.",
        # objects named in the other order, and the cross given the wrong colour: matching is by content
        "two": "a large purple cross on the right and a small blue square at the top.",
        "miss": "a small blue square at the top.",  # one object missing: wrong on all its attributes
    }
    acc = attribute_accuracy(predictions, objects, CFG)
    assert acc["1"] == {
        "colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "object_count": 1.0, "attributes": 1.0, "images": 1
    }  # fmt: skip
    assert acc["2"]["colour"] == pytest.approx(2 / 4) and acc["2"]["shape"] == pytest.approx(3 / 4)
    assert acc["2"]["position"] == pytest.approx(3 / 4) and acc["2"]["object_count"] == pytest.approx(1 / 2)
    assert acc["2"]["attributes"] == pytest.approx((2 / 4 + 3 / 4 + 3 / 4) / 3)
    assert acc["all"]["images"] == 3 and acc["all"]["colour"] == pytest.approx(3 / 5)


def test_reference_captions_score_perfect_attribute_accuracy():
    scenes = [generate_scene(CFG, "test", i) for i in range(40)]
    meta = {s.key: s.metadata() for s in scenes}
    for caption_index in range(CFG.captions_per_image):  # every paraphrase parses fully
        preds = {s.key: s.captions[caption_index] for s in scenes}
        acc = attribute_accuracy(preds, {k: m["objects"] for k, m in meta.items()}, CFG)
        assert all(row[a] == 1.0 for row in acc.values() for a in ("colour", "shape", "size", "position"))
    shuffled = {s.key: scenes[(i + 1) % len(scenes)].captions[0] for i, s in enumerate(scenes)}
    wrong = attribute_accuracy(shuffled, {k: m["objects"] for k, m in meta.items()}, CFG)
    assert wrong["all"]["attributes"] < 0.6  # captions of other images: far from perfect
    metrics = evaluate_captions(
        {s.key: s.captions[0] for s in scenes},
        {s.key: s.captions for s in scenes},
        meta,
        synthetic=CFG,
        tokenizer="simple",
        meteor=False,
    )
    assert metrics["attribute_accuracy"]["all"]["attributes"] == 1.0 and metrics["num_images"] == 40


# ----------------------------------------------------------------------------------------------
# Outputs and generation


def test_results_json_and_sample_grid(tmp_path):
    metrics = caption_metrics(PREDS, REFS, tokenizer="simple", meteor=False)
    path = write_results(tmp_path / "eval" / "results.json", PREDS, REFS, metrics, {"split": "test"})
    payload = json.loads(path.read_text())
    assert payload["metrics"]["CIDEr"] == metrics["CIDEr"] and payload["split"] == "test"
    assert payload["predictions"][0] == {"key": "a", "prediction": PREDS["a"], "references": REFS["a"]}
    scenes = [generate_scene(CFG, "test", i) for i in range(5)]
    grid = save_caption_grid(
        tmp_path / "grid.png",
        [np.asarray(s.image) for s in scenes],
        [s.captions[0] for s in scenes[:4]] + ["a wrong caption"],
        [s.captions for s in scenes],
        columns=3,
    )
    image = Image.open(grid)
    assert image.size[0] > image.size[1] > 300  # 3 columns x 2 rows
    with pytest.raises(ValueError, match="as many predictions"):
        save_caption_grid(tmp_path / "bad.png", [np.asarray(scenes[0].image)], [], [])


class _StubModel:
    """Records what ``generate`` received; answers with the image count it saw."""

    class config:
        caption_prompt = "Caption:"

    def __init__(self):
        self.calls = []
        self.training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, images=None, prompts=None, *, image_features=None, **kw):
        self.calls.append((images, prompts, image_features, kw))
        media = images if images is not None else image_features
        return [f"seen {0 if media is None else 1}"] * len(prompts)


def _batches():
    from vlm.data.reader import CaptionBatch

    for start in (0, 3):
        batch = CaptionBatch(images=torch.zeros(3, 3, 8, 8))
        batch.sample_keys = [f"k{start + i}" for i in range(3)]
        batch.references = [[f"ref {start + i}"] for i in range(3)]
        batch.meta = [{"i": start + i} for i in range(3)]
        batch.pixels = np.zeros((3, 8, 8, 3), dtype=np.uint8)
        yield batch


def test_generate_captions_collects_and_ablates():
    model = _StubModel()
    preds, refs, meta, pixels = generate_captions(model, _batches(), max_new_tokens=5)
    assert preds == {f"k{i}": "seen 1" for i in range(6)} and refs["k4"] == ["ref 4"] and meta["k5"] == {"i": 5}
    assert set(pixels) == set(preds) and model.training  # restored afterwards
    assert model.calls[0][1] == ["Caption:"] * 3 and model.calls[0][3] == {"max_new_tokens": 5}
    preds, *_ = generate_captions(model, _batches(), ablate_images=True, max_images=4, prompt="P")
    assert preds == {f"k{i}": "seen 0" for i in range(4)} and model.calls[-1][1] == ["P"] * 3
