"""The benchmark's model configs, built only from the library's public Perceiver models and decoders."""

from __future__ import annotations

from torch import nn

from resampler.models.decoders import PerceiverDecoder
from resampler.models.perceiver import PerceiverClassifier, PerceiverEncoder, PerceiverEncoderConfig
from resampler.nn.attention import AttentionSpec
from resampler.nn.blocks import FeedForwardSpec

from .config import ModelConfig

__all__ = ["encoder_config", "make_classifier", "make_encoder", "make_decoder"]


def encoder_config(mc: ModelConfig, input_dim: int) -> PerceiverEncoderConfig:
    """``ModelConfig`` -> the library's ``PerceiverEncoderConfig`` (cross-attention q/k width = D)."""
    return PerceiverEncoderConfig(
        input_dim=input_dim,
        num_latents=mc.num_latents,
        latent_dim=mc.latent_dim,
        num_cross_attends=mc.num_cross_attends,
        num_self_attends_per_block=mc.num_self_attends,
        cross_heads=mc.cross_heads,
        self_heads=mc.self_heads,
        cross_qk_from="q",
        cross_widening=mc.widening,
        self_widening=mc.widening,
        dropout=mc.dropout,
    )


def make_encoder(mc: ModelConfig, input_dim: int) -> PerceiverEncoder:
    return PerceiverEncoder(encoder_config(mc, input_dim))


def make_classifier(mc: ModelConfig, input_dim: int, num_classes: int) -> PerceiverClassifier:
    return PerceiverClassifier(encoder_config(mc, input_dim), num_classes)


def make_decoder(mc: ModelConfig, query_dim: int, out_dim: int | None, queries: nn.Module | None = None):
    """Perceiver IO decoder over the latents (``mc.cross_heads`` heads, MLP widening ``mc.widening``);
    ``queries``: a query source, or None for caller queries (e.g. the inputs themselves)."""
    return PerceiverDecoder(
        mc.latent_dim,
        query_dim,
        out_dim,
        queries=queries,
        attn=AttentionSpec(heads=mc.cross_heads, qkv_bias=True),
        ff=FeedForwardSpec(mult=mc.widening),
    )
