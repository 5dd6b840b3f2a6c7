"""Text side of the VLM: ``<image>`` placeholders, (prompt, caption) -> input_ids/labels, padding.

The data pipeline, ``forward`` and ``generate`` all go through ``VLMProcessor`` so the number of
placeholders per image and the label masking live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .language import tokenizer_with_image_token

__all__ = ["VLMProcessor", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class VLMProcessor:
    """Tokenizer wrapper that expands each ``<image>`` into ``tokens_per_image`` placeholder ids.

    Sequence layout: ``[bos] prompt-with-images caption eos``; labels are ``IGNORE_INDEX`` on bos,
    the prompt, every image placeholder and padding, so only the caption and its eos are learned.
    A prompt without ``<image>`` given ``num_images=n`` gets ``n`` images prepended.
    """

    def __init__(self, tokenizer, *, image_token: str = "<image>", tokens_per_image: int = 64, max_length=None):
        if tokens_per_image <= 0:
            raise ValueError(f"tokens_per_image must be positive, got {tokens_per_image}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token before building the VLM")
        tokenizer = tokenizer_with_image_token(tokenizer, image_token)  # a copy: the caller's is never changed
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        bos = tokenizer.bos_token_id
        self.bos_token_id = bos if bos is not None and bos != tokenizer.eos_token_id else None

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if self.image_token_id in ids:
            raise ValueError(f"text pieces must not contain the image token {self.image_token!r}")
        return ids

    def build_inputs(
        self,
        prompt: str = "",
        caption: str | None = None,
        num_images: int | None = None,
        max_caption_tokens: int | None = None,
    ) -> dict:
        """One example -> ``{"input_ids": [...], "labels": [...]}`` (lists of ints, unpadded).

        ``max_caption_tokens`` cuts the caption's tokens (eos included) before the context-length check,
        so an overlong web caption is truncated instead of rejected.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        count = prompt.count(self.image_token)
        if num_images is not None:
            if count == 0:
                prompt = self.image_token * num_images + prompt
            elif count != num_images:
                raise ValueError(
                    f"prompt has {count} {self.image_token!r} tokens but {num_images} images were given: {prompt!r}"
                )
        ids = [] if self.bos_token_id is None else [self.bos_token_id]
        for i, piece in enumerate(prompt.split(self.image_token)):
            if i > 0:
                ids += [self.image_token_id] * self.tokens_per_image
            ids += self._text_ids(piece)
        labels = [IGNORE_INDEX] * len(ids)
        if caption is not None:
            target = (self._text_ids(caption) + [self.eos_token_id])[:max_caption_tokens]
            ids, labels = ids + target, labels + target
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(
                f"example is {len(ids)} tokens long ({self.tokens_per_image} per image), more than the LM's "
                f"context of {self.max_length} tokens: shorten the prompt/caption or use fewer latents"
            )
        return {"input_ids": ids, "labels": labels}

    def pad(self, examples: Sequence[dict], padding_side: str = "right") -> dict[str, Tensor]:
        """Lists from ``build_inputs`` -> (B, L) ``input_ids``, ``attention_mask`` (and ``labels``)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not examples:
            raise ValueError("pad needs at least one example")
        length = max(len(e["input_ids"]) for e in examples)
        with_labels = all("labels" in e for e in examples)
        ids, mask, labels = [], [], []
        for e in examples:
            n = length - len(e["input_ids"])

            def padded(seq, fill, n=n):
                return [fill] * n + list(seq) if padding_side == "left" else list(seq) + [fill] * n

            ids.append(padded(e["input_ids"], self.pad_token_id))
            mask.append(padded([1] * len(e["input_ids"]), 0))
            if with_labels:
                labels.append(padded(e["labels"], IGNORE_INDEX))
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if with_labels:
            batch["labels"] = torch.tensor(labels)
        return batch

    def __call__(
        self,
        prompts: str | Sequence[str],
        captions: Sequence[str] | None = None,
        num_images: int | Sequence[int] | None = None,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        """Batch of (prompt, caption) pairs -> padded tensors ready for ``VisionLanguageModel.forward``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if captions is not None and len(captions) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(captions)} captions")
        counts = num_images if isinstance(num_images, Sequence) else [num_images] * len(prompts)
        if len(counts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(counts)} image counts")
        examples = [
            self.build_inputs(p, None if captions is None else captions[i], counts[i]) for i, p in enumerate(prompts)
        ]
        return self.pad(examples, padding_side)

    def count_images(self, input_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B,) number of images (runs of ``tokens_per_image`` placeholders)."""
        n = (input_ids == self.image_token_id).sum(dim=-1)
        bad = n % self.tokens_per_image != 0
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sample {row} has {int(n[row])} {self.image_token!r} tokens, not a multiple of "
                f"{self.tokens_per_image} (placeholders per image); build inputs with VLMProcessor.build_inputs"
            )
        return n // self.tokens_per_image

    def decode(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
