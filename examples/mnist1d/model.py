"""A small 1-D CNN with BatchNorm for MNIST-1D (about 26k parameters).

BatchNorm is deliberate: its running statistics are buffers, not parameters,
which is exactly what an asynchronous strategy must handle correctly.
"""

from __future__ import annotations

from torch import nn

from examples.classifier import SGDClassifier


def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


def mnist1d_cnn(channels: int = 32, num_classes: int = 10) -> nn.Sequential:
    """Input (B, 1, 40) -> logits (B, num_classes)."""
    c = channels
    return nn.Sequential(
        conv_bn(1, c, 1),
        conv_bn(c, 2 * c, 2),
        conv_bn(2 * c, 2 * c, 2),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * c, num_classes),
    )


class MNIST1DClassifier(SGDClassifier):
    """The MNIST-1D recipe: Nesterov SGD, lr 0.1, wd 5e-4, x0.1 at 50% and 75%."""

    def __init__(
        self,
        channels: int = 32,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        self.channels = channels
        super().__init__(num_classes, lr, momentum, weight_decay, nesterov, milestones, gamma)

    def build_network(self) -> nn.Module:
        return mnist1d_cnn(self.channels, self.hparams.num_classes)
