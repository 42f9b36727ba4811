"""The second task of the reproduction study (issue 8): teacher-student regression, generated offline.

Another kind of problem than MNIST-1D classification: a regression (mean squared error), a plain MLP
without BatchNorm, smooth targets. x ~ N(0, I₃₂); the teacher is a fixed random 2-layer tanh network
(width 64, seeded); y = teacher(x) + 0.1·noise, standardised with the training statistics. The
student is a 3-layer ReLU MLP (``width`` hidden units) trained with the same recipe shape as MNIST-1D:
Nesterov SGD, weight decay, ×0.1 at 50 % and 75 % of the epochs. The error reported is the test
**unexplained variance** in percent, 100·MSE/Var(y) (the noise floor is about 100·0.01/Var ≈ 1 %).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DIM, TEACHER_WIDTH, NOISE = 32, 64, 0.1


def teacher_data(num_samples: int, seed: int, num_test: int = 4000, val_fraction: float = 0.1) -> dict[str, TensorDataset]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    w1 = torch.randn(DIM, TEACHER_WIDTH, generator=gen) / DIM**0.5
    w2 = torch.randn(TEACHER_WIDTH, TEACHER_WIDTH, generator=gen) / TEACHER_WIDTH**0.5
    w3 = torch.randn(TEACHER_WIDTH, 1, generator=gen) / TEACHER_WIDTH**0.5

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, DIM, generator=g)
        y = torch.tanh(torch.tanh(x @ w1 * 2.0) @ w2 * 2.0) @ w3
        return x, y + NOISE * y.std() * torch.randn(n, 1, generator=g)

    x, y = sample(num_samples, gen)
    x_test, y_test = sample(num_test, torch.Generator().manual_seed(1234))
    num_val = int(round(num_samples * val_fraction))
    mean, std = y[num_val:].mean(), y[num_val:].std()
    norm = lambda t: (t - mean) / std  # noqa: E731
    return {
        "train": TensorDataset(x[num_val:], norm(y[num_val:])),
        "val": TensorDataset(x[:num_val], norm(y[:num_val])),
        "test": TensorDataset(x_test, norm(y_test)),
    }


class TeacherDataModule(pl.LightningDataModule):
    def __init__(self, num_samples: int = 20000, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.datasets: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = teacher_data(self.num_samples, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=1024)


class TeacherRegressor(pl.LightningModule):
    """3-layer ReLU MLP, MSE, Nesterov SGD with MultiStepLR at 50 % / 75 % of the epochs."""

    def __init__(self, width: int = 64, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = nn.Sequential(
            nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
        )
        epochs = self.trainer.max_epochs
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2), max(1, 3 * epochs // 4)], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def unexplained_variance(model: nn.Module, dataset: TensorDataset) -> float:
    """100·MSE/Var(y) in percent, at most 100: a model no better than predicting the mean (a diverged run,
    non-finite outputs included) scores 100 %, as a diverged classifier does in the MNIST-1D tables."""
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        pred = model(x)
    mse = float((pred - y).square().mean())
    if not math.isfinite(mse):
        return 100.0
    return min(100.0, 100.0 * mse / float(y.var()))
