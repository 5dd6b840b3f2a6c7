"""The Flamingo Perceiver Resampler (Alayrac et al., 2022): any number of patches -> N latents.

Each layer is a shared `CrossAttentionBlock(kv_includes_queries=True)`: keys/values are
``cat(norm_kv(media), norm_q(latents))`` (context first, then latents), so latents attend to the
media and to themselves. Media items (T) are batch-like: every media item is resampled on its own;
its frames (F) are flattened into one sequence of F*P patches.

Speed (same math as calling each block, checked by a test):
- the media are normalised once, without the norm's affine: ``(x - mean) / std`` is the same in every
  layer, only each layer's weight/bias differ;
- each layer's norm affine is folded into its key/value weights, ``to_kv(x̂·w + b) = x̂ (W·w)ᵀ + W b``,
  so the media projection needs no input gradient (only the weight gradient) when the media are
  frozen features: the biggest matrix product of the backward pass disappears;
- absent media (``media_mask`` False) are not computed at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import CrossAttentionBlock, make_norm, normalize_without_affine

__all__ = ["PerceiverResampler"]


class PerceiverResampler(nn.Module):
    """(B, T, F, P, D), (B, T, P, D) or (B, P, D) media features -> (B, T, num_latents, out_dim).

    Args:
        dim: width of the media features and of the latents.
        depth: number of resampler layers.
        num_latents: output tokens per media item (64 in Flamingo and Idefics2).
        heads, head_dim, num_kv_heads: attention shape (grouped key/value heads if fewer kv heads).
        ff_mult, ff_gated, ff_activation: the MLP (GELU MLP, or SwiGLU with gated=True, 'silu').
        norm, norm_eps: 'layernorm' or 'rmsnorm'.
        max_frames: if set, learned frame embeddings (max_frames, dim) are added per frame F.
        max_media: if set, learned media-time embeddings (max_media, dim) are added per media T.
        num_patch_positions: if set, learned patch position embeddings (P, dim) are added.
        pos_init_std: init std of those embeddings (a small std makes position hard to learn).
        out_dim: if set, a final linear projection to this width (e.g. an LM's hidden size).
        latent_init_std: init std of the learned latents.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        num_latents: int = 64,
        *,
        heads: int = 8,
        head_dim: int = 64,
        num_kv_heads: int | None = None,
        ff_mult: float = 4.0,
        ff_gated: bool = False,
        ff_activation: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float | None = None,
        max_frames: int | None = None,
        max_media: int | None = None,
        num_patch_positions: int | None = None,
        pos_init_std: float = 1.0,
        out_dim: int | None = None,
        latent_init_std: float = 1.0,
        use_sdpa: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in [("dim", dim), ("depth", depth), ("num_latents", num_latents)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerceiverResampler: {name} must be a positive int, got {value!r}")
        for name, value in [
            ("out_dim", out_dim),
            ("max_frames", max_frames),
            ("max_media", max_media),
            ("num_patch_positions", num_patch_positions),
        ]:
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"PerceiverResampler: {name} must be None or a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.depth, self.num_latents = dim, depth, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim, **factory) * latent_init_std)

        def embedding(n: int | None) -> nn.Parameter | None:
            return None if n is None else nn.Parameter(torch.randn(n, dim, **factory) * pos_init_std)

        self.frame_embeddings = embedding(max_frames)
        self.media_time_embeddings = embedding(max_media)
        self.patch_position_embeddings = embedding(num_patch_positions)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(
                dim,
                dim,
                heads=heads,
                head_dim=head_dim,
                num_kv_heads=num_kv_heads,
                ff_mult=ff_mult,
                ff_gated=ff_gated,
                ff_activation=ff_activation,
                ff_bias=False,
                norm=norm,
                norm_eps=norm_eps,
                kv_includes_queries=True,
                qkv_bias=False,
                out_bias=False,
                use_sdpa=use_sdpa,
                **factory,
            )
            for _ in range(depth)
        )
        self.norm = make_norm(norm, dim, norm_eps, **factory)
        self.proj = None if out_dim is None else nn.Linear(dim, out_dim, **factory)
        self.out_dim = dim if out_dim is None else out_dim

    def forward(self, x: Tensor, mask: Tensor | None = None, media_mask: Tensor | None = None) -> Tensor:
        """Resample media features.

        Args:
            x: (B, P, D), (B, T, P, D) or (B, T, F, P, D).
            mask: boolean patch mask, True = real patch; same leading shape as ``x`` without D.
                A media item with every patch masked still gets a defined output (latents only).
            media_mask: (B, T) boolean, True = a real media item; absent media are skipped and
                their outputs are exactly zero.

        Returns:
            (B, T, num_latents, out_dim) (T = 1 for 3-D input).
        """
        x5, mask5 = self._as_5d(x, mask)
        b, t, f, p, d = x5.shape
        pos_media, pos_seq = self._embeddings(b, t, f, p)  # (B*T, 1, D) per media, (1, F*P, D) per patch
        media = x5.reshape(b * t, f * p, d)  # (B*T, F*P, D): each media item resampled alone
        flat_mask = None if mask5 is None else mask5.reshape(b * t, f * p)  # (B*T, F*P)
        if media_mask is None:
            out = self._resample(media, flat_mask, pos_media, pos_seq)
            return out.view(b, t, self.num_latents, self.out_dim)
        if not isinstance(media_mask, Tensor) or media_mask.dtype != torch.bool or media_mask.shape != (b, t):
            got = f"{media_mask.dtype} {tuple(media_mask.shape)}" if isinstance(media_mask, Tensor) else media_mask
            raise ValueError(f"PerceiverResampler: media_mask must be boolean of shape (B, T)=({b}, {t}), got {got}")
        present = media_mask.reshape(b * t).to(media.device)  # (B*T,)
        out = media.new_zeros(b * t, self.num_latents, self.out_dim)
        if bool(present.any()):
            sub_mask = None if flat_mask is None else flat_mask[present]
            sub_pos = None if pos_media is None else pos_media[present]
            out = out.index_put((present,), self._resample(media[present], sub_mask, sub_pos, pos_seq))
        return out.view(b, t, self.num_latents, self.out_dim)

    def _resample(self, media: Tensor, mask: Tensor | None, pos_media: Tensor | None, pos_seq: Tensor | None) -> Tensor:
        """media (M, S, D), mask (M, S) or None, embeddings (M, 1, D) / (1, S, D) -> (M, num_latents, out_dim)."""
        m = media.shape[0]
        if mask is not None:  # padding may hold anything (uninitialised memory: NaN, inf); 0 * NaN would leak
            media = media.masked_fill(~mask[..., None], 0.0)
        pos = [e for e in (pos_media, pos_seq) if e is not None]
        if mask is not None:  # latents always see each other: append their keys as attendable
            mask = torch.cat([mask, mask.new_ones(m, self.num_latents)], dim=-1)  # (M, S + N)
        if self._folds(media, pos_seq):
            return self._resample_folded(media, mask, pos_media, pos_seq)
        learned_pos_only = (
            torch.is_grad_enabled()
            and not media.requires_grad
            and not torch.is_autocast_enabled(media.device.type)  # the closed form runs in the weights' dtype
            and any(e.requires_grad for e in pos)
            and all(type(layer.attn.to_kv) is nn.Linear for layer in self.layers)
        )
        if learned_pos_only:  # frozen media + learned embeddings: no per-patch media gradient needed
            media_kvs = _embedded_media_kv(self.layers, media, pos_media, pos_seq)
        else:
            for e in pos:
                media = media + e
            # Every layer normalises the media the same way; only the affine differs, and is folded.
            media_hat = normalize_without_affine(self.layers[0].norm_kv, media)  # (M, S, D)
        latents = self.latents.expand(m, -1, -1)  # (M, N, D)
        for i, layer in enumerate(self.layers):
            media_kv = layer.attn.split_kv(media_kvs[i]) if learned_pos_only else _media_kv(layer, media_hat)
            latents = _resampler_layer(layer, latents, media_kv, mask)
        return self._output(latents)

    def _output(self, latents: Tensor) -> Tensor:
        out = self.norm(latents)
        return out if self.proj is None else self.proj(out)

    def _folds(self, media: Tensor, pos_seq: Tensor | None) -> bool:
        """Whether the layers attend in the media's own space (`_folded_layer`): only when asked.

        Every layer's ``attn.fold_kv`` must be True (not the automatic None) and the fold possible
        (plain Linear weights, no autocast). Per-patch embeddings that learn on frozen media keep the
        projected path, whose closed-form embedding gradient (`_EmbeddedMediaKV`) is cheaper there.

        Not automatic, although it takes fewer multiply-adds at Flamingo size (dim 1024, 64 latents,
        8 x 128 heads, 257 patches: 0.66x per layer's attention), because on CPU it did not run faster
        and kept twice the memory: forward+backward 6.56 s vs 6.32 s projected, peak 1014 vs 547 MiB
        (one thread, bench_resampler.py). Its products are batched per head and its (H*N, D)
        temporaries are 8x the latents, where the projected path runs one large key/value GEMM.
        """
        if torch.is_autocast_enabled(media.device.type):
            return False
        keys = media.shape[1] + self.num_latents
        if not all(layer.attn.fold_kv is True and layer.attn._folds(self.num_latents, keys) for layer in self.layers):
            return False
        learned_seq = pos_seq is not None and pos_seq.requires_grad and torch.is_grad_enabled()
        return not (learned_seq and not media.requires_grad)

    def _resample_folded(
        self, media: Tensor, mask: Tensor | None, pos_media: Tensor | None, pos_seq: Tensor | None
    ) -> Tensor:
        """`_resample` with every layer attending in the media's space; media (M, S, D), mask (M, S + N)."""
        norm = self.layers[0].norm_kv
        if pos_seq is not None:
            media = media + pos_seq
        token = rstd = None
        learned_media_pos = pos_media is not None and pos_media.requires_grad and torch.is_grad_enabled()
        if learned_media_pos and not media.requires_grad:
            # Frozen media + a learned per-media embedding: its gradient comes in closed form from
            # per-media sums (`_MediaToken`), not from a per-patch gradient of the normalised media.
            media_hat, rstd = _normalize_with_rstd(norm, media + pos_media.detach())
            token = _MediaToken.apply(pos_media, media_hat, rstd, isinstance(norm, nn.RMSNorm))
        else:
            media_hat = normalize_without_affine(norm, media if pos_media is None else media + pos_media)
        latents = self.latents.expand(media.shape[0], -1, -1)  # (M, N, D)
        for layer in self.layers:
            latents = _folded_layer(layer, latents, media_hat, mask, token, rstd)
        return self._output(latents)

    def _embeddings(self, b: int, t: int, f: int, p: int) -> tuple[Tensor | None, Tensor | None]:
        """Per-media (B*T, 1, D) media-time embeddings and per-patch (1, F*P, D) frame + patch embeddings."""
        for table, count, what in [(self.frame_embeddings, f, "frames"), (self.media_time_embeddings, t, "media")]:
            if table is not None and count > table.shape[0]:
                raise ValueError(f"PerceiverResampler: got {count} {what}, the embedding table has {table.shape[0]}")
        if self.patch_position_embeddings is not None and p != self.patch_position_embeddings.shape[0]:
            raise ValueError(
                f"PerceiverResampler: got {p} patches, num_patch_positions is {self.patch_position_embeddings.shape[0]}"
            )
        pos_media = pos_seq = None
        if self.media_time_embeddings is not None:
            pos_media = self.media_time_embeddings[:t].expand(b, t, self.dim).reshape(b * t, 1, self.dim)
        if self.frame_embeddings is not None:
            pos_seq = self.frame_embeddings[:f, None, :].expand(f, p, self.dim)  # (F, P, D)
        if self.patch_position_embeddings is not None:
            patches = self.patch_position_embeddings.expand(f, p, self.dim)  # (F, P, D)
            pos_seq = patches if pos_seq is None else pos_seq + patches
        if pos_seq is not None:
            pos_seq = pos_seq.reshape(1, f * p, self.dim)
        return pos_media, pos_seq

    def _as_5d(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"PerceiverResampler: x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"PerceiverResampler: x must be floating point, got {x.dtype}")
        if x.dim() not in (3, 4, 5) or x.shape[-1] != self.dim:
            raise ValueError(
                f"PerceiverResampler: x must be (B, P, D), (B, T, P, D) or (B, T, F, P, D) with "
                f"D={self.dim}, got {tuple(x.shape)}"
            )
        if x.shape[-2] == 0:
            raise ValueError(f"PerceiverResampler: x has no patches (P=0), got {tuple(x.shape)}")
        if x.device != self.latents.device:
            raise ValueError(f"PerceiverResampler: x is on {x.device} but the weights are on {self.latents.device}")
        if x.dtype != self.latents.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"PerceiverResampler: x has dtype {x.dtype} but the weights are {self.latents.dtype}: cast one, "
                "or run under torch.autocast"
            )
        if mask is not None and (
            not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:-1]
        ):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"PerceiverResampler: mask must be boolean of shape {tuple(x.shape[:-1])} (x's shape without D), got {got}"
            )
        if x.dim() == 3:
            x, mask = x[:, None, None], None if mask is None else mask[:, None, None]  # (B, 1, 1, P, D)
        elif x.dim() == 4:
            x, mask = x[:, :, None], None if mask is None else mask[:, :, None]  # (B, T, 1, P, D)
        return x, mask


