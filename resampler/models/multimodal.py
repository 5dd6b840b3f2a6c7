"""Multimodal autoencoding (the Kinetics Perceiver IO): video + audio + label in one array and back.

`MultimodalPreprocessor` pads each modality to one width with a learned per-modality vector and
concatenates them (sorted-name order, as the official code); `MultimodalDecoder` decodes per-modality
queries padded the same way with one shared decoder and splits the outputs back per modality;
`PerceiverMultimodalAutoencoder` is the model around them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .decoders import PerceiverDecoder
from .perceiver import PerceiverEncoder, PerceiverEncoderConfig
from .perceiver_io import build_encoder, check_widths
from .preprocessors import Preprocessed

__all__ = ["OneHotPreprocessor", "MultimodalPreprocessor", "MultimodalDecoder", "PerceiverMultimodalAutoencoder"]


class OneHotPreprocessor(nn.Module):
    """A label vector (B, K) -> one input (B, 1, K)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.out_dim = num_classes

    def forward(self, labels: Tensor, mask: Tensor | None = None) -> Preprocessed:
        if labels.dim() != 2 or labels.shape[1] != self.out_dim:
            raise ValueError(f"OneHotPreprocessor: labels must be (B, {self.out_dim}), got {tuple(labels.shape)}")
        x = labels[:, None, :]  # (B, 1, K)
        return Preprocessed(x, mask, x, (1,))


class MultimodalPreprocessor(nn.Module):
    """Several modalities -> one (B, sum M_m, C) input, modalities concatenated in sorted-name order.

    Each modality's features are padded to ``C = max width + min_padding`` with a learned vector of
    that modality (which doubles as a modality embedding). ``mask_probs[name] = p`` replaces each of
    that modality's inputs by a learned mask token with probability p, in training and evaluation as
    in the official code (the Kinetics autoencoder masks the label with p=1 so it must be predicted).
    ``forward(inputs: {name: x}, masks: {name: (B, M_m)} | None)``; a missing modality mask means all real.
    """

    def __init__(
        self,
        modalities: Mapping[str, nn.Module],
        *,
        min_padding: int = 2,
        mask_probs: Mapping[str, float] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("MultimodalPreprocessor: give at least one modality")
        self.names = sorted(modalities)
        self.modalities = nn.ModuleDict(modalities)
        self.out_dim = max(m.out_dim for m in modalities.values()) + min_padding
        self.padding = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(self.out_dim - m.out_dim, device=device, dtype=dtype) * 0.02)
                for name, m in modalities.items()
            }
        )
        self.mask_probs = dict(mask_probs or {})
        unknown = set(self.mask_probs) - set(modalities)
        if unknown:
            raise ValueError(f"MultimodalPreprocessor: mask_probs for unknown modalities {sorted(unknown)}")
        self.mask_tokens = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(self.out_dim, device=device, dtype=dtype) * 0.02)
                for name in self.mask_probs
            }
        )

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Preprocessed:
        if not isinstance(inputs, Mapping) or set(inputs) != set(self.names):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"MultimodalPreprocessor: inputs must be a dict with keys {self.names}, got {got}")
        masks = dict(masks or {})
        feats, mask_parts, sizes, without_pos = [], [], {}, {}
        for name in self.names:
            pre = self.modalities[name](inputs[name], mask=masks.get(name))
            x = pre.features  # (B, M_m, C_m)
            pad = self.padding[name].to(x.dtype).expand(*x.shape[:2], -1)
            x = torch.cat([x, pad], dim=-1)  # (B, M_m, C)
            p = self.mask_probs.get(name, 0.0)
            if p > 0:
                hit = torch.bernoulli(torch.full(x.shape[:2], p, device=x.device))[..., None].to(x.dtype)
                x = (1 - hit) * x + hit * self.mask_tokens[name].to(x.dtype)
            feats.append(x)
            mask_parts.append(
                pre.mask if pre.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            )
            sizes[name] = x.shape[1]
            without_pos[name] = pre.without_pos
        mask = torch.cat(mask_parts, dim=1) if masks else None
        return Preprocessed(torch.cat(feats, dim=1), mask, without_pos, None, sizes)


