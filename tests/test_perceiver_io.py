"""Perceiver IO: query sources, subsampled and chunked decoding, task models, invariances, errors."""

import pytest
import torch

from resampler.models.decoders import (
    AudioPatchHead,
    ClassHead,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    LearnedQueries,
    PerceiverDecoder,
)
from resampler.models.multimodal import (
    MultimodalDecoder,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    PerceiverMultimodalAutoencoder,
)
from resampler.models.perceiver import PerceiverEncoderConfig
from resampler.models.perceiver_io import PerceiverIO, PerceiverMaskedLM
from resampler.models.preprocessors import AudioPreprocessor, ImagePreprocessor, TextPreprocessor
from resampler.nn.attention import AttentionSpec
from resampler.nn.position import linear_positions

ENC = {"num_latents": 5, "latent_dim": 16, "num_self_attends_per_block": 2, "self_heads": 2}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _io(queries="fourier", chunk_size=None, input_dim=10, **enc) -> PerceiverIO:
    source = {
        "fourier": FourierQueries((4, 6), 3, project_dim=12),
        "learned": LearnedQueries(24, 12),
        "caller": None,
    }[queries]
    query_dim = input_dim if queries == "caller" else 12
    decoder = PerceiverDecoder(
        16, query_dim, 3, queries=source, attn=AttentionSpec(heads=2, head_dim=4, qkv_bias=True), chunk_size=chunk_size
    )
    return PerceiverIO(
        PerceiverEncoderConfig(input_dim=input_dim, **{**ENC, **enc}), decoder, queries_from_inputs=queries == "caller"
    )


@pytest.mark.parametrize("queries", ["fourier", "learned", "caller"])
def test_subsampled_decoding_equals_full_decoding_at_those_points(queries):
    torch.manual_seed(0)
    model = _io(queries, input_dim=10).eval()
    x = torch.randn(2, 24, 10)
    full = model(x)
    assert full.shape == (2, 24, 3)
    idx = torch.tensor([23, 0, 7, 7, 15])
    torch.testing.assert_close(model(x, query_index=idx), full[:, idx], **TOL)


@pytest.mark.parametrize("queries", ["fourier", "learned", "caller"])
def test_chunked_decoding_equals_unchunked(queries):
    torch.manual_seed(0)
    model = _io(queries).eval()
    x = torch.randn(2, 24, 10)
    full = model(x)
    model.decoder.chunk_size = 5
    torch.testing.assert_close(model(x), full, **TOL)
    idx = torch.randperm(24)[:11]
    torch.testing.assert_close(model(x, query_index=idx), full[:, idx], **TOL)


def test_subsampled_training_step_updates_only_through_chosen_queries():
    """Training on a random subset of outputs: gradients flow, and only chosen learned queries move."""
    torch.manual_seed(0)
    model = _io("learned")
    x = torch.randn(2, 24, 10)
    idx = torch.tensor([1, 4, 9])
    model(x, query_index=idx).square().sum().backward()
    grad = model.decoder.queries.weight.grad
    assert grad[idx].abs().sum() > 0
    others = torch.ones(24, dtype=torch.bool)
    others[idx] = False
    assert torch.all(grad[others] == 0)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_fourier_queries_match_the_grid():
    q = FourierQueries((3, 5), 4)
    pos = linear_positions((3, 5)).reshape(-1, 2)
    torch.testing.assert_close(q.positions(None), pos)
    idx = torch.tensor([0, 4, 7, 14])
    torch.testing.assert_close(q.positions(idx), pos[idx])
    torch.testing.assert_close(q(2, idx), q(2)[:, idx])
    # DeepMind's subsampling convention maps index i of n to -1 + 2 i / n
    dm = FourierQueries((3, 5), 4, subsample_positions="deepmind")
    torch.testing.assert_close(dm.positions(torch.tensor([14])), torch.tensor([[-1 + 4 / 3, -1 + 8 / 5]]))


