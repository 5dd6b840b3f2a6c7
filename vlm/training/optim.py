"""The optimizer of every vlm training run: one parameter-group rule, AdamW, one warmup-cosine schedule.

`param_groups` is the only place that decides which trainable tensor gets which learning rate and
whether it is decayed; `VisionLanguageModel.param_groups`, the trainer and the stand-in backbones all
call it. `warmup_cosine` is the only learning-rate schedule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["param_groups", "is_lora", "is_decayed", "adamw", "build_optimizer", "warmup_cosine"]

# Leaf names of parameters a model holds directly that are embeddings, not matrices: the resampler's
# latents and its time / patch-position embeddings, CLIP's class and positional embeddings, gates.
_NO_DECAY_LEAF = re.compile(r"latent|emb|position|gate")  # emb: embed, embedding, pos_emb, time_emb


def is_lora(name: str) -> bool:
    """A parameter of a peft LoRA module (``...q_proj.lora_A.default.weight``): peft's ``lora_`` names."""
    return any(part.startswith("lora_") for part in name.split("."))


def _embedding_tensors(model: nn.Module) -> set[int]:
    """ids of token-embedding tables: every ``nn.Embedding`` (the input rows, including the rows a VLM
    adds for ``<image>``) and every transformers model's output embedding (an untied head has its own
    new-token rows)."""
    found = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if isinstance(getattr(head, "weight", None), torch.Tensor):
            found.add(id(head.weight))
    return found


def is_decayed(name: str, param: torch.Tensor, embeddings: set[int]) -> bool:
    """Weight decay only on matrices: never on 1-D tensors (biases, norms, gates), embedding tables
    (``embeddings``, from the model's modules) or embedding-like parameters named by their leaf."""
    return param.dim() >= 2 and id(param) not in embeddings and not _NO_DECAY_LEAF.search(name.rsplit(".", 1)[-1])


def param_groups(model: nn.Module, lr: float, lora_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters: {connector, lora} x {decayed, not decayed}.

    ``lora`` (learning rate ``lora_lr``, default ``lr``) holds the parameters of peft LoRA modules;
    ``connector`` (``lr``) everything else trainable: resampler, projection, gates, any unfrozen LM
    weight. Empty groups are left out; every trainable parameter is in exactly one group, named
    ``connector``, ``connector_no_decay``, ``lora`` or ``lora_no_decay``.
    """
    embeddings = _embedding_tensors(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = ("lora" if is_lora(name) else "connector", is_decayed(name, param, embeddings))
            groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr": lr if part == "connector" or lora_lr is None else lora_lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": part if decay else f"{part}_no_decay",
        }
        for (part, decay), params in sorted(groups.items())
    ]


_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")  # torch's fused AdamW kernels (torch >= 2.4 has the CPU one)


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where every parameter allows it (plain floating-point
    tensors on one kernel device). On CPU torch otherwise runs one tensor at a time: measured 48 ms per
    step against 2.5 ms fused for the stand-in ViT's 86 tensors (3.75 M values, two threads). Sharded
    parameters (FSDP2's DTensors) keep torch's default."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device.type for p in params}
    fused = (
        bool(params)
        and len(devices) == 1
        and devices <= set(_FUSED_DEVICES)
        and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point() for p in params)
    )
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {}))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (`adamw`) over `param_groups` with a `TrainConfig`'s learning rates, decay, betas and eps."""
    groups = param_groups(model, config.lr, config.lora_lr, config.weight_decay)
    return adamw(groups, betas=config.betas, eps=config.eps)


def warmup_cosine(max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
