"""Bad API use gets a clear ValueError/TypeError that names the field or the expected shape — never a
crash deep inside torch: tensors of the wrong rank, dtype or device, masks of the wrong shape,
``<image>`` counts that do not match the images, and configs with impossible values."""

from __future__ import annotations

import pytest
import torch

from resampler import (
    Attention,
    AttentionSpec,
    CrossAttentionBlock,
    NormSpec,
    PerceiverARConfig,
    PerceiverEncoderConfig,
    PerceiverResampler,
    SelfAttentionBlock,
)
from resampler import ResamplerConfig as ModelResamplerConfig

ERRORS = (ValueError, TypeError)
B, Q, M, D, C = 2, 3, 5, 8, 6


def _check(fn, pattern: str) -> None:
    with pytest.raises(ERRORS, match=pattern):
        fn()


# ----------------------------------------------------------------------------------------------
# The core: Attention, blocks, resampler

attn = Attention(D, C, heads=2, head_dim=4)
block = CrossAttentionBlock(D, C, AttentionSpec(heads=2))
self_block = SelfAttentionBlock(D, AttentionSpec(heads=2))
resampler = PerceiverResampler(ModelResamplerConfig(dim=D, depth=1, num_latents=4, heads=2, head_dim=4, max_media=2))
x, ctx = torch.randn(B, Q, D), torch.randn(B, M, C)
bool_ones = lambda *shape: torch.ones(*shape, dtype=torch.bool)  # noqa: E731

CORE_CALLS = {
    "attn x rank 2": (lambda: attn(torch.randn(Q, D), ctx), r"x must have shape \(B, Q, q_dim=8\)"),
    "attn x rank 4": (lambda: attn(torch.randn(1, B, Q, D), ctx), r"x must have shape \(B, Q, q_dim=8\)"),
    "attn x width": (lambda: attn(torch.randn(B, Q, D + 1), ctx), r"q_dim=8"),
    "attn x not a tensor": (lambda: attn([[0.0] * D], ctx), r"x must have shape"),
    "attn ctx width": (lambda: attn(x, torch.randn(B, M, C + 1)), r"context must have shape \(B, M, kv_dim=6\)"),
    "attn ctx missing": (lambda: attn(x), r"context is required since kv_dim=6"),
    "attn batch mismatch": (lambda: attn(x, torch.randn(B + 1, M, C)), r"share the batch size"),
    "attn int x": (lambda: attn(x.long(), ctx), r"x must be a floating-point tensor"),
    "attn float64 x": (lambda: attn(x.double(), ctx), r"x has dtype torch.float64 but the weights are torch.float32"),
    "attn float64 ctx": (lambda: attn(x, ctx.double()), r"context has dtype torch.float64"),
    "attn x on meta": (lambda: attn(x.to("meta"), ctx), r"x is on meta but the weights are on cpu"),
    "attn ctx on meta": (lambda: attn(x, ctx.to("meta")), r"context is on meta"),
    "attn mask keys": (lambda: attn(x, ctx, bool_ones(B, M - 1)), r"mask must have shape \(B, M\)=\(2, 5\)"),
    "attn mask batch": (lambda: attn(x, ctx, bool_ones(B + 1, M)), r"mask must have shape \(B, M\)"),
    "attn mask queries": (lambda: attn(x, ctx, bool_ones(B, Q + 1, M)), r"mask must have shape \(B, Q, M\)"),
    "attn mask heads": (lambda: attn(x, ctx, bool_ones(B, 3, Q, M)), r"mask must have shape \(B, H, Q, M\)"),
    "attn mask rank 5": (lambda: attn(x, ctx, bool_ones(B, 2, Q, M, 1)), r"mask must have shape \(B, M\)"),
    "attn mask rank 1": (lambda: attn(x, ctx, bool_ones(M)), r"mask must have shape"),
    "attn mask int": (lambda: attn(x, ctx, torch.ones(B, M, dtype=torch.long)), r"mask must be boolean"),
    "attn mask float": (lambda: attn(x, ctx, torch.ones(B, M)), r"mask must be boolean"),
    "attn mask list": (lambda: attn(x, ctx, [[True] * M] * B), r"mask must be a torch.Tensor"),
    "block ctx width": (lambda: block(x, torch.randn(B, M, C + 1)), r"context must have shape \(B, N, 6\)"),
    "block x width": (lambda: block(torch.randn(B, Q, D - 1), ctx), r"x must have shape \(B, N, 8\)"),
    "block mask": (lambda: block(x, ctx, bool_ones(B, M + 2)), r"mask must have shape"),
    "self block x width": (lambda: self_block(torch.randn(B, Q, D + 2)), r"x must have shape \(B, N, 8\)"),
    "resampler x rank 2": (lambda: resampler(torch.randn(Q, D)), r"x must be \(B, P, D\), \(B, T, P, D\) or"),
    "resampler x rank 6": (lambda: resampler(torch.randn(1, 1, 1, 1, Q, D)), r"x must be \(B, P, D\)"),
    "resampler x width": (lambda: resampler(torch.randn(B, Q, D + 1)), r"with D=8"),
    "resampler int x": (lambda: resampler(torch.ones(B, Q, D, dtype=torch.long)), r"x must be floating point"),
    "resampler float64 x": (lambda: resampler(torch.randn(B, Q, D).double()), r"x has dtype torch.float64"),
    "resampler x on meta": (lambda: resampler(torch.randn(B, Q, D).to("meta")), r"x is on meta"),
    "resampler no patches": (lambda: resampler(torch.randn(B, 0, D)), r"no patches \(P=0\)"),
    "resampler mask shape": (
        lambda: resampler(torch.randn(B, Q, D), bool_ones(B, Q + 1)),
        r"mask must be boolean of shape \(2, 3\)",
    ),
    "resampler mask dtype": (lambda: resampler(torch.randn(B, Q, D), torch.ones(B, Q)), r"mask must be boolean"),
    "resampler media_mask": (
        lambda: resampler(torch.randn(B, 2, Q, D), media_mask=bool_ones(B, 3)),
        r"media_mask must be boolean of shape \(B, T\)=\(2, 2\)",
    ),
    "resampler too many media": (lambda: resampler(torch.randn(B, 3, Q, D)), r"got 3 media, the embedding table has 2"),
}


