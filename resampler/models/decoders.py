"""Perceiver IO decoding: output queries cross-attend to the latents.

`PerceiverDecoder` is one `CrossAttentionBlock` (queries -> latents) plus an optional final linear
projection. Queries come from a query source (`LearnedQueries`, `FourierQueries`) or from the caller
(e.g. the input features, for optical flow). Any subset of queries can be decoded (``query_index``),
and very many queries are decoded ``chunk_size`` at a time so memory stays bounded: every query is
independent of the others in this block, so chunking changes nothing but peak memory.

Task heads built on it: `ClassificationDecoder`, `EmbeddingDecoder` (masked-LM logits tied to the
byte embedding), `FlowDecoder`; the multimodal one is in `multimodal.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn.attention import AttentionSpec
from ..nn.blocks import CrossAttentionBlock, FeedForwardSpec, NormSpec
from ..nn.position import fourier_feature_dim, fourier_features, linear_positions

__all__ = [
    "LearnedQueries",
    "FourierQueries",
    "PerceiverDecoder",
    "ClassificationDecoder",
    "ProjectionDecoder",
    "EmbeddingDecoder",
    "FlowDecoder",
    "AudioPatchHead",
    "ClassHead",
]


def _check_index(name: str, index: Tensor | None, size: int) -> None:
    if index is None:
        return
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        shape = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"{name}: query_index must be a 1-D integer tensor (O,), got {shape}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(
            f"{name}: query_index values must lie in [0, {size}), got [{int(index.min())}, {int(index.max())}]"
        )


class LearnedQueries(nn.Module):
    """A trainable (O, dim) query table: ``forward(batch_size, index=None) -> (B, O or len(index), dim)``."""

    def __init__(self, num_queries: int, dim: int, *, init_std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        if num_queries <= 0 or dim <= 0:
            raise ValueError(f"LearnedQueries: sizes must be positive, got ({num_queries}, {dim})")
        self.num_queries, self.dim = num_queries, dim
        self.weight = nn.Parameter(torch.randn(num_queries, dim, device=device, dtype=dtype) * init_std)

    def forward(
        self, batch_size: int, index: Tensor | None = None, *, start: int = 0, stop: int | None = None, device=None
    ) -> Tensor:
        """Queries ``index[start:stop]`` (or rows ``start:stop`` when ``index`` is None) -> (B, O, dim)."""
        _check_index("LearnedQueries", index, self.num_queries)
        if index is None:
            table = self.weight[start:stop]
        else:
            table = self.weight[index[start:stop].to(self.weight.device)]
        return table.expand(batch_size, *table.shape)


class FourierQueries(nn.Module):
    """Fourier features of the positions of an output grid ``index_dims`` (optionally projected).

    ``forward(batch_size, index=None, start=0, stop=None)``: queries ``start:stop`` of all prod(index_dims)
    grid points, or of the flat indices ``index`` (subsampled decoding); features are computed for
    those queries only. Positions follow ``linear_positions`` (``i -> -1 + 2 i / (n - 1)``).
    ``subsample_positions='deepmind'`` instead maps a *subsampled* index to ``-1 + 2 i / n``, as
    DeepMind's (and Hugging Face's) decoder does on its subsampling path; the converter sets it for
    checkpoint parity. Chunking (``start``/``stop``) never changes the positions.
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        num_bands: int,
        *,
        max_resolution: Sequence[int] | None = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        project_dim: int | None = None,
        subsample_positions: str = "grid",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.index_dims = tuple(int(n) for n in index_dims)
        self.max_resolution = tuple(max_resolution if max_resolution is not None else self.index_dims)
        if len(self.max_resolution) != len(self.index_dims):
            raise ValueError(f"FourierQueries: max_resolution {self.max_resolution} and index_dims {self.index_dims}")
        if subsample_positions not in ("grid", "deepmind"):
            raise ValueError(
                f"FourierQueries: subsample_positions must be 'grid' or 'deepmind', got {subsample_positions!r}"
            )
        self.num_bands, self.concat_pos, self.sine_only = num_bands, concat_pos, sine_only
        self.subsample_positions = subsample_positions
        self.num_queries = math.prod(self.index_dims)
        self.feature_dim = fourier_feature_dim(len(self.index_dims), num_bands, concat_pos, sine_only)
        self.projection = None
        if project_dim is not None:
            self.projection = nn.Linear(self.feature_dim, project_dim, device=device, dtype=dtype)
        self.dim = self.feature_dim if project_dim is None else project_dim

    def positions(self, index: Tensor | None, device=None, start: int = 0, stop: int | None = None) -> Tensor:
        """(O, d) positions in [-1, 1] of grid points ``start:stop``, or of ``index[start:stop]``."""
        d = len(self.index_dims)
        if index is None:  # the grid itself (d floats per point, cheap even for every pixel of a frame)
            return linear_positions(self.index_dims, device=device).reshape(-1, d)[start:stop]
        index = index[start:stop].to(device)
        coords = torch.stack(torch.unravel_index(index, self.index_dims), dim=-1).float()  # (O, d)
        dims = torch.tensor(self.index_dims, device=device, dtype=torch.float32)
        if self.subsample_positions == "deepmind":
            return -1 + 2 * coords / dims
        return torch.where(dims > 1, -1 + 2 * coords / (dims - 1).clamp(min=1), torch.full_like(coords, -1.0))

    def forward(
        self, batch_size: int, index: Tensor | None = None, *, start: int = 0, stop: int | None = None, device=None
    ) -> Tensor:
        _check_index("FourierQueries", index, self.num_queries)
        if self.projection is not None:
            device = self.projection.weight.device
        pos = self.positions(index, device, start, stop)
        feats = fourier_features(
            pos, self.num_bands, self.max_resolution, concat_pos=self.concat_pos, sine_only=self.sine_only
        )  # (O, F)
        if self.projection is not None:
            feats = self.projection(feats)
        return feats.expand(batch_size, *feats.shape)