def test_flow_sized_decoding_is_chunked_and_memory_bounded():
    """Every pixel of a 368x496 flow field (182,528 queries), decoded 4096 at a time: no block or query
    source ever sees more than one chunk, and the result matches decoding the same pixels directly."""
    torch.manual_seed(0)
    h, w, chunk = 368, 496, 4096
    queries = FourierQueries((h, w), 2, max_resolution=(h, w))
    decoder = PerceiverDecoder(
        8, queries.dim, 2, queries=queries, attn=AttentionSpec(heads=1, head_dim=8, qkv_bias=True), chunk_size=chunk
    ).eval()
    seen, made = [], []
    decoder.block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    queries.register_forward_hook(lambda mod, args, out: made.append(out.shape[1]))
    latents = torch.randn(1, 4, 8)
    with torch.no_grad():
        out = decoder(latents)
    assert out.shape == (1, h * w, 2)
    assert max(seen) == max(made) == chunk and len(seen) == len(made) == -(-h * w // chunk)
    idx = torch.tensor([0, 12345, h * w - 1])
    decoder.chunk_size = None
    with torch.no_grad():
        torch.testing.assert_close(decoder(latents, query_index=idx), out[:, idx], **TOL)


def test_chunking_never_changes_positions_in_deepmind_mode():
    """The DeepMind subsampling convention applies to query_index only, never to internal chunks."""
    torch.manual_seed(0)
    queries = FourierQueries((4, 6), 3, subsample_positions="deepmind")
    decoder = PerceiverDecoder(16, queries.dim, 3, queries=queries).eval()
    latents = torch.randn(2, 5, 16)
    full = decoder(latents)
    decoder.chunk_size = 5
    torch.testing.assert_close(decoder(latents), full, **TOL)
    idx = torch.tensor([2, 9, 23])
    sub = decoder(latents, query_index=idx)
    decoder.chunk_size = None
    torch.testing.assert_close(decoder(latents, query_index=idx), sub, **TOL)


def test_flow_decoder_reshapes_and_rescales():
    torch.manual_seed(0)
    flow = FlowDecoder(16, 10, rescale_factor=50.0, chunk_size=7).eval()
    latents, queries = torch.randn(2, 5, 16), torch.randn(2, 12, 10)
    out = flow(latents, queries, (3, 4))
    assert out.shape == (2, 3, 4, 2)
    torch.testing.assert_close(out.reshape(2, 12, 2) * 50.0, flow.decoder(latents, queries), **TOL)
    with pytest.raises(ValueError, match="image_shape"):
        flow(latents, queries, (5, 4))


def test_padding_changes_nothing():
    torch.manual_seed(0)
    model = _io("learned").eval()
    x = torch.randn(2, 9, 10)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out = model(x.masked_fill(~mask[..., None], 77.0), mask)
    torch.testing.assert_close(out[1], model(x[1:, :5])[0], **TOL)
    torch.testing.assert_close(out[0], model(x[:1])[0], **TOL)


def test_masked_lm_and_image_classifier_shapes_and_gradients():
    torch.manual_seed(0)
    text = TextPreprocessor(262, 24, 32)
    decoder = PerceiverDecoder(16, 24, None, queries=LearnedQueries(32, 24), attn=AttentionSpec(heads=4, qkv_bias=True))
    mlm = PerceiverMaskedLM(text, PerceiverEncoderConfig(input_dim=24, **ENC), decoder)
    tokens = torch.randint(0, 262, (2, 11))
    logits = mlm(tokens, query_index=torch.arange(11))
    assert logits.shape == (2, 11, 262)
    logits.logsumexp(-1).sum().backward()
    for name, p in mlm.named_parameters():
        if name.startswith("perceiver.decoder.queries"):
            continue  # only 11 of 32 rows used: checked by the subsampling test
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    pre = ImagePreprocessor(3, "pixels", max_resolution=(6, 6), num_bands=4)
    clf = PerceiverIO(
        PerceiverEncoderConfig(input_dim=pre.out_dim, **ENC), ClassificationDecoder(16, 7), preprocessor=pre
    )
    assert clf(torch.randn(2, 3, 6, 6)).shape == (2, 7)
    with pytest.raises(ValueError, match="takes no queries"):
        clf(torch.randn(2, 3, 6, 6), query_index=torch.tensor([0]))


def test_masked_lm_right_padding_changes_nothing():
    torch.manual_seed(0)
    text = TextPreprocessor(262, 24, 32)
    decoder = PerceiverDecoder(16, 24, None, queries=LearnedQueries(32, 24), attn=AttentionSpec(heads=4, qkv_bias=True))
    mlm = PerceiverMaskedLM(text, PerceiverEncoderConfig(input_dim=24, **ENC), decoder).eval()
    tokens = torch.randint(6, 262, (1, 9))
    padded = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.arange(13)[None] < 9
    idx = torch.arange(9)
    torch.testing.assert_close(mlm(padded, mask, query_index=idx), mlm(tokens, query_index=idx), **TOL)


def _multimodal():
    pre = MultimodalPreprocessor(
        {
            "audio": AudioPreprocessor(4, num_bands=3, max_resolution=32),
            "image": ImagePreprocessor(
                3, "patches", spatial_downsample=2, max_resolution=(2, 4, 4), num_bands=2, video=True
            ),
            "label": OneHotPreprocessor(5),
        },
        min_padding=2,
        mask_probs={"label": 1.0},
    )
    decoder = MultimodalDecoder(
        16,
        {
            "audio": FourierQueries((8,), 3, max_resolution=(32,)),
            "image": FourierQueries((2, 4, 4), 2),
            "label": LearnedQueries(1, 6),
        },
        10,
        heads={"audio": AudioPatchHead(10, 4), "image": torch.nn.Linear(10, 3), "label": ClassHead(10, 5)},
    )
    return PerceiverMultimodalAutoencoder(pre, PerceiverEncoderConfig(input_dim=pre.out_dim, **ENC), decoder).eval()


def test_multimodal_autoencoder_outputs_per_modality_and_respects_masks():
    torch.manual_seed(0)
    model = _multimodal()
    inputs = {"audio": torch.randn(2, 32), "image": torch.randn(2, 2, 3, 4, 4), "label": torch.eye(5)[:2]}
    out = model(inputs)
    assert out["audio"].shape == (2, 32) and out["image"].shape == (2, 32, 3) and out["label"].shape == (2, 5)
    # the label is always replaced by the mask token (p=1): the label input cannot matter
    other = dict(inputs, label=torch.eye(5)[2:4])
    torch.testing.assert_close(model(other)["label"], out["label"], **TOL)
    # per-modality padding masks: masked audio patches are ignored
    audio_mask = torch.ones(2, 8, dtype=torch.bool)
    audio_mask[:, 6:] = False
    noisy = dict(inputs, audio=inputs["audio"].clone())
    noisy["audio"][:, 24:] = 100.0
    a = model(inputs, masks={"audio": audio_mask})
    b = model(noisy, masks={"audio": audio_mask})
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL)
    sub = model(inputs, query_index={"image": torch.tensor([3, 30])})
    torch.testing.assert_close(sub["image"], out["image"][:, [3, 30]], **TOL)


