"""The shard reader: bad samples skipped and counted, image modes converted, splitting over ranks and
workers (also with fewer shards than readers), deterministic epochs, resampling, tokenization, padding."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data import CaptionLoader, DataConfig, build_transform, decode_image, write_samples

SIZE = 16


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _good(i: int) -> dict:
    return {"__key__": f"good{i:02d}", "png": _encode(_rgb(i)), "json": {"captions": [f"a picture number {i}"]}}


def _config(**overrides) -> DataConfig:
    base = dict(batch_size=3, image_size=SIZE, preprocess="plain", sample_shuffle=0, shard_shuffle=False)
    return DataConfig(**{**base, **overrides})


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch.sample_keys]


# ----------------------------------------------------------------------------------------------
# Bad samples and image modes


def _bad_and_odd_samples() -> tuple[list[dict], dict[str, int], dict[str, int]]:
    png = _encode(_rgb(99))
    jpeg = _encode(_rgb(98), "JPEG")
    gray16 = Image.fromarray(np.full((SIZE, SIZE), 65535, dtype=np.uint16))
    palette = _rgb(5).convert("P", palette=Image.ADAPTIVE)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    bomb = _encode(Image.new("1", (9000, 9000)))  # 81 Mpixels > the default 8192**2 limit; tiny as PNG
    caption = {"captions": ["fine"]}
    bad = [
        {"__key__": "empty", "png": b"", "json": caption},
        {"__key__": "garbage", "png": b"this is not an image at all", "json": caption},
        {"__key__": "cut_png", "png": png[: len(png) // 2], "json": caption},
        {"__key__": "cut_jpeg", "jpg": jpeg[: len(jpeg) // 2], "json": caption},
        {"__key__": "bomb", "png": bomb, "json": caption},
        {"__key__": "nocaption", "png": png},
        {"__key__": "notutf8", "png": png, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "badjson", "png": png, "json": b"{not json"},
        {"__key__": "blankcaption", "png": png, "json": {"captions": ["  "]}},
        {"__key__": "noimage", "json": caption},
    ]
    odd = [
        {"__key__": "gray", "png": _encode(_rgb(1).convert("L")), "json": caption},
        {"__key__": "graya", "png": _encode(_rgb(1).convert("LA")), "json": caption},
        {"__key__": "rgba", "png": _encode(_rgb(2).convert("RGBA")), "json": caption},
        {"__key__": "palette", "png": _encode(palette), "json": caption},
        {"__key__": "palette_alpha", "png": _encode(transparent), "json": caption},
        {"__key__": "cmyk", "jpg": _encode(_rgb(3).convert("CMYK"), "JPEG"), "json": caption},
        {"__key__": "gray16", "png": _encode(gray16), "txt": b"sixteen bits"},
    ]
    expected_bad = {
        "empty_image": 1,
        "corrupt_image": 1,
        "truncated_image": 2,
        "decompression_bomb": 1,
        "missing_caption": 1,
        "bad_caption_encoding": 1,
        "bad_json": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }
    modes = [Image.open(io.BytesIO(s.get("png") or s.get("jpg"))).mode for s in odd]
    return bad + odd, expected_bad, dict(zip(*np.unique(modes, return_counts=True)))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_never_fatal(tmp_path, workers, caplog):
    extra, expected_bad, expected_modes = _bad_and_odd_samples()
    samples = [_good(i) for i in range(5)] + extra
    rng = np.random.default_rng(0)
    samples = [samples[i] for i in rng.permutation(len(samples))]
    summary = write_samples(samples, tmp_path, samples_per_shard=8)
    loader = CaptionLoader(summary.pattern, _config(num_workers=workers))
    with caplog.at_level(logging.INFO, logger="vlm.data.reader"):
        keys = _keys(loader)
    good = {f"good{i:02d}" for i in range(5)}
    odd = {"gray", "graya", "rgba", "palette", "palette_alpha", "cmyk", "gray16"}
    assert sorted(keys) == sorted(good | odd)
    assert dict(loader.bad_samples) == expected_bad
    assert sum(loader.converted.values()) == len(odd) and dict(loader.converted) == {
        k: int(v) for k, v in expected_modes.items()
    }
    assert "data pass done: skipped" in caplog.text
    _keys(loader)  # a second pass doubles the running totals
    assert loader.bad_samples["truncated_image"] == 4


def test_counts_from_samples_after_the_last_batch_are_not_lost(tmp_path):
    samples = [_good(i) for i in range(3)] + [{"__key__": "zz_empty", "png": b"", "json": {"caption": "x"}}]
    summary = write_samples(samples, tmp_path)
    loader = CaptionLoader(summary.pattern, _config(batch_size=3))
    assert len(_keys(loader)) == 3 and loader.bad_samples == {"empty_image": 1}


def test_image_modes_convert_to_sensible_rgb():
    gray16 = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    image, mode = decode_image(_encode(Image.fromarray(gray16)), 10**6)
    assert mode.startswith("I") and image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[0, 128], [255, 1]]  # scaled, not clipped at 255
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    image, mode = decode_image(_encode(rgba), 10**6)
    assert mode == "RGBA" and np.asarray(image).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    gray = Image.fromarray(np.array([[7, 200]], dtype=np.uint8))
    image, _ = decode_image(_encode(gray), 10**6)
    assert np.asarray(image).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    image, mode = decode_image(_encode(_rgb(0)), SIZE * SIZE)  # exactly at the pixel limit: fine
    assert mode is None and np.array_equal(np.asarray(image), np.asarray(_rgb(0)))


def test_default_transform_is_open_clips_eval_preprocess(tmp_path):
    import open_clip

    summary = write_samples([_good(i) for i in range(2)], tmp_path)
    config = _config(preprocess="open_clip", image_size=24)
    batch = next(iter(CaptionLoader(summary.pattern, config, train=False)))
    reference = open_clip.image_transform(24, is_train=False)
    expected = torch.stack([reference(_rgb(i)) for i in range(2)])
    torch.testing.assert_close(batch["images"], expected, rtol=0, atol=0)
    assert build_transform(config) is not None


# ----------------------------------------------------------------------------------------------
# Splitting, shuffling, epochs


@pytest.mark.parametrize(("num_shards", "world", "workers"), [(4, 2, 2), (2, 2, 2), (1, 1, 2), (3, 2, 1)])
def test_ranks_and_workers_see_disjoint_complete_slices(tmp_path, num_shards, world, workers):
    n = 24
    summary = write_samples([_good(i) for i in range(n)], tmp_path, samples_per_shard=n // num_shards)
    assert len(summary.shards) == num_shards
    per_rank = []
    for rank in range(world):
        loader = CaptionLoader(summary.pattern, _config(num_workers=workers), rank=rank, world_size=world)
        per_rank.append(_keys(loader))
    everything = [k for keys in per_rank for k in keys]
    assert sorted(everything) == sorted(f"good{i:02d}" for i in range(n))  # each sample exactly once
    assert all(abs(len(keys) - n / world) <= n / world / 2 for keys in per_rank)  # nobody starves


def test_epochs_are_deterministic_and_differ(tmp_path):
    summary = write_samples([_good(i) for i in range(30)], tmp_path, samples_per_shard=6)
    config = _config(sample_shuffle=10, shard_shuffle=True, seed=3)
    a, b = CaptionLoader(summary.pattern, config), CaptionLoader(summary.pattern, config)
    first = _keys(a)
    assert first == _keys(b)  # same seed and epoch: same order (what resume relies on)
    assert sorted(first) == sorted(f"good{i:02d}" for i in range(30)) and first != sorted(first)
    a.set_epoch(1)
    second = _keys(a)
    assert sorted(second) == sorted(first) and second != first
    eval_order = _keys(CaptionLoader(summary.pattern, config, train=False))
    assert eval_order == sorted(eval_order)  # evaluation reads in shard order


def test_resampled_is_endless_and_seeded(tmp_path):
    summary = write_samples([_good(i) for i in range(6)], tmp_path, samples_per_shard=2)
    config = _config(resampled=True, sample_shuffle=4)

    def take(loader, n):
        it = iter(loader)
        return [k for _ in range(n) for k in next(it).sample_keys]

    a = take(CaptionLoader(summary.pattern, config), 10)  # 30 samples from a 6-sample dataset
    assert len(a) == 30 and set(a) <= {f"good{i:02d}" for i in range(6)}
    assert a == take(CaptionLoader(summary.pattern, config), 10)
    other = CaptionLoader(summary.pattern, config)
    other.set_epoch(5)
    assert take(other, 10) != a


def test_drop_last_and_batch_sizes(tmp_path):
    summary = write_samples([_good(i) for i in range(7)], tmp_path)
    sizes = [len(b.sample_keys) for b in CaptionLoader(summary.pattern, _config(batch_size=3))]
    assert sizes == [3, 3, 1]
    sizes = [len(b.sample_keys) for b in CaptionLoader(summary.pattern, _config(batch_size=3, drop_last=True))]
    assert sizes == [3, 3]


# ----------------------------------------------------------------------------------------------
# Text


def test_processor_tokenization_truncates_and_masks(tmp_path):
    from vlm.processor import IGNORE_INDEX, VLMProcessor
    from vlm.testing import tiny_tokenizer

    long_caption = "a small red circle on the left and a large blue square on the right " * 3
    samples = [
        {"__key__": "long", "png": _encode(_rgb(0)), "json": {"captions": [long_caption]}},
        {"__key__": "short", "png": _encode(_rgb(1)), "json": {"captions": ["red"]}},
    ]
    summary = write_samples(samples, tmp_path)
    processor = VLMProcessor(tiny_tokenizer(), tokens_per_image=4)
    loader = CaptionLoader(
        summary.pattern, _config(max_caption_tokens=6), text=processor, prompt="<image>", train=False
    )
    batch = next(iter(loader))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    reference = [processor.build_inputs("<image>", c, num_images=1) for c in batch.captions]
    for row, ref in enumerate(reference):
        prefix = sum(1 for label in ref["labels"] if label == IGNORE_INDEX)
        n = min(len(ref["input_ids"]), prefix + 6)
        assert ids[row, :n].tolist() == ref["input_ids"][:n] and int(mask[row].sum()) == n
        assert (labels[row, :prefix] == IGNORE_INDEX).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert (ids[row, n:] == processor.pad_token_id).all()
    long_row = batch.sample_keys.index("long")
    assert int((labels[long_row] != IGNORE_INDEX).sum()) == 6  # truncated caption: 6 tokens, no eos
    assert processor.eos_token_id not in ids[long_row].tolist()
    short_row = batch.sample_keys.index("short")
    assert processor.eos_token_id in ids[short_row].tolist()


def test_plain_tokenizer_path_pads(tmp_path):
    from vlm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    samples = [
        {"__key__": f"k{i}", "png": _encode(_rgb(i)), "json": {"captions": [c]}}
        for i, c in enumerate(["a red circle on the left", "hi"])
    ]
    summary = write_samples(samples, tmp_path)
    batch = next(iter(CaptionLoader(summary.pattern, _config(), text=tokenizer, train=False)))
    for row, caption in enumerate(batch.captions):
        expected = tokenizer(caption)["input_ids"]
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert int(batch["attention_mask"][row].sum()) == len(expected)
        assert (batch["labels"][row, len(expected) :] == -100).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="DataConfig.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="DataConfig.num_workers"):
        DataConfig(num_workers=-1)


def test_truncated_and_missing_shards_are_counted_not_fatal(tmp_path):
    summary = write_samples([_good(i) for i in range(9)], tmp_path, samples_per_shard=3)
    first, second, third = summary.shards
    data = Path(second).read_bytes()
    Path(second).write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    loader = CaptionLoader([first, second, third, str(tmp_path / "gone.tar")], _config())
    keys = _keys(loader)
    assert {f"good{i:02d}" for i in (0, 1, 2, 6, 7, 8)} <= set(keys) and len(keys) < 9
    assert loader.bad_samples["broken_tar"] == 1 and loader.bad_samples["truncated_shard"] == 1


@pytest.mark.slow
def test_fuzzed_images_and_captions_never_crash_and_are_all_accounted_for(tmp_path):
    """Random bit flips, cuts and junk in images and captions: every sample is yielded or counted once."""
    rng = np.random.default_rng(0)
    sources = [_encode(_rgb(i)) for i in range(4)] + [_encode(_rgb(9), "JPEG"), _encode(_rgb(8).convert("P"))]
    for trial in range(6):
        samples = []
        for i in range(40):
            data = bytearray(sources[int(rng.integers(len(sources)))])
            kind = int(rng.integers(4))
            if kind == 0:
                flips = rng.integers(0, len(data), size=int(rng.integers(1, 20)))
                for at in flips:
                    data[at] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                data = data[: int(rng.integers(0, len(data)))]
            elif kind == 2:
                data = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
            caption = rng.integers(0, 256, int(rng.integers(0, 12)), dtype=np.uint8).tobytes()
            members = {"jpg" if data[:2] == b"\xff\xd8" else "png": bytes(data)}
            members["txt" if rng.random() < 0.5 else "json"] = caption if rng.random() < 0.5 else b"a fine caption"
            samples.append({"__key__": f"t{trial}s{i:02d}", **members})
        summary = write_samples(samples, tmp_path / str(trial), samples_per_shard=16)
        loader = CaptionLoader(summary.pattern, _config(num_workers=trial % 2))
        yielded = len(_keys(loader))
        assert yielded + sum(loader.bad_samples.values()) == len(samples)
        assert yielded > 0 and len(loader.bad_samples) >= 2  # both outcomes, several reasons


def _ddp_reader(rank: int, world: int, init_file: str, patterns: list[str], out_dir: str) -> None:
    import json as _json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for p, pattern in enumerate(patterns):
            for workers in (0, 2):
                loader = CaptionLoader(pattern, _config(num_workers=workers, sample_shuffle=4, shard_shuffle=True))
                Path(out_dir, f"p{p}_rank{rank}_w{workers}.json").write_text(_json.dumps(_keys(loader)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_two_process_gloo_split(tmp_path):
    """torch.distributed ranks (gloo, spawned) plus DataLoader workers split 1 or 4 shards: each sample once."""
    import json as _json

    import torch.multiprocessing as mp

    n = 20
    patterns = [
        write_samples([_good(i) for i in range(n)], tmp_path / str(k), samples_per_shard=n // k).pattern for k in (1, 4)
    ]
    mp.spawn(_ddp_reader, args=(2, str(tmp_path / "init"), patterns, str(tmp_path)), nprocs=2, join=True)
    for p in range(len(patterns)):
        for workers in (0, 2):
            per_rank = [_json.loads((tmp_path / f"p{p}_rank{r}_w{workers}.json").read_text()) for r in range(2)]
            assert sorted(per_rank[0] + per_rank[1]) == sorted(f"good{i:02d}" for i in range(n))
            assert per_rank[0] and per_rank[1]


# ----------------------------------------------------------------------------------------------
# Worker processes end with the pass, also when it is left early


def test_closing_a_stream_mid_pass_stops_its_workers(tmp_path):
    import multiprocessing

    from vlm.training.batches import BatchStream

    summary = write_samples([_good(i) for i in range(24)], tmp_path, samples_per_shard=6)
    before = set(multiprocessing.active_children())
    with BatchStream(CaptionLoader(summary.pattern, _config(num_workers=2))) as stream:
        next(stream)
        assert len(set(multiprocessing.active_children()) - before) == 2
    assert set(multiprocessing.active_children()) - before == set()


def test_a_pass_left_open_does_not_hang_the_exit(tmp_path):
    """A ``for`` loop left with ``break`` while its generator stays referenced (here: a global)."""
    import subprocess
    import sys
    import textwrap

    summary = write_samples([_good(i) for i in range(24)], tmp_path, samples_per_shard=6)
    script = textwrap.dedent(f"""
        from vlm.data import CaptionLoader, DataConfig
        config = DataConfig(batch_size=3, image_size={SIZE}, preprocess="plain", num_workers=2)
        batches = iter(CaptionLoader({str(summary.pattern)!r}, config))
        print("got", len(next(batches).sample_keys), flush=True)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 90 s with a DataLoader pass still open")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "got 3" in done.stdout
