"""Transformers vision towers under the open_clip tower's contract: the reference's own features for each
layer choice, class-token handling, frozen weights, PIL preprocessing, the config as the whole identity,
a VLM built on each, and the feature cache."""

from __future__ import annotations

import pytest
import torch

from vlm import VisionConfig, VisionLanguageModel
from vlm.hf_vision import HFVisionTower, ImageProcessorTransform
from vlm.testing import tiny_images, tiny_lm, tiny_tokenizer, tiny_vlm_config
from vlm.towers import build_vision_tower

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}


def _tower_model(kind: str, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig
    from transformers.models.idefics.vision import IdeficsVisionTransformer
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    torch.manual_seed(seed)
    size = {"image_size": 32, "patch_size": 8}
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**SHAPE, **size)).eval()
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**SHAPE, **size)).eval()
    if kind == "idefics":
        config = IdeficsVisionConfig(embed_dim=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
        config.image_size, config.patch_size = 32, 8
        return IdeficsVisionTransformer(config).eval()
    return Idefics2VisionTransformer(Idefics2VisionConfig(**SHAPE, **size)).eval()


def _reference(model, kind, images, layer):
    """The reference's own tokens: its output, or the hidden states after the penultimate block."""
    if kind != "idefics":
        out = model(pixel_values=images, output_hidden_states=True)
        return out.last_hidden_state if layer == "last" else out.hidden_states[-2]
    if layer == "last":
        return model(pixel_values=images).last_hidden_state
    x = model.pre_layrnorm(model.embeddings(images))
    for block in model.encoder.layers[:-1]:
        x = block(x, attention_mask=None)
        x = x[0] if isinstance(x, tuple) else x
    return x


@pytest.mark.parametrize("kind", ["clip", "siglip", "idefics", "idefics2"])
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_tokens_equal_the_reference_and_the_tower_stays_frozen(kind, layer):
    model = _tower_model(kind)
    has_cls = kind in ("clip", "idefics")
    tower = build_vision_tower(model, VisionConfig(kind=kind, name="tiny", layer=layer, keep_cls=has_cls))
    assert isinstance(tower, HFVisionTower)
    images = tiny_images(2)
    with torch.no_grad():
        want = _reference(model, kind, images, layer)
    torch.testing.assert_close(tower(images), want, rtol=1e-5, atol=1e-5)
    assert tower.width == 32 and tower.num_patches == want.shape[1] == 16 + has_cls
    if has_cls:
        dropped = build_vision_tower(model, VisionConfig(kind=kind, name="tiny", layer=layer))
        torch.testing.assert_close(dropped(images), want[:, 1:], rtol=1e-5, atol=1e-5)
        assert dropped.num_patches == 16
    tower.train()
    assert not tower.training and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not tower(images.requires_grad_(True)).requires_grad
    with pytest.raises(ValueError, match="images must be a float tensor"):
        tower(torch.zeros(2, 3, 16, 16) if kind != "idefics2" else torch.zeros(2, 3, 4, 4))


def test_config_is_the_tower_identity():
    assert VisionConfig(kind="siglip", name="google/siglip-base-patch16-224").pretrained is None
    with pytest.raises(ValueError, match="weights from vision.name"):
        VisionConfig(kind="clip", name="openai/clip-vit-large-patch14", pretrained="laion2b")
    with pytest.raises(ValueError, match="has no class token"):
        VisionConfig(kind="siglip", name="x", keep_cls=True)
    with pytest.raises(ValueError, match="revision is for transformers towers"):
        VisionConfig(revision="main")
    with pytest.raises(ValueError, match="expects a SiglipVisionModel"):
        build_vision_tower(_tower_model("clip"), VisionConfig(kind="siglip", name="x"))


def test_pil_preprocess_with_the_image_processor():
    from transformers import CLIPImageProcessor

    from vlm.convert.tiny import tiny_photos

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tower = build_vision_tower(
        _tower_model("clip"), VisionConfig(kind="clip", name="tiny"), ImageProcessorTransform(processor)
    )
    photos = tiny_photos(2)
    want = processor(images=photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(tower.preprocess_images(photos), want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_vlm_on_a_transformers_tower_trains_and_generates(kind):
    tok = tiny_tokenizer()
    config = tiny_vlm_config("llama", vision=VisionConfig(kind=kind, name="tiny", layer="penultimate"))
    model = VisionLanguageModel.from_parts(_tower_model(kind), tiny_lm("llama", tok), tok, config)
    assert model.vision.num_patches == 16
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model.train()
    model(images=tiny_images(1), **batch).loss.backward()
    assert model.resampler.latents.grad is not None
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.eval()
    features = model.vision(tiny_images(2))
    assert model.generate(image_features=features, prompts="Caption:", max_new_tokens=3) == model.caption(
        tiny_images(2), "Caption:", max_new_tokens=3
    )


def test_feature_cache_with_a_transformers_tower(tmp_path):
    from vlm.data import DataConfig, SyntheticConfig, write_synthetic_shards
    from vlm.data.features import precompute_features
    from vlm.data.reader import CaptionLoader

    tower = build_vision_tower(_tower_model("siglip"), VisionConfig(kind="siglip", name="tiny"))
    images = write_synthetic_shards(SyntheticConfig(samples_per_shard=5), tmp_path / "img", {"test": 6})["test"]
    config = DataConfig(batch_size=4, image_size=32, num_workers=0)
    summary = precompute_features(images.pattern, tmp_path / "feat", tower, config)
    on_the_fly = {}
    for batch in CaptionLoader(images.pattern, config, train=False):
        on_the_fly.update(zip(batch.sample_keys, tower(batch["images"])))
    cached = DataConfig(batch_size=4, image_size=32, use_cached_features=True, num_workers=0)
    seen = 0
    for batch in CaptionLoader(summary.pattern, cached, train=False):
        for key, row in zip(batch.sample_keys, batch["image_features"]):
            torch.testing.assert_close(row, on_the_fly[key].half().float(), rtol=0, atol=0)
            seen += 1
    assert seen == 6