class PerceiverDecoder(nn.Module):
    """Output queries (B, O, query_dim) cross-attend to latents (B, N, latent_dim) -> (B, O, out_dim).

    Args:
        latent_dim: width of the latents.
        query_dim: width of the queries.
        out_dim: width of a final linear projection; None keeps the block's output (query_dim).
        queries: a query source (`LearnedQueries`, `FourierQueries`); None means the caller passes
            ``queries`` to ``forward``.
        attn: the attention (default: 1 head, q/k/v biases); ``head_dim`` None means ``latent_dim /
            heads`` (DeepMind's ``cross_attention_shape_for_attention='kv'``).
        ff: the MLP (default: widening 1, GELU). norm: the block's norms.
        query_residual: add the queries back (off by default: outputs and queries differ in kind).
        chunk_size: decode at most this many queries at a time (bounded memory for e.g. every pixel
            of a 368x496 flow field); the result is identical to unchunked decoding.
    """

    def __init__(
        self,
        latent_dim: int,
        query_dim: int,
        out_dim: int | None = None,
        *,
        queries: nn.Module | None = None,
        attn: AttentionSpec | None = None,
        ff: FeedForwardSpec | None = None,
        norm: NormSpec | None = None,
        query_residual: bool = False,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        attn = AttentionSpec(heads=1, qkv_bias=True) if attn is None else attn
        attn = attn.resolved(latent_dim, "PerceiverDecoder", "latent_dim")
        ff = FeedForwardSpec(mult=1.0) if ff is None else ff
        if queries is not None and getattr(queries, "dim", query_dim) != query_dim:
            raise ValueError(f"PerceiverDecoder: the query source gives width {queries.dim}, expected {query_dim}")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"PerceiverDecoder: chunk_size must be positive, got {chunk_size}")
        self.latent_dim, self.query_dim = latent_dim, query_dim
        self.out_dim = query_dim if out_dim is None else out_dim
        self.chunk_size = chunk_size
        self.queries = queries
        self.block = CrossAttentionBlock(
            query_dim, latent_dim, attn, ff, norm, query_residual=query_residual, device=device, dtype=dtype
        )
        self.proj = None if out_dim is None else nn.Linear(query_dim, out_dim, device=device, dtype=dtype)

    def forward(self, latents: Tensor, queries: Tensor | None = None, query_index: Tensor | None = None) -> Tensor:
        if not isinstance(latents, Tensor) or latents.dim() != 3 or latents.shape[-1] != self.latent_dim:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"PerceiverDecoder: latents must have shape (B, N, {self.latent_dim}), got {shape}")
        batch = latents.shape[0]
        if queries is not None:
            if queries.dim() != 3 or queries.shape[0] != batch or queries.shape[-1] != self.query_dim:
                raise ValueError(
                    f"PerceiverDecoder: queries must have shape (B={batch}, O, {self.query_dim}), got {tuple(queries.shape)}"
                )
            _check_index("PerceiverDecoder", query_index, queries.shape[1])
            num = queries.shape[1] if query_index is None else query_index.numel()
        elif self.queries is None:
            raise ValueError("PerceiverDecoder: this decoder has no query source, pass queries=(B, O, query_dim)")
        else:
            _check_index("PerceiverDecoder", query_index, self.queries.num_queries)
            num = self.queries.num_queries if query_index is None else query_index.numel()

        chunk = self.chunk_size or max(num, 1)
        outs = []
        for start in range(0, num, chunk):
            stop = min(start + chunk, num)
            q = self._chunk_queries(batch, queries, query_index, start, stop, latents.device)
            out = self.block(q.to(latents.dtype), latents)  # (B, O_chunk, query_dim)
            outs.append(out if self.proj is None else self.proj(out))
        if not outs:
            return latents.new_zeros(batch, 0, self.out_dim)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _chunk_queries(
        self, batch: int, queries: Tensor | None, index: Tensor | None, start: int, stop: int, device
    ) -> Tensor:
        """Queries number ``start:stop`` of the ones to decode (all, or ``index``)."""
        if queries is None:
            return self.queries(batch, index, start=start, stop=stop, device=device)
        if index is None:
            return queries[:, start:stop]
        return queries[:, index[start:stop].to(queries.device)]


