"""from_hf_perceiver: transformers' Perceiver (random weights, no download) == ours, fp32, 1e-5."""

import warnings

import pytest
import torch
import transformers
from transformers import PerceiverConfig
from transformers.models.perceiver import modeling_perceiver as hf_mod

from resampler.convert import from_hf_perceiver
from resampler.models.decoders import ClassificationDecoder, PerceiverDecoder, ProjectionDecoder
from resampler.models.perceiver_io import PerceiverIO

warnings.filterwarnings("ignore", category=UserWarning)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _config(**overrides) -> PerceiverConfig:
    base = {
        "num_latents": 6,
        "d_latents": 32,
        "d_model": 24,
        "num_blocks": 1,
        "num_self_attends_per_block": 2,
        "num_self_attention_heads": 4,
        "num_cross_attention_heads": 2,
        "num_labels": 5,
        "max_position_embeddings": 40,
    }
    base.update(overrides)
    return PerceiverConfig(**base)


class _HFProjectionDecoder(hf_mod.PerceiverProjectionDecoder):
    """transformers ships this class unusable inside PerceiverModel (abstract ``num_query_channels``,
    no ``output_attentions`` argument, returns a bare tensor); wrap its own computation, unchanged."""

    num_query_channels = None

    def forward(self, query, z, query_mask=None, output_attentions=False):
        return hf_mod.PerceiverDecoderOutput(logits=super().forward(query, z, query_mask))


def _hf_decoder(kind: str, config: PerceiverConfig):
    if kind == "classification":
        return hf_mod.PerceiverClassificationDecoder(
            config,
            num_channels=config.d_latents,
            trainable_position_encoding_kwargs={"num_channels": config.d_latents, "index_dims": 1},
            use_query_residual=True,
        )
    if kind == "projection":
        return _HFProjectionDecoder(config)
    return hf_mod.PerceiverBasicDecoder(
        config,
        output_num_channels=7,
        output_index_dims=9,
        num_channels=20,
        qk_channels=16,
        v_channels=12,
        num_heads=4,
        widening_factor=2,
        trainable_position_encoding_kwargs={"num_channels": 20, "index_dims": 9},
    )


def _padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return mask


# Encoder shapes that differ in qk vs v widths, heads, latent blocks and self-attends per block.
# HF needs v_channels == d_latents in its self-attention layers (their output feeds the residual).
ENCODER_CONFIGS = {
    "defaults": {},
    "qk16_v32": {"qk_channels": 16, "v_channels": 32},
    "heads1x8_qk8": {"num_cross_attention_heads": 1, "num_self_attention_heads": 8, "qk_channels": 8, "v_channels": 32},
    "blocks3_self1": {"num_blocks": 3, "num_self_attends_per_block": 1},
    "blocks2_self3_wide": {
        "num_blocks": 2,
        "num_self_attends_per_block": 3,
        "self_attention_widening_factor": 2,
        "cross_attention_widening_factor": 3,
    },
    "no_query_residual_q_shape": {"use_query_residual": False, "cross_attention_shape_for_attention": "q"},
    "relu": {"hidden_act": "relu"},
}


@pytest.mark.parametrize("decoder", ["classification", "basic", "projection"])
@pytest.mark.parametrize("name", sorted(ENCODER_CONFIGS))
@pytest.mark.parametrize("masked", [False, True])
def test_base_model_parity(name, decoder, masked):
    torch.manual_seed(0)
    config = _config(**ENCODER_CONFIGS[name])
    hf = hf_mod.PerceiverModel(config, decoder=_hf_decoder(decoder, config)).eval()
    ours = from_hf_perceiver(hf)
    expected_decoder = {"classification": ClassificationDecoder, "basic": PerceiverDecoder}.get(
        decoder, ProjectionDecoder
    )
    assert isinstance(ours, PerceiverIO) and isinstance(ours.decoder, expected_decoder)
    x = torch.randn(3, 11, config.d_model)
    mask = _padding_mask(3, 11) if masked else None
    with torch.no_grad():
        want = hf(inputs=x, attention_mask=mask).logits
        got = ours(x, mask=None if mask is None else mask.bool())
    torch.testing.assert_close(got, want, **TOL)


def test_padding_really_matters_in_the_parity_case():
    """Guard against a vacuous masked test: garbage in padded slots changes nothing, unmasked it does."""
    torch.manual_seed(0)
    config = _config()
    hf = hf_mod.PerceiverModel(config, decoder=_hf_decoder("classification", config)).eval()
    ours = from_hf_perceiver(hf)
    x, mask = torch.randn(3, 11, 24), _padding_mask(3, 11).bool()
    garbage = x.masked_fill(~mask[..., None], 50.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(garbage, mask), ours(x, mask), **TOL)
        assert (ours(garbage) - ours(x)).abs().max() > 10 * TOL["atol"]


def test_fully_padded_sample_is_zero_cross_attention_not_hf_average():
    """Documented difference: HF averages a fully masked sample's values; we give zero attention output."""
    torch.manual_seed(0)
    config = _config()
    hf = hf_mod.PerceiverModel(config, decoder=_hf_decoder("classification", config)).eval()
    ours = from_hf_perceiver(hf)
    x = torch.randn(2, 5, 24)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        got = ours(x, mask)
        torch.testing.assert_close(got[0], hf(inputs=x, attention_mask=mask.long()).logits[0], **TOL)
        cross = ours.encoder.cross_attends[0]
        latents = ours.encoder.latents.expand(2, -1, -1)
        # the cross-attention adds exactly nothing for the fully padded sample
        h = cross.attn(cross.norm_q(latents), cross.norm_kv(x), mask)
        assert torch.all(h[1] == 0) and torch.isfinite(got).all()


