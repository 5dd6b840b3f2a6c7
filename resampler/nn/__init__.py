"""Building blocks: attention and its kernels, the folded cross-attention, blocks, position encodings."""

from .attention import Attention, AttentionSpec, KVCache, causal_mask, normalize_mask
from .blocks import CrossAttentionBlock, FeedForward, FeedForwardSpec, SelfAttentionBlock
from .folded import FoldedAttention, fold_pays
from .kernels import attend, choose_kernel, reference_attention
from .norms import NormSpec, make_norm, normalize_without_affine
from .position import (
    FourierPositionEncoding,
    LearnedPositionEncoding,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
    sincos_2d,
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
    "normalize_without_affine",
    "FeedForward",
    "CrossAttentionBlock",
    "SelfAttentionBlock",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_feature_dim",
    "fourier_features",
    "linear_positions",
    "sincos_2d",
]
