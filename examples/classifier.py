"""The one training recipe every example shares: cross-entropy, SGD, step schedule.

DANA's point is that the single-worker recipe carries over unchanged to N
asynchronous workers, so the recipe lives in one place and each example only
says which network to build.
"""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class SGDClassifier(pl.LightningModule):
    """Classifier trained with (Nesterov) SGD and a per-epoch MultiStepLR.

    Subclasses implement :meth:`build_network`. ``milestones=None`` places the
    decays at 50% and 75% of ``trainer.max_epochs``, so shortening a run keeps
    the shape of the schedule.
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = self.build_network()
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def build_network(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric(logits, y)
        # Epoch-level only: a per-step sync would put a barrier on every step.
        self.log(f"{stage}_loss", self.criterion(logits, y), on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def resolved_milestones(self) -> list[int]:
        """The epochs at which the learning rate decays."""
        if self.hparams.milestones is not None:
            return list(self.hparams.milestones)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if max_epochs is None or max_epochs < 0:
            return []
        return [max(1, max_epochs // 2), max(1, (3 * max_epochs) // 4)]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov and hp.momentum > 0,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=self.resolved_milestones(), gamma=hp.gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
