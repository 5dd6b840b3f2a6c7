"""Perceiver IO (Jaegle et al., 2021): encoder + a decoder whose output queries attend to the latents.

``PerceiverIO(encoder, decoder, preprocessor=None)`` is glue: optional input adapter -> `PerceiverEncoder`
-> a decoder (`PerceiverDecoder` or a task head from `decoders`). Cost is linear in the number of inputs
M and of outputs O. The task models (`PerceiverMaskedLM`, `PerceiverOpticalFlow`,
`multimodal.PerceiverMultimodalAutoencoder`) mirror DeepMind's released Perceiver IO models, which
`resampler.convert.from_hf_perceiver` loads.
"""

from __future__ import annotations

from torch import Tensor, nn

from .decoders import (
    ClassificationDecoder,
    EmbeddingDecoder,
    FlowDecoder,
    PerceiverDecoder,
    ProjectionDecoder,
)
from .perceiver import PerceiverEncoder, PerceiverEncoderConfig
from .preprocessors import Preprocessed

__all__ = [
    "PerceiverIO",
    "PerceiverDecoder",
    "PerceiverMaskedLM",
    "PerceiverOpticalFlow",
    "build_encoder",
    "check_widths",
]


def check_widths(name: str, preprocessor: nn.Module | None, encoder: PerceiverEncoder, decoder: nn.Module) -> None:
    """Preprocessor output == encoder input width; decoder latent width == encoder latent width."""
    cfg = encoder.config
    decoder_latent_dim = getattr(getattr(decoder, "decoder", decoder), "latent_dim", cfg.latent_dim)
    if decoder_latent_dim != cfg.latent_dim:
        raise ValueError(
            f"{name}: decoder expects latents of width {decoder_latent_dim}, encoder gives {cfg.latent_dim}"
        )
    if preprocessor is not None and getattr(preprocessor, "out_dim", cfg.input_dim) != cfg.input_dim:
        raise ValueError(
            f"{name}: preprocessor gives {preprocessor.out_dim} channels, encoder input_dim is {cfg.input_dim}"
        )


def build_encoder(encoder: PerceiverEncoder | PerceiverEncoderConfig, device, dtype) -> PerceiverEncoder:
    if isinstance(encoder, PerceiverEncoderConfig):
        return PerceiverEncoder(encoder, device=device, dtype=dtype)
    if not isinstance(encoder, PerceiverEncoder):
        raise TypeError(f"encoder must be a PerceiverEncoder or PerceiverEncoderConfig, got {type(encoder).__name__}")
    return encoder


class PerceiverIO(nn.Module):
    """inputs -> [preprocessor] -> encoder -> decoder -> (B, O, out_dim) (or the head's output).

    ``forward(inputs, mask=None, queries=None, query_index=None)``:
        inputs: (B, M, C) features, or whatever the preprocessor takes (images, bytes, a dict of
            modalities).
        mask: (B, M) bool, True = real input (passed through the preprocessor if there is one).
        queries: (B, O, query_dim) caller queries, for a decoder without its own query source.
        query_index: (O,) flat indices of the outputs to decode (subsampled decoding, in training
            and inference); None decodes all.
    With ``queries_from_inputs=True`` the (preprocessed) inputs are the queries (e.g. optical flow).
    """

    def __init__(
        self,
        encoder: PerceiverEncoder | PerceiverEncoderConfig,
        decoder: nn.Module,
        *,
        preprocessor: nn.Module | None = None,
        queries_from_inputs: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self.encoder = build_encoder(encoder, device, dtype)
        self.decoder = decoder
        self.queries_from_inputs = queries_from_inputs
        check_widths("PerceiverIO", preprocessor, self.encoder, decoder)

    def encode(self, inputs, mask: Tensor | None = None) -> tuple[Tensor, Preprocessed]:
        """-> latents (B, N, D) and the preprocessed inputs (features, mask, ...)."""
        if self.preprocessor is not None:
            pre = self.preprocessor(inputs) if mask is None else self.preprocessor(inputs, mask=mask)
        else:
            pre = Preprocessed(inputs, mask)
        return self.encoder(pre.features, pre.mask), pre

    def forward(
        self, inputs, mask: Tensor | None = None, queries: Tensor | None = None, query_index: Tensor | None = None
    ) -> Tensor:
        latents, pre = self.encode(inputs, mask)
        if queries is None and self.queries_from_inputs:
            queries = pre.features
        if isinstance(self.decoder, (ClassificationDecoder, ProjectionDecoder)):
            if queries is not None or query_index is not None:
                raise ValueError(f"PerceiverIO: a {type(self.decoder).__name__} takes no queries or query_index")
            return self.decoder(latents)
        return self.decoder(latents, queries, query_index)


class PerceiverMaskedLM(nn.Module):
    """Byte-level masked LM (DeepMind's language Perceiver): ``forward(tokens (B, L), mask) -> (B, O, vocab)``.

    The decoder has one learned query per output position (``max_positions`` of them); pass
    ``query_index`` to decode only some positions (e.g. ``torch.arange(L)`` or the masked ones).
    """

    def __init__(
        self, preprocessor: nn.Module, encoder: PerceiverEncoder | PerceiverEncoderConfig, decoder: PerceiverDecoder
    ):
        super().__init__()
        self.perceiver = PerceiverIO(encoder, decoder, preprocessor=preprocessor)
        self.lm_head = EmbeddingDecoder(preprocessor.token_embedding)

    def forward(self, tokens: Tensor, mask: Tensor | None = None, query_index: Tensor | None = None) -> Tensor:
        return self.lm_head(self.perceiver(tokens, mask, query_index=query_index))


class PerceiverOpticalFlow(nn.Module):
    """Optical flow: two frames of 3x3 patches (B, 2, 27, H, W) -> flow (B, H, W, 2).

    Each pixel's preprocessed feature is its own decoder query; ``FlowDecoder.chunk_size`` bounds the
    memory of decoding every pixel. With ``query_index`` only those pixels are decoded -> (B, O, 2).
    """

    def __init__(
        self, preprocessor: nn.Module, encoder: PerceiverEncoder | PerceiverEncoderConfig, decoder: FlowDecoder
    ):
        super().__init__()
        self.preprocessor = preprocessor
        self.encoder = build_encoder(encoder, None, None)
        self.decoder = decoder
        check_widths("PerceiverOpticalFlow", preprocessor, self.encoder, decoder)

    def forward(self, frames: Tensor, query_index: Tensor | None = None) -> Tensor:
        pre = self.preprocessor(frames)
        latents = self.encoder(pre.features, pre.mask)
        return self.decoder(latents, pre.features, pre.index_dims, query_index)
