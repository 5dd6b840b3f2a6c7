"""Stand-in backbones for the embedded default: a tiny open_clip ViT and a tiny LM, trained here, offline.

Nothing can be downloaded, so the demo makes its own frozen backbones, briefly:

- vision: a tiny open_clip CLIP (ViT image tower + text tower) trained with open_clip's own
  contrastive ``ClipLoss`` on the synthetic world's (image, caption) pairs;
- language: a tiny Llama trained on the caption text with a byte-level BPE tokenizer trained on the
  same captions.

Both are saved under ``<dir>`` and then loaded through the real paths users take with real models —
``open_clip.create_model_and_transforms(name, pretrained=<local .safetensors>)`` and
``AutoModelForCausalLM.from_pretrained(<local dir>)`` — so the VLM code cannot tell them from
downloaded ones. A second run with the same settings reuses them (``<dir>/<part>/standin.json``
records the settings; a change retrains that part).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resampler.config import to_dict

from .io import atomic_directory
from .training.optim import adamw, param_groups, warmup_cosine

VISION_WEIGHTS = "open_clip_model.safetensors"  # weights are written and read as safetensors only

__all__ = [
    "VisionStandInConfig",
    "LMStandInConfig",
    "StandInConfig",
    "register_standin_vision",
    "ensure_standin_backbones",
    "train_standin_vision",
    "train_standin_lm",
]


@dataclass
class VisionStandInConfig:
    """A tiny open_clip CLIP; the image tower is what the VLM keeps (frozen)."""

    name: str = "pvlm-standin-vit"  # the open_clip model name this config registers
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    head_width: int = 32
    mlp_ratio: float = 4.0
    pool_type: str = "avg"  # "avg": every patch token feeds the contrastive embedding; "tok": CLS only
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 40
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50

    def open_clip_config(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.width,
                "layers": self.layers,
                "head_width": self.head_width,
                "mlp_ratio": self.mlp_ratio,
                "pool_type": self.pool_type,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,  # open_clip's bundled BPE tokenizer (offline)
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


@dataclass
class LMStandInConfig:
    """A tiny Llama and a byte-level BPE tokenizer, both trained on the captions."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 512  # byte-level BPE: 259 bytes/specials + merges, so every caption word becomes one token
    max_position_embeddings: int = 256
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class StandInConfig:
    """``standin:`` in a run YAML. ``enabled`` makes the run train/reuse the stand-ins and point
    ``model.vision`` and ``model.lm`` at them."""

    enabled: bool = False
    dir: str = ""  # default: <output_dir>/backbones
    vision: VisionStandInConfig = field(default_factory=VisionStandInConfig)
    lm: LMStandInConfig = field(default_factory=LMStandInConfig)
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Entry point


