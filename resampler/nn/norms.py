"""LayerNorm or RMSNorm, chosen by a `NormSpec`; the normalisation without its affine."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormSpec", "make_norm", "normalize_without_affine"]


@dataclass(frozen=True)
class NormSpec:
    """'layernorm' (eps 1e-5 by default) or 'rmsnorm' (eps 1e-6 by default)."""

    kind: str = "layernorm"
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.kind!r}")


def make_norm(spec: NormSpec | str, dim: int, eps: float | None = None, *, device=None, dtype=None) -> nn.Module:
    """A LayerNorm or RMSNorm of width ``dim`` (``spec``: a `NormSpec` or its kind)."""
    spec = NormSpec(spec, eps) if isinstance(spec, str) else spec
    if spec.kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-5 if spec.eps is None else spec.eps, device=device, dtype=dtype)
    return nn.RMSNorm(dim, eps=1e-6 if spec.eps is None else spec.eps, device=device, dtype=dtype)


def normalize_without_affine(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm``'s normalisation (a LayerNorm or RMSNorm) of x, without its weight and bias."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, eps=norm.eps)
    raise TypeError(f"unsupported norm {type(norm).__name__}: expected LayerNorm or RMSNorm")