def _resampler_layer(
    layer: CrossAttentionBlock, latents: Tensor, media_kv: tuple[Tensor, Tensor], mask: Tensor | None
) -> Tensor:
    """``layer(latents, media, mask)`` for a kv_includes_queries block, given the media's keys/values."""
    q = layer.norm_q(latents)
    latents = latents + layer.attn(q, q, mask, prefix_kv=media_kv)
    return latents + layer.ff(layer.norm_ff(latents))


def _folded_layer(
    layer: CrossAttentionBlock,
    latents: Tensor,
    media_hat: Tensor,
    mask: Tensor | None,
    token: Tensor | None,
    rstd: Tensor | None,
) -> Tensor:
    """One resampler layer attending in the media's own space: latents (M, N, D), media_hat (M, S, D).

    As `Attention.attend_folded`, over two blocks of keys: the media, ``norm_kv(media) = x̂ w + b``
    with the affine taken into the folded queries and into the weighted sum, and the latents,
    ``norm_q(latents)``. Per layer that is 2*H*N*(S+N)*D multiply-adds instead of projecting S+N
    rows to keys and values, and no gradient for the media. ``token`` (see `_MediaToken`) carries
    the per-media embedding's gradient when the media are frozen.
    """
    attn, norm = layer.attn, layer.norm_kv
    m, n, d = latents.shape
    h, hkv, dh, dv = attn.heads, attn.num_kv_heads, attn.head_dim, attn.v_head_dim
    groups, s = h // hkv, media_hat.shape[1]
    y = layer.norm_q(latents)  # (M, N, D): the latents' queries' input and their own keys/values
    q = attn.to_q(y).view(m, n, h, dh).transpose(1, 2).reshape(m, hkv, groups * n, dh) * attn.scale
    w_k, w_v = attn.to_kv.weight.split([hkv * dh, hkv * dv])
    qt = torch.matmul(q, w_k.view(hkv, dh, d)).view(m, h * n, d)  # (M, H*N, D); head i uses kv head i // G
    qm = qt if norm.weight is None else qt * norm.weight
    if token is None:
        s_media = torch.matmul(qm, media_hat.transpose(1, 2))  # (M, H*N, S)
    else:
        s_media = _MediaScores.apply(qm, token, media_hat, rstd)
    shift = getattr(norm, "bias", None)
    if shift is not None:  # q.(W b): the same for every media key, but not for the latents' keys
        s_media = s_media + torch.matmul(qt, shift)[..., None]
    scores = torch.cat([s_media, torch.matmul(qt, y.transpose(1, 2))], dim=-1)  # (M, H*N, S + N)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    p_media, p_latents = scores.softmax(dim=-1).split([s, n], dim=-1)
    if token is None:
        u = torch.matmul(p_media, media_hat)  # (M, H*N, D)
    else:
        u = _MediaWeighted.apply(p_media, token, media_hat, rstd)
    if norm.weight is not None:
        u = u * norm.weight
    if shift is not None:
        u = u + p_media.sum(-1, keepdim=True) * shift
    u = u + torch.matmul(p_latents, y)  # (M, H*N, D): the attention-weighted inputs, in D space
    out = torch.matmul(u.view(m, hkv, groups * n, d), w_v.view(hkv, dv, d).transpose(1, 2))  # (M, Hkv, G*N, dv)
    if attn.to_kv.bias is not None:  # (the keys' bias adds a per-query constant: softmax drops it)
        out = out + attn.to_kv.bias[hkv * dh :].view(hkv, 1, dv)
    out = out.view(m, h, n, dv).transpose(1, 2).reshape(m, n, h * dv)
    latents = latents + attn.to_out(out)
    return latents + layer.ff(layer.norm_ff(latents))