def test_multimodal_gradients_reach_every_parameter_used():
    torch.manual_seed(0)
    model = _multimodal().train()
    inputs = {"audio": torch.randn(2, 32), "image": torch.randn(2, 2, 3, 4, 4), "label": torch.eye(5)[:2]}
    out = model(inputs)
    sum(v.square().sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if name == "preprocessor.padding.label":  # the label is always replaced by its mask token (p=1)
            assert torch.all(p.grad == 0)
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_decoder_errors_are_clear():
    dec = PerceiverDecoder(16, 12, 3)
    latents = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="no query source"):
        dec(latents)
    with pytest.raises(ValueError, match=r"queries must have shape \(B=2, O, 12\)"):
        dec(latents, torch.randn(2, 4, 11))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, N, 16\)"):
        dec(torch.randn(2, 5, 8), torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match=r"query_index values must lie in \[0, 4\)"):
        dec(latents, torch.randn(2, 4, 12), torch.tensor([4]))
    with pytest.raises(ValueError, match="heads=3 must divide"):
        PerceiverDecoder(16, 12, attn=AttentionSpec(heads=3))
    with pytest.raises(ValueError, match="gives width"):
        PerceiverDecoder(16, 12, queries=LearnedQueries(3, 8))
    with pytest.raises(ValueError, match="decoder expects latents of width 16"):
        PerceiverIO(PerceiverEncoderConfig(input_dim=4, latent_dim=8, self_heads=2), dec)
    with pytest.raises(ValueError, match="preprocessor gives"):
        PerceiverIO(PerceiverEncoderConfig(input_dim=4, **ENC), dec, preprocessor=TextPreprocessor(10, 6, 8))
