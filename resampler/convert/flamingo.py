"""``flamingo_pytorch.PerceiverResampler`` -> our `PerceiverResampler`, with identical outputs.

lucidrains' layer is ``[PerceiverAttention(norm_media, norm_latents, to_q, to_kv, to_out),
FeedForward(LayerNorm, Linear, GELU, Linear)]``; its ``to_kv`` rows are [keys; values], as ours.
Its media-time embedding ``media_pos_emb`` (``time_pos_emb`` in later versions), shape
(num_media, 1, dim), becomes our ``media_time_embeddings`` (num_media, dim).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.resampler import PerceiverResampler, ResamplerConfig

__all__ = ["from_flamingo_pytorch"]


def from_flamingo_pytorch(model: nn.Module, *, media_time_embeddings: bool = True) -> PerceiverResampler:
    """Copy a ``flamingo_pytorch.PerceiverResampler``'s weights into an equivalent `PerceiverResampler`.

    ``media_time_embeddings=False`` drops the peer's media-time embedding table (then ours matches the
    peer only when that table is zero).
    """
    time_emb = getattr(model, "media_pos_emb", None)
    time_emb = getattr(model, "time_pos_emb", time_emb)
    if time_emb is None or not hasattr(model, "layers") or not hasattr(model, "latents"):
        raise TypeError(
            f"from_flamingo_pytorch: expected a flamingo_pytorch.PerceiverResampler, got {type(model).__name__}"
        )
    attn0, ff0 = model.layers[0]
    num_latents, dim = model.latents.shape
    heads = attn0.heads
    head_dim = attn0.to_q.out_features // heads
    config = ResamplerConfig(
        dim=dim,
        depth=len(model.layers),
        num_latents=num_latents,
        heads=heads,
        head_dim=head_dim,
        ff_mult=ff0[1].out_features / dim,
        norm="layernorm",
        norm_eps=model.norm.eps,
        max_media=time_emb.shape[0] if media_time_embeddings else None,
    )
    ours = PerceiverResampler(config, device=model.latents.device, dtype=model.latents.dtype)
    if ours.layers[0].ff.fc1.out_features != ff0[1].out_features:
        raise ValueError(f"from_flamingo_pytorch: hidden width {ff0[1].out_features} is not int(dim * mult)")
    with torch.no_grad():
        ours.latents.copy_(model.latents)
        if media_time_embeddings:
            ours.media_time_embeddings.copy_(time_emb.reshape(time_emb.shape[0], dim))
        for layer, (attn, ff) in zip(ours.layers, model.layers):
            layer.norm_kv.load_state_dict(attn.norm_media.state_dict())
            layer.norm_q.load_state_dict(attn.norm_latents.state_dict())
            layer.attn.to_q.weight.copy_(attn.to_q.weight)
            layer.attn.to_kv.weight.copy_(attn.to_kv.weight)  # rows [keys; values] in both
            layer.attn.to_out.weight.copy_(attn.to_out.weight)
            norm, fc1, _, fc2 = ff
            layer.norm_ff.load_state_dict(norm.state_dict())
            layer.ff.fc1.weight.copy_(fc1.weight)
            layer.ff.fc2.weight.copy_(fc2.weight)
        ours.norm.load_state_dict(model.norm.state_dict())
    return ours
