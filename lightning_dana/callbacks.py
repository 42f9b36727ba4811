"""Warm-up, momentum correction and gap monitoring, as Lightning callbacks.

They read N and the push statistics from the strategy (``SimulatedWorkers`` or
``DANAStrategy``) and work with any other strategy too (N = 1 there, unless given).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch.optim import Optimizer


def strategy_workers(trainer: pl.Trainer) -> int:
    """N: the strategy's number of (simulated or real) workers, 1 for any other strategy."""
    return int(getattr(trainer.strategy, "num_workers", 1))


class GradualWarmup(Callback):
    """Goyal et al. (2017) warm-up: lr starts at lr/N and rises linearly, per step, to lr.

    The factor multiplies whatever the user's LR scheduler sets: each scheduler
    step sees (and updates) the un-warmed lr, so step decays, cosine or lambda
    schedules compose exactly. N comes from the strategy unless ``num_workers``
    is given (e.g. for a synchronous baseline with linearly scaled lr).

    Args:
        epochs: length of the warm-up, in epochs. Under real workers the warm-up follows the master's
            pushes (``DANAStrategy.progress``), so it spans the same batches as with one worker.
        num_workers: override N.
    """

    def __init__(self, epochs: float = 5.0, num_workers: int | None = None) -> None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.epochs = epochs
        self.num_workers = num_workers
        self.scheduled: list[list[float]] = []  # the un-warmed lr of every param group

    def factor(self, step: int, num_workers: int, total_steps: float) -> float:
        if total_steps <= 0 or step >= total_steps:
            return 1.0
        start = 1.0 / num_workers
        return start + (1.0 - start) * step / total_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._n = self.num_workers or strategy_workers(trainer)
        if not self.scheduled:
            self.scheduled = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, _Warmed):
                config.scheduler = _Warmed(config.scheduler, self, trainer)
        self._apply(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._apply(trainer)

    def _apply(self, trainer: pl.Trainer) -> None:
        step, per_epoch = _progress(trainer)
        f = self.factor(step, self._n, self.epochs * per_epoch)
        for opt, lrs in zip(trainer.optimizers, self.scheduled):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * f

    def _unwarmed_step(self, trainer: pl.Trainer, scheduler: Any, args: tuple, kwargs: dict) -> None:
        """Let the user's scheduler step from the un-warmed lr, then warm its result."""
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is scheduler.optimizer)
        groups = scheduler.optimizer.param_groups
        for group, lr in zip(groups, self.scheduled[index]):
            group["lr"] = lr
        scheduler.step(*args, **kwargs)
        self.scheduled[index] = [g["lr"] for g in groups]
        self._apply(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduled": self.scheduled}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduled = [list(lrs) for lrs in state_dict["scheduled"]]


class _Warmed:
    """The user's LR scheduler as Lightning sees it during warm-up: same state, un-warmed steps."""

    def __init__(self, scheduler: Any, warmup: GradualWarmup, trainer: pl.Trainer) -> None:
        self.scheduler, self.warmup, self.trainer = scheduler, warmup, trainer

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.warmup._unwarmed_step(self.trainer, self.scheduler, args, kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class MomentumCorrection(Callback):
    """Goyal et al. (2017) momentum correction: on every lr change, scale lr-scaled buffers by lr_new/lr_old.

    Only buffers that hold lr-scaled steps (v ← γv + ηg, θ ← θ − v) need it. An
    optimizer says which of its state entries are such buffers through a class
    attribute ``lr_scaled_state = ("momentum_buffer",)`` or through ``state_keys``
    here. ``torch.optim.SGD`` keeps η outside its buffer (v ← γv + g, θ ← θ − ηv),
    which is the corrected form already, so it is left alone; so are the
    master-side momenta of the simulated and real strategies, kept in the same form.
    Under ``SimulatedWorkers(algorithm="dana")`` each worker's own optimizer state
    is tracked separately and corrected when that worker next steps.
    """

    def __init__(self, state_keys: Mapping[type, Sequence[str]] | None = None) -> None:
        self.state_keys = dict(state_keys or {})
        self._last_lr: dict[int, tuple[Any, list[float]]] = {}

    def keys_for(self, optimizer: Optimizer) -> tuple[str, ...]:
        for cls, keys in self.state_keys.items():
            if isinstance(optimizer, cls):
                return tuple(keys)
        return tuple(getattr(optimizer, "lr_scaled_state", ()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        keys = self.keys_for(optimizer)
        if not keys:
            return
        state = optimizer.state
        lrs = [g["lr"] for g in optimizer.param_groups]
        previous = self._last_lr.get(id(state))
        if previous is not None and previous[0] is state:
            for group, old, new in zip(optimizer.param_groups, previous[1], lrs):
                if old != new and old != 0:
                    for p in group["params"]:
                        for key in keys:
                            buffer = state.get(p, {}).get(key)
                            if buffer is not None:
                                buffer.mul_(new / old)
        self._last_lr[id(state)] = (state, lrs)


class GapMonitor(Callback):
    """Logs the lag τ, the gap G and pushes per second of every worker, from the master's records.

    Every ``logging_interval`` steps (default: the Trainer's ``log_every_n_steps``)
    it logs, from global rank 0, ``dana/lag_mean``, ``dana/lag_max``,
    ``dana/gap_mean`` (over the pushes whose gap was measured), ``dana/pushes``
    and ``dana/pushes_per_s/worker_{i}``. ``history`` keeps every logged row, for
    plots such as the paper's figure 1.
    """

    def __init__(self, logging_interval: int | None = None, prog_bar: bool = True) -> None:
        self.logging_interval = logging_interval
        self.prog_bar = prog_bar
        self.history: list[dict[str, float]] = []
        self._since = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        drain = getattr(trainer.strategy, "drain_push_records", None)
        interval = self.logging_interval or trainer.log_every_n_steps
        if drain is None or trainer.global_step % max(interval, 1):
            return
        self._log(trainer, pl_module, drain())  # only here: reading the simulated master's gaps waits for the device

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The pushes since the last logging step (the master applied them all by now) are logged too."""
        drain = getattr(trainer.strategy, "drain_push_records", None)
        if drain is not None:
            self._log(trainer, pl_module, drain(), prog_bar=False)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[Any], prog_bar: bool = True) -> None:
        if not trainer.is_global_zero or not records:
            return
        metrics = self.summarize(records, time.monotonic() - self._since)
        metrics["step"] = float(trainer.global_step)
        self.history.append(metrics)
        self._since = time.monotonic()
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=trainer.global_step)
        if self.prog_bar and prog_bar:  # self.log is not allowed in on_train_end
            shown = {"lag": metrics["dana/lag_mean"]}
            if "dana/gap_mean" in metrics:
                shown["gap"] = metrics["dana/gap_mean"]
            pl_module.log_dict(shown, prog_bar=True, logger=False, rank_zero_only=True)

    @staticmethod
    def summarize(records: Sequence[Any], seconds: float) -> dict[str, float]:
        lags = [r.lag for r in records]
        gaps = [r.gap for r in records if r.gap is not None]
        metrics = {
            "dana/lag_mean": sum(lags) / len(lags),
            "dana/lag_max": float(max(lags)),
            "dana/pushes": float(len(records)),
        }
        if gaps:
            metrics["dana/gap_mean"] = sum(gaps) / len(gaps)
        per_worker: dict[int, int] = defaultdict(int)
        for r in records:
            per_worker[r.worker] += 1
        for worker, count in sorted(per_worker.items()):
            metrics[f"dana/pushes_per_s/worker_{worker}"] = count / max(seconds, 1e-9)
        return metrics


def ensure_gap_monitor(trainer: pl.Trainer) -> None:
    """Lag and gap reach the loggers without the user asking: add a GapMonitor unless one is there."""
    if not any(isinstance(c, GapMonitor) for c in trainer.callbacks):
        trainer.callbacks.append(GapMonitor())


class MasterView(Callback):
    """Put first among the Trainer's callbacks by the strategies during ``fit`` (not for users).

    At each epoch end, before the other callbacks, the module shows the master's model (so
    ``StochasticWeightAveraging`` averages the master's parameters); at the end of fit, before the
    other callbacks, the strategy finishes the run and the module holds the master's final model
    (so SWA's average, moved in by its own ``on_train_end``, is what stays, as under DDP).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.show_master()  # type: ignore[attr-defined]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.finish_fit()  # type: ignore[attr-defined]


def _progress(trainer: pl.Trainer) -> tuple[int, float]:
    """(steps taken, steps per epoch) as one worker would count them: the master's, where the strategy
    knows them (real workers each take only some of an epoch's batches), else this trainer's."""
    progress = getattr(trainer.strategy, "progress", None)
    known = progress() if callable(progress) else None
    return known if known is not None else (trainer.global_step, float(trainer.num_training_batches))