@pytest.mark.parametrize("case", sorted(CORE_CALLS))
def test_core_calls_reject_bad_tensors_clearly(case):
    _check(*CORE_CALLS[case])


CORE_CONFIGS = {
    "attn negative width": (lambda: Attention(-8), r"q_dim must be a positive int"),
    "attn zero kv width": (lambda: Attention(8, 0), r"kv_dim must be a positive int"),
    "attn float width": (lambda: Attention(8.0), r"q_dim must be a positive int"),
    "attn zero heads": (lambda: Attention(8, heads=0), r"heads must be a positive int"),
    "attn kv heads": (lambda: Attention(8, heads=4, num_kv_heads=3), r"num_kv_heads=3 must divide heads=4"),
    "attn dropout": (lambda: Attention(8, dropout=1.0), r"dropout must be in \[0, 1\)"),
    "attn unknown option": (lambda: Attention(8, query_chunk_size=0), r"unexpected keyword argument"),
    "block heads divide": (lambda: CrossAttentionBlock(10, 6, AttentionSpec(heads=3)), r"heads=3 must divide q_dim=10"),
    "block zero heads": (
        lambda: CrossAttentionBlock(8, 6, AttentionSpec(heads=0)),
        r"heads must be a positive int",
    ),
    "self block heads divide": (lambda: SelfAttentionBlock(10, AttentionSpec(heads=4)), r"heads=4 must divide dim=10"),
    "block norm": (
        lambda: CrossAttentionBlock(8, 6, norm=NormSpec("batchnorm")),
        r"norm must be 'layernorm' or 'rmsnorm'",
    ),
    "block residual width": (
        lambda: CrossAttentionBlock(8, 6, out_dim=4),
        r"query_residual needs out_dim == q_dim",
    ),
    "resampler zero latents": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=8, depth=1, num_latents=0)),
        r"resampler.num_latents must be positive",
    ),
    "resampler negative width": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=-8, depth=1, num_latents=4)),
        r"resampler.dim must be positive",
    ),
    "resampler zero depth": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=8, depth=0, num_latents=4)),
        r"resampler.depth must be positive",
    ),
    "resampler zero heads": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=8, depth=1, num_latents=4, heads=0)),
        r"resampler.heads must be positive",
    ),
    "resampler kv heads": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=8, depth=1, num_latents=4, heads=4, num_kv_heads=3)),
        r"resampler.num_kv_heads=3 must divide resampler.heads=4",
    ),
    "resampler out_dim": (
        lambda: PerceiverResampler(ModelResamplerConfig(dim=8, depth=1, num_latents=4, out_dim=0)),
        r"resampler.out_dim must be positive",
    ),
    "encoder heads divide": (
        lambda: PerceiverEncoderConfig(input_dim=8, latent_dim=10, num_latents=4, cross_heads=3),
        r"multiple of heads=3",
    ),
    "encoder zero latents": (lambda: PerceiverEncoderConfig(input_dim=8, num_latents=0), r"num_latents"),
    "perceiver ar heads divide": (lambda: PerceiverARConfig(dim=10, heads=3), r"dim=10 must be divisible by heads=3"),
}


