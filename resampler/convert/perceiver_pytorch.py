"""lucidrains ``perceiver_pytorch.PerceiverIO`` encoder -> our `PerceiverEncoder`, same outputs (fp32, ~1e-6).

``from_perceiver_pytorch(model)`` converts the encoder part of a ``perceiver_pytorch.PerceiverIO`` (the
latents it returns when called without ``queries``): one cross-attend block (pre-norm cross-attention and
a GEGLU MLP, both residual) followed by ``depth`` latent blocks (self-attention + GEGLU MLP). Shapes are
read from the modules. Differences that the conversion absorbs:

- their ``to_kv`` chunks [keys | values] along the output, as our fused ``to_kv`` rows do: copied as is;
- their GEGLU computes ``x * gelu(gates)`` with ``x`` in the first half of ``fc1``; ours computes
  ``gelu(gate) * up`` with the gate rows first, so the two halves are swapped;
- no q/k/v biases, output bias on, LayerNorm eps 1e-5 (the `PerceiverEncoderConfig` says so).

Not converted (a clear ValueError): tied latent blocks (``weight_tie_layers=True``), the attention
residual variant, inverted cross-attention. The decoder cross-attention (no MLP, no residual) has no
block counterpart here; benchmarks time the encoder, where the M-dependent cost lives.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.perceiver import PerceiverEncoder, PerceiverEncoderConfig
from ..nn.blocks import FeedForward, FeedForwardSpec

__all__ = ["from_perceiver_pytorch"]


def from_perceiver_pytorch(model: nn.Module) -> PerceiverEncoder:
    """Copy a ``perceiver_pytorch.PerceiverIO``'s encoder into a `PerceiverEncoder` (same device/dtype)."""
    _check_supported(model)
    cross = model.cross_attend_block
    cross_attn = cross.cross_attn.fn
    latent_blocks = [block.self_attns[0] for block in model.layers]
    latents = model.latents
    latent_dim = latents.shape[1]
    self_heads = latent_blocks[0][0].fn.heads if latent_blocks else 8
    self_inner = latent_blocks[0][0].fn.to_q.out_features if latent_blocks else latent_dim
    config = PerceiverEncoderConfig(
        input_dim=cross_attn.to_kv.in_features,
        num_latents=latents.shape[0],
        latent_dim=latent_dim,
        num_self_attends_per_block=len(latent_blocks),
        cross_heads=cross_attn.heads,
        self_heads=self_heads,
        cross_qk_dim=cross_attn.to_q.out_features,
        self_qk_dim=self_inner,
        cross_widening=_ff_mult(cross.cross_ff.fn, latent_dim),
        self_widening=_ff_mult(latent_blocks[0][1].fn, latent_dim) if latent_blocks else 4.0,
        qkv_bias=False,
        activation="gelu",
    )
    factory = {"device": latents.device, "dtype": latents.dtype}
    ours = PerceiverEncoder(config, **factory)
    with torch.no_grad():
        ours.latents.copy_(latents)
        block = ours.cross_attends[0]
        _copy_norm(block.norm_q, cross.cross_attn.norm)
        _copy_norm(block.norm_kv, cross.cross_attn.norm_context)
        _copy_attention(block.attn, cross_attn)
        _copy_norm(block.norm_ff, cross.cross_ff.norm)
        block.ff = _gated_ff(cross.cross_ff.fn, factory)
        for layer, (attn, ff) in zip(ours.latent_blocks[0], latent_blocks):
            _copy_norm(layer.norm_attn, attn.norm)
            _copy_attention(layer.attn, attn.fn)
            _copy_norm(layer.norm_ff, ff.norm)
            layer.ff = _gated_ff(ff.fn, factory)
    return ours


def _check_supported(model: nn.Module) -> None:
    try:
        from perceiver_pytorch import PerceiverIO
    except ImportError as err:  # pragma: no cover - the peer is a dev dependency
        raise ImportError("from_perceiver_pytorch needs the perceiver-pytorch package") from err
    if not isinstance(model, PerceiverIO):
        raise TypeError(f"from_perceiver_pytorch expects a perceiver_pytorch.PerceiverIO, got {type(model).__name__}")
    if getattr(model, "has_attn_residual", False):
        raise ValueError("from_perceiver_pytorch: attn_residual=True has no counterpart in PerceiverEncoder")
    if getattr(model, "inverted_cross_attn", False):
        raise ValueError("from_perceiver_pytorch: inverted_cross_attn=True has no counterpart in PerceiverEncoder")
    if len({id(block) for block in model.layers}) != len(model.layers):
        raise ValueError("from_perceiver_pytorch: weight_tie_layers=True (tied latent blocks) is not supported")
    for block in model.layers:
        if len(block.self_attns) != 1:
            raise ValueError("from_perceiver_pytorch: each latent block must hold exactly one self-attention layer")


def _ff_mult(ff: nn.Module, dim: int) -> float:
    hidden = ff.net[2].in_features  # net = [Linear(dim, 2h), GEGLU, Linear(h, dim), (Dropout)]
    return hidden / dim


def _gated_ff(ff: nn.Module, factory: dict) -> FeedForward:
    fc1, fc2 = ff.net[0], ff.net[2]
    hidden = fc2.in_features
    ours = FeedForward(fc1.in_features, FeedForwardSpec(hidden_dim=hidden, gated=True, activation="gelu"), **factory)
    up_w, gate_w = fc1.weight.chunk(2, dim=0)  # theirs: [x; gates] -> ours: [gate; up]
    up_b, gate_b = fc1.bias.chunk(2, dim=0)
    ours.fc1.weight.copy_(torch.cat([gate_w, up_w], dim=0))
    ours.fc1.bias.copy_(torch.cat([gate_b, up_b], dim=0))
    ours.fc2.weight.copy_(fc2.weight)
    ours.fc2.bias.copy_(fc2.bias)
    return ours


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    if dst.weight.shape != src.weight.shape:
        raise ValueError(
            f"from_perceiver_pytorch: LayerNorm width {tuple(src.weight.shape)} != {tuple(dst.weight.shape)}"
        )
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def _copy_attention(dst: nn.Module, src: nn.Module) -> None:
    for name in ("to_q", "to_kv", "to_out"):
        ours, theirs = getattr(dst, name), getattr(src, name)
        if ours.weight.shape != theirs.weight.shape:
            raise ValueError(
                f"from_perceiver_pytorch: {name} weight {tuple(theirs.weight.shape)} does not fit ours "
                f"{tuple(ours.weight.shape)}"
            )
        ours.weight.copy_(theirs.weight)
        if theirs.bias is not None:
            ours.bias.copy_(theirs.bias)
