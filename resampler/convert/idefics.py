"""transformers' ``IdeficsPerceiverResampler`` (IDEFICS v1) -> our `PerceiverResampler`, with identical outputs.

IDEFICS' layer: LayerNorm on context and latents, separate q/k/v projections over cat(context,
latents) without biases, an optional per-head LayerNorm on q and k (``qk_layer_norms_perceiver``),
then an MLP ``c_proj(relu(fc(ln(x))))`` without biases; a final LayerNorm. Our ``to_kv`` holds
[k_proj; v_proj] rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.resampler import PerceiverResampler, ResamplerConfig

__all__ = ["from_idefics_perceiver"]


def from_idefics_perceiver(model: nn.Module) -> PerceiverResampler:
    """Copy an ``IdeficsPerceiverResampler`` (or a model holding one as ``perceiver_resampler``)."""
    model = getattr(getattr(model, "model", model), "perceiver_resampler", model)
    if not hasattr(model, "blocks") or not hasattr(model, "latents") or not hasattr(model, "layer_norm"):
        raise TypeError(f"from_idefics_perceiver: expected an IdeficsPerceiverResampler, got {type(model).__name__}")
    attn0, mlp0 = model.blocks[0]
    config = ResamplerConfig(
        dim=model.embed_dim,
        depth=len(model.blocks),
        num_latents=model.n_latents,
        heads=model.n_heads,
        head_dim=model.head_dim,
        ff_hidden_dim=mlp0.fc.out_features,
        ff_activation="relu",
        norm="layernorm",
        norm_eps=model.layer_norm.eps,
        qk_norm="layernorm" if model.qk_layer_norms else None,
        qk_norm_eps=attn0.q_layer_norm.eps if model.qk_layer_norms else None,
    )
    ours = PerceiverResampler(config, device=model.latents.device, dtype=model.latents.dtype)
    with torch.no_grad():
        ours.latents.copy_(model.latents)
        for layer, (attn, mlp) in zip(ours.layers, model.blocks):
            layer.norm_kv.load_state_dict(attn.context_layer_norm.state_dict())
            layer.norm_q.load_state_dict(attn.latents_layer_norm.state_dict())
            layer.attn.to_q.weight.copy_(attn.q_proj.weight)
            layer.attn.to_kv.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
            layer.attn.to_out.weight.copy_(attn.output_proj.weight)
            if model.qk_layer_norms:
                layer.attn.q_norm.load_state_dict(attn.q_layer_norm.state_dict())
                layer.attn.k_norm.load_state_dict(attn.k_layer_norm.state_dict())
            layer.norm_ff.load_state_dict(mlp.ln.state_dict())
            layer.ff.fc1.weight.copy_(mlp.fc.weight)
            layer.ff.fc2.weight.copy_(mlp.c_proj.weight)
        ours.norm.load_state_dict(model.layer_norm.state_dict())
    return ours
