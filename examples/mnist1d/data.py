"""MNIST-1D generated offline from the ``mnist1d`` templates, cached on disk.

``mnist1d.get_dataset`` would try to download the reference pickle; this module
never does. It generates samples with the package's own ``transform`` from its
templates (the same loop as ``mnist1d.data.make_dataset``) and then:

* draws the **test set from its own seed and size** (``test_seed``,
  ``num_test_samples``), so it stays the same whatever ``num_samples`` or
  ``seed`` a study uses for training;
* standardises train, validation and test with the **training** mean and std
  (``make_dataset`` standardises each generated set with its own statistics);
* holds out ``val_fraction`` of the generated training samples as the
  validation set, so ``val_acc`` never looks at the test set.

Generation costs about 0.25 ms per sample (10 s for 40 000), hence the cache:
one ``.npz`` per distinct set of arguments under ``data_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lightning_dana", "mnist1d")


def generate_raw(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised MNIST-1D signals and labels, in ``make_dataset``'s order.

    With the same ``num_samples`` and ``seed``, standardising the result with
    its own mean and std reproduces ``mnist1d.data.make_dataset``'s ``x``.
    """
    from mnist1d.data import get_dataset_args, get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import set_seed

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    templates = get_templates()
    set_seed(seed)
    xs, ys = [], []
    per_class = num_samples // len(templates["y"])
    for label in range(len(templates["y"])):
        for _ in range(per_class):
            x, _t = transform(templates["x"][label], templates["t"], args)
            xs.append(x)
            ys.append(templates["y"][label])
    order = np.random.permutation(len(ys))
    return np.stack(xs)[order], np.stack(ys)[order]


def build_arrays(
    num_samples: int, seed: int, num_test_samples: int, test_seed: int, val_fraction: float
) -> dict[str, np.ndarray]:
    """Train/val/test arrays, float32 signals standardised with training statistics."""
    x, y = generate_raw(num_samples, seed)
    x_test, y_test = generate_raw(num_test_samples, test_seed)
    num_val = int(round(len(y) * val_fraction))
    x_train, y_train = x[num_val:], y[num_val:]
    mean, std = x_train.mean(), x_train.std()
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return {
        "x_train": norm(x_train), "y_train": y_train.astype(np.int64),
        "x_val": norm(x[:num_val]), "y_val": y[:num_val].astype(np.int64),
        "x_test": norm(x_test), "y_test": y_test.astype(np.int64),
    }


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D with a large, seedable training set and a fixed test set.

    Args:
        num_samples: generated training samples (before the validation hold-out);
            the original data set has 4000. 32 workers with batch 128 need
            tens of thousands to see more than a handful of batches each.
        batch_size: per worker (per step).
        seed: generates the training and validation samples.
        num_test_samples / test_seed: the test set, independent of the above.
        val_fraction: share of the generated training samples held out for ``val_acc``.
        data_dir: cache directory for the generated arrays.
        num_workers: DataLoader worker processes (0 is fastest for these tiny tensors).
    """

    def __init__(
        self,
        num_samples: int = 20000,
        batch_size: int = 128,
        seed: int = 0,
        num_test_samples: int = 4000,
        test_seed: int = 1234,
        val_fraction: float = 0.1,
        data_dir: str = DEFAULT_DATA_DIR,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 10
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def cache_path(self) -> Path:
        """One file per argument set that changes the samples."""
        hp = self.hparams
        key = {k: hp[k] for k in ("num_samples", "seed", "num_test_samples", "test_seed", "val_fraction")}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return Path(hp.data_dir).expanduser() / f"mnist1d_{hp.num_samples}_{hp.seed}_{digest}.npz"

    def prepare_data(self) -> None:
        """Generate and cache once (rank 0 only, as Lightning calls it)."""
        path = self.cache_path
        if path.exists():
            return
        hp = self.hparams
        arrays = build_arrays(hp.num_samples, hp.seed, hp.num_test_samples, hp.test_seed, hp.val_fraction)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.cache_path.exists():
            self.prepare_data()
        with np.load(self.cache_path) as arrays:
            for split in ("train", "val", "test"):
                self.datasets[split] = TensorDataset(
                    torch.from_numpy(arrays[f"x_{split}"]).unsqueeze(1),  # (N, 1, 40)
                    torch.from_numpy(arrays[f"y_{split}"]),
                )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
