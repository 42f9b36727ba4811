"""Which simulated worker pushes next (appendix A.2 of the paper).

Every schedule is seeded and checkpointable, so a resumed simulation replays the
same pushes.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

SCHEDULES = ("round_robin", "block_random", "gamma")


class Schedule:
    """Yields worker indices; ``clock`` is simulated time (used by the gamma models)."""

    def __init__(self, num_workers: int, seed: int = 0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.rng = random.Random(seed)
        self.clock = 0.0

    def next_worker(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "clock": self.clock}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.clock = state["clock"]


class RoundRobin(Schedule):
    """1, 2, ..., N, 1, 2, ..."""

    def __init__(self, num_workers: int, seed: int = 0) -> None:
        super().__init__(num_workers, seed)
        self.position = 0

    def next_worker(self) -> int:
        worker = self.position % self.num_workers
        self.position += 1
        self.clock += 1.0
        return worker

    def state_dict(self) -> dict:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.position = state["position"]


class BlockRandom(Schedule):
    """Every block of N pushes holds each worker once, in an order shuffled per block."""

    def __init__(self, num_workers: int, seed: int = 0) -> None:
        super().__init__(num_workers, seed)
        self.block: list[int] = []

    def next_worker(self) -> int:
        if not self.block:
            self.block = list(range(self.num_workers))
            self.rng.shuffle(self.block)
        self.clock += 1.0
        return self.block.pop()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "block": list(self.block)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.block = list(state["block"])


class Gamma(Schedule):
    """Batch times drawn from Gamma(1/V², B·V²/speed) (Ali et al. 2000); the earliest finisher pushes.

    With V = 0.1 and mean time B (the batch size) this is the paper's Γ(100, 1.28)
    for B = 128. ``speeds`` makes workers heterogeneous: worker i's mean batch time
    is B / speeds[i].
    """

    def __init__(
        self,
        num_workers: int,
        seed: int = 0,
        speeds: Sequence[float] | None = None,
        variation: float = 0.1,
        mean_time: float = 128.0,
    ) -> None:
        super().__init__(num_workers, seed)
        self.speeds = check_speeds(speeds, num_workers) if speeds is not None else [1.0] * num_workers
        if variation <= 0:
            raise ValueError(f"variation must be > 0, got {variation}")
        self.shape = 1.0 / variation**2
        self.mean_time = mean_time
        self.heap = [(self._batch_time(w), w) for w in range(num_workers)]
        heapq.heapify(self.heap)

    def _batch_time(self, worker: int) -> float:
        scale = self.mean_time / self.speeds[worker] / self.shape
        return self.rng.gammavariate(self.shape, scale)

    def next_worker(self) -> int:
        finish, worker = heapq.heappop(self.heap)
        self.clock = finish
        heapq.heappush(self.heap, (finish + self._batch_time(worker), worker))
        return worker

    def state_dict(self) -> dict:
        return {**super().state_dict(), "heap": list(self.heap)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.heap = [tuple(item) for item in state["heap"]]


def check_speeds(speeds: Sequence[float], num_workers: int) -> list[float]:
    speeds = [float(s) for s in speeds]
    if len(speeds) != num_workers:
        raise ValueError(
            f"schedule= got a list of {len(speeds)} speeds for num_workers={num_workers}; give one mean speed per worker"
        )
    if any(not s > 0 for s in speeds):
        raise ValueError(f"schedule= speeds must all be > 0, got {speeds}")
    return speeds


def make_schedule(
    schedule: str | Sequence[float], num_workers: int, seed: int = 0, mean_time: float = 128.0
) -> Schedule:
    """A schedule by name, or a ``Gamma`` over per-worker mean speeds when given a list."""
    if isinstance(schedule, str):
        if schedule == "round_robin":
            return RoundRobin(num_workers, seed)
        if schedule == "block_random":
            return BlockRandom(num_workers, seed)
        if schedule == "gamma":
            return Gamma(num_workers, seed, mean_time=mean_time)
        raise ValueError(
            f"schedule={schedule!r} is not known; choose one of {', '.join(SCHEDULES)} or a list of per-worker speeds"
        )
    return Gamma(num_workers, seed, speeds=schedule, mean_time=mean_time)
