"""Training: one loop for one or N processes, its optimizer, checkpoints, data position and logs.

One module per concern:

    config.py    TrainConfig (the ``train:`` section), TrainResult
    loop.py      train(): accumulation, clipping, autocast, non-finite-step skipping, checkpoint cadence
    optim.py     the one parameter-group rule, AdamW, the one warmup-cosine schedule
    batches.py   EpochLoader and BatchStream: a resumable position in the data
    state.py     training checkpoints: save, find the latest, load (weights, optimizer, RNG, data position)
    fsdp.py      train.distributed=fsdp: FSDP2 units over the LM's layers and the connector; adapter export
    sharded.py   the checkpoints of fsdp runs: torch.distributed.checkpoint, resumable on any world size
    metrics.py   metrics.csv, TensorBoard, progress bar, loss-curve plot
"""

from .batches import EpochLoader
from .config import TrainConfig, TrainResult
from .loop import train
from .optim import build_optimizer, param_groups, warmup_cosine
from .state import latest_checkpoint, set_seed

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EpochLoader",
    "train",
    "build_optimizer",
    "param_groups",
    "warmup_cosine",
    "latest_checkpoint",
    "set_seed",
]
