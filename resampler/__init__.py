"""perceiver-vlm's Perceiver family: one attention core and the models built on it."""

from .attention import Attention, KVCache, causal_mask
from .blocks import CrossAttentionBlock, FeedForward, SelfAttentionBlock, make_norm
from .flamingo import PerceiverResampler
from .position import (
    FourierPositionEncoding,
    LearnedPositionEncoding,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "KVCache",
    "causal_mask",
    "CrossAttentionBlock",
    "FeedForward",
    "SelfAttentionBlock",
    "make_norm",
    "PerceiverResampler",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_feature_dim",
    "fourier_features",
    "linear_positions",
]