def _normalize_with_rstd(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """x̂ = normalize_without_affine(norm, x) and its reciprocal std (or rms), (..., 1)."""
    if isinstance(norm, nn.RMSNorm):
        eps = torch.finfo(x.dtype).eps if norm.eps is None else norm.eps
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd, rstd
    x_hat, _, rstd = torch.native_layer_norm(x, [x.shape[-1]], None, None, norm.eps)
    return x_hat, rstd


class _MediaToken(torch.autograd.Function):
    """A zero (M, D + S) tensor whose gradient is turned into the per-media embedding's gradient.

    With x̂ = norm(media + e) per media item (rows r), the folded layers use x̂ only in products
    ``qm x̂ᵀ`` and ``p x̂``. Their backward (`_MediaScores`, `_MediaWeighted`) sends, instead of the
    (S, D) gradient g of x̂, what the embedding needs: v = Σ_r g_r/σ_r (D values) and t_r = x̂_r·g_r
    (S values). Then de = v - mean(v) - Σ_r x̂_r t_r/(σ_r D) (no mean term for RMSNorm): the norm's
    Jacobian summed over the item's rows, as in `_EmbeddedMediaKV`.
    """

    @staticmethod
    def forward(ctx, pos_media, media_hat, rstd, rms: bool):
        ctx.save_for_backward(media_hat, rstd)
        ctx.rms = rms
        m, s, d = media_hat.shape
        return media_hat.new_zeros(m, d + s)

    @staticmethod
    def backward(ctx, message):
        media_hat, rstd = ctx.saved_tensors
        d = media_hat.shape[-1]
        v, t = message.split([d, media_hat.shape[1]], dim=-1)  # (M, D), (M, S)
        if not ctx.rms:
            v = v - v.mean(-1, keepdim=True)
        correction = torch.matmul((t * rstd[..., 0])[:, None, :], media_hat)[:, 0] / d  # (M, D)
        return (v - correction)[:, None, :], None, None, None


class _MediaScores(torch.autograd.Function):
    """qm x̂ᵀ (M, H*N, S); backward: qm's gradient and `_MediaToken`'s message instead of x̂'s gradient."""

    @staticmethod
    def forward(ctx, qm, token, media_hat, rstd):
        scores = torch.matmul(qm, media_hat.transpose(1, 2))
        ctx.save_for_backward(qm, media_hat, rstd, scores)
        return scores

    @staticmethod
    def backward(ctx, grad):
        qm, media_hat, rstd, scores = ctx.saved_tensors
        grad_qm = torch.matmul(grad, media_hat) if ctx.needs_input_grad[0] else None  # (M, H*N, D)
        message = None
        if ctx.needs_input_grad[1]:  # g_r = Σ_i grad[i, r] qm[i]
            v = torch.matmul(torch.matmul(grad, rstd).transpose(1, 2), qm)[:, 0]  # (M, D)
            t = (grad * scores).sum(1)  # (M, S): x̂_r·g_r = Σ_i grad[i, r] (qm[i]·x̂_r)
            message = torch.cat([v, t], dim=-1)
        return grad_qm, message, None, None


class _MediaWeighted(torch.autograd.Function):
    """p x̂ (M, H*N, D); backward: p's gradient and `_MediaToken`'s message instead of x̂'s gradient."""

    @staticmethod
    def forward(ctx, p, token, media_hat, rstd):
        ctx.save_for_backward(p, media_hat, rstd)
        return torch.matmul(p, media_hat)

    @staticmethod
    def backward(ctx, grad):
        p, media_hat, rstd = ctx.saved_tensors
        grad_p = torch.matmul(grad, media_hat.transpose(1, 2))  # (M, H*N, S)
        message = None
        if ctx.needs_input_grad[1]:  # g_r = Σ_i p[i, r] grad[i]
            v = torch.matmul(torch.matmul(p, rstd).transpose(1, 2), grad)[:, 0]  # (M, D)
            t = (p * grad_p).sum(1)  # (M, S): x̂_r·g_r = Σ_i p[i, r] (grad[i]·x̂_r)
            message = torch.cat([v, t], dim=-1)
        return grad_p if ctx.needs_input_grad[0] else None, message, None, None


def _folded_kv_weights(layer: CrossAttentionBlock) -> tuple[Tensor, Tensor | None]:
    """``to_kv`` with ``norm_kv``'s affine folded in: to_kv(x̂·w + b) = x̂ (W·w)ᵀ + (W b + c)."""
    norm, proj = layer.norm_kv, layer.attn.to_kv
    weight = proj.weight if norm.weight is None else proj.weight * norm.weight  # (Hkv*(dh+dv), D)
    bias = proj.bias
    norm_bias = getattr(norm, "bias", None)
    if norm_bias is not None:
        shift = F.linear(norm_bias, proj.weight)  # W b: (Hkv*(dh+dv),)
        bias = shift if bias is None else bias + shift
    return weight, bias


def _media_kv(layer: CrossAttentionBlock, media_hat: Tensor) -> tuple[Tensor, Tensor]:
    """Keys/values of ``norm_kv(media)`` with the norm's affine folded into ``to_kv``.

    ``to_kv(x̂·w + b) = x̂ (W·w)ᵀ + (W b + c)``: the product's input x̂ carries no gradient when the
    media are frozen, so autograd computes only the weight gradient of this, the largest, product.
    """
    norm, proj = layer.norm_kv, layer.attn.to_kv
    if type(proj) is not nn.Linear:  # e.g. an int8 dynamically quantized Linear: apply the affine, then it
        return layer.attn.split_kv(proj(_apply_affine(norm, media_hat)))
    return layer.attn.split_kv(F.linear(media_hat, *_folded_kv_weights(layer)))


def _embedded_media_kv(layers, media: Tensor, pos_media: Tensor | None, pos_seq: Tensor | None) -> tuple[Tensor, ...]:
    """Every layer's media keys/values (M, S, Hkv*(dh+dv)) from frozen media plus learned embeddings."""
    norm = layers[0].norm_kv
    params = [p for layer in layers for p in _folded_kv_weights(layer)]
    return _EmbeddedMediaKV.apply(media, pos_media, pos_seq, isinstance(norm, nn.RMSNorm), norm.eps, *params)


class _EmbeddedMediaKV(torch.autograd.Function):
    """kv_l = norm(media + pos_media + pos_seq) W_lᵀ + b_l for every layer l (norm affines folded in).

    Autograd would compute the media's per-patch gradient, a (rows x out x D) product per layer, only to
    sum it into a few embedding rows. The norm's Jacobian gives those sums in closed form: per row
    dx = (1/σ)(u - mean(u) - x̂ (x̂·u)/D) (no mean term for RMSNorm) with u = Σ_l W_lᵀ g_l, so a group's
    sum needs only Σ g_l/σ over the group (times W_l: a group-sized product) and x̂·u = Σ_l g_l·(kv_l - b_l).
    """

    @staticmethod
    def forward(ctx, media, pos_media, pos_seq, rms: bool, eps, *params):
        x = media
        for e in (pos_media, pos_seq):
            if e is not None:
                x = x + e
        if rms:
            eps = torch.finfo(x.dtype).eps if eps is None else eps
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (M, S, 1)
            x_hat = x * rstd
        else:
            x_hat, _, rstd = torch.native_layer_norm(x, [x.shape[-1]], None, None, eps)
        outs = tuple(F.linear(x_hat, w, b) for w, b in zip(params[0::2], params[1::2]))
        ctx.rms, ctx.num_layers = rms, len(outs)
        ctx.shapes = (pos_media is not None, pos_seq is not None)
        ctx.save_for_backward(x_hat, rstd, *params, *outs)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x_hat, rstd, *rest = ctx.saved_tensors
        params, outs = rest[: 2 * ctx.num_layers], rest[2 * ctx.num_layers :]
        has_media, has_seq = ctx.shapes
        need_pos = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        rows = x_hat.reshape(-1, x_hat.shape[-1])  # (M*S, D)
        param_grads, u_media, u_seq, dot = [], 0, 0, 0
        for i, (g, out) in enumerate(zip(grads, outs)):
            w, b = params[2 * i], params[2 * i + 1]
            if g is None:
                param_grads += [None, None]
                continue
            gw = g.reshape(-1, g.shape[-1]).T @ rows if ctx.needs_input_grad[5 + 2 * i] else None  # (out, D)
            gb = g.sum((0, 1)) if b is not None and ctx.needs_input_grad[6 + 2 * i] else None
            param_grads += [gw, gb]
            if need_pos:
                scaled = g * rstd  # (M, S, out)
                if has_media:
                    u_media = u_media + scaled.sum(1) @ w  # (M, D)
                if has_seq:
                    u_seq = u_seq + scaled.sum(0) @ w  # (S, D)
                dot = dot + (g * (out if b is None else out - b)).sum(-1, keepdim=True)  # (M, S, 1): x̂·u
        grad_media = grad_seq = None
        if need_pos:
            c = x_hat * (dot * rstd / x_hat.shape[-1])  # (M, S, D): x̂ (x̂·u) / (σ D)

            def group_sum(u: Tensor, dim: int) -> Tensor:
                if not ctx.rms:
                    u = u - u.mean(-1, keepdim=True)
                return u - c.sum(dim)

            grad_media = group_sum(u_media, 1)[:, None, :] if has_media else None  # (M, 1, D)
            grad_seq = group_sum(u_seq, 0)[None] if has_seq else None  # (1, S, D)
        return (None, grad_media, grad_seq, None, None, *param_grads)


def _apply_affine(norm: nn.Module, x_hat: Tensor) -> Tensor:
    if norm.weight is not None:
        x_hat = x_hat * norm.weight
    return x_hat if getattr(norm, "bias", None) is None else x_hat + norm.bias
