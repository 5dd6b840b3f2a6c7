"""Where a training run is in its data: `EpochLoader` for indexable datasets, `BatchStream` for any loader.

Both give a position that a checkpoint stores and a resume restores, so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..distributed import rank, world_size

__all__ = ["EpochLoader", "BatchStream"]


class EpochLoader:
    """Batches from an indexable dataset, reshuffled per epoch from ``seed``, with an exact position.

    Global batch g of an epoch is ``perm[g*B*W : (g+1)*B*W]`` and rank r takes its r-th slice of B,
    so W processes with batch B see the same samples as one process with batch W*B. The last
    incomplete global batch of an epoch is dropped. ``state_dict()`` is (epoch, batch index).
    """

    def __init__(self, dataset, batch_size: int, collate, *, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"EpochLoader: batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world = rank(), world_size()
        self.batches_per_epoch = len(dataset) // (batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"EpochLoader: {len(dataset)} samples are fewer than one global batch "
                f"(batch_size {batch_size} x {self.world} processes)"
            )
        self.epoch, self.index = 0, 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            order = self._order(self.epoch)
            while self.index < self.batches_per_epoch:
                start = (self.index * self.world + self.rank) * self.batch_size
                self.index += 1
                yield self.collate([self.dataset[int(i)] for i in order[start : start + self.batch_size]])
            self.epoch, self.index = self.epoch + 1, 0

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class BatchStream:
    """Endless batches with a resumable position (exact for EpochLoader-like loaders, else by skipping).

    A streaming loader (e.g. `vlm.data.CaptionLoader`) must give the same batches for the same epoch
    (set by ``set_epoch``); it is then resumed by replaying the epoch up to the saved batch.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.exact = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        self.epoch = 0
        self.in_epoch = 0  # batches handed out on this rank in the current epoch
        self._it: Iterator[Any] | None = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the loader's iterator now (a worker-backed loader stops its workers), not at exit."""
        it, self._it = self._it, None
        if hasattr(it, "close"):
            it.close()

    def __next__(self) -> Any:
        if self._it is None:
            if not self.exact and hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if self.in_epoch == 0:
                    raise ValueError("train: the data loader gave no batch in a whole epoch") from None
                self.epoch, self.in_epoch = self.epoch + 1, 0
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        self.in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "in_epoch": self.in_epoch}
        if self.exact:
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.epoch = int(state["epoch"])
        if self.exact:
            self.in_epoch = int(state["in_epoch"])
            self.loader.load_state_dict(state["loader"])
            return
        self.in_epoch = 0
        for _ in range(int(state["in_epoch"])):  # replay the epoch up to where the run stopped
            next(self)