@pytest.mark.parametrize("case", sorted(CORE_CONFIGS))
def test_impossible_core_configs_are_rejected_at_construction(case):
    _check(*CORE_CONFIGS[case])


# ----------------------------------------------------------------------------------------------
# Config dataclasses


def _vlm_configs():
    from vlm.config import InjectionConfig, LoRAConfig, ProjectorConfig, ResamplerConfig, VLMConfig
    from vlm.data import DataConfig
    from vlm.training import TrainConfig

    return {
        "resampler.num_latents": (lambda: ResamplerConfig(num_latents=0), r"resampler.num_latents must be positive"),
        "resampler.depth": (lambda: ResamplerConfig(depth=-1), r"resampler.depth must be positive"),
        "resampler.heads": (lambda: ResamplerConfig(heads=0), r"resampler.heads must be positive"),
        "resampler.num_kv_heads": (
            lambda: ResamplerConfig(heads=8, num_kv_heads=3),
            r"resampler.num_kv_heads=3 must divide resampler.heads=8",
        ),
        "projector.hidden_dim": (lambda: ProjectorConfig(hidden_dim=-4), r"projector.hidden_dim must be positive"),
        "lora.r": (lambda: LoRAConfig(r=0), r"lora.r must be positive"),
        "lora.dropout": (lambda: LoRAConfig(dropout=1.5), r"lora.dropout must be in"),
        "lora.target_modules": (lambda: LoRAConfig(target_modules=[]), r"lora.target_modules"),
        "injection.every_k_layers": (
            lambda: InjectionConfig(every_k_layers=0),
            r"injection.every_k_layers must be positive",
        ),
        "injection.image_token": (lambda: InjectionConfig(image_token=" <image>"), r"injection.image_token"),
        "vlm.max_new_tokens": (lambda: VLMConfig(max_new_tokens=0), r"vlm.max_new_tokens must be positive"),
        "train.max_steps": (lambda: TrainConfig(max_steps=0), r"train.max_steps must be positive"),
        "train.lr": (lambda: TrainConfig(lr=-1.0), r"train.lr"),
        "train.max_grad_norm": (lambda: TrainConfig(max_grad_norm=0.0), r"train.max_grad_norm"),
        "data.batch_size": (lambda: DataConfig(batch_size=0), r"DataConfig.batch_size must be positive"),
        "data.num_workers": (lambda: DataConfig(num_workers=-1), r"DataConfig.num_workers must be >= 0"),
    }


@pytest.mark.parametrize("case", sorted(_vlm_configs()))
def test_impossible_vlm_configs_name_the_field(case):
    _check(*_vlm_configs()[case])


def test_yaml_overrides_with_impossible_values_name_the_field(tmp_path):
    from resampler.config import load_config
    from vlm.config import VLMConfig

    path = tmp_path / "c.yaml"
    path.write_text("resampler:\n  num_latents: 8\n")
    _check(lambda: load_config(VLMConfig, path, ["resampler.num_latents=0"]), r"resampler.num_latents")
    _check(lambda: load_config(VLMConfig, path, ["resampler.no_such_field=1"]), r"no_such_field")


# ----------------------------------------------------------------------------------------------
# The VLM: text, images, <image> counts