def ensure_standin_backbones(
    config: StandInConfig,
    directory: str | Path,
    load_pairs: Callable[[], tuple[torch.Tensor, list[list[str]]]],
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train (or reuse) both stand-ins under ``directory``; returns the paths to put in the VLM config.

    ``load_pairs()`` gives the training (images (N, 3, H, W) preprocessed, captions per image); it is
    only called when something has to be trained.

    Returns ``{"vision_name", "vision_pretrained", "lm_dir"}``.
    """
    directory = Path(directory)
    vision_dir, lm_dir = directory / "vision", directory / "lm"
    pairs: tuple[torch.Tensor, list[list[str]]] | None = None
    if not _is_current(vision_dir, config.vision, config.seed) or not (vision_dir / VISION_WEIGHTS).is_file():
        pairs = load_pairs()
        log(f"stand-in vision: training a tiny open_clip ViT ({config.vision.steps} steps, contrastive)")
        with atomic_directory(vision_dir) as tmp:
            train_standin_vision(config.vision, *pairs, tmp, config.seed, log)
    else:
        log(f"stand-in vision: reusing {vision_dir}")
    if not _is_current(lm_dir, config.lm, config.seed):
        pairs = load_pairs() if pairs is None else pairs
        log(f"stand-in LM: training a tiny Llama on the captions ({config.lm.steps} steps)")
        with atomic_directory(lm_dir) as tmp:
            train_standin_lm(config.lm, pairs[1], tmp, config.seed, log)
    else:
        log(f"stand-in LM: reusing {lm_dir}")
    name = register_standin_vision(vision_dir)
    return {"vision_name": name, "vision_pretrained": str(vision_dir / VISION_WEIGHTS), "lm_dir": str(lm_dir)}


def register_standin_vision(vision_dir: str | Path) -> str:
    """Register a saved stand-in's open_clip model config (idempotent); returns its model name."""
    import open_clip

    path = Path(vision_dir) / "open_clip_config.json"
    if not path.is_file():
        raise ValueError(f"no stand-in vision model at {vision_dir} (expected {path.name}); train it first")
    name = json.loads((Path(vision_dir) / "standin.json").read_text())["config"]["name"]
    if name not in open_clip.list_models():
        # open_clip names a config file's model after the file's stem
        named = Path(vision_dir) / f"{name}.json"
        if not named.is_file():
            shutil.copyfile(path, named)
        open_clip.add_model_config(named)
    return name


def _is_current(part_dir: Path, config: Any, seed: int) -> bool:
    record = part_dir / "standin.json"
    if not record.is_file():
        return False
    saved = json.loads(record.read_text())
    return saved.get("config") == to_dict(config) and saved.get("seed") == seed


# ----------------------------------------------------------------------------------------------
# Vision


def train_standin_vision(
    config: VisionStandInConfig,
    images: torch.Tensor,
    captions: list[list[str]],
    out_dir: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Contrastive (CLIP) training of a tiny open_clip model; writes the weights open_clip loads."""
    import open_clip
    from open_clip.loss import ClipLoss

    if images.dim() != 4 or tuple(images.shape[1:]) != (3, config.image_size, config.image_size):
        raise ValueError(
            f"stand-in vision: images must be (N, 3, {config.image_size}, {config.image_size}) preprocessed, "
            f"got {tuple(images.shape)}"
        )
    if len(captions) != len(images):
        raise ValueError(f"stand-in vision: {len(images)} images but {len(captions)} caption lists")
    out_dir = Path(out_dir)
    config_path = out_dir / "open_clip_config.json"
    config_path.write_text(json.dumps(config.open_clip_config(), indent=1))
    named = out_dir / f"{config.name}.json"
    shutil.copyfile(config_path, named)
    open_clip.add_model_config(named)
    torch.manual_seed(seed)
    model = open_clip.create_model(config.name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.name)
    texts = {c: i for i, c in enumerate(sorted({c for caps in captions for c in caps}))}
    text_ids = tokenizer(list(texts))  # (num distinct captions, context_length)
    caption_index = [[texts[c] for c in caps] for caps in captions]

    groups = param_groups(model, config.lr, weight_decay=config.weight_decay)
    optimizer = adamw(groups, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup_steps))
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(config.steps):
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        pick = torch.randint(1 << 30, (config.batch_size,), generator=gen)
        cap = torch.tensor([caption_index[i][p % len(caption_index[i])] for i, p in zip(idx.tolist(), pick.tolist())])
        image_features, text_features, logit_scale = model(images[idx], text_ids[cap])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % max(1, config.steps // 5) == 0:
            log(
                f"  vision step {step + 1}/{config.steps}: contrastive loss {sum(losses[-20:]) / len(losses[-20:]):.3f}"
            )
    seconds = time.perf_counter() - start
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / VISION_WEIGHTS))
    record = {"config": to_dict(config), "seed": seed, "final_loss": losses[-1], "train_seconds": seconds}
    (out_dir / "standin.json").write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# Language model


def build_caption_tokenizer(captions: list[str], vocab_size: int):
    """A byte-level BPE trained on the captions, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def train_standin_lm(
    config: LMStandInConfig,
    captions: list[list[str]],
    out_dir: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a tiny Llama on ``<bos> caption <eos>``; save model + tokenizer with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    texts = sorted({c for caps in captions for c in caps})
    if not texts:
        raise ValueError("stand-in LM: no captions to train on")
    tokenizer = build_caption_tokenizer(texts, config.vocab_size)
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32)
    encoded = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"], tokenizer.eos_token_id] for t in texts]
    optimizer = adamw(param_groups(model, config.lr, weight_decay=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(config.steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (config.batch_size,), generator=gen).tolist()]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % max(1, config.steps // 5) == 0:
            log(f"  LM step {step + 1}/{config.steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"config": to_dict(config), "seed": seed, "final_loss": losses[-1], "train_seconds": seconds}
    (out_dir / "standin.json").write_text(json.dumps(record, indent=1))
    return record
