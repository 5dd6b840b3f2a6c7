"""perceiver-vlm's Perceiver family: one attention core and the models built on it."""

from .attention import Attention, KVCache, causal_mask
from .blocks import CrossAttentionBlock, FeedForward, SelfAttentionBlock, make_norm
from .decoders import (
    ClassificationDecoder,
    EmbeddingDecoder,
    FlowDecoder,
    FourierQueries,
    LearnedQueries,
    MultimodalDecoder,
    PerceiverDecoder,
    ProjectionDecoder,
)
from .flamingo import PerceiverResampler
from .perceiver import PerceiverClassifier, PerceiverEncoder, PerceiverEncoderConfig
from .perceiver_ar import PerceiverAR, PerceiverARConfig
from .perceiver_io import PerceiverIO, PerceiverMaskedLM, PerceiverMultimodalAutoencoder, PerceiverOpticalFlow
from .position import (
    FourierPositionEncoding,
    LearnedPositionEncoding,
    fourier_feature_dim,
    fourier_features,
    linear_positions,
)
from .preprocessors import (
    AudioPreprocessor,
    ImagePreprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    PointCloudPreprocessor,
    TextPreprocessor,
)
from .quantize import quantize_int8
from .tokenizer import ByteTokenizer

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
    "quantize_int8",
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
    "ByteTokenizer",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_feature_dim",
    "fourier_features",
    "linear_positions",
]
