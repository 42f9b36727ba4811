"""ImageNet (ILSVRC2012) from an ImageFolder tree, or FakeData of the same shape.

Expects ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``
(the validation images sorted into class folders, as for torchvision's
reference scripts). Training: RandomResizedCrop(224) + RandomHorizontalFlip;
evaluation: Resize(256) + CenterCrop(224) (1-crop), both normalised with the
usual ImageNet statistics. The 50k validation images are the test set, as in
the paper (Table 2), and also feed ``val_acc``.
``fake_data: true`` uses ``torchvision.datasets.FakeData`` with the same
transforms; ``image_size`` (only allowed with fake data) shrinks it for tests.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from examples.image_data import TrainTestDataModule

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, image_size: int = 224) -> transforms.Compose:
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(image_size * 256 // 224), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class ImageNetDataModule(TrainTestDataModule):
    """ImageNet loaders for the ResNet-50 recipe.

    Args:
        data_dir: root holding ``train/`` and ``val/`` class folders.
        batch_size: per worker (He et al.: 256).
        num_workers: DataLoader processes.
        fake_data: use FakeData instead of the files.
        fake_train_size / fake_val_size: number of fake images.
        fake_num_classes: class count of the fake data (1000 like ImageNet).
        image_size: crop size (224; smaller only with fake data, to make tests cheap).
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        fake_data: bool = False,
        fake_train_size: int = 1281167,
        fake_val_size: int = 50000,
        fake_num_classes: int = 1000,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if image_size != 224 and not fake_data:
            raise ValueError("image_size other than 224 only makes sense with fake_data")
        self.save_hyperparameters()
        self.num_classes = fake_num_classes if fake_data else 1000

    def _make(self, train: bool) -> Dataset:
        hp = self.hparams
        transform = imagenet_transforms(train, hp.image_size)
        if hp.fake_data:
            # FakeData draws images at their full size; the transforms then crop as for real data.
            side = hp.image_size * 256 // 224
            return datasets.FakeData(
                size=hp.fake_train_size if train else hp.fake_val_size,
                image_size=(3, side, side),
                num_classes=hp.fake_num_classes,
                transform=transform,
                random_offset=0 if train else 10**7,
            )
        folder = os.path.join(hp.data_dir, "train" if train else "val")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"ImageNet folder {folder!r} not found: point data.data_dir at a root with train/ and val/ "
                "class folders, or set `data.fake_data: true` for a smoke test"
            )
        return datasets.ImageFolder(folder, transform=transform)
