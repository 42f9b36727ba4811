"""One record of what went wrong in a run: workers done, lost or broken, refused pushes, the abort.

The master's serving threads, rank 0's training loop and the launcher's child
watcher all write here, so every change happens under one lock and every reader
gets a consistent view. The first abort wins and is never overwritten.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)


class WorkerState(Enum):
    ACTIVE = "active"
    DONE = "done"  # stopped cleanly
    LOST = "lost"  # died, failed, or went silent: its batches are dealt again
    BROKEN = "broken"  # sent a malformed message: nothing more is read from it


class MasterFailedError(RuntimeError):
    """The master stopped with an error; the message says why and where its model was saved."""


@dataclass(frozen=True)
class Abort:
    code: int
    reason: str
    lost_rank: int = -1


class FaultRecord:
    """Thread-safe state of every worker of a run, and the run's abort (set once)."""

    def __init__(self, num_workers: int, max_refused_in_a_row: int) -> None:
        self.num_workers = num_workers
        self.max_refused_in_a_row = max_refused_in_a_row
        self._lock = threading.RLock()  # re-entrant: wait()'s predicate reads the record under it
        self._states = [WorkerState.ACTIVE] * num_workers
        self._reasons: dict[int, str] = {}
        self.refused = [0] * num_workers
        self._refused_in_a_row = 0
        self._abort: Abort | None = None
        self.changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------ workers
    def state(self, rank: int) -> WorkerState:
        with self._lock:
            return self._states[rank]

    def _set(self, rank: int, state: WorkerState, reason: str | None) -> bool:
        """Move ``rank`` out of ACTIVE (only once); returns whether this call did it."""
        with self._lock:
            if self._states[rank] is not WorkerState.ACTIVE:
                return False
            self._states[rank] = state
            if reason:
                self._reasons[rank] = reason
            self.changed.notify_all()
            return True

    def done(self, rank: int) -> bool:
        return self._set(rank, WorkerState.DONE, None)

    def lose(self, rank: int, reason: str) -> bool:
        first = self._set(rank, WorkerState.LOST, reason)
        if first:
            log.error(f"[dana master] {reason}")
        return first

    def break_(self, rank: int, reason: str) -> bool:
        first = self._set(rank, WorkerState.BROKEN, reason)
        if first:
            log.error(f"[dana master] {reason}")
        return first

    def active(self, ranks: range | None = None) -> list[int]:
        with self._lock:
            return [r for r in (ranks or range(self.num_workers)) if self._states[r] is WorkerState.ACTIVE]

    def gone(self) -> dict[int, str]:
        """Ranks lost or broken, with why."""
        with self._lock:
            return {r: self._reasons.get(r, s.value) for r, s in enumerate(self._states) if s in (WorkerState.LOST, WorkerState.BROKEN)}

    # ----------------------------------------------------------------- refusals
    def refuse(self, rank: int) -> bool:
        """Count a refused push; True when refusals in a row reached the limit (the run must stop)."""
        with self._lock:
            self.refused[rank] += 1
            self._refused_in_a_row += 1
            return self._refused_in_a_row >= self.max_refused_in_a_row

    def accepted(self) -> None:
        with self._lock:
            self._refused_in_a_row = 0

    # -------------------------------------------------------------------- abort
    def abort(self, code: int, reason: str, lost_rank: int = -1) -> Abort:
        """Stop the run (the first call wins); returns the abort in force."""
        with self._lock:
            if self._abort is None:
                self._abort = Abort(int(code), reason, lost_rank)
                log.error(f"[dana master] run aborted: {reason}")
                self.changed.notify_all()
            return self._abort

    @property
    def aborted(self) -> Abort | None:
        with self._lock:
            return self._abort

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` (called under the lock, at every change) holds, or ``timeout`` passes."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)
