"""LightningCLI that tests the final weights right after ``fit``.

The paper reports *final* test error, so ``fit`` ends with ``trainer.test`` on
the weights training ended with (under DANA: the master's), not on a "best"
checkpoint. ``validate``/``test``/``predict`` subcommands work as usual.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

import lightning_dana  # noqa: F401  (registers the strategy names, e.g. "dana")


class FitThenTestCLI(LightningCLI):
    """``fit`` followed by ``test`` on the same trainer, model and data."""

    def add_arguments_to_parser(self, parser) -> None:
        # The class count is a property of the data: never set it twice.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=self.datamodule)


def run_cli(
    model_class: type[pl.LightningModule],
    datamodule_class: type[pl.LightningDataModule],
    args: list[str] | None = None,
    **kwargs: Any,
) -> FitThenTestCLI:
    """Entry point shared by every ``train.py``; ``args`` lets tests run it in-process."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return FitThenTestCLI(model_class, datamodule_class, args=args, **kwargs)
