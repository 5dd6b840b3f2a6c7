"""IDEFICS v1 -> VisionLanguageModel: logits and generation equal transformers' IdeficsForVisionText2Text
on the IDEFICS processor's own inputs (interleaved images, left padding, eos resets, decoupled
embeddings, vector and scalar gates, q/k norms)."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm.convert import from_idefics
from vlm.convert.tiny import tiny_idefics, tiny_photos

VARIANTS = {
    "vector-qk-every2": {"cross_layer_interval": 2, "alpha_type": "vector", "qk_norms": True},
    "float-every1": {"cross_layer_interval": 1, "alpha_type": "float", "qk_norms": False},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    """(reference IDEFICS, its processor, our converted model) — converted from a copy."""
    hf, processor = tiny_idefics(**VARIANTS[request.param])
    ours = from_idefics(copy.deepcopy(hf), processor.tokenizer, image_processor=processor.image_processor)
    return hf, processor, ours


def _batch(processor, padding_side="left"):
    photos = tiny_photos(4)
    prompts = [
        ["User:", photos[0], "Describe it.<eos>Then", photos[1], "and this?"],  # eos: the next text sees no image
        ["Hi there", photos[2], "What is"],
        ["text only, no image"],
        [photos[3], "Caption:"],
    ]
    processor.tokenizer.padding_side = padding_side
    return processor(text=prompts, padding="longest", return_tensors="pt")


def _ours(model, batch, **kwargs):
    return model(
        images=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_the_reference(pair, padding_side):
    hf, processor, ours = pair
    batch = _batch(processor, padding_side)
    eos = processor.tokenizer.eos_token_id
    assert (batch["input_ids"] == eos).sum() >= 1 and (batch["image_attention_mask"].sum(-1) == 0).any()
    with torch.no_grad():
        want = hf(**batch).logits
        got = _ours(ours, batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    # the images matter (the test is not vacuous): other pixels change the logits
    with torch.no_grad():
        other = ours(images=batch["pixel_values"] * 0.5, **{k: batch[k] for k in ("input_ids", "attention_mask")})
    assert (other.logits[real] - got[real]).abs().max() > 1e-2


def test_images_as_per_sample_lists_and_pil(pair):
    hf, processor, ours = pair
    batch = _batch(processor)
    pixels = batch["pixel_values"]
    counts = [int(n) for n in (batch["input_ids"] == ours.image_token_id).sum(-1)]
    lists = [list(pixels[b, :n]) for b, n in enumerate(counts)]
    ids = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(ours(images=lists, **ids).logits, _ours(ours, batch).logits, rtol=0, atol=0)
    photo = tiny_photos(1)[0]
    want = processor.image_processor([photo], return_tensors="pt")[0]
    torch.testing.assert_close(ours.vision.preprocess_images([photo])[0], want, rtol=0, atol=0)
    bad = pixels.clone()
    bad[2, 0] = 1.0  # the text-only sample's padding slot holds an image
    with pytest.raises(ValueError, match="all-zero padding"):
        ours(images=bad, **ids)


def test_decoupled_embeddings_and_gates_are_carried(pair):
    hf, processor, ours = pair
    c = hf.config
    table = ours.language_model.get_input_embeddings().weight
    assert table.shape[0] == c.vocab_size + c.additional_vocab_size == len(processor.tokenizer)
    torch.testing.assert_close(table[c.vocab_size :], hf.model.embed_tokens.additional_embedding.weight)
    head = ours.language_model.get_output_embeddings().weight
    torch.testing.assert_close(head[c.vocab_size :], hf.lm_head.additional_fc.weight)
    block, theirs = ours.xattn.blocks[0], hf.model.gated_cross_attn_layers[0]
    assert block.attn_gate.numel() == (c.hidden_size if c.alpha_type == "vector" else 1)
    torch.testing.assert_close(block.attn_gate, theirs.alpha_cross_attn.reshape(-1))
    assert (block.attn.q_norm is not None) == c.qk_layer_norms
    assert ours.xattn.layer_indices == list(range(0, c.num_hidden_layers, c.cross_layer_interval))
    assert ours.config.injection.xattn_reset_after_eos and ours.config.projector.kind == "none"


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_equals_the_reference_generate(pair, num_beams):
    hf, processor, ours = pair
    batch = _batch(processor)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    bad = [[ours.image_token_id], [processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")]]
    want = hf.generate(**batch, bad_words_ids=bad, **kwargs)[:, batch["input_ids"].shape[1] :]
    ids = {k: batch[k] for k in ("input_ids", "attention_mask")}
    got = ours.generate_ids(**ids, images=batch["pixel_values"], bad_words_ids=bad, **kwargs)
    assert torch.equal(got, want)
    uncached = ours.generate_ids(**ids, images=batch["pixel_values"], bad_words_ids=bad, use_cache=False, **kwargs)
    assert torch.equal(uncached, want)
    assert len({tuple(row.tolist()) for row in got}) > 1  # not a degenerate model


def test_not_an_idefics_model_is_refused():
    with pytest.raises(TypeError, match="expected an IdeficsForVisionText2Text"):
        from_idefics(torch.nn.Linear(2, 2), None)
