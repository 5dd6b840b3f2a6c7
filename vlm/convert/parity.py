"""Measure each converter against its reference on the tiny offline models: max |Δ logits| over the
real tokens of an interleaved, left-padded batch, and whether greedy and beam generation are identical.

    from vlm.convert.parity import measure_parity
    rows = measure_parity()         # one dict per (reference, variant)

``scripts/convert_parity.py`` prints the rows and writes docs/convert_parity.md with ``--docs``.
"""

from __future__ import annotations

import copy
import tempfile

import torch

from .idefics import from_idefics
from .idefics2 import from_idefics2
from .open_flamingo import from_open_flamingo
from .tiny import tiny_idefics, tiny_idefics2, tiny_open_flamingo, tiny_photos

__all__ = ["measure_parity"]


def _max_delta(want, got, mask) -> float:
    real = mask.bool()
    return float((want[real].double() - got[real].double()).abs().max())


def _generation_equal(reference_generate, ours_generate, length: int) -> bool:
    for beams in (1, 2):
        kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams}
        if not torch.equal(reference_generate(**kwargs)[:, length:], ours_generate(**kwargs)):
            return False
    return True


def _idefics(variant: dict) -> dict:
    hf, processor = tiny_idefics(**variant)
    ours = from_idefics(copy.deepcopy(hf), processor.tokenizer)
    photos = tiny_photos(3)
    processor.tokenizer.padding_side = "left"
    prompts = [["User:", photos[0], "Describe.<eos>Then", photos[1], "this?"], ["Hi", photos[2], "What"], ["text"]]
    batch = processor(text=prompts, padding="longest", return_tensors="pt")
    ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    bad = [[ours.image_token_id], [processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")]]
    with torch.no_grad():
        delta = _max_delta(
            hf(**batch).logits, ours(images=batch["pixel_values"], **ids).logits, batch["attention_mask"]
        )
    same = _generation_equal(
        lambda **kw: hf.generate(**batch, bad_words_ids=bad, **kw),
        lambda **kw: ours.generate_ids(**ids, images=batch["pixel_values"], bad_words_ids=bad, **kw),
        batch["input_ids"].shape[1],
    )
    return {"max_abs_delta_logits": delta, "generation_identical": same}


def _idefics2() -> dict:
    hf, processor = tiny_idefics2()
    ours = from_idefics2(copy.deepcopy(hf), processor.tokenizer)
    photos = tiny_photos(2, size=(40, 52)) + tiny_photos(1, seed=1, size=(64, 33))
    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=[[photos[0], photos[1]], [photos[2]]], text=["<image>In<image>this", "Where<image>"], padding="longest",
        return_tensors="pt",
    )  # fmt: skip
    inputs = {
        "images": batch["pixel_values"],
        "pixel_attention_mask": batch["pixel_attention_mask"],
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }
    tok = processor.tokenizer
    bad = [[tok.convert_tokens_to_ids("<image>")], [tok.convert_tokens_to_ids("<fake_token_around_image>")]]
    with torch.no_grad():
        delta = _max_delta(hf(**batch).logits, ours(**inputs).logits, batch["attention_mask"])
    same = _generation_equal(
        lambda **kw: hf.generate(**batch, bad_words_ids=bad, **kw),
        lambda **kw: ours.generate_ids(**inputs, bad_words_ids=bad, **kw),
        batch["input_ids"].shape[1],
    )
    return {"max_abs_delta_logits": delta, "generation_identical": same}


def _open_flamingo(family: str, every_k: int) -> dict:
    from ..testing import register_tiny_clip

    with tempfile.TemporaryDirectory() as directory:
        flamingo, _, tokenizer = tiny_open_flamingo(directory, family=family, every_k=every_k)
        ours = from_open_flamingo(
            copy.deepcopy(flamingo), tokenizer, vision_name=register_tiny_clip(), vision_pretrained=None
        )
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["<image>Two cats.<|endofchunk|><image>An image of", "Text first, <image>a dog"],
        return_tensors="pt",
        padding=True,
    )
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = [[vision_x[0, 0, 0], vision_x[0, 1, 0]], [vision_x[1, 0, 0]]]
    with torch.no_grad():
        want = flamingo(vision_x, batch["input_ids"], batch["attention_mask"]).logits
        got = ours(images=images, **batch).logits
    return {"max_abs_delta_logits": _max_delta(want, got, batch["attention_mask"]), "generation_identical": None}


def measure_parity() -> list[dict]:
    """One row per reference and variant (fp32, CPU, seed 0). OpenFlamingo's generation is compared
    in tests/test_convert_open_flamingo.py (its ``generate`` needs a shim under transformers 5)."""
    torch.manual_seed(0)
    rows = []
    for name, variant in {
        "vector gates, q/k norms, every 2": {"cross_layer_interval": 2, "alpha_type": "vector", "qk_norms": True},
        "scalar gates, every layer": {"cross_layer_interval": 1, "alpha_type": "float", "qk_norms": False},
    }.items():
        rows.append({"reference": "IDEFICS v1", "variant": name, **_idefics(variant)})
    rows.append({"reference": "Idefics2", "variant": "GQA, patch masks, padded images", **_idefics2()})
    try:
        import open_flamingo  # noqa: F401
    except ImportError:
        return rows
    for family, every_k in (("llama", 1), ("gpt_neox", 2)):
        rows.append(
            {"reference": "OpenFlamingo", "variant": f"{family}, every {every_k}", **_open_flamingo(family, every_k)}
        )
    return rows