class ClassificationDecoder(nn.Module):
    """One learned query -> logits: ``forward(latents (B, N, D)) -> (B, num_classes)``.

    ``attn``, ``ff``, ``norm``: as `PerceiverDecoder`; the query residual is on.
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        *,
        query_dim: int | None = None,
        attn: AttentionSpec | None = None,
        ff: FeedForwardSpec | None = None,
        norm: NormSpec | None = None,
        query_residual: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"ClassificationDecoder: num_classes must be a positive int, got {num_classes!r}")
        query_dim = latent_dim if query_dim is None else query_dim
        self.decoder = PerceiverDecoder(
            latent_dim,
            query_dim,
            num_classes,
            queries=LearnedQueries(1, query_dim, device=device, dtype=dtype),
            attn=attn,
            ff=ff,
            norm=norm,
            query_residual=query_residual,
            device=device,
            dtype=dtype,
        )

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)[:, 0]  # (B, num_classes)


class ProjectionDecoder(nn.Module):
    """Perceiver v1's classifier: average the latents, then a linear layer -> (B, num_classes)."""

    def __init__(self, latent_dim: int, num_classes: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.proj = nn.Linear(latent_dim, num_classes, device=device, dtype=dtype)

    def forward(self, latents: Tensor) -> Tensor:
        if latents.dim() != 3 or latents.shape[-1] != self.latent_dim:
            raise ValueError(
                f"ProjectionDecoder: latents must be (B, N, {self.latent_dim}), got {tuple(latents.shape)}"
            )
        return self.proj(latents.mean(dim=1))


class EmbeddingDecoder(nn.Module):
    """Masked-LM logits tied to the input embedding: ``h @ embedding.T + bias`` -> (B, O, vocab)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: tied, not registered twice in state_dict
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings, device=embedding.weight.device))

    def forward(self, hidden: Tensor) -> Tensor:
        weight = self.embedding[0].weight
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"EmbeddingDecoder: hidden must have width {weight.shape[1]}, got {tuple(hidden.shape)}")
        return hidden @ weight.T + self.bias


class FlowDecoder(nn.Module):
    """Optical flow: every pixel's input feature is its query -> (B, H, W, 2) / rescale_factor.

    ``forward(latents, queries (B, H*W, C), image_shape=(H, W), query_index=None)``; with
    ``query_index`` only those pixels are decoded and the result is (B, O, 2). Pixels are decoded
    ``chunk_size`` at a time (exact: every query is independent; peak memory is bounded by the chunk).
    """

    def __init__(
        self,
        latent_dim: int,
        query_dim: int,
        *,
        out_channels: int = 2,
        rescale_factor: float = 100.0,
        chunk_size: int | None = 16384,
        **decoder_kwargs,
    ) -> None:
        super().__init__()
        self.rescale_factor = rescale_factor
        self.decoder = PerceiverDecoder(latent_dim, query_dim, out_channels, chunk_size=chunk_size, **decoder_kwargs)

    def forward(
        self, latents: Tensor, queries: Tensor, image_shape: Sequence[int], query_index: Tensor | None = None
    ) -> Tensor:
        flow = self.decoder(latents, queries, query_index) / self.rescale_factor  # (B, O, 2)
        if query_index is not None:
            return flow
        if math.prod(image_shape) != flow.shape[1]:
            raise ValueError(f"FlowDecoder: image_shape {tuple(image_shape)} does not hold {flow.shape[1]} queries")
        return flow.reshape(flow.shape[0], *image_shape, flow.shape[-1])  # (B, H, W, 2)


class AudioPatchHead(nn.Module):
    """(B, O, C) -> (B, O * samples_per_patch): each audio query predicts one patch of samples."""

    def __init__(self, in_dim: int, samples_per_patch: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, samples_per_patch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).reshape(x.shape[0], -1)


class ClassHead(nn.Module):
    """(B, 1, C) -> (B, num_classes): the label query's logits."""

    def __init__(self, in_dim: int, num_classes: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)[:, 0]
