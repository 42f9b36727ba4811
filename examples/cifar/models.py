"""CIFAR networks of the paper's accuracy tables, plain ``nn.Module``s.

* :func:`resnet20`: He et al. (2016), section 4.2: a 3x3 conv with 16 filters,
  then 3 stages of 3 basic blocks with 16/32/64 filters (stride 2 between
  stages), global average pooling and a linear layer; 0.27M parameters.
  Shortcuts use **option A** (identity; when the shape changes, subsample by 2
  and zero-pad the new channels), which is what He et al. used on CIFAR and
  what the 0.27M count assumes (option B's 1x1 projections add ~2k more).
* :func:`wrn16_4`: Wide ResNet 16-4 of Zagoruyko & Komodakis (2016):
  pre-activation basic blocks, 2 per stage, widths 64/128/256, 1x1 projection
  shortcuts where the shape changes, optional dropout between the convs
  (0 by default, as in the paper's runs we reproduce); 2.75M parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) init for convs, BN at (1, 0): both papers' choice."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling, zero-padded channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Post-activation basic block of the original ResNet: conv-BN-ReLU-conv-BN, add, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = ShortcutA(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WideBasicBlock(nn.Module):
    """Pre-activation block of Wide ResNets: BN-ReLU-conv-(dropout)-BN-ReLU-conv, add."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.projection = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: depth = 6n + 4."""

    def __init__(self, depth: int = 16, widen_factor: int = 4, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths[1:]):
            for i in range(n):
                layers.append(WideBasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1, dropout))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (option A shortcuts), 0.27M parameters with 10 classes."""
    return CifarResNet(blocks_per_stage=3, num_classes=num_classes)


def wrn16_4(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """Wide ResNet 16-4, 2.75M parameters with 10 classes."""
    return WideResNet(depth=16, widen_factor=4, num_classes=num_classes, dropout=dropout)


ARCHITECTURES = {"resnet20": resnet20, "wrn16_4": wrn16_4}
