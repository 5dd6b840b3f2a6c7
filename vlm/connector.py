"""The connector between the frozen tower and the LM: the Perceiver Resampler and a projection head.

    resample_then_project (default):  tokens (Dv) -> resampler (at Dv) -> head (Dv -> D_lm)
    project_then_resample (Idefics2): tokens (Dv) -> head (Dv -> D_lm) -> resampler (at D_lm)

The head is ``linear``, ``mlp`` (Linear -> GELU -> Linear), ``swiglu`` (the core `FeedForward`, gated,
no biases) or ``none`` (identity: OpenFlamingo and IDEFICS cross-attend to the resampler's output at
the vision width). A resampler with ``input_dim`` maps widths itself (MiniCPM-V's ``kv_proj``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from resampler import FeedForward, FeedForwardSpec, PerceiverResampler

from .config import ProjectorConfig, ResamplerConfig

__all__ = ["build_projector", "build_connector", "resampler_input_width"]


def build_projector(
    kind: str, in_dim: int, out_dim: int, hidden_dim: int | None = None, activation: str = "silu"
) -> nn.Module:
    """The head ``in_dim -> out_dim`` of `ProjectorConfig.kind` (hidden width: ``hidden_dim`` or ``out_dim``)."""
    hidden_dim = out_dim if hidden_dim is None else hidden_dim
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
    if kind == "swiglu":
        spec = FeedForwardSpec(hidden_dim=hidden_dim, activation=activation, gated=True, bias=False)
        return FeedForward(in_dim, spec, out_dim=out_dim)
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projector.kind='none' keeps the width {in_dim}, but {out_dim} is needed")
        return nn.Identity()
    raise ValueError(f"projector.kind must be 'linear', 'mlp', 'swiglu' or 'none', got {kind!r}")


def resampler_input_width(projector: ProjectorConfig, vision_width: int, hidden_size: int) -> int:
    """The width of the tokens the resampler reads: the tower's, or the LM's after the head."""
    return hidden_size if projector.order == "project_then_resample" else vision_width


def _media_width(projector: ProjectorConfig, resampler_out: int, hidden_size: int, xattn: bool) -> int:
    """The head's output width: the LM's, except a 'none' head in cross-attention mode."""
    if projector.kind == "none":
        if not xattn and resampler_out != hidden_size:
            raise ValueError(
                f"projector.kind='none' in prefix mode needs the resampler to output the LM's hidden size "
                f"{hidden_size}, it outputs {resampler_out}: set resampler.out_dim or choose a projector"
            )
        return resampler_out
    return hidden_size


def build_connector(
    projector: ProjectorConfig,
    resampler_config: ResamplerConfig,
    vision_width: int,
    hidden_size: int,
    *,
    num_patches: int,
    xattn: bool,
    resampler: nn.Module | None = None,
) -> tuple[PerceiverResampler, nn.Module, int]:
    """(resampler, head, width of the media the LM receives) for a tower of ``vision_width``.

    ``resampler``: a trained one to plug in (checked to fit); otherwise built from ``resampler_config``,
    whose ``dim`` is left None (set to the width it reads) unless ``input_dim`` maps widths.
    """
    width_in = resampler_input_width(projector, vision_width, hidden_size)
    if resampler is None:
        resampler = _build_resampler(resampler_config, width_in, num_patches)
    else:
        source = "the LM's hidden size" if projector.order == "project_then_resample" else "the vision tower's width"
        _check_resampler(resampler, resampler_config, width_in, f"{source} is {width_in}")
    if projector.order == "project_then_resample":
        head = build_projector(projector.kind, vision_width, hidden_size, projector.hidden_dim, projector.activation)
        return resampler, head, _media_width(projector, resampler.out_dim, hidden_size, xattn)
    media_width = _media_width(projector, resampler.out_dim, hidden_size, xattn)
    head = build_projector(projector.kind, resampler.out_dim, media_width, projector.hidden_dim, projector.activation)
    return resampler, head, media_width


def _build_resampler(rc: ResamplerConfig, width_in: int, num_patches: int) -> PerceiverResampler:
    if rc.num_patch_positions is not None and rc.num_patch_positions != num_patches:
        raise ValueError(
            f"resampler.num_patch_positions={rc.num_patch_positions} but the vision tower gives "
            f"{num_patches} patch tokens per image"
        )
    if rc.input_dim is None:
        if rc.dim not in (None, width_in):
            raise ValueError(
                f"resampler.dim={rc.dim} but the resampler reads tokens of width {width_in}: leave it unset"
            )
        return PerceiverResampler(dataclasses.replace(rc, dim=width_in))
    if rc.input_dim != width_in:
        raise ValueError(f"resampler.input_dim={rc.input_dim} but the resampler reads tokens of width {width_in}")
    if rc.dim is None:
        raise ValueError("resampler.input_dim is set: set resampler.dim, the width it maps the tokens to")
    return PerceiverResampler(rc)


def _check_resampler(resampler: nn.Module, rc: ResamplerConfig, width_in: int, source: str) -> None:
    if not isinstance(resampler, PerceiverResampler):
        raise TypeError(f"resampler must be a PerceiverResampler, got {type(resampler).__name__}")
    if resampler.in_dim != width_in:
        raise ValueError(
            f"the given resampler reads tokens of width {resampler.in_dim}, but {source}: it must take {width_in}"
        )
    expected_out = rc.out_dim if rc.out_dim is not None else (rc.dim if rc.input_dim else width_in)
    if resampler.out_dim != expected_out:
        raise ValueError(
            f"the given resampler maps width {resampler.in_dim} -> {resampler.out_dim}, but the config expects "
            f"{resampler.in_dim} -> {expected_out}"
        )
    if resampler.num_latents != rc.num_latents:
        raise ValueError(
            f"the given resampler has {resampler.num_latents} latents but resampler.num_latents={rc.num_latents}"
        )
