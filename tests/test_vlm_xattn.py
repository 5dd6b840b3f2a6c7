"""Flamingo gated cross-attention: identity at init, latest-image routing, placement and gate variants,
generation with and without a KV cache, media never outliving a call, weights kept."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm import InjectionConfig, LoRAConfig, VisionLanguageModel
from vlm.gated_xattn import latest_image_index
from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_tokenizer, tiny_vlm_config


def _build(family="llama", lora=False, every_k=1, **injection):
    """(VLM in cross_attention mode, an untouched copy of its base LM)."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = tiny_lm(family, tok)
    base = copy.deepcopy(lm).eval()
    clip, preprocess = tiny_clip()
    injection = {"xattn_heads": 2, "xattn_head_dim": 8, **injection}
    config = tiny_vlm_config(
        family,
        injection=InjectionConfig(mode="cross_attention", every_k_layers=every_k, **injection),
        lora=LoRAConfig(enabled=lora, r=4),
    )
    torch.manual_seed(1)
    return VisionLanguageModel.from_parts(clip, lm, tok, config, preprocess=preprocess).eval(), base


def _open_gates(model, value=1.0):
    with torch.no_grad():
        for block in model.xattn.blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gates_at_zero_give_the_base_lm_exactly(family):
    model, base = _build(family, lora=True)
    batch = model.processor(["<image>a red <image>circle", "no image here"], captions=["x", "y"], num_images=[2, 0])
    got = model(images=tiny_images(2), **batch, logits_to_keep=0).logits  # all positions, as the base gives
    want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, want)
    # the LM's own weights keep their names: its state dict is exactly the base's
    names = {n.replace("base_layer.", "") for n in model.language_model.state_dict() if "lora_" not in n}
    assert names == set(base.state_dict())


def _first_block_outputs(model, batch, *image_sets):
    captured = []
    hook = model.xattn.blocks[0].register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    try:
        for images in image_sets:
            model(images=images, **batch)
    finally:
        hook.remove()
    return captured


@pytest.mark.parametrize("ff_scope", ["all", "after_image"])
def test_each_token_sees_only_the_latest_preceding_image(ff_scope):
    model, base = _build(every_k=1, xattn_ff_scope=ff_scope)
    _open_gates(model)
    batch = model.processor(["the quick <image>brown fox <image>jumps over"], num_images=2)
    first, second = (batch["input_ids"][0] == model.image_token_id).nonzero()[:, 0].tolist()
    images = tiny_images(2, seed=1)
    changed_first = images.clone()
    changed_first[0] += 1.0
    ref, alt = (model(images=x, **batch).logits[0] for x in (images, changed_first))
    plain = base(input_ids=batch["input_ids"]).logits[0]
    if ff_scope == "after_image":  # before any image: the base LM, untouched
        assert torch.equal(ref[:first], plain[:first])
    else:  # the FF branch updates every token, as OpenFlamingo and IDEFICS do
        assert (ref[:first] - plain[:first]).abs().amax(-1).min() > 1e-4
    assert torch.equal(ref[:first], alt[:first])  # no token before image 0 sees it
    assert (ref[first:second] - alt[first:second]).abs().amax(-1).min() > 1e-4
    # in the first cross-attended layer (deeper layers mix positions) image 0 reaches exactly [first, second)
    out = _first_block_outputs(model, batch, images, changed_first)
    delta = (out[0] - out[1])[0].abs().amax(-1)  # (L,)
    assert delta[:first].max() == 0 and delta[second:].max() == 0 and delta[first:second].min() > 0


def test_text_only_batch_runs_the_ff_branch_only_when_reference_semantics():
    batch_text = ["no image at all here"]
    for scope, equal in (("all", False), ("after_image", True)):
        model, base = _build(xattn_ff_scope=scope)
        _open_gates(model)
        batch = model.processor(batch_text)
        got = model(**batch).logits
        assert torch.equal(got, base(**batch).logits) == equal


