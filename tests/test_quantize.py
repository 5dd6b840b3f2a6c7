"""Int8 inference path: outputs within the stated tolerance of fp32, every Linear really int8, model untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resampler.models.perceiver import PerceiverEncoder, PerceiverEncoderConfig
from resampler.models.resampler import PerceiverResampler, ResamplerConfig
from resampler.nn.attention import Attention
from resampler.quantize import INT8_TOLERANCE, Int8Linear, int8_supported, quantize_int8

pytestmark = pytest.mark.skipif(not int8_supported(), reason="needs torch's x86 int8 kernels")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                module.weight.normal_(1.0, 0.3)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.3)


def test_int8_linear_is_an_int8_gemm_of_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    q = Int8Linear(linear)
    w = q.weight  # the dequantized fp32 weight
    # per-channel symmetric: every row has at most 255 levels and its max maps to +-127
    levels = (w / (w.abs().amax(1, keepdim=True) / 127)).round()
    torch.testing.assert_close(w / (w.abs().amax(1, keepdim=True) / 127), levels, rtol=0, atol=1e-3)
    with torch.no_grad():
        got = q(x)
        want = F.linear(x, w, linear.bias)  # exact weights; only the activation quantization differs
    assert got.shape == (3, 7, 40)
    err = _relative_error(got, want)
    assert 0 < err < 0.02, err  # nonzero: the input really went through int8
    assert _relative_error(got, linear(x).detach()) < 0.03


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_resampler_int8_within_tolerance_and_media_projection_is_int8(norm, monkeypatch):
    torch.manual_seed(0)
    config = ResamplerConfig(dim=128, depth=2, num_latents=8, heads=4, head_dim=32, norm=norm)
    model = PerceiverResampler(config).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 40, 128)  # (B, T, P, D)
    mask = torch.ones(2, 3, 40, dtype=torch.bool)
    mask[0, 1, 25:] = False
    fast = quantize_int8(model)
    rows_seen = []
    original = Int8Linear.forward

    def counting(self, inp):
        rows_seen.append(inp.reshape(-1, inp.shape[-1]).shape[0])
        return original(self, inp)

    monkeypatch.setattr(Int8Linear, "forward", counting)
    with torch.no_grad():
        want = model(x, mask)
        got = fast(x, mask)
    err = _relative_error(got, want)
    assert 0 < err < INT8_TOLERANCE, err
    assert isinstance(fast.layers[0].attn.to_kv, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    # the largest product, every layer's media keys/values over all B*T*P patches, ran as an int8 GEMM
    assert rows_seen.count(2 * 3 * 40) >= len(model.layers), rows_seen


def test_perceiver_encoder_int8_within_tolerance():
    torch.manual_seed(0)
    config = PerceiverEncoderConfig(
        input_dim=24, num_latents=16, latent_dim=64, num_self_attends_per_block=2, self_heads=4, cross_heads=1
    )
    model = PerceiverEncoder(config).eval()
    _randomise_norms(model)
    x = torch.randn(2, 300, 24)
    fast = quantize_int8(model)
    with torch.no_grad():
        err = _relative_error(fast(x), model(x))
    assert 0 < err < INT8_TOLERANCE, err


def test_int8_encoder_attends_in_the_inputs_space_like_fp32(monkeypatch):
    """The int8 copy keeps the fold: its cross-attend never projects the 300 inputs to keys/values."""
    torch.manual_seed(0)
    config = PerceiverEncoderConfig(input_dim=24, num_latents=16, latent_dim=64, self_heads=4, cross_heads=1)
    model = PerceiverEncoder(config).eval()
    _randomise_norms(model)
    fast = quantize_int8(model)
    cross = [m for m in fast.modules() if isinstance(m, Attention) and m.kv_dim == 24]
    assert cross and all(isinstance(m.to_kv, Int8Linear) for m in cross)
    projected_rows = []
    original = Attention.project_kv
    monkeypatch.setattr(
        Attention,
        "project_kv",
        lambda self, c, *a, **k: projected_rows.append(c.shape[1]) or original(self, c, *a, **k),
    )
    x = torch.randn(2, 300, 24)
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert 300 not in projected_rows, projected_rows  # the latents' own self-attention still projects
    assert 0 < _relative_error(got, want) < INT8_TOLERANCE
    # The same weights, keys/values projected: the fold changes the arithmetic, not the answer.
    projected = PerceiverEncoder(dataclasses.replace(config, fold_cross_attention=False)).eval()
    projected.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert _relative_error(quantize_int8(projected)(x), got) < INT8_TOLERANCE


def test_original_model_untouched_and_copy_has_no_gradients():
    torch.manual_seed(0)
    model = PerceiverResampler(ResamplerConfig(dim=64, depth=1, num_latents=4, heads=2, head_dim=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = quantize_int8(model)
    assert model.training and not fast.training
    assert isinstance(model.layers[0].attn.to_q, nn.Linear)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in fast.parameters())


def test_min_features_keeps_small_layers_fp32():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    fast = quantize_int8(model, min_features=16)
    assert isinstance(fast[0], Int8Linear) and isinstance(fast[1], nn.Linear)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_int8("not a model")
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear(nn.Conv1d(2, 2, 1))
