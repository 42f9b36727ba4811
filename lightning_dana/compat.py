"""Every place lightning-dana reaches into Lightning, torch or torchmetrics internals, in one module.

Each function says which internal it touches and why no public hook does the job,
so a Lightning upgrade has one file to check.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytorch_lightning.core.optimizer as pl_optimizer
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import nn
from torch.utils.data import DataLoader

import pytorch_lightning as pl

ONE_OPTIMIZER = (
    "{who} trains with exactly one optimizer (each optimizer step is one push), configure_optimizers returned "
    "{count}; put all parameters in one optimizer (its param groups may differ)"
)


@contextlib.contextmanager
def one_optimizer(who: str) -> Iterator[None]:
    """Lightning refuses several optimizers under automatic optimization and suggests manual
    optimization, which DANA cannot do; say what works instead. Patches
    ``pytorch_lightning.core.optimizer._validate_multiple_optimizers_support`` while optimizers are set up."""
    original = pl_optimizer._validate_multiple_optimizers_support

    def validate(optimizers: list, model: pl.LightningModule) -> None:
        if len(optimizers) > 1:
            raise MisconfigurationException(ONE_OPTIMIZER.format(who=who, count=len(optimizers)))
        original(optimizers, model)

    pl_optimizer._validate_multiple_optimizers_support = validate
    try:
        yield
    finally:
        pl_optimizer._validate_multiple_optimizers_support = original


def local_sigterm_check(trainer: pl.Trainer) -> None:
    """Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``): a per-step collective that lines every
    worker up with the slowest. Each rank checks its own flag instead; :func:`restore_sigterm_check` undoes it."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(type(loop), "_broadcast_sigterm_tensor"):
        return

    def check_local_sigterm() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    loop._broadcast_sigterm_tensor = check_local_sigterm  # instance attribute


def restore_sigterm_check(trainer: pl.Trainer) -> None:
    trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)


def set_metric_sync(module: nn.Module, enabled: bool) -> None:
    """torchmetrics syncs a metric's state across all ranks of the default group in ``compute()``
    (``Metric.sync_on_compute``, ``dist_sync_on_step``); during asynchronous fit only some ranks compute
    (validation runs on rank 0 alone), so the sync would wait forever. Each metric computes on its own rank's
    state while ``enabled`` is False; the user's settings come back with ``enabled=True``."""
    from torchmetrics import Metric

    for metric in module.modules():
        if not isinstance(metric, Metric):
            continue
        if not enabled:
            metric.__dict__.setdefault("_dana_sync", (metric.sync_on_compute, metric.dist_sync_on_step))
            metric.sync_on_compute = metric.dist_sync_on_step = False
            metric._to_sync = False
        elif "_dana_sync" in metric.__dict__:
            metric.sync_on_compute, metric.dist_sync_on_step = metric.__dict__.pop("_dana_sync")
            metric._to_sync = metric.sync_on_compute


def with_batch_sampler(dataloader: DataLoader, batch_sampler: Any) -> DataLoader:
    """A copy of ``dataloader`` that takes its batches of indices from ``batch_sampler``, keeping
    everything else (workers, prefetching, collate, pinning, the user's DataLoader subclass).
    ``DataLoader`` forbids setting ``batch_sampler`` after construction and Lightning's
    ``_update_dataloader`` re-creates custom batch samplers from their init arguments, so the copy's
    attribute is set directly; ``len()`` and iteration read it through ``DataLoader._index_sampler``."""
    loader = copy.copy(dataloader)
    object.__setattr__(loader, "batch_sampler", batch_sampler)
    object.__setattr__(loader, "batch_size", None)
    object.__setattr__(loader, "drop_last", False)
    object.__setattr__(loader, "_iterator", None)
    return loader



def let_checkpoints_save(trainer: pl.Trainer) -> None:
    """``ModelCheckpoint`` skips a save while ``trainer.global_step`` has not moved since its last one
    (``_last_global_step_saved``). On rank 0 of real workers global_step counts rank 0's own steps, and
    the master's model moves with every worker's push: an epoch in which rank 0 took no batch (the others
    took them while it validated) would leave ``last.ckpt`` one epoch behind the final model."""
    for callback in trainer.checkpoint_callbacks:
        if hasattr(callback, "_last_global_step_saved"):
            callback._last_global_step_saved = -1


def requested_devices(trainer: pl.Trainer) -> int:
    """How many devices ``Trainer(devices=...)`` asked for. A single-device strategy silently runs on one
    whatever ``devices`` says (``_AcceleratorConnector._devices_flag`` keeps what was asked)."""
    flag = getattr(trainer._accelerator_connector, "_devices_flag", 1)
    if isinstance(flag, (list, tuple)):
        return len(flag)
    try:
        return int(flag)
    except (TypeError, ValueError):
        return 1


def forget_train_data(trainer: pl.Trainer) -> None:
    """Make the fit loop build its training DataLoader again when it starts. ``configure_optimizers``
    may have built it already (``trainer.estimated_stepping_batches`` does), before the strategy could
    deal its batches; ``FitLoop.setup_data`` returns early while ``FitLoop._combined_loader`` is set."""
    trainer.fit_loop._combined_loader = None


def unrepeated(dataloader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """Lightning gives validate/test a ``DistributedSampler``, which pads the last shard with repeated
    samples (it warns so); Lightning's own ``UnrepeatedDistributedSamplerWrapper`` (what it uses for
    predict) shards without repeating, so every sample is evaluated once."""
    from lightning_fabric.utilities.data import _update_dataloader
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSamplerWrapper
    from torch.utils.data import DistributedSampler, SequentialSampler

    sampler = dataloader.sampler
    if not isinstance(sampler, DistributedSampler) or isinstance(sampler, UnrepeatedDistributedSamplerWrapper):
        return dataloader
    inner = getattr(sampler.dataset, "_sampler", None) or SequentialSampler(dataloader.dataset)
    return _update_dataloader(
        dataloader, UnrepeatedDistributedSamplerWrapper(inner, num_replicas=num_replicas, rank=rank, shuffle=False)
    )
