"""``VisionLanguageModel``: frozen tower -> Perceiver Resampler + projection -> any HF causal LM.

The class is glue: encode images (open_clip or transformers towers, `vlm.vision`), run the connector
(resampler and head in either order, `vlm.connector`), then either splice the tokens into
``inputs_embeds`` at the ``<image>`` placeholders (prefix mode) or hand them to gated cross-attention
hooks (cross_attention mode, `vlm.gated_xattn`), and call the LM.

    model = VisionLanguageModel.from_parts(open_clip_model, hf_lm, tokenizer, VLMConfig(...))
    batch = model.processor(["<image>Caption:"], captions=["a red circle"])
    loss = model(images=images, **batch).loss
    texts = model.generate(images, ["<image>Caption:"], max_new_tokens=20)

Models converted from IDEFICS, Idefics2 and OpenFlamingo (`vlm.convert`) are instances of it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from resampler import PerceiverResampler
from resampler.config import load_config

from .config import VLMConfig
from .connector import build_connector, build_projector
from .gated_xattn import GatedCrossAttention
from .language import add_token_rows, apply_lora, context_length, load_language_model, load_tokenizer, unwrap_lm
from .loss import install_causal_lm_loss, supervised_logits
from .media import flatten_features, flatten_images, flatten_pixel_mask, media_per_sample
from .processor import IGNORE_INDEX, VLMProcessor
from .registry import decoder_layers
from .towers import build_vision_tower, load_vision
from .training.optim import param_groups

__all__ = ["VisionLanguageModel", "build_projector"]


class VisionLanguageModel(nn.Module):
    """See the module docstring. Build with ``from_parts`` (objects in memory) or from a config."""

    def __init__(
        self,
        config: VLMConfig | None = None,
        *,
        vision_model: nn.Module | None = None,
        lm: nn.Module | None = None,
        tokenizer=None,
        preprocess=None,
        resampler: PerceiverResampler | None = None,
    ) -> None:
        super().__init__()
        config = VLMConfig() if config is None else config
        if not isinstance(config, VLMConfig):
            raise TypeError(f"config must be a VLMConfig, got {type(config).__name__}")
        self.config = config
        if vision_model is None:
            vision_model, preprocess = load_vision(config.vision)
        if lm is None:
            lm = load_language_model(config.lm)
        if tokenizer is None:
            tokenizer = load_tokenizer(config.lm)

        self.vision = build_vision_tower(vision_model, config.vision, preprocess)
        hf_lm = unwrap_lm(lm)
        install_causal_lm_loss(hf_lm)  # transformers' default loss with one (N, vocab) buffer fewer
        self.lm_config = hf_lm.config
        self.hidden_size = hf_lm.get_input_embeddings().embedding_dim
        self.model_type = hf_lm.config.model_type
        self.processor = VLMProcessor(
            tokenizer,
            image_token=config.injection.image_token,
            tokens_per_image=config.tokens_per_image,
            max_length=context_length(hf_lm.config),
        )
        self.base_vocab_size, self.new_token_ids = add_token_rows(hf_lm, len(self.processor.tokenizer))

        cross_attention = config.injection.mode == "cross_attention"
        self.resampler, self.projector, media_width = build_connector(
            config.projector,
            config.resampler,
            self.vision.width,
            self.hidden_size,
            num_patches=self.vision.num_patches,
            xattn=cross_attention,
            resampler=resampler,
        )
        self.resampler.requires_grad_(config.resampler.trainable)
        self.xattn = None
        if cross_attention:
            inj = config.injection
            self.xattn = GatedCrossAttention(
                hf_lm,
                decoder_layers(hf_lm, self.model_type, inj.decoder_layers),
                self.hidden_size,
                media_width,
                inj.xattn_specs(),
                every_k=inj.every_k_layers,
                placement=inj.xattn_layers,
                gate=inj.xattn_gate,
                ff_scope=inj.xattn_ff_scope,
                image_token_id=self.image_token_id,
                reset_token_id=self.processor.eos_token_id if inj.xattn_reset_after_eos else None,
            )
        self.lm = apply_lora(lm, config.lora, config.lm)
        from transformers import GenerationConfig

        # what it sets overrides generate()'s defaults (config.max_new_tokens, greedy); saved by save_pretrained
        self.generation_config = GenerationConfig()

        lm_param = next(hf_lm.parameters())
        self.resampler.to(lm_param.device)
        self.projector.to(lm_param.device)
        if self.xattn is not None:
            self.xattn.to(lm_param.device)

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_parts(
        cls, vision_model, lm, tokenizer, config: VLMConfig, *, preprocess=None, resampler=None
    ) -> VisionLanguageModel:
        """From a tower model (open_clip, or transformers as ``config.vision.kind`` says), a transformers
        causal LM and its tokenizer already in memory."""
        return cls(
            config, vision_model=vision_model, lm=lm, tokenizer=tokenizer, preprocess=preprocess, resampler=resampler
        )

    @classmethod
    def from_config(cls, config: VLMConfig | str | Path, overrides: list[str] | None = None) -> VisionLanguageModel:
        """From a ``VLMConfig`` or a YAML file mirroring it (loads the tower and the LM by name/path)."""
        if not isinstance(config, VLMConfig):
            config = load_config(VLMConfig, config, overrides)
        return cls(config)

    # ----------------------------------------------------------------------------- properties

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def language_model(self) -> nn.Module:
        """The transformers model (LoRA layers injected in place when LoRA is on)."""
        return unwrap_lm(self.lm)

    @property
    def image_token_id(self) -> int:
        return self.processor.image_token_id

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, lora_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups by the trainer's rule (`vlm.training.optim.param_groups`): "connector"
        (resampler, projection, gates) at ``lr`` and "lora" (the LM adapters) at ``lora_lr``; no weight
        decay on biases, norms, gates, latents, position/time embeddings or token-embedding rows."""
        return param_groups(self, lr, lora_lr, weight_decay)

    # ----------------------------------------------------------------------------- images

    def encode_images(
        self,
        images=None,
        image_features: Tensor | None = None,
        *,
        per_sample: Sequence[int] | None = None,
        pixel_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor | None, list[int] | None]:
        """Images or precomputed tower features -> (N, num_latents, width) tokens for the LM (its hidden
        size, or the resampler's width with a 'none' head), plus the per-sample image counts when the input
        says them (nested lists or (B, T, ...) tensors). ``per_sample``: the counts the text gives, which
        lets a (B, T, ...) tensor carry all-zero padding slots. ``pixel_attention_mask`` (N, H, W) or
        (B, T, H, W): real pixels of padded images, for towers with a patch mask (Idefics2)."""
        if images is not None and image_features is not None:
            raise ValueError("pass either images or image_features, not both")
        if images is None and image_features is None:
            return None, None
        per_sample = None if per_sample is None else list(per_sample)
        patch_mask = None
        if image_features is not None:
            if pixel_attention_mask is not None:
                raise ValueError("pixel_attention_mask goes with images, not with image_features")
            features, counts = flatten_features(image_features, self.vision.width, per_sample)
        else:
            pixels, counts = flatten_images(images, self.vision, per_sample)
            pixel_mask = flatten_pixel_mask(pixel_attention_mask, pixels, per_sample)
            if not pixels.shape[0]:
                features = pixels.new_zeros(0, 1, self.vision.width)
            else:
                features = self.vision(pixels, pixel_mask)
                patch_mask = None if pixel_mask is None else self.vision.patch_mask(pixel_mask)
        if features.shape[0] == 0:
            return None, counts
        device = self.projector_device
        features = features.to(device=device, dtype=torch.float32)
        patch_mask = None if patch_mask is None else patch_mask.to(device)
        if self.config.projector.order == "project_then_resample":
            return self.resampler(self.projector(features), patch_mask)[:, 0], counts  # (N, latents, hidden)
        tokens = self.resampler(features, patch_mask)[:, 0]  # (N, latents, Dv)
        return self.projector(tokens), counts  # (N, latents, hidden)

    @property
    def projector_device(self) -> torch.device:
        return next(self.resampler.parameters()).device

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        images=None,
        image_features: Tensor | None = None,
        pixel_attention_mask: Tensor | None = None,
        **lm_kwargs,
    ):
        """HF-style output (``.loss`` when labels are given, ``.logits`` (B, L, vocab)).

        Images are matched, in order, to the ``<image>`` runs of the whole batch (sample 0's images
        first); samples without ``<image>`` are text-only. With labels, the LM head runs only from the
        position that predicts the batch's first label on (HF ``logits_to_keep``): ``.logits`` is then
        (B, k, vocab), the last k positions, and the image prefix and prompt cost no vocabulary
        projection; pass ``logits_to_keep=0`` for all L positions.
        """
        self._check_text(input_ids, attention_mask, labels)
        per_sample = self.processor.count_images(input_ids)  # (B,)
        media, counts = self.encode_images(
            images, image_features, per_sample=per_sample.tolist(), pixel_attention_mask=pixel_attention_mask
        )
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
            labels, lm_kwargs = supervised_logits(self.language_model, labels, lm_kwargs)
        lm_inputs = self._lm_inputs(input_ids, per_sample, media, counts)
        if self.xattn is None:
            return self.language_model(**lm_inputs, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        with self.xattn.attach(media_per_sample(media, per_sample)):
            return self.language_model(**lm_inputs, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    def _check_text(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor (B, L), got {shape}")
        for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
            if tensor is not None and (not isinstance(tensor, Tensor) or tensor.shape != input_ids.shape):
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        limit = self.processor.max_length
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"input is {input_ids.shape[1]} tokens long, more than the LM's context of {limit}")

    def _lm_inputs(self, input_ids: Tensor, per_sample: Tensor, media: Tensor | None, counts) -> dict:
        given = 0 if media is None else media.shape[0]
        if counts is not None and len(counts) != input_ids.shape[0]:
            raise ValueError(f"images are given for {len(counts)} samples but the batch has {input_ids.shape[0]}")
        if counts is not None and per_sample.tolist() != list(counts):
            raise ValueError(
                f"<image> runs per sample in the text {per_sample.tolist()} != images given per sample {list(counts)}"
            )
        if int(per_sample.sum()) != given:
            raise ValueError(
                f"the text has {int(per_sample.sum())} {self.processor.image_token!r} slots "
                f"({self.config.tokens_per_image} tokens each) but {given} images were given"
            )
        if self.xattn is not None:
            return {"input_ids": input_ids}
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, H)
        if media is not None:
            is_image = (input_ids == self.image_token_id).to(embeds.device)
            embeds = embeds.clone()
            embeds[is_image] = media.reshape(-1, media.shape[-1]).to(embeds.dtype)  # (N*latents, H) in order
        return {"inputs_embeds": embeds}

    # ----------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        images=None,
        prompts: str | Sequence[str] | None = None,
        *,
        image_features: Tensor | None = None,
        **generation_kwargs,
    ) -> list[str]:
        """Batched generation with left padding -> one string per prompt (x num_return_sequences).

        ``prompts`` may contain ``<image>`` markers; a prompt without one gets its sample's images
        prepended. Any ``transformers`` generation kwarg works (``num_beams``, ``do_sample``, ...).
        """
        media, counts = self.encode_images(images, image_features)
        n_images = 0 if media is None else media.shape[0]
        if prompts is None:
            prompts = self.config.caption_prompt
        if isinstance(prompts, str):
            prompts = [prompts] * (len(counts) if counts is not None else max(n_images, 1))
        prompts = list(prompts)
        if counts is None and n_images == len(prompts):
            counts = [1] * len(prompts)  # one image per prompt, prepended where the prompt has no marker
        elif counts is None and not any(self.processor.image_token in p for p in prompts):
            if n_images:
                raise ValueError(
                    f"got {n_images} images for {len(prompts)} prompts: give one image per prompt, one list of "
                    f"images per prompt, or put {self.processor.image_token!r} markers in the prompts"
                )
            counts = [0] * len(prompts)
        batch = self.processor(prompts, num_images=counts, padding_side="left")
        input_ids = batch["input_ids"].to(self.projector_device)
        attention_mask = batch["attention_mask"].to(self.projector_device)
        self._check_text(input_ids, attention_mask, None)
        per_sample = self.processor.count_images(input_ids)
        return self.processor.decode(
            self._generate(input_ids, attention_mask, per_sample, media, counts, generation_kwargs)
        )

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        images=None,
        *,
        image_features: Tensor | None = None,
        pixel_attention_mask: Tensor | None = None,
        **generation_kwargs,
    ):
        """Generation from token ids made elsewhere (a reference processor's ``input_ids``, left padded)
        -> the new tokens (B x num_return_sequences, new), or transformers' output object when
        ``return_dict_in_generate=True``. Same defaults as ``generate``."""
        self._check_text(input_ids, attention_mask, None)
        per_sample = self.processor.count_images(input_ids)
        media, counts = self.encode_images(
            images, image_features, per_sample=per_sample.tolist(), pixel_attention_mask=pixel_attention_mask
        )
        return self._generate(input_ids, attention_mask, per_sample, media, counts, generation_kwargs)

    def _generate(self, input_ids, attention_mask, per_sample, media, counts, generation_kwargs: dict):
        lm_inputs = self._lm_inputs(input_ids, per_sample, media, counts)
        for key, value in _set_fields(self.generation_config).items():
            generation_kwargs.setdefault(key, value)
        generation_kwargs.setdefault("max_new_tokens", self.config.max_new_tokens)
        generation_kwargs.setdefault("pad_token_id", self.processor.pad_token_id)
        generation_kwargs.setdefault("eos_token_id", self.processor.eos_token_id)
        generation_kwargs.setdefault("bad_words_ids", [[self.image_token_id]])
        if not generation_kwargs.get("do_sample", False):
            generation_kwargs.setdefault("do_sample", False)
            generation_kwargs.setdefault("temperature", None)
            generation_kwargs.setdefault("top_p", None)
            generation_kwargs.setdefault("top_k", None)
        was_training = self.training
        self.eval()
        try:
            if self.xattn is None:
                out = self.language_model.generate(**lm_inputs, attention_mask=attention_mask, **generation_kwargs)
            else:
                with self.xattn.attach(media_per_sample(media, per_sample)):
                    out = self.language_model.generate(**lm_inputs, attention_mask=attention_mask, **generation_kwargs)
        finally:
            self.train(was_training)
        if "input_ids" in lm_inputs:  # with input_ids, generate returns prompt + new tokens
            if isinstance(out, Tensor):
                return out[:, input_ids.shape[1] :]
            out.sequences = out.sequences[:, input_ids.shape[1] :]
        return out

    def caption(self, images, prompt: str | None = None, **generation_kwargs) -> list[str]:
        """One caption per image (greedy by default), after ``config.caption_prompt``."""
        prompt = self.config.caption_prompt if prompt is None else prompt
        return self.generate(images, prompt, **generation_kwargs)

    # ----------------------------------------------------------------------------- checkpoints

    def save_adapter(self, directory: str | Path) -> Path:
        """Adapter-only checkpoint (resampler, projection, LoRA, gates, new token rows) + manifest."""
        from .checkpoint import save_adapter

        return save_adapter(self, directory)

    @classmethod
    def load_adapter(
        cls,
        directory: str | Path,
        vision_model=None,
        lm=None,
        tokenizer=None,
        *,
        preprocess=None,
        trust_remote_code: bool = False,
    ) -> VisionLanguageModel:
        """Rebuild from a ``save_adapter`` directory: base parts from the manifest's config (or given
        in memory), adapter weights loaded strictly. ``trust_remote_code`` is never taken from the
        manifest: only this argument turns it on."""
        from .checkpoint import load_adapter

        return load_adapter(
            cls,
            directory,
            vision_model=vision_model,
            lm=lm,
            tokenizer=tokenizer,
            preprocess=preprocess,
            trust_remote_code=trust_remote_code,
        )

    # ----------------------------------------------------------------------------- Hugging Face conventions

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + connector.safetensors + generation_config.json + lora/ (peft's format); `vlm.hub`."""
        from .hub import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> VisionLanguageModel:
        """From a `save_pretrained` / `merge_and_export` directory or a Hub repo id. Keyword arguments:
        in-memory ``vision_model``, ``lm``, ``tokenizer``, ``preprocess`` (as `load_adapter`), ``revision``,
        ``token``, ``trust_remote_code``; `vlm.hub.from_pretrained`."""
        from .hub import from_pretrained

        return from_pretrained(cls, name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """`save_pretrained` + a model card, uploaded to ``repo_id`` (``private``, ``token``, ``revision``)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def merge_and_export(self, directory: str | Path) -> Path:
        """A plain transformers LM directory with LoRA merged, plus the connector in ``vlm/``; `vlm.hub`."""
        from .hub import merge_and_export

        return merge_and_export(self, directory)


def _set_fields(config) -> dict:
    """The generation settings ``config`` sets away from transformers' defaults (no bookkeeping keys)."""
    return {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
