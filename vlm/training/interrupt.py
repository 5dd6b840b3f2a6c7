"""Stopping a run on SIGINT / SIGTERM: finish the step, checkpoint, exit; a second signal aborts.

`StopOnSignal` installs handlers for the duration of a training call (main thread only: Python
delivers signals there). The first SIGINT or SIGTERM only sets a flag, which the loop reads after
each optimizer step (`requested`, agreed over all ranks so every replica stops at the same step);
the loop then writes its checkpoint through the one checkpoint writer and returns, and the command
exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) and a one-line message saying how to
resume (`stop_message`). A second signal raises `TrainingAborted` (a KeyboardInterrupt) at once: the
step in progress is abandoned and an interrupted atomic write leaves only its temporary, removed on
the way out.

Under a launcher agent (torchrun, ``accelerate launch --multi_gpu``) a Ctrl-C reaches each worker
twice: from the terminal (the whole process group) and forwarded by the agent milliseconds later. A
second signal within ``debounce_s`` of the first therefore counts as the same request there. The agent
kills workers that have not exited 30 s after it forwarded the signal (torch's default shutdown
timeout): the stop checkpoint must be written within that time.

DataLoader workers ignore both signals (`ignore_stop_signals`, their ``worker_init_fn``): the main
process decides, and a terminal's Ctrl-C no longer kills the workers that the step in progress still
reads from.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ..distributed import any_rank, gather_objects

__all__ = ["StopOnSignal", "TrainingAborted", "ignore_stop_signals", "stop_message", "exit_status"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingAborted(KeyboardInterrupt):
    """A second stop signal: the run stops at once, without a checkpoint of the step in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM request a stop after the current step; a second one aborts."""

    def __init__(self, enabled: bool = True, debounce_s: float | None = None) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        self.enabled = enabled and in_main
        if debounce_s is None:  # a launcher agent forwards the terminal's signal a second time
            debounce_s = 2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        self.debounce_s = debounce_s
        self.signum: int | None = None
        self._agreed: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if self.enabled:
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            _say(f"train: {name} received: stopping after this step with a checkpoint (a second signal aborts)")
            return
        if time.monotonic() - self._first_at < self.debounce_s:
            return
        _say(f"train: second {name}: aborting now, without a checkpoint of this step")
        raise TrainingAborted(signum)

    @property
    def signal_name(self) -> str | None:
        """The signal every rank agreed to stop on (after `requested` returned True), else this rank's."""
        signum = self._agreed if self._agreed is not None else self.signum
        return None if signum is None else signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank once any rank got a stop signal (one all-reduce per call when distributed;
        the signal itself is exchanged once, so every rank reports and exits with the same one)."""
        if not any_rank(self.signum is not None):
            return False
        if self._agreed is None:
            self._agreed = next(s for s in gather_objects(self.signum) if s is not None)
        return True


def _say(message: str) -> None:
    os.write(2, (message + "\n").encode())  # async-signal-safe enough: no buffered stream re-entered


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves SIGINT/SIGTERM to the main process."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_status(signal_name: str) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130, 143)."""
    return 128 + int(signal.Signals[signal_name])


def stop_message(signal_name: str, step: int, max_steps: int, checkpoint: Path | None) -> str:
    """The one line a stopped run prints."""
    where = f"checkpoint {checkpoint}" if checkpoint is not None else "checkpoint written by rank 0"
    return (
        f"train: stopped by {signal_name} at step {step} of {max_steps}; {where}. "
        "To resume, run the same command again."
    )
