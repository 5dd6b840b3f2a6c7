"""OpenFlamingo -> VisionLanguageModel: the components and the whole model equal the open_flamingo
package's forward (interleaved images, left padding, gated layers every k); generation equals a
step-by-step greedy loop over the package's forward and the package's own generate (beam too); the
released checkpoint.pt layout loads without the package."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("open_flamingo")

from vlm.convert import from_open_flamingo, load_open_flamingo  # noqa: E402
from vlm.convert.tiny import tiny_open_flamingo  # noqa: E402
from vlm.testing import register_tiny_clip  # noqa: E402

CASES = {"llama-every1": ("llama", 1), "gpt_neox-every2": ("gpt_neox", 2)}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(reference Flamingo, its tokenizer, our converted model, the LM's directory)."""
    family, every_k = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    flamingo, _, tokenizer = tiny_open_flamingo(directory, family=family, every_k=every_k)
    ours = from_open_flamingo(
        copy.deepcopy(flamingo), tokenizer, vision_name=register_tiny_clip(), vision_pretrained=None
    )
    return flamingo, tokenizer, ours, directory


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    text = [
        "<image>An image of two cats.<|endofchunk|><image>An image of",
        "Text first, then <image>a dog",
    ]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(0)
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=gen)  # (B, T_img, F, C, H, W)
    vision_x[1, 1] = 0.0  # the second sample has one image: its second slot is padding
    return batch, vision_x


