"""Evaluation in the COCO protocol: one caption per image against all its references, a results file
that pycocoevalcap's own ``COCOEvalCap`` scores to the same numbers as our metrics, scoring existing
results files, NoCaps domains and its reference-less test split, METEOR on/off, progress bars."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm import evaluation
from vlm.cli import run
from vlm.data import DataConfig, shards_from_annotations
from vlm.data.tiny_datasets import write_coco_layout, write_karpathy_layout, write_nocaps_layout
from vlm.evaluation import caption_metrics, java_available
from vlm.pipeline import EvalConfig, RunConfig, run_evaluation

needs_java = pytest.mark.skipif(not java_available(), reason="PTB tokenizer and METEOR need Java")
GUESSES = [
    "a cat with green eyes",
    "a cup of coffee on a table",
    "a woman in an orange space suit",
    "a rocket on a launch pad",
    "a pink flower with a yellow center",
    "an old temple under a blue sky",
    "a man with a camera on a tripod",
    "a photo of something",
]


class GuessingCaptioner:
    """Stands in for a trained VLM: the caption is a deterministic function of the image's pixels, so
    predictions are plausible sentences that sometimes match the references (non-zero, unequal scores)."""

    training = False

    def __init__(self) -> None:
        from vlm.data import build_transform

        self.vision = SimpleNamespace(preprocess=build_transform(DataConfig(image_size=32, preprocess="plain")))
        self.config = SimpleNamespace(caption_prompt="")

    def eval(self):
        return self

    def generate(self, images, prompts, **kwargs):
        if images is None:  # the no-image ablation
            return ["a photo of something"] * len(prompts)
        return [GUESSES[int(image.mean() * 997) % len(GUESSES)] for image in images]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_layouts")
    coco = write_coco_layout(root / "coco")
    karpathy = write_karpathy_layout(root / "karpathy")
    nocaps = write_nocaps_layout(root / "nocaps")
    shards = root / "shards"
    captions = coco / "annotations" / "captions_val2014.json"
    shards_from_annotations("coco", captions, coco / "val2014", shards, "coco")
    shards_from_annotations("karpathy", karpathy / "dataset_coco.json", karpathy, shards, "karpathy_test", split="test")
    shards_from_annotations(
        "nocaps", nocaps / "nocaps_val_4500_captions.json", nocaps / "validation", shards, "nocaps_val"
    )
    shards_from_annotations("nocaps", nocaps / "nocaps_test_image_info.json", nocaps / "test", shards, "nocaps_test")
    return SimpleNamespace(root=root, coco_captions=captions, karpathy=karpathy, nocaps=nocaps, shards=shards)


def _cfg(tmp_path, data, split_shards: str, **eval_fields) -> RunConfig:
    fields = {"splits": ("test",), "grid_samples": 0, "print_samples": 1, "progress": False, "ablation": False}
    fields.update(eval_fields)
    return RunConfig(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(test_shards=str(data.shards / split_shards), image_size=32, preprocess="plain", batch_size=4),
        eval=EvalConfig(**fields),
    )


def _cocoevalcap(annotations: Path, results: Path, monkeypatch) -> dict[str, float]:
    """pycocoevalcap's own COCOEvalCap on the two files, SPICE left out (its models download at start)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def method(self):
            return "SPICE (left out: it downloads Stanford CoreNLP)"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(annotations))
    scorer = coco_eval.COCOEvalCap(coco, coco.loadRes(str(results)))
    scorer.params["image_id"] = scorer.cocoRes.getImgIds()
    scorer.evaluate()
    return scorer.eval


@needs_java
def test_cocoevalcap_scores_our_results_file_to_our_numbers(data, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, data, "coco-*.tar", metrics_tokenizer="ptb", meteor=True)
    ours = run_evaluation(cfg, GuessingCaptioner(), log=lambda m: None)["test"]
    out = tmp_path / "run" / "eval"
    results = json.loads((out / "test.coco_results.json").read_text())
    ann = json.loads(data.coco_captions.read_text())
    assert sorted(r["image_id"] for r in results) == sorted(i["id"] for i in ann["images"])  # one per image
    assert 0.05 < ours["CIDEr"] < 2.0 and ours["num_images"] == 12
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}  # fmt: skip
    theirs = _cocoevalcap(out / "test.coco_annotations.json", out / "test.coco_results.json", monkeypatch)
    for ours_name, their_name in names.items():
        assert ours[ours_name] == pytest.approx(theirs[their_name], abs=1e-9), ours_name
    # the annotations file we write holds the dataset's own references (whitespace normalised), so the
    # results file scores the same against COCO's own captions_val2014.json
    from pycocotools.coco import COCO

    written, original = COCO(str(out / "test.coco_annotations.json")), COCO(str(data.coco_captions))
    for image_id in original.getImgIds():
        assert sorted(a["caption"] for a in written.imgToAnns[image_id]) == sorted(
            " ".join(a["caption"].split()) for a in original.imgToAnns[image_id]
        )
    # the Java-free tokenizer gives the same numbers on these plain captions
    preds = {str(r["image_id"]): r["caption"] for r in results}
    refs = {str(i["id"]): [] for i in ann["images"]}
    for a in ann["annotations"]:
        refs[str(a["image_id"])].append(a["caption"])
    simple = caption_metrics(preds, refs, tokenizer="simple", meteor=False)
    assert simple["CIDEr"] == pytest.approx(ours["CIDEr"], abs=1e-9)


