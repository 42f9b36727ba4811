"""LightningCLI with no import of lightning_dana: the YAML's class_path names the strategy."""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel

if __name__ == "__main__":
    cli = LightningCLI(BoringModel, BoringDataModule, save_config_kwargs={"overwrite": True})
    if cli.trainer.global_rank == 0:
        strategy = cli.trainer.strategy
        print(f"CLI-RESULT {type(strategy).__name__} {strategy.algorithm} {cli.trainer.global_step}", flush=True)
