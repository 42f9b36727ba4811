"""LightningCLI entry for the CIFAR recipes: ``fit`` trains, then tests the final weights.

    python -m examples.cifar.train fit --config examples/cifar/resnet20_cifar10.yaml
    python -m examples.cifar.train fit --config examples/cifar/resnet20_cifar10.yaml \
        --config examples/strategies/simulated_dana.yaml            # N simulated workers
    python -m examples.cifar.train fit --config examples/cifar/resnet20_cifar10.yaml \
        --data.fake_data=true --trainer.fast_dev_run=true           # no data needed
"""

from __future__ import annotations

from examples.cifar.data import CIFARDataModule
from examples.cifar.module import CIFARClassifier
from examples.cli import FitThenTestCLI, run_cli


def main(args: list[str] | None = None) -> FitThenTestCLI:
    return run_cli(CIFARClassifier, CIFARDataModule, args=args)


if __name__ == "__main__":
    main()
