"""perceiver-vlm's Perceiver family: one attention core (`resampler.nn`) and the models built on it.

resampler.nn        attention, kernels, folded cross-attention, blocks, position encodings
resampler.models    Perceiver, Perceiver IO, Perceiver AR, the Perceiver Resampler
resampler.convert   weight converters from transformers, flamingo-pytorch, perceiver-pytorch
resampler.quantize  int8 CPU inference for any model built from the blocks
resampler.config    typed dataclass configs <-> YAML
"""

from .models import (
    AudioPreprocessor,
    ClassificationDecoder,
    EmbeddingDecoder,
    FlowDecoder,
    FourierQueries,
    ImagePreprocessor,
    LearnedQueries,
    MultimodalDecoder,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    PerceiverAR,
    PerceiverARConfig,
    PerceiverClassifier,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverEncoderConfig,
    PerceiverIO,
    PerceiverMaskedLM,
    PerceiverMultimodalAutoencoder,
    PerceiverOpticalFlow,
    PerceiverResampler,
    PointCloudPreprocessor,
    ProjectionDecoder,
    ResamplerConfig,
    TextPreprocessor,
)
from .nn import (
    Attention,
    AttentionSpec,
    CrossAttentionBlock,
    FeedForward,
    FeedForwardSpec,
    FoldedAttention,
    FourierPositionEncoding,
    KVCache,
    LearnedPositionEncoding,
    NormSpec,
    SelfAttentionBlock,
    causal_mask,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
    make_norm,
)
from .quantize import quantize_int8
from .tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionSpec",
    "FoldedAttention",
    "KVCache",
    "causal_mask",
    "CrossAttentionBlock",
    "FeedForward",
    "FeedForwardSpec",
    "NormSpec",
    "SelfAttentionBlock",
    "make_norm",
    "quantize_int8",
    "ByteTokenizer",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_feature_dim",
    "fourier_features",
    "linear_positions",
    "PerceiverEncoderConfig",
    "PerceiverEncoder",
    "PerceiverClassifier",
    "PerceiverIO",
    "PerceiverDecoder",
    "LearnedQueries",
    "FourierQueries",
    "ClassificationDecoder",
    "ProjectionDecoder",
    "EmbeddingDecoder",
    "FlowDecoder",
    "MultimodalDecoder",
    "PerceiverMaskedLM",
    "PerceiverOpticalFlow",
    "PerceiverMultimodalAutoencoder",
    "PerceiverARConfig",
    "PerceiverAR",
    "ImagePreprocessor",
    "AudioPreprocessor",
    "TextPreprocessor",
    "PointCloudPreprocessor",
    "OneHotPreprocessor",
    "MultimodalPreprocessor",
    "ResamplerConfig",
    "PerceiverResampler",
]
