"""Perceiver (Jaegle et al., ICML 2021): a learned latent array reads the inputs by cross-attention.

The encoder runs ``num_cross_attends`` times [cross-attend -> ``num_blocks`` x latent block], where a
latent block is ``num_self_attends_per_block`` self-attention layers. The weight-sharing schedule is
configurable; the paper's ImageNet model shares all cross-attends but the first and all latent blocks.
Hugging Face's (and DeepMind's Perceiver IO) encoder is the special case ``num_cross_attends=1``.

Everything is built from the shared `CrossAttentionBlock` / `SelfAttentionBlock`. The cross-attends
attend in the inputs' own space (`resampler.nn.folded`) when that takes fewer multiply-adds per input,
which is decided once, when the encoder is built (``fold_cross_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.attention import AttentionSpec
from ..nn.blocks import CrossAttentionBlock, FeedForwardSpec, NormSpec, SelfAttentionBlock
from ..nn.folded import fold_pays
from .decoders import ClassificationDecoder, ProjectionDecoder

__all__ = ["PerceiverEncoderConfig", "PerceiverEncoder", "PerceiverClassifier", "check_inputs"]

_CROSS_SHARING = ("all_but_first", "none", "all")


@dataclass
class PerceiverEncoderConfig:
    """Shape of a Perceiver encoder.

    Widths ``*_qk_dim`` / ``*_v_dim`` are totals over heads (the official ``qk_channels`` /
    ``v_channels``); ``None`` means: cross-attend qk = ``input_dim`` (DeepMind's
    ``cross_attention_shape_for_attention='kv'``) or ``latent_dim`` (``cross_qk_from='q'``);
    self-attend qk = ``latent_dim``; v = qk.

    Args:
        input_dim: channels C of the inputs (B, M, C).
        num_latents, latent_dim: the latent array (N, D).
        num_cross_attends: cross-attends, each followed by ``num_blocks`` applications of a latent block.
        num_blocks: applications of the latent block after each cross-attend (weights shared across them).
        num_self_attends_per_block: self-attention layers per latent block.
        cross_heads, self_heads: attention heads.
        cross_widening, self_widening: MLP hidden width = widening x width.
        cross_sharing: 'all_but_first' (paper), 'none' or 'all' cross-attend weight sharing.
        share_latent_blocks: one latent block for every cross-attend (paper) or one per cross-attend.
        query_residual: residual around the cross-attention (off when queries and outputs differ in kind).
        qkv_bias: biases on the q/k/v projections (the official code has them).
        activation: MLP activation ('gelu' is exact GELU as in the official code).
        norm_eps: LayerNorm epsilon (1e-5 in the Hugging Face port).
        dropout: attention-probability and MLP dropout.
        latent_init_std: std of the latent array's normal init.
        use_sdpa: the kernel policy, or the plain reference kernel for checking (see `AttentionSpec`).
        fold_cross_attention: cross-attend in the inputs' own space (`FoldedAttention`: same weights,
            same function, no projected keys/values); None: when that takes fewer multiply-adds per
            input (long narrow inputs, as pixels or audio samples) and ``use_sdpa`` is on.
    """

    input_dim: int
    num_latents: int = 256
    latent_dim: int = 512
    num_cross_attends: int = 1
    num_blocks: int = 1
    num_self_attends_per_block: int = 6
    cross_heads: int = 1
    self_heads: int = 8
    cross_qk_dim: int | None = None
    cross_v_dim: int | None = None
    cross_qk_from: str = "kv"
    self_qk_dim: int | None = None
    self_v_dim: int | None = None
    cross_widening: float = 1.0
    self_widening: float = 1.0
    cross_sharing: str = "all_but_first"
    share_latent_blocks: bool = True
    query_residual: bool = True
    qkv_bias: bool = True
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    latent_init_std: float = 0.02
    use_sdpa: bool = True
    fold_cross_attention: bool | None = None

    def __post_init__(self) -> None:
        for name in ("input_dim", "num_latents", "latent_dim", "num_cross_attends", "num_blocks", "cross_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerceiverEncoderConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_self_attends_per_block, int) or self.num_self_attends_per_block < 0:
            raise ValueError(
                f"PerceiverEncoderConfig.num_self_attends_per_block must be an int >= 0, "
                f"got {self.num_self_attends_per_block!r}"
            )
        if self.cross_sharing not in _CROSS_SHARING:
            raise ValueError(
                f"PerceiverEncoderConfig.cross_sharing must be one of {_CROSS_SHARING}, got {self.cross_sharing!r}"
            )
        if self.cross_qk_from not in ("q", "kv"):
            raise ValueError(f"PerceiverEncoderConfig.cross_qk_from must be 'q' or 'kv', got {self.cross_qk_from!r}")
        _check_split("cross_qk_dim", self.cross_qk_dim_, self.cross_heads)
        _check_split("cross_v_dim", self.cross_v_dim_, self.cross_heads)
        if self.num_self_attends_per_block:
            _check_split("self_qk_dim", self.self_qk_dim_, self.self_heads)
            _check_split("self_v_dim", self.self_v_dim_, self.self_heads)

    # Resolved widths (the trailing underscore marks derived values).
    @property
    def cross_qk_dim_(self) -> int:
        if self.cross_qk_dim is not None:
            return self.cross_qk_dim
        return self.input_dim if self.cross_qk_from == "kv" else self.latent_dim

    @property
    def cross_v_dim_(self) -> int:
        return self.cross_qk_dim_ if self.cross_v_dim is None else self.cross_v_dim

    @property
    def self_qk_dim_(self) -> int:
        return self.latent_dim if self.self_qk_dim is None else self.self_qk_dim

    @property
    def self_v_dim_(self) -> int:
        return self.self_qk_dim_ if self.self_v_dim is None else self.self_v_dim

    def cross_attention(self) -> AttentionSpec:
        h = self.cross_heads
        return AttentionSpec(
            heads=h,
            head_dim=self.cross_qk_dim_ // h,
            v_head_dim=self.cross_v_dim_ // h,
            qkv_bias=self.qkv_bias,
            dropout=self.dropout,
            use_sdpa=self.use_sdpa,
        )

    def self_attention(self) -> AttentionSpec:
        h = self.self_heads
        return AttentionSpec(
            heads=h,
            head_dim=self.self_qk_dim_ // h,
            v_head_dim=self.self_v_dim_ // h,
            qkv_bias=self.qkv_bias,
            dropout=self.dropout,
            use_sdpa=self.use_sdpa,
        )

    def feed_forward(self, widening: float) -> FeedForwardSpec:
        return FeedForwardSpec(mult=widening, activation=self.activation, dropout=self.dropout)

    @property
    def norm(self) -> NormSpec:
        return NormSpec("layernorm", self.norm_eps)

    @property
    def folds_cross_attention(self) -> bool:
        """Derived: whether the cross-attends attend in the inputs' space (see ``fold_cross_attention``)."""
        if self.fold_cross_attention is not None:
            return self.fold_cross_attention
        return self.use_sdpa and fold_pays(self.cross_attention(), self.num_latents, self.input_dim)


