"""LightningCLI entry for MNIST-1D: ``fit`` trains, then tests the final weights.

    python -m examples.mnist1d.train fit --config examples/mnist1d/config.yaml
    python -m examples.mnist1d.train fit --config examples/mnist1d/config_simulated.yaml
"""

from __future__ import annotations

import os

import torch

from examples.cli import FitThenTestCLI, run_cli
from examples.mnist1d.data import MNIST1DDataModule
from examples.mnist1d.model import MNIST1DClassifier


def limit_cpu_threads(default: int = 1) -> None:
    """Use one intra-op thread unless ``OMP_NUM_THREADS`` says otherwise.

    This network is so small that a second thread buys nothing, and on a busy
    2-core machine intra-op threads waiting on each other made a step ~10x
    slower (5 ms -> 50+ ms, measured).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default)


def main(args: list[str] | None = None) -> FitThenTestCLI:
    limit_cpu_threads()
    return run_cli(MNIST1DClassifier, MNIST1DDataModule, args=args)


if __name__ == "__main__":
    main()
