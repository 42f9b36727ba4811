"""The CIFAR LightningModule: one of the paper's networks plus the shared SGD recipe."""

from __future__ import annotations

from typing import Literal

from torch import nn

from examples.cifar.models import resnet20, wrn16_4
from examples.classifier import SGDClassifier


class CIFARClassifier(SGDClassifier):
    """ResNet-20 or WRN-16-4 with Nesterov SGD and a step schedule.

    Defaults are the ResNet-20 recipe (He et al. 2016); the YAML configs set
    the WRN-16-4 one (Zagoruyko & Komodakis 2016).
    """

    def __init__(
        self,
        arch: Literal["resnet20", "wrn16_4"] = "resnet20",
        num_classes: int = 10,
        dropout: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        if arch not in ("resnet20", "wrn16_4"):
            raise ValueError(f"arch must be 'resnet20' or 'wrn16_4', got {arch!r}")
        self.arch = arch
        self.dropout = dropout
        super().__init__(num_classes, lr, momentum, weight_decay, nesterov, milestones, gamma)

    def build_network(self) -> nn.Module:
        if self.arch == "resnet20":
            if self.dropout:
                raise ValueError("dropout is a Wide ResNet option")
            return resnet20(self.hparams.num_classes)
        return wrn16_4(self.hparams.num_classes, self.dropout)
