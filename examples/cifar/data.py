"""CIFAR-10 / CIFAR-100 with the standard augmentation, or FakeData of the same shape.

Training: RandomCrop(32, padding=4) + RandomHorizontalFlip + per-channel
normalisation; test: normalisation only. As in the papers whose recipes we
reproduce, there is no separate validation split: the validation loader is the
test set (``val_acc`` == the test accuracy at that epoch), and the reported
number is the test accuracy after the last epoch.

Data: torchvision's layout under ``data_dir`` (``cifar-10-batches-py`` /
``cifar-100-python``). Nothing is downloaded unless ``download: true``.
``fake_data: true`` swaps in ``torchvision.datasets.FakeData`` (random images,
same shape and class count, same transforms) to smoke-test a setup without data.
"""

from __future__ import annotations

from typing import Literal

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from examples.image_data import TrainTestDataModule

STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def cifar_transforms(dataset: str, train: bool, image_size: int = 32) -> transforms.Compose:
    mean, std = STATS[dataset]
    augment = [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


class CIFARDataModule(TrainTestDataModule):
    """CIFAR-10/100 loaders for the paper's recipes.

    Args:
        dataset: ``cifar10`` or ``cifar100``.
        data_dir: directory holding torchvision's CIFAR folders.
        batch_size: per worker (the paper: 128).
        num_workers: DataLoader processes.
        download: let torchvision download into ``data_dir`` (off: runs must not touch the network).
        fake_data: use FakeData instead of the files.
        fake_train_size / fake_test_size: number of fake images.
        image_size: side of the fake images (32 for real CIFAR; smaller only to make tests cheap).
    """

    def __init__(
        self,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        fake_data: bool = False,
        fake_train_size: int = 50000,
        fake_test_size: int = 10000,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if dataset not in NUM_CLASSES:
            raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {dataset!r}")
        if image_size != 32 and not fake_data:
            raise ValueError("image_size other than 32 only makes sense with fake_data")
        self.save_hyperparameters()
        self.num_classes = NUM_CLASSES[dataset]

    def _make(self, train: bool) -> Dataset:
        hp = self.hparams
        transform = cifar_transforms(hp.dataset, train, hp.image_size)
        if hp.fake_data:
            return datasets.FakeData(
                size=hp.fake_train_size if train else hp.fake_test_size,
                image_size=(3, hp.image_size, hp.image_size),
                num_classes=self.num_classes,
                transform=transform,
                random_offset=0 if train else 10**6,  # different images for test
            )
        cls = datasets.CIFAR10 if hp.dataset == "cifar10" else datasets.CIFAR100
        try:
            return cls(hp.data_dir, train=train, transform=transform, download=hp.download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise RuntimeError(
                f"{hp.dataset} not found under data_dir={hp.data_dir!r}: put torchvision's extracted "
                "CIFAR folder there, set `data.download: true` (needs internet), or set "
                "`data.fake_data: true` for a smoke test"
            ) from err

    def prepare_data(self) -> None:
        if self.hparams.download and not self.hparams.fake_data:
            for train in (True, False):
                self._make(train)