def test_resampler_and_gated_block_equal_the_package(pair):
    flamingo, _, ours, _ = pair
    media = torch.randn(2, 3, 1, 17, ours.vision.width)  # (B, T, F, P, D)
    with torch.no_grad():
        torch.testing.assert_close(ours.resampler(media), flamingo.perceiver(media), rtol=1e-5, atol=1e-5)
    layers = flamingo.lang_encoder.gated_cross_attn_layers
    theirs = [layer for layer in layers if layer is not None]
    assert ours.xattn.layer_indices == [i for i, layer in enumerate(layers) if layer is not None]
    x = torch.randn(2, 7, ours.hidden_size)
    latents = torch.randn(2, 2, 8, ours.vision.width)  # (B, T_img, n, D)
    locations = torch.zeros(2, 7, dtype=torch.bool)
    locations[0, 2], locations[0, 5], locations[1, 4] = True, True, True
    time = locations.cumsum(-1)  # OpenFlamingo's text time: the latest image, 0 = none
    mask = time[:, :, None] - 1 == torch.arange(2).repeat_interleave(8)[None, None, :]
    with torch.no_grad():
        want = theirs[0](x, latents, media_locations=locations)
        got = ours.xattn.blocks[0](x, latents.flatten(1, 2), mask, (time > 0)[:, :, None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_logits_equal_the_package_forward(pair):
    flamingo, tokenizer, ours, _ = pair
    batch, vision_x = _batch(tokenizer)
    images = [[vision_x[0, 0, 0], vision_x[0, 1, 0]], [vision_x[1, 0, 0]]]
    with torch.no_grad():
        want = flamingo(vision_x, batch["input_ids"], batch["attention_mask"]).logits
        got = ours(images=images, **batch).logits
        padded = ours(images=vision_x, **batch).logits  # its own (B, T, F=1, C, H, W); zero slots dropped
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded, got, rtol=0, atol=0)


def _greedy_with_the_package(flamingo, vision_x, ids, mask, steps, bad):
    for _ in range(steps):
        with torch.no_grad():
            logits = flamingo(vision_x, ids, mask).logits[:, -1]
        logits[:, bad] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.fixture
def package_generate(monkeypatch):
    """OpenFlamingo's generate under transformers 5: its LM forward only lacks a default for the
    attention mask transformers 5 no longer passes on every step."""
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin

    forward = FlamingoLMMixin.forward
    monkeypatch.setattr(FlamingoLMMixin, "forward", lambda self, input_ids, attention_mask=None, **kw: forward(
        self, input_ids, attention_mask, **kw
    ))  # fmt: skip


def test_generation_equals_the_package(pair, package_generate):
    flamingo, tokenizer, ours, _ = pair
    batch, vision_x = _batch(tokenizer)
    images = [[vision_x[0, 0, 0], vision_x[0, 1, 0]], [vision_x[1, 0, 0]]]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    kwargs = {"max_new_tokens": 6, "bad_words_ids": [[image_id]], "eos_token_id": eoc}
    got = ours.generate_ids(**batch, images=images, **kwargs)
    length = batch["input_ids"].shape[1]
    stepwise = _greedy_with_the_package(flamingo, vision_x, batch["input_ids"], batch["attention_mask"], 6, image_id)
    assert torch.equal(got, stepwise[:, length:])
    assert torch.equal(ours.generate_ids(**batch, images=images, use_cache=False, **kwargs), got)
    for beams in (1, 3):
        want = flamingo.generate(
            vision_x, batch["input_ids"], batch["attention_mask"], num_beams=beams, do_sample=False, **kwargs
        )
        assert torch.equal(ours.generate_ids(**batch, images=images, num_beams=beams, **kwargs), want[:, length:])


def _released_state(flamingo) -> dict:
    """What OpenFlamingo's training saved (its ``filter_state_dict_to_trainable``) under the transformers
    of its time: trainable tensors and every tensor whose name holds ``embed`` (GPT-NeoX's head was
    ``embed_out`` then, ``lm_head`` in transformers 5), minus the duplicate layer lists and the tower."""
    legacy = {"lang_encoder.lm_head.weight": "lang_encoder.embed_out.weight"}
    if flamingo.lang_encoder.config.model_type != "gpt_neox":
        legacy = {}
    trainable = {name for name, param in flamingo.named_parameters() if param.requires_grad}
    state = {legacy.get(k, k): v for k, v in flamingo.state_dict().items()}
    duplicates = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
    return {k: v for k, v in state.items() if (k in trainable or "embed" in k) and not k.startswith(duplicates)}


def test_released_checkpoint_loads_without_the_package(pair, tmp_path, monkeypatch):
    flamingo, tokenizer, _, directory = pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if flamingo.lang_encoder.config.model_type == "llama":
        pytest.skip("OpenFlamingo's checkpoints do not hold an untied head not named 'embed' (Llama's lm_head)")
    assert "lang_encoder.embed_out.weight" in _released_state(flamingo)  # renamed to lm_head on loading
    torch.save(_released_state(flamingo), tmp_path / "checkpoint.pt")
    every_k = len(flamingo.lang_encoder.gated_cross_attn_layers) // sum(
        layer is not None for layer in flamingo.lang_encoder.gated_cross_attn_layers
    )
    vision = copy.deepcopy(flamingo.vision_encoder)  # the open_clip tower it was built on
    lm = AutoModelForCausalLM.from_pretrained(directory)
    base_tokenizer = AutoTokenizer.from_pretrained(directory)
    monkeypatch.setitem(sys.modules, "open_flamingo", None)  # importing it now fails
    model = load_open_flamingo(
        tmp_path / "checkpoint.pt", vision, lm, base_tokenizer, cross_attn_every_n_layers=every_k
    )
    assert "<image>" not in base_tokenizer.get_vocab()  # the caller's tokenizer is left as it was
    batch, vision_x = _batch(model.tokenizer)
    images = [[vision_x[0, 0, 0], vision_x[0, 1, 0]], [vision_x[1, 0, 0]]]
    monkeypatch.delitem(sys.modules, "open_flamingo")
    with torch.no_grad():
        want = flamingo(vision_x, batch["input_ids"], batch["attention_mask"]).logits
        got = model(images=images, **batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="check cross_attn_every_n_layers"):
        load_open_flamingo(
            tmp_path / "checkpoint.pt",
            vision,
            AutoModelForCausalLM.from_pretrained(directory),
            base_tokenizer,
            cross_attn_every_n_layers=every_k + 1,
        )
    state = _released_state(flamingo)
    state["perceiver.unknown.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected resampler tensor perceiver.unknown.weight"):
        load_open_flamingo(
            state,
            vision,
            AutoModelForCausalLM.from_pretrained(directory),
            base_tokenizer,
            cross_attn_every_n_layers=every_k,
        )