def _check_split(name: str, total: int, heads: int) -> None:
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads for {name} must be a positive int, got {heads!r}")
    if not isinstance(total, int) or total <= 0 or total % heads:
        raise ValueError(f"PerceiverEncoderConfig.{name}={total!r} must be a positive multiple of heads={heads}")


def check_inputs(name: str, inputs: Tensor, dim: int, mask: Tensor | None) -> None:
    """Raise a ValueError naming the expected shapes of ``inputs`` (B, M, dim) and ``mask`` (B, M)."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 3 or inputs.shape[-1] != dim:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"{name}: inputs must have shape (B, M, C={dim}), got {shape}")
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: mask must be a boolean tensor (True = real input), got {getattr(mask, 'dtype', mask)}"
        )
    if tuple(mask.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"{name}: mask must have shape (B, M)={tuple(inputs.shape[:2])}, got {tuple(mask.shape)}")


class PerceiverEncoder(nn.Module):
    """inputs (B, M, C) [+ mask (B, M), True = real input] -> latents (B, N, D).

    Inputs whose mask is False are ignored exactly; a sample with no real input at all gets zero
    cross-attention outputs (our convention; Hugging Face would average over the padding).
    """

    def __init__(self, config: PerceiverEncoderConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.latent_dim, **factory) * c.latent_init_std)

        n_cross = {"all_but_first": min(2, c.num_cross_attends), "none": c.num_cross_attends, "all": 1}[c.cross_sharing]
        self.cross_attends = nn.ModuleList(self._cross_block(c, factory) for _ in range(n_cross))
        n_latent = 1 if c.share_latent_blocks else c.num_cross_attends
        self.latent_blocks = nn.ModuleList(
            nn.ModuleList(self._self_block(c, factory) for _ in range(c.num_self_attends_per_block))
            for _ in range(n_latent)
        )
        # Which unique module runs at each of the num_cross_attends steps.
        self.cross_schedule = [min(i, n_cross - 1) for i in range(c.num_cross_attends)]
        self.latent_schedule = [min(i, n_latent - 1) for i in range(c.num_cross_attends)]

    @staticmethod
    def _cross_block(c: PerceiverEncoderConfig, factory: dict) -> CrossAttentionBlock:
        return CrossAttentionBlock(
            c.latent_dim,
            c.input_dim,
            c.cross_attention(),
            c.feed_forward(c.cross_widening),
            c.norm,
            query_residual=c.query_residual,
            fold=c.folds_cross_attention,
            **factory,
        )

    @staticmethod
    def _self_block(c: PerceiverEncoderConfig, factory: dict) -> SelfAttentionBlock:
        return SelfAttentionBlock(c.latent_dim, c.self_attention(), c.feed_forward(c.self_widening), c.norm, **factory)

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        check_inputs("PerceiverEncoder", inputs, self.config.input_dim, mask)
        z = self.latents.expand(inputs.shape[0], -1, -1)  # (B, N, D)
        for cross_idx, latent_idx in zip(self.cross_schedule, self.latent_schedule):
            z = self.cross_attends[cross_idx](z, inputs, mask)
            for _ in range(self.config.num_blocks):
                for layer in self.latent_blocks[latent_idx]:
                    z = layer(z)
        return z


class PerceiverClassifier(nn.Module):
    """Perceiver classifier: ``forward(inputs (B, M, C), mask=None) -> (B, num_classes)``.

    ``head='query'`` (Perceiver IO's classification decoder, the default): one learned query of width
    ``latent_dim`` cross-attends to the latents (``decoder_heads`` heads, query residual, widening 1).
    ``head='mean'`` (Perceiver v1 paper): average the latents, then a linear layer.
    """

    def __init__(
        self,
        config: PerceiverEncoderConfig,
        num_classes: int,
        *,
        head: str = "query",
        decoder_heads: int = 1,
        decoder_widening: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if head not in ("query", "mean"):
            raise ValueError(f"PerceiverClassifier: head must be 'query' or 'mean', got {head!r}")
        self.encoder = PerceiverEncoder(config, device=device, dtype=dtype)
        if head == "mean":
            self.decoder = ProjectionDecoder(config.latent_dim, num_classes, device=device, dtype=dtype)
            return
        self.decoder = ClassificationDecoder(
            config.latent_dim,
            num_classes,
            attn=AttentionSpec(heads=decoder_heads, qkv_bias=config.qkv_bias, use_sdpa=config.use_sdpa),
            ff=FeedForwardSpec(mult=decoder_widening),
            norm=config.norm,
            device=device,
            dtype=dtype,
        )

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.decoder(self.encoder(inputs, mask))
