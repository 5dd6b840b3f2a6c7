"""COCO, Karpathy and NoCaps layouts of real photos -> shards: one sample per image with all its captions.

The layouts are written by `vlm.data.tiny_datasets` (scikit-image / scikit-learn sample photos, cropped
and flipped) in the real files' JSON layouts and folder structure; every check compares the shards with
the annotation file itself.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data import DataConfig, shards_from_annotations
from vlm.data.reader import CaptionLoader
from vlm.data.tiny_datasets import write_coco_layout, write_karpathy_layout, write_nocaps_layout

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "coco": write_coco_layout(root / "coco"),
        "karpathy": write_karpathy_layout(root / "karpathy"),
        "nocaps": write_nocaps_layout(root / "nocaps"),
    }


def _read(spec: str, **kw) -> tuple[dict[str, tuple[list[str], dict, np.ndarray]], CaptionLoader]:
    config = DataConfig(batch_size=5, image_size=64, preprocess="plain", sample_shuffle=0, shard_shuffle=False)
    loader = CaptionLoader(spec, config, train=False, keep_pixels=True, **kw)
    out = {}
    for batch in loader:
        for key, refs, meta, pixels in zip(batch.sample_keys, batch.references, batch.meta, batch.pixels):
            out[key] = (refs, meta, pixels)
    return out, loader


def _decoded(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def test_coco_one_sample_per_image_with_all_its_captions(layouts, tmp_path):
    root = layouts["coco"]
    ann = json.loads((root / "annotations" / "captions_val2014.json").read_text())
    wanted = defaultdict(list)
    for a in reversed(ann["annotations"]):  # the file lists them reversed; captions keep their file order
        wanted[a["image_id"]].insert(0, " ".join(a["caption"].split()))
    summary = shards_from_annotations(
        "coco", root / "annotations" / "captions_val2014.json", root / "val2014", tmp_path, "val", samples_per_shard=5
    )
    assert summary.num_samples == len(ann["images"]) == 12 and summary.samples_per_shard == [5, 5, 2]
    got, loader = _read(summary.pattern)
    assert len(got) == 12 and not loader.bad_samples
    for image in ann["images"]:
        refs, meta, pixels = got[Path(image["file_name"]).stem]
        assert meta["image_id"] == image["id"] and meta["file_name"] == image["file_name"]
        assert sorted(refs) == sorted(wanted[image["id"]]) and len(refs) == 5
        assert np.array_equal(pixels, _decoded(root / "val2014" / image["file_name"]))


def test_coco_images_without_captions_and_stray_annotations_are_counted(layouts, tmp_path):
    root = layouts["coco"]
    ann = json.loads((root / "annotations" / "captions_val2014.json").read_text())
    dropped = ann["images"][3]["id"]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != dropped]
    ann["annotations"].append({"id": 1, "image_id": 123, "caption": "an image nobody listed"})
    ann["annotations"].append({"id": 2, "image_id": ann["images"][0]["id"], "caption": "   "})
    (tmp_path / "c.json").write_text(json.dumps(ann))
    (root / "val2014" / ann["images"][5]["file_name"]).rename(tmp_path / "away.jpg")
    try:
        summary = shards_from_annotations("coco", tmp_path / "c.json", root / "val2014", tmp_path / "out", "val")
    finally:
        (tmp_path / "away.jpg").rename(root / "val2014" / ann["images"][5]["file_name"])
    assert summary.num_samples == 10
    assert summary.skipped == {
        "missing_caption": 1, "annotation_without_image": 1, "bad_annotation_row": 1, "missing_image": 1
    }  # fmt: skip


def test_karpathy_splits(layouts, tmp_path):
    root = layouts["karpathy"]
    rows = json.loads((root / "dataset_coco.json").read_text())["images"]
    for split in ("train", "restval", "val", "test", "train+restval"):
        expected = [r for r in rows if r["split"] in split.split("+")]
        summary = shards_from_annotations(
            "karpathy", root / "dataset_coco.json", root, tmp_path, split.replace("+", "_"), split=split
        )
        assert summary.num_samples == len(expected) > 0
        got, _ = _read(summary.pattern)
        assert len(got) == len(expected)
        for r in expected:
            refs, meta, pixels = got[Path(r["filename"]).stem]
            assert refs == [s["raw"] for s in r["sentences"]] and meta["image_id"] == r["cocoid"]
            assert meta["split"] == r["split"]
            assert np.array_equal(pixels, _decoded(root / r["filepath"] / r["filename"]))


def test_karpathy_flickr_layout_uses_imgid_and_the_image_folder(layouts, tmp_path):
    root = layouts["karpathy"]
    rows = json.loads((root / "dataset_coco.json").read_text())["images"]
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    flickr = []
    for r in rows:  # Flickr30k's file: no filepath, no cocoid, images in one folder
        (images / f"{1000 + r['imgid']}.jpg").write_bytes((root / r["filepath"] / r["filename"]).read_bytes())
        flickr.append({"filename": f"{1000 + r['imgid']}.jpg", "imgid": r["imgid"], "split": r["split"],
                       "sentences": r["sentences"]})  # fmt: skip
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": flickr, "dataset": "flickr30k"}))
    summary = shards_from_annotations(
        "karpathy", tmp_path / "dataset_flickr30k.json", images, tmp_path / "out", "test", split="test"
    )
    got, _ = _read(summary.pattern)
    assert sorted(meta["image_id"] for _, meta, _ in got.values()) == [
        r["imgid"] for r in flickr if r["split"] == "test"
    ]


def test_nocaps_val_keeps_domains_and_ten_captions_and_test_has_images_only(layouts, tmp_path):
    root = layouts["nocaps"]
    val = json.loads((root / "nocaps_val_4500_captions.json").read_text())
    summary = shards_from_annotations(
        "nocaps", root / "nocaps_val_4500_captions.json", root / "validation", tmp_path, "val"
    )
    assert summary.num_samples == len(val["images"]) == 9
    got, _ = _read(summary.pattern)
    for image in val["images"]:
        refs, meta, _ = got[Path(image["file_name"]).stem]
        assert refs == [a["caption"] for a in val["annotations"] if a["image_id"] == image["id"]] and len(refs) == 10
        assert meta["domain"] == image["domain"] and meta["open_images_id"] == image["open_images_id"]
    test = shards_from_annotations("nocaps", root / "nocaps_test_image_info.json", root / "test", tmp_path, "test")
    assert test.num_samples == 3
    got, _ = _read(test.pattern, allow_uncaptioned=True)
    assert len(got) == 3 and all(refs == [] for refs, _, _ in got.values())
    training_view, loader = _read(test.pattern)  # a reader that needs captions skips them, counted
    assert not training_view and loader.bad_samples == {"empty_caption": 3}


def test_wrong_inputs_are_clear_errors(layouts, tmp_path):
    coco, karpathy = layouts["coco"], layouts["karpathy"]
    captions = coco / "annotations" / "captions_val2014.json"
    with pytest.raises(FileNotFoundError, match="captions_val2104.json does not exist"):
        shards_from_annotations("coco", coco / "annotations" / "captions_val2104.json", coco / "val2014", tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder .*val2104 does not exist"):
        shards_from_annotations("coco", captions, coco / "val2104", tmp_path)
    with pytest.raises(ValueError, match=r"no sample to write.*missing_image.: 12"):
        shards_from_annotations("coco", captions, karpathy / "train2014", tmp_path)  # the wrong image folder
    (tmp_path / "none.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match="no usable row"):
        shards_from_annotations("coco", tmp_path / "none.json", coco / "val2014", tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        shards_from_annotations("coco", tmp_path / "broken.json", coco / "val2014", tmp_path)
    with pytest.raises(ValueError, match="karpathy split must be one of"):
        shards_from_annotations("karpathy", karpathy / "dataset_coco.json", karpathy, tmp_path, split="testing")
    rows = json.loads((karpathy / "dataset_coco.json").read_text())["images"]
    (tmp_path / "k.json").write_text(json.dumps({"images": [r for r in rows if r["split"] != "test"]}))
    with pytest.raises(ValueError, match=r"no usable row for split 'test' \(splits in the file: \{'train'"):
        shards_from_annotations("karpathy", tmp_path / "k.json", karpathy, tmp_path, split="test")
    assert not list(tmp_path.glob("*.tar"))


def test_make_shards_command_for_each_source(layouts, tmp_path, capsys):
    from vlm.cli import main_make_shards, run

    coco, karpathy, nocaps = layouts["coco"], layouts["karpathy"], layouts["nocaps"]
    base = ["--config", str(TINY / "make_shards.yaml"), f"output_dir={tmp_path}", "shards.progress=false"]
    main_make_shards([*base, "shards.source=coco", f"shards.annotations_file={coco}/annotations/captions_val2014.json",
                      f"shards.input_dir={coco}/val2014", "shards.prefix=val"])  # fmt: skip
    main_make_shards([*base, "shards.source=karpathy", f"shards.annotations_file={karpathy}/dataset_coco.json",
                      f"shards.input_dir={karpathy}", "shards.split=test"])  # fmt: skip
    main_make_shards([*base, "shards.source=karpathy", f"shards.annotations_file={karpathy}/dataset_coco.json",
                      f"shards.input_dir={karpathy}", "shards.split=train+restval"])  # fmt: skip
    main_make_shards([*base, "shards.source=nocaps", f"shards.annotations_file={nocaps}/nocaps_val_4500_captions.json",
                      f"shards.input_dir={nocaps}/validation", "shards.prefix=nocaps_val"])  # fmt: skip
    counts = {p: json.loads((tmp_path / "data" / f"{p}-index.json").read_text())["num_samples"]
              for p in ("val", "test", "train_restval", "nocaps_val")}  # fmt: skip
    assert counts == {"val": 12, "test": 3, "train_restval": 6, "nocaps_val": 9}
    printed = capsys.readouterr().out
    assert "wrote 3 samples to 1 shards" in printed and "test-*.tar" in printed
    with pytest.raises(ValueError, match=r"needs shards.annotations_file, shards.split"):
        run("make-shards", [*base, "shards.source=karpathy", f"shards.input_dir={karpathy}"])
