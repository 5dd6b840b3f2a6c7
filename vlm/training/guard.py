"""`StepGuard`: undo an optimizer step that left a trainable parameter non-finite.

A finite loss and a finite gradient do not make a finite update: a non-finite learning rate, a
corrupt optimizer state or an overflow inside the optimizer can still write NaN into the weights.
The guard copies the trainable parameters and their optimizer state into buffers of the same shape
before each step (one ``copy_`` per tensor; the buffers are allocated once, so the cost is memory
equal to the parameters plus their optimizer state, and a memory-bound copy per step), checks the
parameters after it, and copies everything back when one is non-finite.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["StepGuard"]


class StepGuard:
    """``snapshot()`` before ``optimizer.step()``; ``finite()`` after it; ``restore()`` to undo it."""

    def __init__(self, params: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.local = [_local(p.detach()) for p in self.params]  # this rank's shard of an FSDP DTensor
        self.optimizer = optimizer
        self._weights: list[Tensor] | None = None
        self._state: dict[Tensor, dict] = {}

    @torch.no_grad()
    def snapshot(self) -> None:
        if self._weights is None:
            self._weights = [t.clone() for t in self.local]
        else:
            torch._foreach_copy_(self._weights, self.local)
        saved = {}
        for p in self.params:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            old = self._state.get(p, {})
            saved[p] = {k: _copy_into(old.get(k), v) for k, v in state.items()}
        self._state = saved

    @torch.no_grad()
    def finite(self) -> bool:
        """True when every trainable parameter is finite (on this rank; one device synchronisation)."""
        checks = [torch.isfinite(t).all() for t in self.local if t.is_floating_point()]
        return bool(torch.stack([c.to(checks[0].device) for c in checks]).all()) if checks else True

    @torch.no_grad()
    def restore(self) -> None:
        if self._weights is None:
            raise RuntimeError("StepGuard.restore() before snapshot()")
        torch._foreach_copy_(self.local, self._weights)
        for p in self.params:
            if p not in self._state:
                self.optimizer.state.pop(p, None)  # the undone step was this parameter's first
                continue
            state = self.optimizer.state[p]
            for k, v in self._state[p].items():
                if isinstance(v, Tensor) and isinstance(state.get(k), Tensor):
                    state[k].copy_(v)
                else:
                    state[k] = v.clone() if isinstance(v, Tensor) else v


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _copy_into(buffer, value):
    """``value`` copied into ``buffer`` when it fits (no new allocation), else a fresh copy."""
    if not isinstance(value, Tensor):
        return value
    fits = isinstance(buffer, Tensor) and (buffer.shape, buffer.dtype, buffer.device) == (
        value.shape,
        value.dtype,
        value.device,
    )
    if fits:
        return buffer.copy_(value)
    return value.detach().clone()
