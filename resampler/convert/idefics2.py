"""transformers' ``Idefics2PerceiverResampler`` -> our `PerceiverResampler`, with identical outputs.

Idefics2's layer: RMSNorm on latents (``input_latents_norm``) and context (``input_context_norm``),
attention with grouped key/value heads over ``cat(context, latents)``, RMSNorm, then a gated MLP
``down(act(gate(x)) * up(x))``; a final RMSNorm. Our ``to_kv`` holds [k_proj; v_proj] rows and our
gated ``fc1`` holds [gate_proj; up_proj] rows. Its attention mask (B, P) of 1/0 is our patch mask.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.resampler import PerceiverResampler, ResamplerConfig

__all__ = ["from_idefics2"]

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def from_idefics2(model: nn.Module) -> PerceiverResampler:
    """Copy an ``Idefics2PerceiverResampler`` (or an ``Idefics2Connector``/``Idefics2Model`` holding one)."""
    model = getattr(model, "connector", model)
    model = getattr(model, "perceiver_resampler", model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "resampler_n_latents") or not hasattr(model, "layers"):
        raise TypeError(f"from_idefics2: expected an Idefics2PerceiverResampler, got {type(model).__name__}")
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"from_idefics2: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {config.hidden_act!r}")
    dim = config.hidden_size
    ours_config = ResamplerConfig(
        dim=dim,
        depth=config.resampler_depth,
        num_latents=config.resampler_n_latents,
        heads=config.resampler_n_heads,
        head_dim=config.resampler_head_dim,
        num_kv_heads=config.num_key_value_heads,
        ff_mult=4.0,  # Idefics2PerceiverLayer's MLP is hidden_size * 4 wide
        ff_gated=True,
        ff_activation=_ACTIVATIONS[config.hidden_act],
        norm="rmsnorm",
        norm_eps=config.rms_norm_eps,
    )
    ours = PerceiverResampler(ours_config, device=model.latents.device, dtype=model.latents.dtype)
    with torch.no_grad():
        ours.latents.copy_(model.latents)
        for layer, theirs in zip(ours.layers, model.layers):
            attn, mlp = theirs.self_attn, theirs.mlp
            layer.norm_q.weight.copy_(theirs.input_latents_norm.weight)
            layer.norm_kv.weight.copy_(theirs.input_context_norm.weight)
            layer.attn.to_q.weight.copy_(attn.q_proj.weight)
            layer.attn.to_kv.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
            layer.attn.to_out.weight.copy_(attn.o_proj.weight)
            layer.norm_ff.weight.copy_(theirs.post_attention_layernorm.weight)
            layer.ff.fc1.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            layer.ff.fc2.weight.copy_(mlp.down_proj.weight)
        ours.norm.weight.copy_(model.norm.weight)
    return ours
