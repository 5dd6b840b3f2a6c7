"""transformers' Perceiver input preprocessors (image, text, audio) -> ours, for `from_hf_perceiver`."""

from __future__ import annotations

from torch import nn

from ..models.preprocessors import AudioPreprocessor, ImagePreprocessor, TextPreprocessor

__all__ = ["copy_linear", "convert_image_preprocessor", "convert_text_preprocessor", "convert_audio_preprocessor"]


def copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    if dst.weight.shape != src.weight.shape:
        raise ValueError(f"from_hf_perceiver: shape mismatch {tuple(dst.weight.shape)} vs {tuple(src.weight.shape)}")
    dst.weight.copy_(src.weight)
    if (dst.bias is None) != (src.bias is None):
        raise ValueError("from_hf_perceiver: bias mismatch between converted and source Linear")
    if dst.bias is not None:
        dst.bias.copy_(src.bias)


def _copy_positions(ours_pos, hf_pos_enc, hf_proj) -> None:
    if ours_pos.kind == "learned":
        ours_pos.table.copy_(hf_pos_enc.position_embeddings)
    if isinstance(hf_proj, nn.Linear):
        copy_linear(ours_pos.projection, hf_proj)


def _position_kwargs(hf_pre) -> dict:
    pe, proj = hf_pre.position_embeddings, hf_pre.positions_projection
    kwargs = {"project_pos_dim": proj.out_features if isinstance(proj, nn.Linear) else None}
    if hf_pre.position_encoding_type == "fourier":
        kwargs.update(
            position="fourier",
            num_bands=pe.num_bands,
            max_resolution=tuple(pe.max_resolution),
            concat_pos=pe.concat_pos,
            sine_only=pe.sine_only,
        )
    else:
        table = pe.position_embeddings
        kwargs.update(position="learned", num_positions=table.shape[0], learned_pos_dim=table.shape[1])
    return kwargs


def convert_image_preprocessor(hf_pre) -> ImagePreprocessor:
    prep = hf_pre.prep_type
    s, t = hf_pre.spatial_downsample, hf_pre.temporal_downsample
    kwargs = _position_kwargs(hf_pre)
    video = prep == "patches" and (t > 1 or (kwargs.get("max_resolution") and len(kwargs["max_resolution"]) > 2))
    conv_after = isinstance(hf_pre.conv_after_patches, nn.Linear)
    in_channels = hf_pre.in_channels
    if conv_after:  # the patch width tells the input channels (the flow model feeds 27 = 3x3x3)
        in_channels = hf_pre.conv_after_patches.in_features // (s * s * (t if video else 1))
    if prep == "conv":
        conv = hf_pre.convnet.conv
        in_channels = conv.in_channels
        bn = hf_pre.convnet.batchnorm
        batchnorm = isinstance(bn, nn.BatchNorm2d)
    ours = ImagePreprocessor(
        in_channels,
        prep,
        spatial_downsample=s,
        temporal_downsample=t,
        out_channels=hf_pre.out_channels,
        conv_after_patching=conv_after,
        conv_batchnorm=batchnorm if prep == "conv" else True,
        concat_pos_to_input=hf_pre.concat_or_add_pos == "concat",
        video=bool(video),
        **kwargs,
    )
    if prep == "conv":
        ours.stem[0].weight.copy_(conv.weight)
        if batchnorm:
            ours.stem[1].load_state_dict(bn.state_dict())
            ours.stem[1].eps, ours.stem[1].momentum = bn.eps, bn.momentum
    elif prep == "conv1x1":
        copy_linear(ours.stem, hf_pre.convnet_1x1)
    if conv_after:
        copy_linear(ours.patch_proj, hf_pre.conv_after_patches)
    _copy_positions(ours.positions, hf_pre.position_embeddings, hf_pre.positions_projection)
    if ours.out_dim != hf_pre.num_channels and prep != "pixels":
        raise ValueError(f"from_hf_perceiver: image preprocessor width {ours.out_dim} != HF {hf_pre.num_channels}")
    return ours


def convert_text_preprocessor(hf_pre) -> TextPreprocessor:
    emb, pos = hf_pre.embeddings, hf_pre.position_embeddings
    ours = TextPreprocessor(emb.num_embeddings, emb.embedding_dim, pos.num_embeddings)
    ours.token_embedding.weight.copy_(emb.weight)
    ours.position_embedding.weight.copy_(pos.weight)
    return ours


def convert_audio_preprocessor(hf_pre) -> AudioPreprocessor:
    if hf_pre.position_encoding_type != "fourier" or hf_pre.concat_or_add_pos != "concat":
        raise ValueError("from_hf_perceiver: only Fourier, concatenated audio positions are supported")
    if isinstance(hf_pre.positions_projection, nn.Linear):
        raise ValueError("from_hf_perceiver: projected audio positions are not supported")
    pe = hf_pre.position_embeddings
    return AudioPreprocessor(
        hf_pre.samples_per_patch,
        num_bands=pe.num_bands,
        max_resolution=pe.max_resolution[0],
        concat_pos=pe.concat_pos,
        sine_only=pe.sine_only,
    )


# --------------------------------------------------------------------------------- the models
