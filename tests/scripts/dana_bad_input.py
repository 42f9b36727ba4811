"""Configurations the strategy refuses at setup, run in the same two processes one after another."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.demos.boring_classes import BoringModel  # noqa: E402

import lightning_dana  # noqa: E402,F401


class Manual(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(BoringModel):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


class Adam(BoringModel):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.1)


def main() -> None:
    out = sys.argv[1]
    errors = {}
    for name, model, strategy in (("manual", Manual(), "dana"), ("two_optimizers", TwoOptimizers(), "dana"),
                                  ("adam_asgd", Adam(), "asgd"), ("adam_dana", Adam(), "dana")):
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0)
        try:
            trainer.fit(model)
            errors[name] = None
        except Exception as error:  # noqa: BLE001
            errors[name] = f"{type(error).__name__}: {error}"
    with open(f"{out}.{trainer.global_rank}", "w") as f:
        json.dump(errors, f)


if __name__ == "__main__":
    main()
