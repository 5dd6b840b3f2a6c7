"""Idefics2 -> VisionLanguageModel: logits and generation equal transformers' Idefics2ForConditionalGeneration
on the Idefics2 processor's own inputs (interleaved images of several sizes with their pixel masks,
padding images, left padding, GQA in the resampler and the Mistral decoder)."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm.convert import from_idefics2
from vlm.convert.tiny import tiny_idefics2, tiny_photos


@pytest.fixture(scope="module")
def pair():
    hf, processor = tiny_idefics2()
    ours = from_idefics2(copy.deepcopy(hf), processor.tokenizer, image_processor=processor.image_processor)
    return hf, processor, ours


def _batch(processor, padding_side="left"):
    photos = tiny_photos(2, size=(40, 52)) + tiny_photos(2, seed=1, size=(64, 33))
    processor.tokenizer.padding_side = padding_side
    return processor(
        images=[[photos[0], photos[1]], [photos[2]], [photos[3]]],
        text=["<image>In this<image>image we see", "Where is<image>", "<image>"],
        padding="longest",
        return_tensors="pt",
    )


def _inputs(batch, **extra):
    return {
        "images": batch["pixel_values"],
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_attention_mask": batch["pixel_attention_mask"],
        **extra,
    }


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_the_reference(pair, padding_side):
    hf, processor, ours = pair
    batch = _batch(processor, padding_side)
    assert not bool(batch["pixel_attention_mask"].all())  # some images are padded: the patch mask matters
    with torch.no_grad():
        want = hf(**batch).logits
        got = ours(**_inputs(batch)).logits
        unmasked = ours(**_inputs(batch, pixel_attention_mask=None)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert (unmasked[real] - want[real]).abs().max() > 1e-3  # without the patch mask it is another model


def test_the_connector_is_projection_then_resampler_with_gqa(pair):
    hf, _, ours = pair
    assert ours.config.projector.order == "project_then_resample" and ours.config.projector.kind == "swiglu"
    text = hf.config.text_config
    assert ours.resampler.dim == text.hidden_size and ours.resampler.config.num_kv_heads == 2
    assert ours.config.tokens_per_image == hf.config.perceiver_config.resampler_n_latents
    features = torch.randn(3, 10, hf.config.vision_config.hidden_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = hf.model.connector(features, attention_mask=mask)
        got = ours.resampler(ours.projector(features), mask.bool())[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tower_features_and_patch_mask_equal_the_reference(pair):
    hf, processor, ours = pair
    batch = _batch(processor)
    pixels = batch["pixel_values"][0]  # (2, 3, H, W) the first sample's images
    pixel_mask = batch["pixel_attention_mask"][0]
    patch = hf.config.vision_config.patch_size
    subgrid = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    want_mask = (subgrid.sum(dim=(-1, -2)) == patch * patch).bool()  # Idefics2's own rule
    torch.testing.assert_close(ours.vision.patch_mask(pixel_mask), want_mask.flatten(1), rtol=0, atol=0)
    with torch.no_grad():
        want = hf.model.vision_model(pixel_values=pixels, patch_attention_mask=want_mask).last_hidden_state
    torch.testing.assert_close(ours.vision(pixels, pixel_mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_equals_the_reference_generate(pair, num_beams):
    hf, processor, ours = pair
    batch = _batch(processor)
    tok = processor.tokenizer
    bad = [[tok.convert_tokens_to_ids("<image>")], [tok.convert_tokens_to_ids("<fake_token_around_image>")]]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "bad_words_ids": bad}
    want = hf.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    inputs = _inputs(batch)
    got = ours.generate_ids(inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs, **kwargs)
    assert torch.equal(got, want)
    assert len({tuple(row.tolist()) for row in got}) > 1


def test_pil_images_and_wrong_tokenizer(pair):
    hf, processor, ours = pair
    photo = tiny_photos(1, size=(70, 50))[0]
    side = ours.vision.image_size[0]
    pixels = ours.vision.preprocess_images([photo])
    assert pixels.shape == (1, 3, side, side)
    want = processor.image_processor([[photo.resize((side, side))]], do_resize=False, return_tensors="pt")
    torch.testing.assert_close(pixels[0], want["pixel_values"][0, 0], rtol=0, atol=0)
    from vlm.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="pass Idefics2's own tokenizer"):
        from_idefics2(hf, tiny_tokenizer())
