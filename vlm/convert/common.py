"""What the converters share: an empty LM skeleton to fill with the reference's modules, checks, names."""

from __future__ import annotations

from torch import nn

from resampler.convert.idefics2 import _ACTIVATIONS

from ..config import ResamplerConfig

__all__ = [
    "empty_model",
    "check_materialized",
    "check_not_quantized",
    "activation",
    "source_name",
    "vlm_resampler_config",
]


def empty_model(cls, config) -> nn.Module:
    """``cls(config)`` with its parameters on the meta device (no memory) and its buffers (rotary
    frequencies) computed for real: the converter then moves the reference's modules in."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(config)


def check_materialized(model: nn.Module, what: str) -> None:
    """Every parameter was filled from the reference (none left on the meta device)."""
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"{what}: parameters not converted from the reference: {left[:5]} ({len(left)})")


def check_not_quantized(where: str, skip: list[str], **modules: nn.Module) -> None:
    """The parts a converter copies weights from (connector, gates) must be in floating point."""
    for name, module in modules.items():
        if any(not p.is_floating_point() for p in module.parameters()):
            raise ValueError(
                f"{where}: the reference's {name} is quantized; load it with BitsAndBytesConfig("
                f"llm_int8_skip_modules={skip}) so only the language model is (QLoRA)"
            )


def activation(name: str, where: str) -> str:
    """A transformers ``hidden_act`` -> the core's activation name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def source_name(model: nn.Module, fallback: str) -> str:
    """The hub id or directory the reference came from (its config's ``name_or_path``), else ``fallback``."""
    return getattr(model.config, "name_or_path", "") or fallback


def vlm_resampler_config(resampler) -> ResamplerConfig:
    """A converted `PerceiverResampler`'s config as the VLM's section (``dim`` left to the VLM)."""
    import dataclasses

    fields = {f.name: getattr(resampler.config, f.name) for f in dataclasses.fields(resampler.config)}
    fields["dim"] = None if fields.get("input_dim") is None else fields["dim"]
    return ResamplerConfig(**fields)