@pytest.fixture(scope="module")
def vlm():
    from vlm.testing import tiny_vlm

    return tiny_vlm("llama")


def _batch(vlm, prompts, captions=None, num_images=None):
    return vlm.processor(prompts, captions=captions, num_images=num_images)


def test_vlm_rejects_bad_text_tensors(vlm):
    from vlm.testing import tiny_images

    batch = _batch(vlm, ["<image>Caption:"], ["a red circle"])
    img = tiny_images(1)
    ids = batch["input_ids"]
    _check(lambda: vlm(input_ids=ids.float(), images=img), r"input_ids must be an integer tensor \(B, L\)")
    _check(lambda: vlm(input_ids=ids[0], images=img), r"input_ids must be an integer tensor \(B, L\)")
    _check(
        lambda: vlm(input_ids=ids, attention_mask=batch["attention_mask"][:, :-1], images=img),
        r"attention_mask must have input_ids' shape",
    )
    _check(lambda: vlm(input_ids=ids, labels=batch["labels"][:, 1:], images=img), r"labels must have input_ids' shape")
    too_long = torch.zeros(1, 10_000, dtype=torch.long)
    _check(lambda: vlm(input_ids=too_long), r"more than the LM's context of 512")


def test_vlm_rejects_bad_image_tensors(vlm):
    from vlm.testing import tiny_images

    ids = _batch(vlm, ["<image>Caption:"])["input_ids"]
    img = tiny_images(1)
    _check(lambda: vlm(input_ids=ids, images=img[:, :, :16]), r"images must be a float tensor \(N, 3, 32, 32\)")
    _check(lambda: vlm(input_ids=ids, images=img[0]), r"images must be a float tensor \(N, 3, 32, 32\)")
    _check(lambda: vlm(input_ids=ids, images=(img * 255).to(torch.uint8)), r"torch.uint8 tensor \(preprocess it")
    _check(lambda: vlm(input_ids=ids, images="cat.jpg"), r"images must be")
    width = vlm.vision.width
    _check(
        lambda: vlm(input_ids=ids, image_features=torch.randn(1, 4, width + 1)), rf"the vision tower's width is {width}"
    )
    _check(lambda: vlm(input_ids=ids, image_features=torch.ones(1, 4, width, dtype=torch.long)), r"image_features must")
    _check(
        lambda: vlm(input_ids=ids, images=img, image_features=torch.randn(1, 4, width)),
        r"either images or image_features",
    )


def test_image_token_counts_must_match_the_images(vlm):
    from vlm.testing import tiny_images

    one = _batch(vlm, ["<image>Caption:"])["input_ids"]
    two = _batch(vlm, ["<image>and<image>"])["input_ids"]
    pair = _batch(vlm, ["<image>a", "<image><image>b"])["input_ids"]
    _check(lambda: vlm(input_ids=one, images=tiny_images(2)), r"the text has 1 '<image>' slots .* but 2 images")
    _check(lambda: vlm(input_ids=two, images=tiny_images(1)), r"the text has 2 '<image>' slots .* but 1 images")
    _check(lambda: vlm(input_ids=one), r"the text has 1 '<image>' slots .* but 0 images")
    nested = [[tiny_images(1)[0], tiny_images(1)[0]], [tiny_images(1)[0]]]  # 2 + 1, but the text says 1 + 2
    _check(lambda: vlm(input_ids=pair, images=nested), r"<image> runs per sample in the text \[1, 2\] != images")
    cut = one.clone()
    cut[0, 1] = vlm.processor.pad_token_id  # one placeholder of the run lost
    _check(lambda: vlm(input_ids=cut, images=tiny_images(1)), r"not a multiple of 8 \(placeholders per image\)")
    _check(lambda: vlm.processor("<image>x<image>", num_images=1), r"prompt has 2 '<image>' tokens but 1 images")
    _check(lambda: vlm.processor(["a", "b"], captions=["only one"]), r"got 2 prompts but 1 captions")
    _check(lambda: vlm.processor("x", captions=["a <image> inside"]), r"must not contain the image token")
    _check(lambda: vlm.generate(tiny_images(3), ["a", "b"]), r"got 3 images for 2 prompts")
