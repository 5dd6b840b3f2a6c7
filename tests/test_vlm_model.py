"""VisionLanguageModel in prefix mode on tiny offline parts: splicing, labels, images, generation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm import IGNORE_INDEX, InjectionConfig, VisionConfig, VisionLanguageModel
from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_parts, tiny_tokenizer, tiny_vlm, tiny_vlm_config
from vlm.vision import VisionTower


def _perturb(model, scale=0.3, seed=0):
    """Move the trainable weights off their init (LoRA B = 0, gates = 0) so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="module")
def model():
    return _perturb(tiny_vlm("llama")).eval()


def test_image_embeddings_are_spliced_at_placeholders(model):
    batch = model.processor(["Caption:", "<image>left <image>right"], num_images=[1, 2])
    images = tiny_images(3)
    seen = {}
    handle = model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        model(images=images, **batch)
    finally:
        handle.remove()
    embeds = seen["inputs_embeds"]
    is_image = batch["input_ids"] == model.image_token_id
    media, _ = model.encode_images(images)  # (3, latents, H), in batch order
    torch.testing.assert_close(embeds[is_image], media.reshape(-1, media.shape[-1]), rtol=0, atol=0)
    table = model.language_model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[~is_image], table[batch["input_ids"][~is_image]], rtol=0, atol=0)
    # every image is one contiguous run of num_latents placeholders
    assert is_image.sum().item() == 3 * model.config.resampler.num_latents


