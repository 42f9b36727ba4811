"""Per-step LR schedules paced by the master's pushes, so they keep their single-worker meaning.

With one worker, Lightning steps an ``interval="step"`` scheduler after each optimizer step.
Under real workers each worker takes about 1/N of the master's steps: stepped by its own
steps, a schedule sized for one worker (``OneCycleLR(total_steps=trainer.estimated_stepping_batches)``,
a per-step cosine) would run N times too slowly. :class:`MasterPaced` stands in for the
user's scheduler while Lightning steps it and catches it up to the master's push count, so
every worker computes with the lr one worker would use at that point of the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any


def pace(configs: Sequence[Any], pushes: Callable[[], int]) -> list[Any]:
    """Wrap every per-step scheduler of ``configs`` (Lightning's ``LRSchedulerConfig``) that can be
    paced; return the per-step schedulers that cannot be (they step with this worker's own steps)."""
    unpaced = []
    for config in configs:
        if config.interval != "step" or isinstance(config.scheduler, MasterPaced):
            continue
        if config.reduce_on_plateau or not isinstance(getattr(config.scheduler, "last_epoch", None), int):
            unpaced.append(config.scheduler)
            continue
        config.scheduler = MasterPaced(config.scheduler, pushes, config.frequency)
    return unpaced


def catch_up(configs: Sequence[Any]) -> None:
    """Step every paced scheduler to the master's count now: before a step, whose pull may be newer
    than the last step's reply (a worker joining late, a pull at an epoch's end)."""
    for config in configs:
        if isinstance(config.scheduler, MasterPaced):
            config.scheduler.catch_up()


def unpace(configs: Sequence[Any]) -> None:
    """Give Lightning the user's schedulers back (after fit)."""
    for config in configs:
        if isinstance(config.scheduler, MasterPaced):
            config.scheduler = config.scheduler.scheduler


class MasterPaced:
    """The user's LR scheduler as Lightning sees it under real workers: each ``step()`` steps it
    until its step count (``last_epoch``) reaches the master's pushes divided by ``frequency``.

    Its state is the user's scheduler's, so checkpoints hold what one worker's run would hold.
    """

    def __init__(self, scheduler: Any, pushes: Callable[[], int], frequency: int = 1) -> None:
        self.scheduler = scheduler
        self.pushes = pushes
        self.frequency = max(int(frequency), 1)

    def step(self, *args: Any, **kwargs: Any) -> None:
        behind = self.pushes() // self.frequency - self.scheduler.last_epoch
        for _ in range(behind):  # no step when ahead (e.g. resumed past the master's count)
            self.scheduler.step(*args, **kwargs)

    def catch_up(self) -> None:
        """:meth:`step` outside Lightning's scheduler updates; torch's warning that a scheduler
        stepped before its optimizer (a worker joining late) does not apply."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\(\)` before")
            self.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)
