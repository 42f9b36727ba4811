"""The master's data dealer: one shared order of batches per epoch, dealt to workers as they ask.

A fast worker asks more often and so trains more batches than a slow one; one
epoch is one pass of the master over the dataset, whatever the workers' speeds.
A batch stays *outstanding* at its worker from the moment it is dealt until a
push covers it; a worker that is lost gives its outstanding batches back, and
they are dealt again before any new batch, so every batch of an epoch is
trained exactly once.

Epoch numbers keep every worker's Lightning loop in step with the master: a
worker asks for a batch of its own epoch ``e``; while ``e`` is the epoch being
dealt it gets batches, and once that epoch has none left it gets ``EPOCH_END``
(and the master moves on to ``e + 1``). Each worker therefore sees every epoch
end exactly once, and per-epoch LR schedules, ``max_epochs`` and epoch-end
callbacks keep their single-worker meaning.

Pure bookkeeping: no processes, no messages, no locks (the master holds its lock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

#: the dataset indices of one epoch, in the order they are dealt
EpochOrder = Callable[[int], Sequence[int]]


class DealKind(Enum):
    BATCH = "batch"
    EPOCH_END = "epoch_end"
    WAIT = "wait"  # the run's last batches are with other workers: ask again when one of them pushes
    STOP = "stop"


@dataclass(frozen=True)
class Deal:
    kind: DealKind
    epoch: int
    indices: tuple[int, ...] = ()


def shuffled_order(num_samples: int, seed: int) -> EpochOrder:
    """A fresh permutation per epoch, the same for a given seed (independent of the global RNG)."""

    def order(epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(num_samples, generator=generator).tolist()

    return order


def sequential_order(num_samples: int) -> EpochOrder:
    return lambda epoch: range(num_samples)


class BatchDealer:
    """Deals batches of ``batch_size`` indices from ``order(epoch)``.

    Args:
        order: the dataset indices of an epoch, in order.
        batch_size: indices per batch.
        drop_last: drop the last, smaller batch of an epoch.
        batches_per_epoch: at most this many batches per epoch (``limit_train_batches``).
        max_batches: stop dealing after this many batches in all (``max_steps`` times the
            accumulation); ``None``: no limit.
        max_epochs: the run's epochs (``None``: no limit), so the last epoch ends only when all its
            batches are trained.
    """

    def __init__(
        self,
        order: EpochOrder,
        num_samples: int,
        batch_size: int,
        drop_last: bool = False,
        batches_per_epoch: int | None = None,
        max_batches: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.order = order
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        full = num_samples // batch_size if drop_last else -(-num_samples // batch_size)
        self.batches_per_epoch = full if batches_per_epoch is None else min(full, batches_per_epoch)
        self.max_batches = max_batches
        self.max_epochs = max_epochs
        self.epoch = 0  # the epoch being dealt
        self.cursor = 0  # next batch of that epoch
        self.dealt = 0  # batches dealt in all, returned ones counted once
        self.stopped = False
        self.returned: deque[tuple[int, int]] = deque()  # (epoch, batch) given back by lost workers
        self.outstanding: dict[int, deque[tuple[int, int]]] = {}
        self.trained: dict[int, int] = {}  # epoch -> batches trained
        self._orders: dict[int, Sequence[int]] = {}

    # ------------------------------------------------------------------ dealing
    def deal(self, worker: int, worker_epoch: int, waiting: frozenset[int] = frozenset()) -> Deal:
        """The next batch for ``worker``, which is in its epoch ``worker_epoch``.

        At the end of the run (the last epoch or ``max_batches`` fully dealt) the answer is ``WAIT``
        while another worker still trains batches of it (one of those may die and give them back);
        ``waiting``: workers blocked in this same call, whose outstanding batches are only prefetched.
        """
        if self.stopped:
            return Deal(DealKind.STOP, self.epoch)
        if self.returned:  # a lost worker's batches first, whatever epoch they belong to
            return self._give(worker, *self.returned.popleft())
        if worker_epoch < self.epoch:
            return Deal(DealKind.EPOCH_END, worker_epoch)
        if self.max_batches is not None and self.dealt >= self.max_batches:
            return Deal(DealKind.WAIT, self.epoch) if self._others_busy(worker, waiting) else Deal(DealKind.STOP, self.epoch)
        if self.cursor >= self.batches_per_epoch:  # this epoch is fully dealt: the next one starts
            last = self.max_epochs is not None and self.epoch + 1 >= self.max_epochs
            if last and self._others_busy(worker, waiting):
                return Deal(DealKind.WAIT, self.epoch)
            ended = self.epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._orders = {e: o for e, o in self._orders.items() if e >= ended}
            return Deal(DealKind.EPOCH_END, ended)
        self.cursor += 1
        self.dealt += 1
        return self._give(worker, self.epoch, self.cursor - 1)

    def _others_busy(self, worker: int, waiting: frozenset[int]) -> bool:
        return any(queue for w, queue in self.outstanding.items() if w != worker and w not in waiting)

    def _give(self, worker: int, epoch: int, batch: int) -> Deal:
        self.outstanding.setdefault(worker, deque()).append((epoch, batch))
        return Deal(DealKind.BATCH, epoch, self.indices(epoch, batch))

    def indices(self, epoch: int, batch: int) -> tuple[int, ...]:
        if epoch not in self._orders:
            self._orders[epoch] = self.order(epoch)
        start = batch * self.batch_size
        return tuple(int(i) for i in self._orders[epoch][start : start + self.batch_size])

    # --------------------------------------------------------------- accounting
    def trained_batches(self, worker: int, count: int) -> None:
        """A push of ``worker`` covered its ``count`` oldest outstanding batches."""
        queue = self.outstanding.get(worker)
        for _ in range(min(count, len(queue) if queue else 0)):
            epoch, _batch = queue.popleft()  # type: ignore[union-attr]
            self.trained[epoch] = self.trained.get(epoch, 0) + 1

    def release(self, worker: int) -> int:
        """``worker`` stopped cleanly: what it was dealt and did not train is not owed any more."""
        return len(self.outstanding.pop(worker, ()))

    def lose(self, worker: int) -> int:
        """``worker`` is gone: its outstanding batches are dealt again; returns how many."""
        lost = self.outstanding.pop(worker, deque())
        self.returned.extend(lost)
        return len(lost)

    def stop(self) -> None:
        self.stopped = True

    def take_over(self, other: BatchDealer) -> None:
        """Go on dealing where the live ``other`` is, its batches in flight included (the training
        DataLoader was made again during the run: ``reload_dataloaders_every_n_epochs``). Unlike
        :meth:`load_state_dict`, outstanding batches stay with their workers, which are training them."""
        self.epoch, self.cursor, self.dealt, self.stopped = other.epoch, other.cursor, other.dealt, other.stopped
        self.returned = deque(other.returned)
        self.outstanding = {w: deque(queue) for w, queue in other.outstanding.items()}
        self.trained = dict(other.trained)
        self._orders = dict(other._orders)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """What resuming needs; batches outstanding at save time are dealt again after resume."""
        returned = list(self.returned) + [b for queue in self.outstanding.values() for b in queue]
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "dealt": self.dealt,
            "returned": returned,
            "trained": dict(self.trained),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.dealt = state["epoch"], state["cursor"], state["dealt"]
        self.returned = deque(tuple(b) for b in state["returned"])
        self.trained = dict(state["trained"])
        self.outstanding = {}
        self.stopped = False
