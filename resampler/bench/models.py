"""The benchmark's model configs, built only from the library's public Perceiver models and decoders."""

from __future__ import annotations

from torch import Tensor, nn

from ..decoders import LearnedQueries, PerceiverDecoder
from ..perceiver import PerceiverClassifier, PerceiverEncoder, PerceiverEncoderConfig
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


def make_decoder(
    mc: ModelConfig, query_dim: int, out_dim: int | None, *, num_learned_queries: int | None = None
) -> PerceiverDecoder:
    """Perceiver IO decoder over the latents; learned queries if ``num_learned_queries``, else caller queries."""
    queries = None if num_learned_queries is None else LearnedQueries(num_learned_queries, query_dim)
    return PerceiverDecoder(
        mc.latent_dim, query_dim, out_dim, queries=queries, heads=mc.cross_heads, widening=mc.widening
    )


class EncoderDecoder(nn.Module):
    """Perceiver IO as glue: ``decoder(encoder(inputs, mask), queries, query_index)``."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(
        self, inputs: Tensor, mask: Tensor | None = None, queries: Tensor | None = None, query_index=None
    ) -> Tensor:
        return self.decoder(self.encoder(inputs, mask), queries, query_index)
