"""``train.distributed=fsdp``: shard the model over the ranks with torch's FSDP2 (`fully_shard`).

`shard_model` makes one FSDP unit (one ``fully_shard`` call: its parameters are stored 1/N per rank,
all-gathered just before the unit runs and freed after it; its gradients are reduce-scattered in
backward) of each of:

    every decoder layer of the LM        `vlm.registry.decoder_layers`, with its LoRA matrices inside
    every gated cross-attention block    cross_attention mode (they run inside the layers' pre-hooks)
    the resampler, the projector         the trainable connector
    the input embedding, the output head when they do not share a weight (a tied pair stays in the root)
    the root                             whatever is left (final norm, a tied embedding)

The frozen vision tower is left out of every unit (``ignored_params``): it runs under ``no_grad`` and
has no gradient or optimizer state, so it stays whole on every rank and costs no communication.

Why LoRA shares its layer's unit: FSDP1 flattened a unit into one tensor and refused mixed
``requires_grad`` (pytorch #100945), or allocated gradients for the frozen part (#104690). FSDP2 keeps
one DTensor per parameter and makes a gradient only where ``requires_grad`` is set, so a frozen layer
with trainable LoRA inside is one unit and one all-gather; separate LoRA units would add an all-gather
per adapted linear and save nothing.

Precision: ``train.precision=bf16`` gives every unit ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` (stored parameters keep their dtype, compute in bf16, gradients reduced in fp32);
``fp32`` casts nothing. Activation checkpointing (``train.gradient_checkpointing``, transformers'
non-reentrant checkpoint around each decoder layer) composes: FSDP2 skips the re-gather when a layer
is recomputed inside its own backward. 4-bit LMs (QLoRA) shard like any other: their packed
``Params4bit`` data are chunked, the quantization state stays on each module; set
``lm.bnb_4bit_quant_storage`` to ``lm.dtype`` (bitsandbytes' FSDP-QLoRA guide) so the packed weights
have the dtype of the rest of their unit.

One process without a process group has nothing to shard: the model trains as it is, and checkpoints
are still written in the sharded format (`vlm.training.sharded`), so such a process can resume a
sharded run. `export_adapter` writes the ordinary adapter format from a sharded model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..distributed import barrier, broadcast_parameters, is_distributed, print0, rank, world_size
from .config import TrainConfig

__all__ = ["shard_model", "is_sharded", "mixed_precision", "full_parameters", "export_adapter"]


def mixed_precision(precision: str):
    """The FSDP2 policy of ``train.precision``: bf16 compute with fp32 gradient reduction, or no casting."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"train.distributed=fsdp trains in fp32 or bf16, got train.precision={precision!r}")


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one, innermost first (FSDP2 requires children before parents)."""
    units: list[nn.Module] = []
    lm = getattr(model, "language_model", None)
    if lm is not None:
        from ..registry import decoder_layers

        model_type = getattr(getattr(lm, "config", None), "model_type", None)
        try:
            units += list(decoder_layers(lm, model_type))
        except ValueError as err:
            raise ValueError(
                f"train.distributed=fsdp shards the LM one decoder layer at a time and needs its layers: {err}"
            ) from None
        inputs, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        tied = head is not None and head.weight is inputs.weight
        if not tied:
            units += [m for m in (inputs, head) if m is not None]
    xattn = getattr(model, "xattn", None)
    if xattn is not None:
        units += list(xattn.blocks)
    units += [
        getattr(model, name) for name in ("resampler", "projector") if isinstance(getattr(model, name, None), nn.Module)
    ]
    return [m for m in units if any(True for _ in m.parameters())]


def shard_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Shard ``model`` in place over the process group's ranks (see the module docstring); returns it.

    Rank 0's trainable weights are broadcast first (as under ddp); frozen ones must already agree (the
    same checkpoint on every rank). Parameters become DTensors: rebuild anything that holds the old
    ones (the trainable dict, the optimizer) after this call. A model sharded already is returned as
    it is, so a caller may shard before `train` (to free each rank's full copy early).
    """
    if not is_distributed():
        print0("train: distributed=fsdp in a single process: nothing to shard, checkpoints are still sharded")
        return model
    if is_sharded(model):
        return model
    broadcast_parameters(p for p in model.parameters() if p.requires_grad)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the device init_distributed chose: cuda:<local rank> with nccl, else the CPU with gloo
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = mixed_precision(config.precision)
    tower = getattr(model, "vision", None)
    ignored = set(tower.parameters()) if isinstance(tower, nn.Module) else set()
    if tower is not None and ignored:
        tower.to(device)  # FSDP moves what it shards to the mesh's device, not what it ignores
    # The connector's outputs are views (reshapes); the VLM copies them into the LM's inputs and never
    # modifies them in place, which is the case FSDP2 warns about on every forward.
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDP(PerceiverResampler|Sequential|Linear)\) returned a view"
    )
    units = _units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    print0(f"train: FSDP2 over {world_size()} ranks, {len(units) + 1} units, {config.precision} compute")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every FSDP unit is all-gathered: ``model``'s parameters are full plain tensors on every
    rank (collective: every rank enters). Holds the whole model per rank, as DDP does, until exit."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with torch.no_grad():
        for unit in units:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()


def export_adapter(model: nn.Module, directory: str | Path, *, step: int | None = None) -> Path:
    """`vlm.checkpoint.save_adapter` from a sharded (or plain) VLM: rank 0 writes, every rank calls.

    The adapter is the ordinary one (`vlm.checkpoint`): it loads into a plain model on one process.
    A model whose full weights do not fit one device: resume its sharded checkpoint in one CPU process
    (`vlm.training.sharded.load_weights`) and call ``save_adapter`` there instead.
    """
    from ..checkpoint import save_adapter

    directory = Path(directory)
    if is_sharded(model):
        with full_parameters(model):
            if rank() == 0:
                save_adapter(model, directory, step=step)
    elif rank() == 0:
        save_adapter(model, directory, step=step)
    barrier()
    return directory