def test_pvlm_eval_scores_an_existing_results_file(data, tmp_path, capsys):
    ann = json.loads(data.coco_captions.read_text())
    ids = [i["id"] for i in ann["images"]][:8]  # a published file may cover a subset (Karpathy test of val2014)
    results = tmp_path / "published.json"
    results.write_text(json.dumps([{"image_id": i, "caption": GUESSES[n % 3]} for n, i in enumerate(ids)]))
    args = [f"output_dir={tmp_path}", f"eval.results_file={results}", f"eval.annotations_file={data.coco_captions}",
            "eval.metrics_tokenizer=simple", "eval.meteor=false", "eval.progress=false"]  # fmt: skip
    metrics = run("eval", args)
    refs = {str(i): [] for i in ids}
    for a in ann["annotations"]:
        if a["image_id"] in ids:
            refs[str(a["image_id"])].append(a["caption"])
    want = caption_metrics({str(i): GUESSES[n % 3] for n, i in enumerate(ids)}, refs, tokenizer="simple", meteor=False)
    assert {k: metrics[k] for k in want} == want and "METEOR" not in metrics
    assert metrics["num_images"] == 8 and metrics["images_without_prediction"] == 4
    assert json.loads((tmp_path / "eval" / "published.metrics.json").read_text())["CIDEr"] == metrics["CIDEr"]
    assert "4 annotated images have no prediction" in capsys.readouterr().out
    results.write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    with pytest.raises(ValueError, match=r"1 image ids of results file .* have no reference"):
        run("eval", args)
    results.write_text(json.dumps([{"image_id": ids[0], "caption": "x"}, {"image_id": ids[0], "caption": "y"}]))
    with pytest.raises(ValueError, match="has two captions"):
        run("eval", args)
    with pytest.raises(ValueError, match="go together"):
        run("eval", [f"output_dir={tmp_path}", f"eval.results_file={results}"])


def test_karpathy_split_results_carry_coco_ids_and_the_ablation(data, tmp_path):
    cfg = _cfg(tmp_path, data, "karpathy_test-*.tar", metrics_tokenizer="simple", meteor=False, ablation=True)
    metrics = run_evaluation(cfg, GuessingCaptioner(), log=lambda m: None)["test"]
    rows = json.loads((data.karpathy / "dataset_coco.json").read_text())["images"]
    results = json.loads((tmp_path / "run" / "eval" / "test.coco_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(r["cocoid"] for r in rows if r["split"] == "test")
    assert "no_image" in metrics and metrics["no_image"]["example"] == "a photo of something"
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["test"]
    assert saved["CIDEr"] == metrics["CIDEr"] and saved["results_file"].endswith("test.coco_results.json")


def test_nocaps_domains_and_the_test_split_without_references(data, tmp_path, capsys):
    cfg = _cfg(tmp_path, data, "nocaps_val-*.tar", metrics_tokenizer="simple", meteor=False)
    metrics = run_evaluation(cfg, GuessingCaptioner(), log=lambda m: None)["test"]
    assert sorted(metrics["by_domain"]) == ["in-domain", "near-domain", "out-domain"]
    val = json.loads((data.nocaps / "nocaps_val_4500_captions.json").read_text())
    results = json.loads((tmp_path / "run" / "eval" / "test.coco_results.json").read_text())
    preds = {str(r["image_id"]): r["caption"] for r in results}
    in_domain = {str(i["id"]) for i in val["images"] if i["domain"] == "in-domain"}
    refs = {k: [a["caption"] for a in val["annotations"] if str(a["image_id"]) == k] for k in in_domain}
    want = caption_metrics({k: preds[k] for k in in_domain}, refs, tokenizer="simple", meteor=False)
    assert metrics["by_domain"]["in-domain"]["CIDEr"] == want["CIDEr"]  # each domain scored on its own images

    test_cfg = _cfg(tmp_path / "t", data, "nocaps_test-*.tar", metrics_tokenizer="simple", meteor=False, ablation=True)
    metrics = run_evaluation(test_cfg, GuessingCaptioner())["test"]
    results = json.loads((tmp_path / "t" / "run" / "eval" / "test.coco_results.json").read_text())
    assert len(results) == 3 and "CIDEr" not in metrics and "submit" in metrics["note"]
    assert not (tmp_path / "t" / "run" / "eval" / "test.coco_annotations.json").exists()
    assert "no references in this split" in capsys.readouterr().out


def test_meteor_switch_and_progress_bars(data, tmp_path, capsys, monkeypatch):
    cfg = _cfg(tmp_path, data, "coco-*.tar", metrics_tokenizer="simple", meteor=False, progress=True)
    metrics = run_evaluation(cfg, GuessingCaptioner(), log=lambda m: None)["test"]
    assert "METEOR" not in metrics
    err = capsys.readouterr().err
    assert "captions: 12img" in err.replace("\r", "\n") and "metrics: 100%" in err
    monkeypatch.setattr(evaluation, "java_available", lambda: False)
    with pytest.raises(ValueError, match="METEOR needs Java.*eval.meteor=false"):
        caption_metrics({"a": "x"}, {"a": ["x"]}, tokenizer="simple", meteor=True)
    assert "METEOR" not in caption_metrics({"a": "x"}, {"a": ["x"]}, tokenizer="simple")  # default: when Java is there


def test_eval_and_caption_help_list_the_new_fields(capsys):
    from vlm.cli import main_caption, main_eval

    with pytest.raises(SystemExit):
        main_eval(["--help"])
    out = capsys.readouterr().out
    assert "eval.meteor: bool | None = None  -- METEOR (Java, slow)" in out
    assert "eval.results_file: str = ''  -- score this COCO results file" in out and "eval.annotations_file" in out
    assert "features.on_change: {rebuild,error} = 'rebuild'" in out
    with pytest.raises(SystemExit):
        main_caption(["--help"])
    out = capsys.readouterr().out
    assert "--batch-size" in out and "--output" in out and "files, folders or globs" in out