def _text(config, batch=2, length=13):
    torch.manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 9:] = 0
    return tokens, mask


@pytest.mark.parametrize("overrides", [{}, {"qk_channels": 16, "v_channels": 32, "num_blocks": 2}])
def test_masked_lm_parity(overrides):
    torch.manual_seed(0)
    config = _config(**overrides)
    hf = transformers.PerceiverForMaskedLM(config).eval()
    ours = from_hf_perceiver(hf)
    tokens, mask = _text(config)
    with torch.no_grad():
        want = hf(inputs=tokens, attention_mask=mask).logits  # (B, max_positions, vocab)
        got = ours(tokens, mask.bool())
        torch.testing.assert_close(got, want, **TOL)
        # decoding only the first L positions gives those rows
        part = ours(tokens, mask.bool(), query_index=torch.arange(tokens.shape[1]))
        torch.testing.assert_close(part, want[:, : tokens.shape[1]], **TOL)


def test_converted_model_state_dict_round_trip(tmp_path):
    """Save the converted MLM, load into a differently initialised one: same logits (tied embedding too)."""
    config = _config()
    torch.manual_seed(0)
    ours = from_hf_perceiver(transformers.PerceiverForMaskedLM(config).eval())
    torch.manual_seed(1)
    other = from_hf_perceiver(transformers.PerceiverForMaskedLM(config).eval())
    tokens, mask = _text(config)
    torch.save(ours.state_dict(), tmp_path / "mlm.pt")
    with torch.no_grad():
        assert (other(tokens, mask.bool()) - ours(tokens, mask.bool())).abs().max() > 1e-3
        other.load_state_dict(torch.load(tmp_path / "mlm.pt"))
        torch.testing.assert_close(other(tokens, mask.bool()), ours(tokens, mask.bool()), atol=0, rtol=0)


def test_sequence_classification_parity():
    torch.manual_seed(0)
    config = _config(num_self_attention_heads=2)
    hf = transformers.PerceiverForSequenceClassification(config).eval()
    ours = from_hf_perceiver(hf)
    tokens, mask = _text(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, mask.bool()), hf(inputs=tokens, attention_mask=mask).logits, **TOL)


@pytest.mark.parametrize(
    "cls, size",
    [
        (transformers.PerceiverForImageClassificationLearned, 8),
        (transformers.PerceiverForImageClassificationFourier, 8),
        (transformers.PerceiverForImageClassificationConvProcessing, 16),
    ],
)
def test_image_classification_parity(cls, size):
    torch.manual_seed(0)
    # Fourier widths (3 + 258, 64 + 258) are odd or not multiples of 2: one cross-attention head.
    hf = cls(_config(num_cross_attention_heads=1, image_size=8)).eval()
    for module in hf.modules():  # non-trivial BatchNorm statistics in the conv stem
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    ours = from_hf_perceiver(hf)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(inputs=images).logits, **TOL)


def test_optical_flow_parity_and_chunked_decoding():
    torch.manual_seed(0)
    hf = transformers.PerceiverForOpticalFlow(_config(train_size=[8, 12])).eval()
    ours = from_hf_perceiver(hf)
    frames = torch.randn(2, 2, 27, 8, 12)  # two frames of 3x3 patches of RGB
    with torch.no_grad():
        want = hf(inputs=frames).logits  # (B, H, W, 2)
        torch.testing.assert_close(ours(frames), want, **TOL)
        ours.decoder.decoder.chunk_size = 7
        torch.testing.assert_close(ours(frames), want, **TOL)
        idx = torch.tensor([0, 5, 95])
        torch.testing.assert_close(ours(frames, query_index=idx), want.reshape(2, -1, 2)[:, idx], **TOL)


@pytest.mark.slow
def test_optical_flow_parity_at_sintel_size():
    """Every pixel of a 368x496 frame (182,528 queries), decoded in chunks, equals HF's one-shot decode."""
    torch.manual_seed(0)
    config = _config(num_latents=8, num_self_attends_per_block=1, train_size=[368, 496])
    hf = transformers.PerceiverForOpticalFlow(config).eval()
    ours = from_hf_perceiver(hf)
    assert ours.decoder.decoder.chunk_size == 16384
    frames = torch.randn(1, 2, 27, 368, 496)
    with torch.no_grad():
        torch.testing.assert_close(ours(frames), hf(inputs=frames).logits, **TOL)


def test_multimodal_autoencoding_parity():
    torch.manual_seed(0)
    config = _config(
        num_cross_attention_heads=1,
        num_frames=2,
        image_size=8,
        audio_samples_per_frame=32,
        samples_per_patch=8,
        output_shape=[1, 2, 8, 8],
        output_num_channels=16,
    )
    config._label_trainable_num_channels = 20
    hf = transformers.PerceiverForMultimodalAutoencoding(config).eval()
    ours = from_hf_perceiver(hf)
    inputs = {"image": torch.randn(1, 2, 3, 8, 8), "audio": torch.randn(1, 64, 1), "label": torch.zeros(1, 5)}
    with torch.no_grad():
        for chunk in (torch.arange(0, 50), torch.arange(50, 128)):
            points = {"image": chunk, "audio": torch.arange(2, 8), "label": None}
            want = hf(inputs=inputs, subsampled_output_points=points).logits
            got = ours(inputs, query_index=points)
            assert sorted(got) == sorted(want) == ["audio", "image", "label"]
            for key in want:
                torch.testing.assert_close(got[key], want[key], **TOL)


def test_unsupported_models_raise_clearly():
    with pytest.raises(ValueError, match="unsupported model"):
        from_hf_perceiver(torch.nn.Linear(2, 2))
    config = _config()
    with pytest.raises(ValueError, match="no decoder"):
        from_hf_perceiver(hf_mod.PerceiverModel(config))
