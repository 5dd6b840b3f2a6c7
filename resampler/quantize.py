"""Int8 inference on CPU: every ``nn.Linear`` -> an int8 GEMM (fbgemm: AVX-512 VNNI, or AVX2 with 7-bit activations).

    fast = quantize_int8(model)       # a copy; model is untouched; eval mode, no gradients
    out = fast(x)

What changes: each ``nn.Linear`` becomes an `Int8Linear` whose weight is per-output-channel symmetric
int8 and whose input is quantized per call (dynamic quantization, ``torch.ops.quantized.linear_dynamic``).
Attention scores, softmax, norms and residuals stay fp32. Nothing else in the model changes, so every
model built from our blocks works: `PerceiverEncoder`, `PerceiverIO`, `PerceiverResampler` (its media
keys/values, the largest GEMM, go through ``to_kv`` too; code that folds a norm affine into a weight,
``F.linear(x, weight * w, bias)``, also stays int8: `Int8Weight` answers that with a cached int8 product).

Measured against torch.ao's ``quantize_dynamic`` on the same resampler (dim 1024, depth 2, batch 4, one
thread): 47 ms vs 57 ms (fp32 240 ms), max relative error 0.004 vs 0.009, so this is the one path.

Accuracy (see tests/test_quantize.py): relative error ``max|int8 - fp32| / max|fp32|`` of the outputs is
about 1e-2 (AVX-512 VNNI) to 3e-2 (AVX2, 7-bit activations) for the resampler and the Perceiver
encoder with random weights; the stated bound is ``INT8_TOLERANCE`` = 0.05. Speed (bench_int8.py,
Flamingo-size resampler, 2 threads): 2.33x the fp32 forward with AVX-512 VNNI, 1.60x on an
AVX2-only AMD EPYC.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["Int8Linear", "Int8Weight", "quantize_int8", "INT8_TOLERANCE", "int8_supported"]

INT8_TOLERANCE = 0.05  # max |int8 - fp32| / max |fp32| of a model's output


def int8_supported() -> bool:
    """True when this torch build has the fbgemm/x86 int8 kernels (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


@functools.cache
def _reduce_range() -> bool:
    """Quantize activations to 7 bits unless the CPU has AVX-512 VNNI.

    Without VNNI, fbgemm's AVX2 kernel sums pairs of u8 x s8 products in saturating int16
    (``vpmaddubsw``): full-range activations overflow there (5% output error on the resampler, measured
    on an AVX2-only AMD EPYC), 7-bit ones cannot (0.5%). With VNNI the products accumulate in int32.
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


class Int8Weight(Tensor):
    """An fp32-looking (out, in) weight whose ``F.linear`` runs as an int8 GEMM.

    Any other operation sees the dequantized fp32 weight, except ``weight * v`` with v of shape (in,)
    (a norm affine folded into the weight), which returns another `Int8Weight`, cached per v.
    """

    @staticmethod
    def __new__(cls, weight: Tensor, bias: Tensor | None = None):
        return Tensor._make_wrapper_subclass(cls, weight.shape, dtype=torch.float32, device=weight.device)

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.packed, self.dequant = _pack(weight, bias)
        self.has_bias = bias is not None
        self._folded: dict[tuple[int, int], Int8Weight] = {}

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, per-channel symmetric int8)"

    def linear(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) through the int8 GEMM (bias included if packed)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous().float()
        out = torch.ops.quantized.linear_dynamic(x, self.packed, _reduce_range())
        return out.view(*shape[:-1], out.shape[-1]).to(x.dtype)  # (..., out)

    def scaled_by(self, v: Tensor) -> Int8Weight:
        key = (v.data_ptr(), v._version)
        if key not in self._folded:
            self._folded = {key: Int8Weight(self.dequant * v.detach().float())}  # keep one: weights are fixed
        return self._folded[key]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], Int8Weight) and not isinstance(args[0], Int8Weight):
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if not torch.is_grad_enabled() or not x.requires_grad:
                out = w.linear(x)
                if b is not None:
                    out = out + b
                return out
        if func in (Tensor.mul, Tensor.__mul__, torch.mul, Tensor.__rmul__) and len(args) == 2:
            a, v = args if isinstance(args[0], Int8Weight) else (args[1], args[0])
            is_row_scale = isinstance(v, Tensor) and not isinstance(v, Int8Weight) and v.dim() == 1
            if isinstance(a, Int8Weight) and is_row_scale and v.shape[0] == a.shape[1]:
                return a.scaled_by(v)
        args, kwargs = tree_map(_dequant, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(_dequant, (args, kwargs or {}))
        return func(*args, **kwargs)


def _dequant(value):
    return value.dequant if isinstance(value, Int8Weight) else value


class Int8Linear(nn.Module):
    """Drop-in inference replacement of an ``nn.Linear``: int8 weight (per output channel), fp32 bias."""

    # `Attention` may still attend in the context's own space with this as its to_kv: the folded path
    # reads the (dequantized) weight, so the int8 copy does the same, smaller, work as the fp32 model
    # instead of projecting 50k inputs to keys and values first.
    folds_like_linear = True

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear wraps an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on CPU only, the weight is on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = Int8Weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


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
