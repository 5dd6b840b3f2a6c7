"""Building blocks: attention and its kernels, the folded cross-attention, blocks, position encodings."""

from .attention import Attention, AttentionSpec, KVCache, causal_mask, normalize_mask
from .blocks import CrossAttentionBlock, FeedForward, FeedForwardSpec, NormSpec, SelfAttentionBlock, make_norm
from .folded import FoldedAttention, fold_pays
from .kernels import attend, choose_kernel, reference_attention
from .position import (
    FourierPositionEncoding,
    LearnedPositionEncoding,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
)

__all__ = [
    "Attention",
    "AttentionSpec",
    "KVCache",
    "causal_mask",
    "normalize_mask",
    "attend",
    "choose_kernel",
    "reference_attention",
    "FoldedAttention",
    "fold_pays",
    "NormSpec",
    "FeedForwardSpec",
    "make_norm",
    "FeedForward",
    "CrossAttentionBlock",
    "SelfAttentionBlock",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_feature_dim",
    "fourier_features",
    "linear_positions",
]
