"""What the CIFAR and ImageNet data modules share: a train set, one held-out set, their loaders."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class TrainTestDataModule(pl.LightningDataModule):
    """Subclasses build ``train_set`` and ``test_set`` with ``_make(train)``.

    As in the papers whose recipes these are, the held-out set is both the
    validation and the test set. Needs ``batch_size`` and ``num_workers`` hparams.
    """

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _make(self, train: bool) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._make(train=True)
        if self.test_set is None:
            self.test_set = self._make(train=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