@pytest.mark.parametrize(
    ("placement", "every_k", "want"), [("first", 2, [0, 2]), ("last", 2, [1, 3]), ("last", 1, [0, 1, 2, 3])]
)
def test_placement_of_the_blocks(placement, every_k, want):
    tok = tiny_tokenizer()
    lm = tiny_lm("llama", tok, num_hidden_layers=4)
    clip, _ = tiny_clip()
    injection = InjectionConfig(
        mode="cross_attention", every_k_layers=every_k, xattn_layers=placement, xattn_heads=2, xattn_head_dim=8
    )
    model = VisionLanguageModel.from_parts(clip, lm, tok, tiny_vlm_config("llama", injection=injection))
    assert model.xattn.layer_indices == want
    ran = []
    for i in want:
        model.language_model.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    model(images=tiny_images(1), **model.processor(["<image>a"]))
    assert ran == want


def test_vector_gates_rmsnorm_gated_mlp_and_qk_norm_variant():
    model, base = _build(
        xattn_gate="vector", xattn_norm="rmsnorm", xattn_ff_gated=True, xattn_ff_activation="silu",
        xattn_ff_bias=False, xattn_out_bias=False, xattn_qk_norm="rmsnorm",
    )  # fmt: skip
    block = model.xattn.blocks[0]
    assert block.attn_gate.shape == (32,) and isinstance(block.norm_attn, torch.nn.RMSNorm)
    assert block.attn.q_norm is not None and block.ff.fc2.bias is None and block.attn.to_out.bias is None
    batch = model.processor(["<image>a red circle"])
    images = tiny_images(1)
    assert torch.equal(model(images=images, **batch).logits, base(**batch).logits)  # gates at 0
    with torch.no_grad():
        block.attn_gate[:16] = 1.0  # half the channels open
    captured = _first_block_outputs(model, batch, images)[0]
    moved = (captured - model.language_model.get_input_embeddings()(batch["input_ids"])).abs().amax(dim=(0, 1))
    assert moved[16:].max() == 0 and moved[:16].min() > 0


def test_latest_image_index_equals_the_idefics_processor_mask():
    """The IDEFICS processor's image_attention_mask: latest image, none after an eos until the next image."""
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids_pt

    class Tok:
        eos_token_id = 2

        def convert_tokens_to_ids(self, token):
            return 9

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 9, (6, 40), generator=gen)
    ids[torch.rand(6, 40, generator=gen) < 0.15] = 9
    ids[torch.rand(6, 40, generator=gen) < 0.1] = 2
    ids[0, :3] = torch.tensor([2, 9, 2])
    want, _ = image_attention_mask_for_packed_input_ids_pt(ids.clone(), Tok())
    torch.testing.assert_close(latest_image_index(ids, 9, reset_token_id=2), want, rtol=0, atol=0)
    assert torch.equal(latest_image_index(ids, 9), (ids == 9).long().cumsum(-1) - 1)


def _step_logits(model, **generate_kwargs):
    """Last-position logits of every LM call during one ``generate``."""
    seen = []
    head = model.language_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].detach()))
    try:
        texts = model.generate(**generate_kwargs)
    finally:
        hook.remove()
    return texts, seen


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_without_a_cache_equals_with_one(num_beams):
    """Regression: without a KV cache every step re-runs the whole sequence; each token must still see
    its own latest image, not the last one (text before and between images)."""
    model, _ = _build(lora=True, every_k=1)
    _open_gates(model, 0.8)
    images = tiny_images(3, seed=2)
    kwargs = {
        "images": [[images[0], images[1]], [images[2]]],
        "prompts": ["the quick <image>brown fox <image>jumps", "Question: <image>What is in this picture?"],
        "max_new_tokens": 5,
        "num_beams": num_beams,
    }
    cached, cached_logits = _step_logits(model, **kwargs)
    uncached, uncached_logits = _step_logits(model, **kwargs, use_cache=False)
    assert cached == uncached
    assert len(cached_logits) == len(uncached_logits)
    for a, b in zip(cached_logits, uncached_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generation_equals_a_step_by_step_forward():
    model, _ = _build(every_k=1)
    _open_gates(model, 0.8)
    images = tiny_images(2, seed=3)
    prompt = "the quick <image>brown <image>fox"
    new = model.generate_ids(**model.processor([prompt], padding_side="left"), images=images, max_new_tokens=5)
    batch = model.processor([prompt])
    ids = batch["input_ids"]
    for _ in range(5):
        logits = model(images=images, input_ids=ids).logits[:, -1]
        logits[:, model.image_token_id] = -float("inf")  # generate's bad_words_ids
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, ids[:, batch["input_ids"].shape[1] :])


