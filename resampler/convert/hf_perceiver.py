"""Hugging Face ``transformers`` Perceiver -> our modules, with identical outputs (fp32, 1e-5).

``from_hf_perceiver(hf_model)`` reads shapes from the HF modules (not only the config), builds the
matching model from `resampler` blocks and copies every weight. HF uses separate q/k/v Linear layers;
our `Attention.to_kv` holds [keys; values] rows, so key and value weights are concatenated.

Supported, and what the converted model is called with:

| HF model                                       | ours                              | call                          |
|------------------------------------------------|-----------------------------------|-------------------------------|
| PerceiverModel, no preprocessor, Classification| PerceiverIO + ClassificationDecoder| ``m(inputs, mask)``           |
|   or Projection decoder (mean + linear)        | PerceiverIO + ProjectionDecoder   | ``m(inputs, mask)``           |
|   or Basic decoder (trainable queries)         | PerceiverIO + PerceiverDecoder    | ``m(inputs, mask)``           |
| PerceiverForMaskedLM                           | PerceiverMaskedLM                 | ``m(input_ids, mask)``        |
| PerceiverForSequenceClassification             | PerceiverIO (text preprocessor)   | ``m(input_ids, mask)``        |
| PerceiverForImageClassification{Learned,Fourier,ConvProcessing} | PerceiverIO (image preprocessor) | ``m(pixel_values)`` |
| PerceiverForOpticalFlow                        | PerceiverOpticalFlow              | ``m(frames)``                 |
| PerceiverForMultimodalAutoencoding             | PerceiverMultimodalAutoencoder    | ``m(inputs, query_index=...)``|

The HF model must be in eval mode for parity (dropout, BatchNorm). Masks: HF's mask is additive on
the encoder cross-attention only; ours is boolean (True = real) and gives the same result for every
sample with at least one real input. A sample whose inputs are all padding gets zero cross-attention
outputs here, whereas HF averages over the padding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.decoders import (
    AudioPatchHead,
    ClassHead,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    LearnedQueries,
    PerceiverDecoder,
    ProjectionDecoder,
)
from ..models.multimodal import (
    MultimodalDecoder,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    PerceiverMultimodalAutoencoder,
)
from ..models.perceiver import PerceiverEncoder, PerceiverEncoderConfig
from ..models.perceiver_io import PerceiverIO, PerceiverMaskedLM, PerceiverOpticalFlow
from ..nn.attention import AttentionSpec
from ..nn.blocks import CrossAttentionBlock, FeedForwardSpec, NormSpec, SelfAttentionBlock
from .hf_preprocessors import (
    convert_audio_preprocessor,
    convert_image_preprocessor,
    convert_text_preprocessor,
    copy_linear,
)

__all__ = ["from_hf_perceiver"]

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh"}


def from_hf_perceiver(hf_model: nn.Module) -> nn.Module:
    """Convert a ``transformers`` Perceiver model (any of the task models, or a ``PerceiverModel``
    with no input preprocessor and a classification / basic decoder) into ours, in eval mode."""
    name = type(hf_model).__name__
    converters = {
        "PerceiverModel": _convert_base,
        "PerceiverForMaskedLM": _convert_masked_lm,
        "PerceiverForSequenceClassification": _convert_sequence_classification,
        "PerceiverForImageClassificationLearned": _convert_image_classification,
        "PerceiverForImageClassificationFourier": _convert_image_classification,
        "PerceiverForImageClassificationConvProcessing": _convert_image_classification,
        "PerceiverForOpticalFlow": _convert_optical_flow,
        "PerceiverForMultimodalAutoencoding": _convert_multimodal,
    }
    if name not in converters:
        raise ValueError(f"from_hf_perceiver: unsupported model {name}; supported: {sorted(converters)}")
    hf_dtype = next(hf_model.parameters()).dtype
    with torch.no_grad():
        model = converters[name](hf_model)
    return model.to(hf_dtype).eval()


# ---------------------------------------------------------------------------------------- helpers


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)
    dst.eps = src.eps


def _copy_attention(attn, hf_self, hf_output) -> None:
    """HF PerceiverSelfAttention (query/key/value) + PerceiverSelfOutput -> our Attention."""
    copy_linear(attn.to_q, hf_self.query)
    attn.to_kv.weight.copy_(torch.cat([hf_self.key.weight, hf_self.value.weight], dim=0))
    attn.to_kv.bias.copy_(torch.cat([hf_self.key.bias, hf_self.value.bias], dim=0))
    copy_linear(attn.to_out, hf_output.dense)


def _copy_layer(block: CrossAttentionBlock | SelfAttentionBlock, hf_layer) -> None:
    hf_self = hf_layer.attention.self
    if isinstance(block, CrossAttentionBlock):
        _copy_norm(block.norm_q, hf_self.layernorm1)
        _copy_norm(block.norm_kv, hf_self.layernorm2)
    else:
        _copy_norm(block.norm_attn, hf_self.layernorm1)
    _copy_attention(block.attn, hf_self, hf_layer.attention.output)
    _copy_norm(block.norm_ff, hf_layer.layernorm)
    copy_linear(block.ff.fc1, hf_layer.mlp.dense1)
    copy_linear(block.ff.fc2, hf_layer.mlp.dense2)


def _layer_shape(hf_layer) -> dict:
    """heads, total qk / v widths, MLP widening of a HF PerceiverLayer."""
    hf_self = hf_layer.attention.self
    dense1 = hf_layer.mlp.dense1
    return {
        "heads": hf_self.num_heads,
        "qk_dim": hf_self.query.out_features,
        "v_dim": hf_self.value.out_features,
        "widening": dense1.out_features / dense1.in_features,
        "query_residual": hf_layer.attention.use_query_residual,
        "q_dim": hf_self.query.in_features,
        "kv_dim": hf_self.key.in_features,
    }


def _block_specs(shape: dict, config, norm_eps: float) -> dict:
    """attn / ff / norm specs of a decoder block with the shape of a HF PerceiverLayer."""
    heads = shape["heads"]
    return {
        "attn": AttentionSpec(
            heads=heads, head_dim=shape["qk_dim"] // heads, v_head_dim=shape["v_dim"] // heads, qkv_bias=True
        ),
        "ff": FeedForwardSpec(mult=shape["widening"], activation=_activation(config)),
        "norm": NormSpec("layernorm", norm_eps),
    }


def _activation(config) -> str:
    act = config.hidden_act
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"from_hf_perceiver: hidden_act {act!r} not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _convert_encoder(perceiver) -> PerceiverEncoder:
    hf_enc, config = perceiver.encoder, perceiver.config
    cross = _layer_shape(hf_enc.cross_attention)
    latents = perceiver.embeddings.latents
    selfs = [_layer_shape(layer) for layer in hf_enc.self_attends]
    first = selfs[0] if selfs else {"heads": 1, "qk_dim": None, "v_dim": None, "widening": 1.0}
    for s in selfs:
        if s["v_dim"] != latents.shape[1]:
            raise ValueError("from_hf_perceiver: self-attention v_channels must equal d_latents")
    cfg = PerceiverEncoderConfig(
        input_dim=cross["kv_dim"],
        num_latents=latents.shape[0],
        latent_dim=latents.shape[1],
        num_cross_attends=1,
        num_blocks=config.num_blocks,
        num_self_attends_per_block=len(selfs),
        cross_heads=cross["heads"],
        self_heads=first["heads"],
        cross_qk_dim=cross["qk_dim"],
        cross_v_dim=cross["v_dim"],
        self_qk_dim=first["qk_dim"],
        self_v_dim=first["v_dim"],
        cross_widening=cross["widening"],
        self_widening=first["widening"],
        query_residual=cross["query_residual"],
        qkv_bias=True,
        activation=_activation(config),
        norm_eps=hf_enc.cross_attention.layernorm.eps,
    )
    enc = PerceiverEncoder(cfg)
    enc.latents.copy_(latents)
    _copy_layer(enc.cross_attends[0], hf_enc.cross_attention)
    for ours, theirs in zip(enc.latent_blocks[0], hf_enc.self_attends):
        _copy_layer(ours, theirs)
    return enc


def _queries_of(hf_basic):
    """The query source of a HF PerceiverBasicDecoder: learned (projection folded in) or Fourier."""
    kind = hf_basic.position_encoding_type
    proj = hf_basic.positions_projection
    if kind == "trainable":
        table = hf_basic.output_position_encodings.position_embeddings
        if isinstance(proj, nn.Linear):
            table = proj(table)  # a constant: fold the projection into the table
        q = LearnedQueries(table.shape[0], table.shape[1])
        q.weight.copy_(table)
        return q
    if kind == "fourier":
        pe = hf_basic.output_position_encodings
        index_dims = hf_basic.output_index_dims
        index_dims = (index_dims,) if isinstance(index_dims, int) else tuple(index_dims)
        project_dim = proj.out_features if isinstance(proj, nn.Linear) else None
        q = FourierQueries(
            index_dims,
            pe.num_bands,
            max_resolution=tuple(pe.max_resolution),
            concat_pos=pe.concat_pos,
            sine_only=pe.sine_only,
            project_dim=project_dim,
            subsample_positions="deepmind",
        )
        if project_dim is not None:
            copy_linear(q.projection, proj)
        return q
    raise ValueError(f"from_hf_perceiver: decoder position encoding {kind!r} has no query source")


def _convert_basic_decoder(hf_basic, config, *, queries) -> PerceiverDecoder:
    if getattr(hf_basic, "concat_preprocessed_input", False):
        raise ValueError("from_hf_perceiver: decoders with concat_preprocessed_input=True are not supported")
    layer = hf_basic.decoding_cross_attention
    shape = _layer_shape(layer)
    final = hf_basic.final_layer
    dec = PerceiverDecoder(
        shape["kv_dim"],
        shape["q_dim"],
        final.out_features if isinstance(final, nn.Linear) else None,
        queries=queries,
        query_residual=shape["query_residual"],
        **_block_specs(shape, config, layer.layernorm.eps),
    )
    _copy_layer(dec.block, layer)
    if isinstance(final, nn.Linear):
        copy_linear(dec.proj, final)
    return dec


def _convert_classification_decoder(hf_cls, config) -> ClassificationDecoder:
    hf_basic = hf_cls.decoder
    queries = _queries_of(hf_basic)
    shape = _layer_shape(hf_basic.decoding_cross_attention)
    ours = ClassificationDecoder(
        shape["kv_dim"],
        hf_basic.final_layer.out_features,
        query_dim=shape["q_dim"],
        query_residual=shape["query_residual"],
        **_block_specs(shape, config, hf_basic.decoding_cross_attention.layernorm.eps),
    )
    ours.decoder = _convert_basic_decoder(hf_basic, config, queries=queries)
    return ours


def _kinds(module: nn.Module) -> set[str]:
    """Class names along the MRO, so subclasses of the HF classes convert too."""
    return {cls.__name__ for cls in type(module).__mro__}


def _convert_any_decoder(hf_decoder, config) -> nn.Module:
    name, kinds = type(hf_decoder).__name__, _kinds(hf_decoder)
    if "PerceiverClassificationDecoder" in kinds:
        return _convert_classification_decoder(hf_decoder, config)
    if "PerceiverProjectionDecoder" in kinds:
        lin = hf_decoder.classifier
        ours = ProjectionDecoder(lin.in_features, lin.out_features)
        copy_linear(ours.proj, lin)
        return ours
    if "PerceiverBasicDecoder" in kinds:
        if hf_decoder.position_encoding_type != "trainable":
            raise ValueError("from_hf_perceiver: a PerceiverModel's basic decoder must use trainable queries")
        return _convert_basic_decoder(hf_decoder, config, queries=_queries_of(hf_decoder))
    raise ValueError(f"from_hf_perceiver: decoder {name} is not supported")


def _convert_base(hf) -> PerceiverIO:
    if hf.input_preprocessor is not None:
        raise ValueError("from_hf_perceiver: a PerceiverModel with an input_preprocessor: convert a task model")
    if hf.decoder is None:
        raise ValueError("from_hf_perceiver: the PerceiverModel has no decoder")
    if hf.output_postprocessor is not None:
        raise ValueError("from_hf_perceiver: output postprocessors on a bare PerceiverModel are not supported")
    return PerceiverIO(_convert_encoder(hf), _convert_any_decoder(hf.decoder, hf.config))


def _convert_masked_lm(hf) -> PerceiverMaskedLM:
    p = hf.perceiver
    pre = convert_text_preprocessor(p.input_preprocessor)
    decoder = _convert_basic_decoder(p.decoder, hf.config, queries=_queries_of(p.decoder))
    ours = PerceiverMaskedLM(pre, _convert_encoder(p), decoder)
    ours.lm_head.bias.copy_(hf.embedding_decoder.bias)
    return ours


def _convert_sequence_classification(hf) -> PerceiverIO:
    p = hf.perceiver
    pre = convert_text_preprocessor(p.input_preprocessor)
    return PerceiverIO(_convert_encoder(p), _convert_any_decoder(p.decoder, hf.config), preprocessor=pre)


def _convert_image_classification(hf) -> PerceiverIO:
    p = hf.perceiver
    pre = convert_image_preprocessor(p.input_preprocessor)
    return PerceiverIO(_convert_encoder(p), _convert_any_decoder(p.decoder, hf.config), preprocessor=pre)


def _convert_optical_flow(hf) -> PerceiverOpticalFlow:
    p = hf.perceiver
    pre = convert_image_preprocessor(p.input_preprocessor)
    hf_flow = p.decoder
    basic = _convert_basic_decoder(hf_flow.decoder, hf.config, queries=None)
    flow = FlowDecoder(
        basic.latent_dim, basic.query_dim, out_channels=basic.out_dim, rescale_factor=hf_flow.rescale_factor
    )
    basic.chunk_size = flow.decoder.chunk_size  # decode pixels in chunks: exact, bounded memory
    flow.decoder = basic
    return PerceiverOpticalFlow(pre, _convert_encoder(p), flow)


def _convert_multimodal(hf) -> PerceiverMultimodalAutoencoder:
    p = hf.perceiver
    hf_pre = p.input_preprocessor
    modalities = {}
    for name, sub in hf_pre.modalities.items():
        kind = type(sub).__name__
        if kind == "PerceiverImagePreprocessor":
            modalities[name] = convert_image_preprocessor(sub)
        elif kind == "PerceiverAudioPreprocessor":
            modalities[name] = convert_audio_preprocessor(sub)
        elif kind == "PerceiverOneHotPreprocessor":
            modalities[name] = OneHotPreprocessor(sub.num_channels)
        else:
            raise ValueError(f"from_hf_perceiver: multimodal preprocessor {kind} is not supported")
    pre = MultimodalPreprocessor(modalities, min_padding=hf_pre.min_padding_size, mask_probs=dict(hf_pre.mask_probs))
    for name in modalities:
        pre.padding[name].copy_(hf_pre.padding[name][0])
    for name in hf_pre.mask_probs:
        pre.mask_tokens[name].copy_(hf_pre.mask[name][0])

    hf_dec = p.decoder
    queries = {}
    for name, sub in hf_dec.modalities.items():
        basic = sub if type(sub).__name__ == "PerceiverBasicDecoder" else sub.decoder
        if basic.concat_preprocessed_input:
            raise ValueError("from_hf_perceiver: concat_preprocessed_input is not supported")
        queries[name] = _queries_of(basic)
    heads = {}
    for name, post in p.output_postprocessor.modalities.items() if p.output_postprocessor else []:
        kind, lin = type(post).__name__, post.classifier
        if kind == "PerceiverAudioPostprocessor":
            heads[name] = AudioPatchHead(lin.in_features, lin.out_features)
        elif kind == "PerceiverClassificationPostprocessor":
            heads[name] = ClassHead(lin.in_features, lin.out_features)
        elif kind == "PerceiverProjectionPostprocessor":
            heads[name] = nn.Linear(lin.in_features, lin.out_features)
        else:
            raise ValueError(f"from_hf_perceiver: postprocessor {kind} is not supported")
        copy_linear(heads[name] if isinstance(heads[name], nn.Linear) else heads[name].proj, lin)
    shared = _convert_basic_decoder(hf_dec.decoder, hf.config, queries=None)
    ours_dec = MultimodalDecoder(
        shared.latent_dim,
        queries,
        shared.out_dim,
        heads=heads,
        min_padding=hf_dec.min_padding_size,
    )
    ours_dec.decoder = shared
    for name in queries:
        ours_dec.padding[name].copy_(hf_dec.padding[name][0])
    return PerceiverMultimodalAutoencoder(pre, _convert_encoder(p), ours_dec)
