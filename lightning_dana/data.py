"""Each worker's training batches, dealt by the master: the batch sampler the strategy installs.

The strategy puts :class:`DealtBatchSampler` in place of the ``DistributedSampler``
Lightning would inject (:meth:`DANAStrategy.process_dataloader`), in a copy of the
user's DataLoader, so workers, prefetching and collation stay the user's. The
DataLoader asks for index batches ahead of training (prefetching); the master
counts a batch as trained when a push covers it, and deals a lost worker's
unfinished batches again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from lightning_dana.client import MasterClient
from lightning_dana.dealer import BatchDealer, DealKind, EpochOrder, sequential_order, shuffled_order


class DealtBatchSampler:
    """Yields the index batches the master deals to this worker, until its epoch or the run ends.

    It has no ``len()``: how many batches of an epoch come to this worker depends on the speed of
    the others, so Lightning treats the loader as one of unknown length, prefetches a batch to learn
    which is the last, and validates after it (``val_check_interval=1.0``).
    """

    def __init__(self, client: MasterClient, current_epoch: Callable[[], int]) -> None:
        self.client = client
        self.current_epoch = current_epoch  # the worker's own epoch (Lightning's ``trainer.current_epoch``)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.current_epoch()
        new_pass = True  # an iterator abandoned before its end (a DataLoader made again) leaves its batches
        while not self.client.stop:
            deal = self.client.deal(epoch, new_pass)
            new_pass = False
            if deal.kind is not DealKind.BATCH:
                return
            yield list(deal.indices)


def make_dealer(
    dataloader: DataLoader, seed: int, limit_batches: int | float, max_batches: int | None, max_epochs: int | None = None
) -> BatchDealer:
    """The master's dealer for ``dataloader``: its dataset size, batch size, drop_last and order.

    A ``RandomSampler`` becomes a seeded permutation per epoch (deterministic for a seed), a
    ``SequentialSampler`` the plain order, any other sampler is drawn from as the user made it.
    """
    sampler = dataloader.sampler
    shuffle = isinstance(sampler, RandomSampler)
    if isinstance(sampler, DistributedSamplerWrapper):  # Lightning wrapped the user's own sampler: unwrap it
        sampler = sampler.dataset._sampler
    elif isinstance(sampler, DistributedSampler):  # Lightning's, for a plain shuffled or sequential loader
        shuffle, sampler = sampler.shuffle, None
    num_samples = len(sampler) if sampler is not None else len(dataloader.dataset)  # type: ignore[arg-type]
    if shuffle:
        order: EpochOrder = shuffled_order(num_samples, seed)
    elif sampler is None or isinstance(sampler, SequentialSampler):
        order = sequential_order(num_samples)
    else:
        order = lambda epoch: list(sampler)  # noqa: E731 - the user's own sampler, one pass per epoch
    batch_size = dataloader.batch_size or 1
    full = num_samples // batch_size if dataloader.drop_last else -(-num_samples // batch_size)
    if isinstance(limit_batches, float):
        per_epoch = full if limit_batches >= 1.0 else max(int(full * limit_batches), 1)
    else:
        per_epoch = min(full, int(limit_batches))
    return BatchDealer(order, num_samples, batch_size, bool(dataloader.drop_last), per_epoch, max_batches, max_epochs)
