"""Input adapters and the byte tokenizer, against Hugging Face's functions where they exist."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PerceiverTokenizer
from transformers.models.perceiver import modeling_perceiver as hf_mod

from resampler.models.multimodal import MultimodalPreprocessor, OneHotPreprocessor
from resampler.models.perceiver import PerceiverEncoder, PerceiverEncoderConfig
from resampler.models.preprocessors import (
    AudioPreprocessor,
    ImagePreprocessor,
    PointCloudPreprocessor,
    TextPreprocessor,
    pad_point_clouds,
    space_to_depth,
)
from resampler.nn.position import linear_positions
from resampler.tokenizer import ByteTokenizer

warnings.filterwarnings("ignore", category=UserWarning)
TOK = ByteTokenizer()


# ------------------------------------------------------------------------------------ tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode(TOK.encode(text, add_special_tokens=True)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=400), max_size=50))
def test_tokenizer_decode_never_raises(ids):
    assert isinstance(TOK.decode(ids, skip_special_tokens=False), str)


def test_tokenizer_matches_hugging_face_ids():
    hf = PerceiverTokenizer()
    for text in ["hello world", "héllo 🌍 \x00 tab\t", "", "日本語"]:
        assert TOK.encode(text, add_special_tokens=True) == hf(text).input_ids
    assert TOK.vocab_size == len(hf) == 262  # hf.vocab_size counts only the 256 bytes
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.mask_id, TOK.cls_id, TOK.sep_id) == (
        hf.pad_token_id,
        hf.bos_token_id,
        hf.eos_token_id,
        hf.mask_token_id,
        hf.cls_token_id,
        hf.sep_token_id,
    )


def test_tokenizer_batch_padding_and_special_names():
    ids, mask = TOK(["ab", "ü"], add_special_tokens=True)
    assert ids.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[True] * 4, [True] * 4]  # "ü" is two bytes
    ids, mask = TOK(["abc", "a"])
    assert ids[1].tolist() == [TOK.offset + 97, 0, 0] and mask[1].tolist() == [True, False, False]
    assert TOK.decode([4, 110, 3, 5], skip_special_tokens=False) == "[CLS]h[MASK][SEP]"
    with pytest.raises(TypeError, match="must be str"):
        TOK.encode(b"bytes")


# ------------------------------------------------------------------------------ images and video


@pytest.mark.parametrize("shape, t, s", [((2, 3, 8, 12), 1, 4), ((2, 4, 3, 6, 6), 2, 3), ((1, 2, 27, 4, 4), 2, 1)])
def test_space_to_depth_matches_hugging_face(shape, t, s):
    frames = torch.randn(shape)
    torch.testing.assert_close(space_to_depth(frames, t, s), hf_mod.space_to_depth(frames, t, s), atol=0, rtol=0)


def test_space_to_depth_errors():
    with pytest.raises(ValueError, match="multiples of spatial_block=3"):
        space_to_depth(torch.randn(1, 3, 8, 8), 1, 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, T, C, H, W\)"):
        space_to_depth(torch.randn(3, 8, 8))


def test_image_fourier_positions_match_hugging_face():
    pre = ImagePreprocessor(3, "pixels", max_resolution=(224, 224), num_bands=64)
    images = torch.randn(2, 3, 5, 7)
    out = pre(images)
    assert out.features.shape == (2, 35, pre.out_dim) and pre.out_dim == 3 + 258
    pos = hf_mod.build_linear_positions((5, 7)).reshape(1, 35, 2)
    want = hf_mod.generate_fourier_features(pos, 64, (224, 224))
    torch.testing.assert_close(out.features[0, :, 3:], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.features[..., :3], images.permute(0, 2, 3, 1).reshape(2, 35, 3))


@pytest.mark.parametrize(
    "kwargs, image_shape, m, c",
    [
        (
            {"prep_type": "patches", "spatial_downsample": 2, "max_resolution": (4, 4), "num_bands": 2},
            (2, 3, 8, 8),
            16,
            12 + 10,
        ),
        (
            {"prep_type": "conv1x1", "out_channels": 5, "max_resolution": (8, 8), "num_bands": 2},
            (2, 3, 8, 8),
            64,
            5 + 10,
        ),
        ({"prep_type": "conv", "out_channels": 6, "max_resolution": (3, 3), "num_bands": 2}, (2, 3, 16, 16), 9, 6 + 10),
        (
            {
                "prep_type": "pixels",
                "position": "learned",
                "num_positions": 64,
                "learned_pos_dim": 4,
                "project_pos_dim": 5,
            },
            (2, 3, 8, 8),
            64,
            3 + 5,
        ),
        (
            {
                "prep_type": "conv1x1",
                "out_channels": 4,
                "position": "learned",
                "num_positions": 64,
                "learned_pos_dim": 4,
                "concat_pos_to_input": False,
            },
            (2, 3, 8, 8),
            64,
            4,
        ),
        (
            {
                "prep_type": "patches",
                "spatial_downsample": 2,
                "temporal_downsample": 2,
                "video": True,
                "max_resolution": (2, 4, 4),
                "num_bands": 2,
            },
            (2, 4, 3, 8, 8),
            32,
            24 + 15,
        ),
    ],
)
def test_image_preprocessor_variants(kwargs, image_shape, m, c):
    pre = ImagePreprocessor(3, **kwargs)
    out = pre(torch.randn(image_shape))
    assert out.features.shape == (image_shape[0], m, c) and pre.out_dim == c
    params = dict(pre.named_parameters())
    if params:  # patches / pixels with Fourier positions have no parameters
        out.features.sum().backward()
        for name, p in params.items():
            assert p.grad is not None, name


def test_image_preprocessor_errors():
    pre = ImagePreprocessor(3, "pixels", max_resolution=(4, 4), num_bands=2)
    with pytest.raises(ValueError, match="expected 3 channels at dim 1"):
        pre(torch.randn(1, 4, 4, 3))
    with pytest.raises(ValueError, match="grid \\(4, 4, 4\\) has 3 axes"):
        pre(torch.randn(1, 4, 3, 4, 4))
    with pytest.raises(ValueError, match="prep_type"):
        ImagePreprocessor(3, "tokens", max_resolution=(4, 4))
    with pytest.raises(ValueError, match="need max_resolution"):
        ImagePreprocessor(3, "pixels")
    with pytest.raises(ValueError, match="learned positions cover 16 inputs"):
        ImagePreprocessor(3, "pixels", position="learned", num_positions=16, learned_pos_dim=2)(torch.randn(1, 3, 5, 5))


# --------------------------------------------------------------------------- audio, text, labels


def test_audio_patches_and_positions():
    pre = AudioPreprocessor(8, num_bands=4, max_resolution=64)
    wave = torch.randn(2, 64)
    out = pre(wave)
    assert out.features.shape == (2, 8, 8 + 9)
    torch.testing.assert_close(out.features[..., :8], wave.view(2, 8, 8))
    want = hf_mod.generate_fourier_features(hf_mod.build_linear_positions((8,)).view(1, 8, 1), 4, (64,))
    torch.testing.assert_close(out.features[0, :, 8:], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pre(wave[..., None]).features, out.features)
    with pytest.raises(ValueError, match="multiple of 8"):
        pre(torch.randn(2, 60))


def test_text_and_one_hot():
    pre = TextPreprocessor(262, 6, 10)
    out = pre(torch.tensor([[4, 100, 5]]))
    assert out.features.shape == (1, 3, 6)
    with pytest.raises(ValueError, match="max_positions=10"):
        pre(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 262\)"):
        pre(torch.tensor([[262]]))
    assert OneHotPreprocessor(4)(torch.eye(4)[:2]).features.shape == (2, 1, 4)


# ------------------------------------------------------------------------------------ point clouds


def test_point_cloud_features_are_per_point_and_permutation_equivariant():
    pre = PointCloudPreprocessor(num_bands=3, max_resolution=16, feature_dim=2)
    pts, feats = torch.rand(2, 9, 3) * 2 - 1, torch.randn(2, 9, 2)
    out = pre(pts, features=feats).features
    perm = torch.randperm(9)
    torch.testing.assert_close(pre(pts[:, perm], features=feats[:, perm]).features, out[:, perm])
    assert out.shape == (2, 9, pre.out_dim) and pre.out_dim == 2 + 3 * 7


def test_ragged_point_clouds_pad_invariance_through_the_encoder():
    torch.manual_seed(0)
    clouds = [torch.rand(n, 3) * 2 - 1 for n in (7, 3, 5)]
    points, mask = pad_point_clouds(clouds)
    assert points.shape == (3, 7, 3) and mask.sum(1).tolist() == [7, 3, 5]
    pre = PointCloudPreprocessor(num_bands=4, max_resolution=16, normalize=True)
    enc = PerceiverEncoder(
        PerceiverEncoderConfig(input_dim=pre.out_dim, num_latents=4, latent_dim=8, self_heads=2)
    ).eval()
    batched = pre(points, mask)
    z = enc(batched.features, batched.mask)
    for i, cloud in enumerate(clouds):
        single = pre(cloud[None])
        torch.testing.assert_close(z[i], enc(single.features)[0], atol=1e-5, rtol=1e-5)


def test_point_cloud_normalize_uses_real_points_only():
    pts = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 4.0, 2.0], [100.0, 100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    norm = PointCloudPreprocessor._normalize(pts, mask)
    torch.testing.assert_close(norm[0, :2], torch.tensor([[-0.5, -1.0, -0.5], [0.5, 1.0, 0.5]]))
    with pytest.raises(ValueError, match=r"\(B, P, 3\)"):
        PointCloudPreprocessor()(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match=r"features must be \(B, P, 0\) or None"):
        PointCloudPreprocessor()(torch.randn(2, 5, 3), features=torch.randn(2, 5, 1))


# ----------------------------------------------------------------------------------- multimodal


def _multimodal(mask_probs=None):
    return MultimodalPreprocessor(
        {
            "image": ImagePreprocessor(3, "pixels", max_resolution=(2, 2), num_bands=1),  # 3 + 6 = 9
            "audio": AudioPreprocessor(4, num_bands=1, max_resolution=8),  # 4 + 3 = 7
            "label": OneHotPreprocessor(3),
        },
        min_padding=2,
        mask_probs=mask_probs,
    )


def test_multimodal_pads_orders_and_masks():
    torch.manual_seed(0)
    pre = _multimodal({"label": 1.0})
    inputs = {"image": torch.randn(2, 3, 2, 2), "audio": torch.randn(2, 8), "label": torch.eye(3)[:2]}
    out = pre(inputs)
    assert pre.out_dim == 11 and out.features.shape == (2, 2 + 4 + 1, 11)
    assert list(out.modality_sizes.items()) == [("audio", 2), ("image", 4), ("label", 1)]  # sorted names
    audio = out.features[:, :2]
    torch.testing.assert_close(audio[..., 7:], pre.padding["audio"].expand(2, 2, 4))  # learned modality padding
    torch.testing.assert_close(out.features[:, 6], pre.mask_tokens["label"].expand(2, -1))  # p=1: always masked
    assert out.mask is None
    masked = pre(inputs, masks={"audio": torch.tensor([[True, False], [True, True]])})
    assert masked.mask.tolist()[0] == [True, False, True, True, True, True, True]


def test_multimodal_errors():
    pre = _multimodal()
    with pytest.raises(ValueError, match="keys \\['audio', 'image', 'label'\\]"):
        pre({"image": torch.randn(1, 3, 2, 2)})
    with pytest.raises(ValueError, match="unknown modalities"):
        _multimodal({"video": 0.5})
    with pytest.raises(ValueError, match="at least one"):
        MultimodalPreprocessor({})


def test_grid_positions_helper_is_the_one_hf_uses():
    torch.testing.assert_close(linear_positions((3, 4)), hf_mod.build_linear_positions((3, 4)))
