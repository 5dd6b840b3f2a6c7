"""Int8 inference on CPU: every ``nn.Linear`` -> an int8 GEMM (fbgemm: AVX-512 VNNI, or AVX2 with 7-bit activations).

    fast = quantize_int8(model)       # a copy; model is untouched; eval mode, no gradients
    out = fast(x)

What changes: each ``nn.Linear`` becomes an `Int8Linear` whose weight is per-output-channel symmetric
int8 and whose input is quantized per call (dynamic quantization, ``torch.ops.quantized.linear_dynamic``).
Attention scores, softmax, norms and residuals stay fp32. Nothing else in the model changes, so every
model built from our blocks works: `PerceiverEncoder`, `PerceiverIO`, `PerceiverResampler` (its media
keys/values, the largest GEMM, go through ``to_kv`` too).

Accuracy (tests/test_quantize.py): the relative error ``max|int8 - fp32| / max|fp32|`` of a model's
outputs is bounded by ``INT8_TOLERANCE``. Speed against fp32 and against torch.ao's
``quantize_dynamic``: ``benchmarks/bench_int8.py`` (results in docs/speed.md).
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import Tensor, nn

__all__ = ["Int8Linear", "quantize_int8", "INT8_TOLERANCE", "int8_supported"]

INT8_TOLERANCE = 0.05  # max |int8 - fp32| / max |fp32| of a model's output


def int8_supported() -> bool:
    """True when this torch build has the fbgemm/x86 int8 kernels (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


@functools.cache
def _reduce_range() -> bool:
    """Quantize activations to 7 bits unless the CPU has AVX-512 VNNI.

    Without VNNI, fbgemm's AVX2 kernel sums pairs of u8 x s8 products in saturating int16
    (``vpmaddubsw``): full-range activations can overflow there, 7-bit ones cannot. With VNNI the
    products accumulate in int32.
    """
    return not torch.cpu._is_vnni_supported()


def _pack(weight: Tensor, bias: Tensor | None):
    """fp32 (out, in) weight -> fbgemm packed per-channel symmetric int8 weight (+ fp32 bias)."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()  # (out,)
    zero_points = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's kernels are the VNNI path
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
    dequant = qweight.dequantize()
    return packed, dequant


class Int8Linear(nn.Module):
    """Drop-in inference replacement of an ``nn.Linear``: int8 weight (per output channel), fp32 bias.

    ``weight`` is the dequantized fp32 weight, for code that reads it rather than calling the layer
    (`FoldedAttention` maps its queries through the key/value weight: it never runs that GEMM).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear wraps an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on CPU only, the weight is on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.packed, dequant = _pack(linear.weight, self.bias)
        self.register_buffer("weight", dequant, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) through the int8 GEMM (bias included)."""
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, shape[-1]).contiguous().float(), self.packed, _reduce_range()
        )
        return out.view(*shape[:-1], out.shape[-1]).to(x.dtype)  # (..., out)


def quantize_int8(model: nn.Module, *, min_features: int = 1) -> nn.Module:
    """A copy of ``model`` for CPU inference with every ``nn.Linear`` (both widths >= min_features) int8.

    The copy is in eval mode with gradients off; ``model`` itself is not modified. Raises a ValueError
    if the model is not on CPU or this torch build has no x86 int8 kernels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 expects an nn.Module, got {type(model).__name__}")
    if not int8_supported():
        raise ValueError("quantize_int8: this torch build has no fbgemm/x86 int8 kernels (needs an x86 CPU build)")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"quantize_int8: the model must be on CPU, found parameters on {sorted(devices)}")
    quantized = copy.deepcopy(model).eval()
    for p in quantized.parameters():
        p.requires_grad_(False)
    _replace_linears(quantized, min_features)
    return quantized


def _replace_linears(module: nn.Module, min_features: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and min(child.in_features, child.out_features) >= min_features:
            setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child, min_features)
