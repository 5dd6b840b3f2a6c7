"""UTF-8 byte tokenizer for byte-level Perceivers: 6 special ids, then the 256 byte values.

Ids: pad 0, bos 1, eos 2, mask 3, cls 4, sep 5, byte b -> b + 6; vocabulary 262. This is the layout
of DeepMind's language Perceiver (and Hugging Face's ``PerceiverTokenizer``), so converted
checkpoints read the same ids. Any Unicode string round-trips; decoding never raises (invalid
UTF-8 byte sequences become U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    special_tokens = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
    pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(6)
    offset = len(special_tokens)
    vocab_size = offset + 256

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids (bytes + 6); with ``add_special_tokens``: [CLS] ... [SEP] as the official model."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be str, got {type(text).__name__}")
        ids = [b + self.offset for b in text.encode("utf-8", errors="surrogatepass")]
        return [self.cls_id, *ids, self.sep_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Special ids are dropped (or written as their names); never raises."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out, chunk = [], bytearray()
        for i in ids:
            i = int(i)
            if self.offset <= i < self.vocab_size:
                chunk.append(i - self.offset)
                continue
            if chunk:
                out.append(chunk.decode("utf-8", errors="replace"))
                chunk = bytearray()
            if not skip_special_tokens and 0 <= i < self.offset:
                out.append(self.special_tokens[i])
        if chunk:
            out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(
        self, texts: str | Sequence[str], *, add_special_tokens: bool = False, max_length: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """A batch of texts -> ids (B, L) right-padded with [PAD], mask (B, L) (True = real token)."""
        if isinstance(texts, str):
            texts = [texts]
        seqs = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if max_length is not None:
            seqs = [s[:max_length] for s in seqs]
        length = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = True
        return ids, mask
