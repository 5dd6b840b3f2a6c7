"""``VisionLanguageModel``: frozen open_clip tower -> Perceiver Resampler -> projection -> any HF causal LM.

The class is glue: encode images, resample them to ``num_latents`` tokens, project to the LM width,
then either splice them into ``inputs_embeds`` at the ``<image>`` placeholders (prefix mode) or hand
them to gated cross-attention hooks (cross_attention mode), and call the LM.

    model = VisionLanguageModel.from_parts(open_clip_model, hf_lm, tokenizer, VLMConfig(...))
    batch = model.processor(["<image>Caption:"], captions=["a red circle"])
    loss = model(images=images, **batch).loss
    texts = model.generate(images, ["<image>Caption:"], max_new_tokens=20)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from resampler import PerceiverResampler
from resampler.config import load_config

from .config import VLMConfig
from .gated_xattn import GatedCrossAttention
from .language import add_token_rows, apply_lora, context_length, load_language_model, load_tokenizer, unwrap_lm
from .processor import IGNORE_INDEX, VLMProcessor
from .registry import decoder_layers
from .training.optim import param_groups
from .vision import VisionTower, load_open_clip

__all__ = ["VisionLanguageModel", "build_projector"]


def build_projector(kind: str, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Module:
    """'linear' or 'mlp' (Linear -> GELU -> Linear) from the resampler width to the LM width."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
    raise ValueError(f"projector.kind must be 'linear' or 'mlp', got {kind!r}")


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
            vision_model, preprocess = load_open_clip(config.vision)
        if lm is None:
            lm = load_language_model(config.lm)
        if tokenizer is None:
            tokenizer = load_tokenizer(config.lm)

        self.vision = VisionTower(vision_model, config.vision, preprocess)
        hf_lm = unwrap_lm(lm)
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

        self.xattn = None
        if config.injection.mode == "cross_attention":
            self.xattn = GatedCrossAttention(
                decoder_layers(hf_lm, self.model_type),
                self.hidden_size,
                every_k=config.injection.every_k_layers,
                heads=config.injection.xattn_heads,
                head_dim=config.injection.xattn_head_dim,
                ff_mult=config.injection.xattn_ff_mult,
            )
        self.lm = apply_lora(lm, config.lora, config.lm)

        self.resampler = self._build_resampler() if resampler is None else self._check_resampler(resampler)
        self.resampler.requires_grad_(config.resampler.trainable)
        self.projector = build_projector(
            config.projector.kind, self.vision.width, self.hidden_size, config.projector.hidden_dim
        )
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
        """From an open_clip model, a transformers causal LM and its tokenizer already in memory."""
        return cls(
            config, vision_model=vision_model, lm=lm, tokenizer=tokenizer, preprocess=preprocess, resampler=resampler
        )

    @classmethod
    def from_config(cls, config: VLMConfig | str | Path, overrides: list[str] | None = None) -> VisionLanguageModel:
        """From a ``VLMConfig`` or a YAML file mirroring it (loads the tower and the LM by name/path)."""
        if not isinstance(config, VLMConfig):
            config = load_config(VLMConfig, config, overrides)
        return cls(config)

    def _build_resampler(self) -> PerceiverResampler:
        rc = self.config.resampler
        if rc.num_patch_positions is not None and rc.num_patch_positions != self.vision.num_patches:
            raise ValueError(
                f"resampler.num_patch_positions={rc.num_patch_positions} but the vision tower gives "
                f"{self.vision.num_patches} patch tokens per image"
            )
        if rc.dim not in (None, self.vision.width):
            raise ValueError(
                f"resampler.dim={rc.dim} but the vision tower's width is {self.vision.width}: leave it unset"
            )
        return PerceiverResampler(dataclasses.replace(rc, dim=self.vision.width))

    def _check_resampler(self, resampler: nn.Module) -> nn.Module:
        if not isinstance(resampler, PerceiverResampler):
            raise TypeError(f"resampler must be a PerceiverResampler, got {type(resampler).__name__}")
        if resampler.dim != self.vision.width or resampler.out_dim != self.vision.width:
            raise ValueError(
                f"the given resampler maps width {resampler.dim} -> {resampler.out_dim}, but the vision tower's "
                f"width is {self.vision.width}: it must take and return {self.vision.width}"
            )
        if resampler.num_latents != self.config.resampler.num_latents:
            raise ValueError(
                f"the given resampler has {resampler.num_latents} latents but resampler.num_latents="
                f"{self.config.resampler.num_latents}"
            )
        return resampler

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
        self, images=None, image_features: Tensor | None = None
    ) -> tuple[Tensor | None, list[int] | None]:
        """Images or precomputed tower features -> (N, num_latents, hidden) LM-width tokens, plus the
        per-sample image counts when the input says them (nested lists or (B, T, ...) tensors)."""
        if images is not None and image_features is not None:
            raise ValueError("pass either images or image_features, not both")
        if images is None and image_features is None:
            return None, None
        if image_features is not None:
            features, counts = self._flatten_features(image_features)
        else:
            pixels, counts = self._flatten_images(images)
            features = self.vision(pixels) if pixels.shape[0] else pixels.new_zeros(0, 1, self.vision.width)
        if features.shape[0] == 0:
            return None, counts
        device = self.projector_device
        tokens = self.resampler(features.to(device=device, dtype=torch.float32))[:, 0]  # (N, latents, Dv)
        return self.projector(tokens), counts  # (N, latents, hidden)

    @property
    def projector_device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def _flatten_features(self, features) -> tuple[Tensor, list[int] | None]:
        width = self.vision.width
        if isinstance(features, (list, tuple)):
            parts = [self._flatten_features(f)[0] for f in features]
            counts = [p.shape[0] for p in parts]
            empty = features[0].new_zeros(0, 1, width) if features else torch.zeros(0, 1, width)
            nonempty = [p for p in parts if p.shape[0]]
            return (torch.cat(nonempty) if nonempty else empty), counts
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise ValueError(
                f"image_features must be a float tensor (N, P, {width}) or (B, T, P, {width}), "
                f"got {type(features).__name__}"
            )
        if features.dim() == 2 and features.shape[0] == 0:
            return features.reshape(0, 1, width), None
        if features.dim() not in (3, 4) or features.shape[-1] != width:
            raise ValueError(
                f"image_features must be (N, P, {width}) or (B, T, P, {width}) (the vision tower's width is "
                f"{width}), got {tuple(features.shape)}"
            )
        if features.dim() == 4:
            b, t = features.shape[:2]
            return features.reshape(b * t, *features.shape[2:]), [t] * b  # (B*T, P, D)
        return features, None

    def _flatten_images(self, images) -> tuple[Tensor, list[int] | None]:
        h, w = self.vision.image_size
        expected = (
            f"a float tensor (N, 3, {h}, {w}) or (B, T, 3, {h}, {w}), a list of PIL images, or one list per sample"
        )
        if isinstance(images, Tensor):
            if not images.is_floating_point():
                raise ValueError(f"images must be {expected}; got a {images.dtype} tensor (preprocess it first)")
            if images.dim() == 5 and tuple(images.shape[2:]) == (3, h, w):
                b, t = images.shape[:2]
                return images.reshape(b * t, 3, h, w), [t] * b  # (B*T, 3, H, W)
            if images.dim() == 4 and tuple(images.shape[1:]) == (3, h, w):
                return images, None
            raise ValueError(f"images must be {expected}; got shape {tuple(images.shape)}")
        if isinstance(images, (list, tuple)):
            if all(isinstance(x, (list, tuple)) for x in images):
                flat = [x for sample in images for x in sample]
                pixels = self._flatten_images(flat)[0] if flat else torch.zeros(0, 3, h, w)
                return pixels, [len(sample) for sample in images]
            if all(isinstance(x, Tensor) for x in images):
                return self._flatten_images(torch.stack(images) if images else torch.zeros(0, 3, h, w))[0], None
            if all(hasattr(x, "convert") and hasattr(x, "size") for x in images):  # PIL images
                return self.vision.preprocess_images(images), None
        raise ValueError(f"images must be {expected}; got {type(images).__name__}")

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        images=None,
        image_features: Tensor | None = None,
        **lm_kwargs,
    ):
        """HF-style output (``.loss`` when labels are given, ``.logits`` (B, L, vocab)).

        Images are matched, in order, to the ``<image>`` runs of the whole batch (sample 0's images
        first); samples without ``<image>`` are text-only.
        """
        self._check_text(input_ids, attention_mask, labels)
        media, counts = self.encode_images(images, image_features)
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        lm_inputs = self._lm_inputs(input_ids, media, counts)
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

    def _lm_inputs(self, input_ids: Tensor, media: Tensor | None, counts: list[int] | None) -> dict:
        per_sample = self.processor.count_images(input_ids)  # (B,)
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
            self.xattn.set_media(self._media_per_sample(media, per_sample), input_ids == self.image_token_id)
            return {"input_ids": input_ids}
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, H)
        if media is not None:
            is_image = (input_ids == self.image_token_id).to(embeds.device)
            embeds = embeds.clone()
            embeds[is_image] = media.reshape(-1, media.shape[-1]).to(embeds.dtype)  # (N*latents, H) in order
        return {"inputs_embeds": embeds}

    @staticmethod
    def _media_per_sample(media: Tensor | None, per_sample: Tensor) -> Tensor | None:
        """(N, latents, H) flat -> (B, T_max, latents, H), zero rows for missing images."""
        if media is None:
            return None
        b, t = per_sample.shape[0], int(per_sample.max())
        out = media.new_zeros(b, t, *media.shape[1:])
        slots = torch.arange(t)[None, :] < per_sample[:, None].cpu()  # (B, T_max)
        out[slots.to(media.device)] = media
        return out

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
        lm_inputs = self._lm_inputs(input_ids, media, counts)

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
            out = self.language_model.generate(**lm_inputs, attention_mask=attention_mask, **generation_kwargs)
        finally:
            self.train(was_training)
        if "input_ids" in lm_inputs:  # with input_ids, generate returns prompt + new tokens
            out = out[:, input_ids.shape[1] :]
        return self.processor.decode(out)

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