def test_interleaved_images_and_text_only_samples_batch_like_alone(model):
    """A batch mixing 2 interleaved images, no image and 1 image gives each sample's solo logits."""
    prompts = ["<image>a red <image>and a blue", "a text only prompt", "<image>Caption:"]
    captions = ["circle", "square", "two stars"]
    counts = [2, 0, 1]
    images = tiny_images(3, seed=3)
    batch = model.processor(prompts, captions=captions, num_images=counts)
    out = model(images=images, **batch, logits_to_keep=0)  # all positions (labels would keep only the tail)
    starts = [0, 2, 2]
    for i in range(3):
        solo = model.processor([prompts[i]], captions=[captions[i]], num_images=counts[i])
        sub = images[starts[i] : starts[i] + counts[i]]
        solo_out = model(images=sub if counts[i] else None, **solo, logits_to_keep=0)
        n = solo["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[i, :n], solo_out.logits[0], rtol=1e-5, atol=1e-5)


def test_labels_cover_only_the_caption_and_eos(model):
    batch = model.processor(["<image>Caption:", "Q:"], captions=["a red circle", "a"], num_images=[1, 1])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = model.tokenizer
    for i, caption in enumerate(["a red circle", "a"]):
        target = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[i][labels[i] != IGNORE_INDEX].tolist() == target
    assert (labels[ids == model.image_token_id] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    # the loss is the mean next-token cross-entropy over exactly those positions
    full = model(images=tiny_images(2), **batch, logits_to_keep=0)
    assert full.logits.shape[1] == ids.shape[1]
    logits, shifted = full.logits[:, :-1], labels[:, 1:]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(full.loss, manual)
    # by default the head runs only from the position before the first label: same loss, the tail's logits
    out = model(images=tiny_images(2), **batch)
    first = int((labels != IGNORE_INDEX).any(0).nonzero()[0])
    assert out.logits.shape[1] == ids.shape[1] - first + 1
    torch.testing.assert_close(out.logits, full.logits[:, first - 1 :], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("mode", ["prefix", "cross_attention"])
def test_label_only_logits_give_the_full_loss_and_gradients(mode):
    """The default head-on-supervised-positions path trains exactly like all-position logits."""
    model = _perturb(tiny_vlm("llama", injection=InjectionConfig(mode=mode)))
    batch = model.processor(["<image>Caption:", "<image>Q: what?"], captions=["a red circle", "a"], num_images=[1, 1])
    images = tiny_images(2, seed=1)
    grads = []
    for kwargs in ({"logits_to_keep": 0}, {}):
        model.zero_grad()
        out = model(images=images, **batch, **kwargs)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    (loss_full, grads_full), (loss_kept, grads_kept) = grads
    torch.testing.assert_close(loss_kept, loss_full, rtol=1e-6, atol=1e-7)
    for kept, full in zip(grads_kept, grads_full, strict=True):
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-7)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]  # the default did keep fewer positions


def test_precomputed_features_nested_lists_and_pil_match_tensors(model):
    images = tiny_images(2, seed=5)
    batch = model.processor(["Caption:", "Caption:"], num_images=1)
    ref = model(images=images, **batch).logits
    features = model.vision(images)
    torch.testing.assert_close(model(image_features=features, **batch).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(model(images=[[images[0]], [images[1]]], **batch).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(model(images=images[:, None], **batch).logits, ref, rtol=0, atol=0)
    # PIL images go through the tower's own open_clip preprocess
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = torch.stack([model.vision.preprocess(p) for p in pil])
    torch.testing.assert_close(model(images=pil, **batch).logits, model(images=pixels, **batch).logits, rtol=0, atol=0)


def test_text_only_input_at_init_equals_the_base_lm():
    """LoRA starts at B = 0 and text embeddings are untouched: no image -> the base LM's logits."""
    vision, _, lm, tok = tiny_parts("qwen2")
    base = tiny_lm("qwen2", tiny_tokenizer()).eval()
    model = VisionLanguageModel.from_parts(vision, lm, tok, tiny_vlm_config("qwen2")).eval()
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    got = model(input_ids=ids).logits
    want = base(input_ids=ids).logits
    assert torch.equal(got[..., : want.shape[-1]], want)


def test_batched_greedy_equals_one_by_one_and_other_decoders(model):
    images = tiny_images(3, seed=7)
    prompts = ["Caption:", "a", "Question: What is in this picture? Answer:"]
    batched = model.generate(images, prompts, max_new_tokens=6)
    single = [model.generate(images[i : i + 1], [prompts[i]], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single
    assert model.caption(images, prompt="Caption:", max_new_tokens=6)[0] == batched[0]
    beams = model.generate(images, prompts, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert len(beams) == 6 and all(isinstance(s, str) for s in beams)
    torch.manual_seed(0)
    sampled = model.generate(images, prompts, max_new_tokens=4, do_sample=True, top_k=10)
    torch.manual_seed(0)
    assert model.generate(images, prompts, max_new_tokens=4, do_sample=True, top_k=10) == sampled


def test_train_step_changes_only_trainable_and_keeps_tower_frozen():
    model = tiny_vlm("gpt2")
    model.train()
    assert not model.vision.training and not model.vision.visual.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("resampler.", "projector.")) or (n.startswith("lm.") and "lora_" in n)
    }
    assert all(not p.requires_grad for p in model.vision.parameters())
    grouped = {id(p) for g in model.param_groups(1e-3, lora_lr=1e-4, weight_decay=0.1) for p in g["params"]}
    assert grouped == {id(p) for p in model.trainable_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, lora_lr=1e-3))
    batch = model.processor(["Caption:"] * 2, captions=["a red circle", "a blue square"], num_images=1)
    model(images=tiny_images(2), **batch).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # LoRA A has zero gradient while B = 0, as it should; everything else trainable gets one
    assert got_grad == {n for n in trainable if "lora_A" not in n}
    optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable and "lora_A" not in name:
            assert not torch.equal(param, before[name]), name
        elif name not in trainable:
            assert torch.equal(param, before[name]), name


def test_vision_tower_layers_and_cls():
    clip, preprocess = tiny_clip()
    images = tiny_images(2)
    last = VisionTower(clip, VisionConfig(pretrained=None), preprocess)
    clip.visual.output_tokens = True
    _, tokens = clip.visual(images)
    clip.visual.output_tokens = False
    torch.testing.assert_close(last(images), tokens, rtol=0, atol=0)
    penultimate = VisionTower(clip, VisionConfig(pretrained=None, layer="penultimate", keep_cls=True))
    x = clip.visual._embeds(images)
    for block in clip.visual.transformer.resblocks[:-1]:
        x = block(x)
    torch.testing.assert_close(penultimate(images), x, rtol=1e-5, atol=1e-5)
    assert penultimate.num_patches == last.num_patches + 1 == x.shape[1]


def test_bad_inputs_raise_clear_errors(model):
    batch = model.processor(["Caption:", "Caption:"], num_images=1)
    with pytest.raises(ValueError, match="2 .*slots.* but 3 images"):
        model(images=tiny_images(3), **batch)
    with pytest.raises(ValueError, match="but 1 images"):
        model(images=tiny_images(1), **batch)
    with pytest.raises(ValueError, match=r"images given per sample \[2, 0\]"):
        model(images=[[tiny_images(1)[0]] * 2, []], **batch)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(images=torch.randn(2, 3, 64, 64), **batch)
    with pytest.raises(ValueError, match="uint8 tensor"):
        model(images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8), **batch)
    with pytest.raises(ValueError, match="got str"):
        model(images="cat.jpg", **batch)
    with pytest.raises(ValueError, match="tower's width is 48"):
        model(image_features=torch.randn(2, 16, 32), **batch)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model(images=tiny_images(1), input_ids=batch["input_ids"][:1, :-5])
    with pytest.raises(ValueError, match="has 1 '<image>' tokens but 2 images"):
        model.processor.build_inputs("<image>Caption:", num_images=2)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, 1:], images=tiny_images(2))