def test_generation_projects_the_media_once_per_block_and_never_reuses_them():
    """Decoding reuses each block's media keys/values from the prompt's call (IDEFICS re-projects them
    at every step); a new generate call with other images gets its own."""
    model, _ = _build(every_k=1)
    _open_gates(model, 0.8)
    batch = model.processor(["<image>a red", "<image>Caption:"], padding_side="left")
    kwargs = {"max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True}

    def scores(m, seed):
        out = m.generate_ids(**batch, images=tiny_images(2, seed=seed), **kwargs)
        return torch.stack(out.scores)

    calls = []
    hooks = [b.attn.to_kv.register_forward_hook(lambda m, a, out: calls.append(1)) for b in model.xattn.blocks]
    try:
        first = scores(model, 4)
        assert len(calls) == len(model.xattn.blocks)  # one projection per block for 6 decoding steps
        second = scores(model, 5)
    finally:
        for hook in hooks:
            hook.remove()
    fresh, _ = _build(every_k=1)
    _open_gates(fresh, 0.8)
    torch.testing.assert_close(second, scores(fresh, 5), rtol=0, atol=0)  # no stale keys/values
    assert not torch.allclose(first, second)  # (the images do change the scores)


def test_media_do_not_outlive_a_call():
    """Regression: after a call with images, the LM alone is the text-only LM again (no stale images,
    no batch-size error)."""
    model, base = _build(every_k=1)
    _open_gates(model)
    model(images=tiny_images(4), **model.processor(["<image>a <image>b", "<image>c <image>d"]))
    text = model.processor(["a red circle"])
    torch.testing.assert_close(model.lm(**text).logits, base(**text).logits, rtol=0, atol=0)
    model.generate(tiny_images(1), "Caption:", max_new_tokens=2)
    torch.testing.assert_close(model.lm(**text).logits, base(**text).logits, rtol=0, atol=0)


def test_gates_and_blocks_train_and_round_trip(tmp_path):
    model, _ = _build(family="opt", lora=True, every_k=2)
    assert model.xattn.layer_indices == [0]
    model.train()
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=tiny_images(1), **batch).loss.backward()
    gates = [model.xattn.blocks[0].attn_gate, model.xattn.blocks[0].ff_gate]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    _open_gates(model, 0.7)
    model.eval()
    logits = model(images=tiny_images(1), **batch).logits
    model.save_adapter(tmp_path / "a")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    clip, _ = tiny_clip()
    loaded = VisionLanguageModel.load_adapter(tmp_path / "a", clip, tiny_lm("opt", tok), tok).eval()
    assert torch.equal(loaded(images=tiny_images(1), **batch).logits, logits)


def test_a_deep_copy_runs_its_own_blocks():
    model, _ = _build(every_k=1)
    clone = copy.deepcopy(model)
    _open_gates(clone, 1.0)  # only the copy's gates open
    batch = model.processor(["<image>Caption:"], num_images=1)
    images = tiny_images(1)
    closed = model(images=images, **batch).logits
    opened = clone(images=images, **batch).logits
    assert not torch.equal(closed, opened)
    _open_gates(model, 1.0)
    torch.testing.assert_close(model(images=images, **batch).logits, opened, rtol=0, atol=0)