class MultimodalDecoder(nn.Module):
    """Per-modality queries, padded to one width, decoded together, split back per modality.

    Modalities are processed in sorted-name order (the convention of the official code). Each
    modality's queries are padded with a learned per-modality vector to ``max width + min_padding``;
    one shared `PerceiverDecoder` decodes all of them; outputs are split per modality and passed
    through that modality's head (if any).

    ``forward(latents, query_index={name: (O_m,) or None}) -> {name: output}``.
    """

    def __init__(
        self,
        latent_dim: int,
        queries: Mapping[str, nn.Module],
        out_dim: int,
        *,
        heads: Mapping[str, nn.Module] | None = None,
        min_padding: int = 2,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
        **decoder_kwargs,
    ) -> None:
        super().__init__()
        if not queries:
            raise ValueError("MultimodalDecoder: give at least one modality's query source")
        self.names = sorted(queries)
        self.queries = nn.ModuleDict(queries)
        self.query_dim = max(q.dim for q in queries.values()) + min_padding
        self.padding = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(self.query_dim - q.dim, device=device, dtype=dtype) * 0.02)
                for name, q in queries.items()
            }
        )
        self.heads = nn.ModuleDict(heads or {})
        unknown = set(self.heads) - set(self.queries)
        if unknown:
            raise ValueError(f"MultimodalDecoder: heads for unknown modalities {sorted(unknown)}")
        self.decoder = PerceiverDecoder(
            latent_dim, self.query_dim, out_dim, chunk_size=chunk_size, device=device, dtype=dtype, **decoder_kwargs
        )

    def build_queries(
        self, batch: int, query_index: Mapping[str, Tensor | None] | None = None, device=None
    ) -> dict[str, Tensor]:
        query_index = dict(query_index or {})
        unknown = set(query_index) - set(self.names)
        if unknown:
            raise ValueError(f"MultimodalDecoder: query_index for unknown modalities {sorted(unknown)}")
        out = {}
        for name in self.names:
            q = self.queries[name](batch, query_index.get(name), device=device)  # (B, O_m, d_m)
            pad = self.padding[name].to(q.dtype).expand(*q.shape[:2], -1)
            out[name] = torch.cat([q, pad], dim=-1)  # (B, O_m, query_dim)
        return out

    def forward(self, latents: Tensor, query_index: Mapping[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        per_modality = self.build_queries(latents.shape[0], query_index, latents.device)
        sizes = [per_modality[name].shape[1] for name in self.names]
        decoded = self.decoder(latents, torch.cat([per_modality[n] for n in self.names], dim=1))
        outputs = {}
        for name, part in zip(self.names, decoded.split(sizes, dim=1)):
            outputs[name] = self.heads[name](part) if name in self.heads else part
        return outputs


class PerceiverMultimodalAutoencoder(nn.Module):
    """Video + audio + label autoencoding (Kinetics): ``forward({name: input}, query_index={name: idx})``.

    Returns ``{name: output}`` per modality, from the modality heads of the `MultimodalDecoder`.
    Decode the video in chunks of ``query_index`` to bound memory, as the official example does.
    """

    def __init__(
        self, preprocessor: nn.Module, encoder: PerceiverEncoder | PerceiverEncoderConfig, decoder: MultimodalDecoder
    ):
        super().__init__()
        self.preprocessor = preprocessor
        self.encoder = build_encoder(encoder, None, None)
        self.decoder = decoder
        check_widths("PerceiverMultimodalAutoencoder", preprocessor, self.encoder, decoder)

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        query_index: Mapping[str, Tensor | None] | None = None,
    ) -> dict[str, Tensor]:
        pre = self.preprocessor(inputs, masks=masks)
        latents = self.encoder(pre.features, pre.mask)
        return self.decoder(latents, query_index)