def test_prompt_longer_than_context_and_widths_that_do_not_fit():
    vision, _, _, tok = tiny_parts("llama")
    lm = tiny_lm("llama", tok, max_position_embeddings=24)
    model = VisionLanguageModel.from_parts(vision, lm, tok, tiny_vlm_config("llama"))
    with pytest.raises(ValueError, match="more than the LM's context of 24"):
        model.processor.build_inputs("<image>" + "the quick brown fox jumps over the lazy dog")
    with pytest.raises(ValueError, match="more than the LM's context of 24"):
        model(input_ids=torch.ones(1, 30, dtype=torch.long))
    vision, _, lm, tok = tiny_parts("llama")
    config = tiny_vlm_config("llama")
    config.resampler.num_patch_positions = 49
    with pytest.raises(ValueError, match="num_patch_positions=49 but the vision tower gives 16"):
        VisionLanguageModel.from_parts(vision, lm, tok, config)
    from resampler import PerceiverResampler, ResamplerConfig

    vision, _, lm, tok = tiny_parts("llama")
    with pytest.raises(ValueError, match="vision tower's width is 48"):
        VisionLanguageModel.from_parts(
            vision, lm, tok, config, resampler=PerceiverResampler(ResamplerConfig(dim=64, depth=1, num_latents=8))
        )


@pytest.mark.parametrize("mode", ["prefix", "cross_attention"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(mode):
    results = []
    for checkpointing in (False, True):
        vision, _, lm, tok = tiny_parts("qwen3")
        injection = InjectionConfig(mode=mode, every_k_layers=1, xattn_heads=2, xattn_head_dim=8)
        config = tiny_vlm_config("qwen3", injection=injection)
        config.lm.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        model = _perturb(VisionLanguageModel.from_parts(vision, lm, tok, config)).train()
        assert model.language_model.is_gradient_checkpointing == checkpointing
        batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
        loss = model(images=tiny_images(1), **batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_lm_with_fp32_connector():
    vision, _, lm, tok = tiny_parts("llama")
    model = VisionLanguageModel.from_parts(vision, lm.to(torch.bfloat16), tok, tiny_vlm_config("llama"))
    assert next(model.resampler.parameters()).dtype == torch.float32
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    out = model(images=tiny_images(1), **batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(model.projector[0].weight.grad).all()


def test_max_caption_tokens_cuts_the_caption(model):
    full = model.processor.build_inputs("Caption:", "a small red circle on the left", num_images=1)
    cut = model.processor.build_inputs("Caption:", "a small red circle on the left", num_images=1, max_caption_tokens=4)
    target = [t for t in cut["labels"] if t != IGNORE_INDEX]
    assert target == [t for t in full["labels"] if t != IGNORE_INDEX][:4]
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]
    short = model.processor.build_inputs("Caption:", "a", num_images=1, max_caption_tokens=4)
    assert short["input_ids"][-1] == model.tokenizer.eos_token_id  # a caption that fits keeps its eos


def test_linear_projector_and_penultimate_layer_build_and_train():
    from vlm import ProjectorConfig

    vision = VisionConfig(name=tiny_vlm_config().vision.name, pretrained=None, layer="penultimate", keep_cls=True)
    model = tiny_vlm("llama", projector=ProjectorConfig(kind="linear"), vision=vision)
    assert isinstance(model.projector, torch.nn.Linear) and model.vision.num_patches == 17
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=tiny_images(1), **batch).loss.backward()
    assert model.projector.weight.grad is not None


def test_lm_with_a_padded_vocabulary_keeps_its_embedding_size(tmp_path):
    """Qwen-style LMs have more embedding rows than tokenizer entries: <image> fits without a resize."""
    vision, preprocess, _, tok = tiny_parts("qwen2")
    lm = tiny_lm("qwen2", tok, vocab_size=384)
    model = VisionLanguageModel.from_parts(vision, lm, tok, tiny_vlm_config("qwen2"), preprocess=preprocess)
    assert model.language_model.get_input_embeddings().num_embeddings == 384 and model.new_token_ids == []
    assert model.image_token_id == 320
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=tiny_images(1), **batch).loss.backward()
    model.save_adapter(tmp_path / "a")
    vision, preprocess, _, tok = tiny_parts("qwen2")
    loaded = VisionLanguageModel.load_adapter(tmp_path / "a", vision, tiny_lm("qwen2", tok, vocab_size=384), tok)
    assert loaded.language_model.get_input_embeddings().num_embeddings == 384
