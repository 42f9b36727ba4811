"""The ImageNet LightningModule: torchvision's ResNet-50 plus the shared SGD recipe."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50

from examples.classifier import SGDClassifier


class ImageNetClassifier(SGDClassifier):
    """ResNet-50 from scratch (``weights=None``) with the He et al. (2016) recipe.

    ``nesterov`` defaults to True as in every DANA baseline ("the baseline uses
    NAG"); He et al. used plain momentum: set ``nesterov: false`` to match them.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, nesterov, milestones, gamma)

    def build_network(self) -> nn.Module:
        return resnet50(weights=None, num_classes=self.hparams.num_classes)
