"""Callbacks that make one worker slow or kill it: a straggler and a crash, on demand.

They use only Lightning's callback hooks and ``trainer.global_rank``, so they work
under any strategy (``"dana"``, ``"ddp"``, one device) and any launcher, and the demo
(``examples/mnist1d/demo.py``) and the whole-run benchmark (``benchmarks/whole_run.py``)
share them::

    from examples.faults import CountSamples, KillRankAtStep, PaceSteps, SlowRank

    # rank 2 takes twice as long per step as it otherwise would (it sleeps as long as its step took)
    trainer = pl.Trainer(strategy="dana", devices=3, callbacks=[SlowRank(rank=2, factor=2.0)])
    # every step takes 30 ms (padded by a sleep), rank 2's 60 ms: a known step time
    trainer = pl.Trainer(strategy="dana", devices=3, callbacks=[PaceSteps(0.03, factors={2: 2.0})])
    # rank 2 is SIGKILLed right after its 50th training step
    trainer = pl.Trainer(strategy="dana", devices=3, callbacks=[KillRankAtStep(rank=2, step=50)])

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward and the optimizer step (under ``"dana"`` the push and the reply; under
``"ddp"`` the gradient all-reduce). The sleep goes at its end. Only training steps
are slowed; validation and test run at full speed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (``(x, y)`` tuples, dicts, tensors)."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch)


class SlowRank(pl.Callback):
    """Make worker ``rank`` ``factor`` times slower than it is: after each of its training steps
    it sleeps ``factor - 1`` times as long as the step took.

    This is a worker on a slower machine: its step time stays proportional to the real work,
    whatever the load. ``factor=1`` does nothing.
    """

    def __init__(self, rank: int, factor: float = 2.0) -> None:
        if not factor >= 1.0:
            raise ValueError(f"SlowRank(factor={factor!r}) must be >= 1 (1: not slowed)")
        if rank < 0:
            raise ValueError(f"SlowRank(rank={rank!r}) must be a global rank >= 0")
        self.rank, self.factor = rank, float(factor)
        self._start = 0.0
        self.slept = 0.0  # seconds this rank slept in total

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != self.rank or self.factor == 1.0:
            return
        pause = (self.factor - 1.0) * (time.perf_counter() - self._start)
        time.sleep(pause)
        self.slept += pause


class PaceSteps(pl.Callback):
    """Make every training step take ``seconds`` (``seconds * factors[rank]`` on the listed ranks).

    A step that took less is padded with a sleep; one that took longer is left alone. On a
    machine with fewer cores than workers, real compute would measure core contention rather
    than the strategy; a padded step has a known length as long as the real work fits in it.
    """

    def __init__(self, seconds: float, factors: Mapping[int, float] | None = None) -> None:
        if not seconds > 0:
            raise ValueError(f"PaceSteps(seconds={seconds!r}) must be > 0")
        self.seconds = float(seconds)
        self.factors = {int(r): float(f) for r, f in (factors or {}).items()}
        if any(not f > 0 for f in self.factors.values()):
            raise ValueError(f"PaceSteps(factors={factors!r}): every factor must be > 0")
        self._start = 0.0
        self.overruns = 0  # steps whose real work took longer than their pace
        self.work = 0.0  # seconds of real work in the steps, before padding

    def step_time(self, rank: int) -> float:
        return self.seconds * self.factors.get(rank, 1.0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.work += now - self._start
        left = self._start + self.step_time(trainer.global_rank) - now
        if left > 0:
            time.sleep(left)
        else:
            self.overruns += 1


class KillRankAtStep(pl.Callback):
    """SIGKILL worker ``rank``'s own process right after its ``step``-th training step (1-based,
    counted by this rank across epochs).

    SIGKILL cannot be caught: the process leaves no message, no checkpoint, no goodbye to the
    master, as when a machine dies or the OOM killer strikes. ``rank=0`` kills the master's
    process under ``strategy="dana"``.
    """

    def __init__(self, rank: int, step: int, sig: int = signal.SIGKILL) -> None:
        if rank < 0 or step < 1:
            raise ValueError(f"KillRankAtStep(rank={rank!r}, step={step!r}): rank >= 0 and step >= 1")
        self.rank, self.step, self.sig = rank, step, sig
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != self.rank:
            return
        self.steps += 1
        if self.steps >= self.step:
            print(f"[faults] killing rank {self.rank} (pid {os.getpid()}) after its step {self.steps}", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), self.sig)


class CountSamples(pl.Callback):
    """Count this rank's trained samples and time its training, and write them to
    ``<out_dir>/rank<r>.json`` when training ends (a rank that is killed writes nothing).

    Wall-clock stamps (``time.time()``) so that ranks on one machine can be compared:
    a run's wall time is the latest ``end`` minus the earliest ``start``.
    """

    def __init__(self, out_dir: str | os.PathLike | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.samples = 0
        self.steps = 0
        self.start: float | None = None
        self.end: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples += _batch_size(batch)
        self.steps += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.time()
        self.write(trainer.global_rank)

    def record(self) -> dict[str, Any]:
        return {"samples": self.samples, "steps": self.steps, "start": self.start, "end": self.end}

    def write(self, rank: int, **extra: Any) -> None:
        """Write (or rewrite, with ``extra`` fields) this rank's record."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"rank": rank, **self.record(), **extra}))
        os.replace(tmp, self.out_dir / f"rank{rank}.json")


def read_counts(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The records ``CountSamples`` wrote, by rank."""
    records = {}
    for path in sorted(Path(out_dir).glob("rank*.json")):
        record = json.loads(path.read_text())
        records[int(record["rank"])] = record
    return records


def samples_per_second(records: Mapping[int, Mapping[str, Any]]) -> tuple[int, float, float]:
    """(samples trained by all ranks, wall seconds from the first start to the last end, their ratio)."""
    done = [r for r in records.values() if r.get("start") is not None and r.get("end") is not None]
    if not done:
        raise ValueError("no rank finished training")
    samples = sum(int(r["samples"]) for r in records.values())
    seconds = max(r["end"] for r in done) - min(r["start"] for r in done)
    return samples, seconds, samples / seconds if seconds > 0 else float("inf")
