"""LightningCLI entry for ImageNet ResNet-50: ``fit`` trains, then tests the final weights.

    python -m examples.imagenet.train fit --config examples/imagenet/resnet50.yaml
    python -m examples.imagenet.train fit --config examples/imagenet/resnet50.yaml \
        --config examples/strategies/dana.yaml --trainer.devices=8
"""

from __future__ import annotations

from examples.cli import FitThenTestCLI, run_cli
from examples.imagenet.data import ImageNetDataModule
from examples.imagenet.module import ImageNetClassifier


def main(args: list[str] | None = None) -> FitThenTestCLI:
    return run_cli(ImageNetClassifier, ImageNetDataModule, args=args)


if __name__ == "__main__":
    main()
