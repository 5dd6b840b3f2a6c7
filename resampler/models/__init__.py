"""Models built only from `resampler.nn`: Perceiver, Perceiver IO, Perceiver AR, the Perceiver Resampler."""

from .decoders import (
    ClassificationDecoder,
    EmbeddingDecoder,
    FlowDecoder,
    FourierQueries,
    LearnedQueries,
    PerceiverDecoder,
    ProjectionDecoder,
)
from .multimodal import MultimodalDecoder, MultimodalPreprocessor, OneHotPreprocessor, PerceiverMultimodalAutoencoder
from .perceiver import PerceiverClassifier, PerceiverEncoder, PerceiverEncoderConfig
from .perceiver_ar import PerceiverAR, PerceiverARConfig
from .perceiver_io import PerceiverIO, PerceiverMaskedLM, PerceiverOpticalFlow
from .preprocessors import (
    AudioPreprocessor,
    ImagePreprocessor,
    PointCloudPreprocessor,
    TextPreprocessor,
)
from .resampler import PerceiverResampler, ResamplerConfig

__all__ = [
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
