"""The error checkpoint with real processes: rank 0 raises mid-fit, or a resume is refused.

``--raise-step S``: rank 0's training_step raises at its step S (the master's process fails, so rank 0
writes the master's error checkpoint). ``--resume PATH --algorithm A``: resume from PATH with algorithm A.
Each rank writes a JSON report: ``--out`` on rank 0, ``--out.rankR`` on the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from dana_habits import Plain, loader  # noqa: E402
from lightning_dana import DANAStrategy  # noqa: E402


class InjectedFailure(RuntimeError):
    pass


class Failing(Plain):
    def __init__(self, lr: float = 0.1, raise_step: int = -1) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 0 and self.steps == self.hparams.raise_step:
            raise InjectedFailure(f"injected failure on rank 0 at its step {self.steps}")
        self.steps += 1
        return super().training_step(batch, batch_idx)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--algorithm", default="dana")
    p.add_argument("--raise-step", type=int, default=-1)
    p.add_argument("--resume", default=None)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    pl.seed_everything(0, verbose=False)
    model = Failing(raise_step=args.raise_step)
    strategy = DANAStrategy(algorithm=args.algorithm, timeout=120)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=args.epochs, default_root_dir=args.root,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    report: dict[str, Any] = {}
    try:
        trainer.fit(model, loader(), ckpt_path=args.resume)
        report["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - the test reads what happened
        report.update(status="error", error_type=type(error).__name__, error=str(error),
                      error_checkpoint=strategy.error_checkpoint_path)
    rank = trainer.global_rank
    with open(args.out if rank == 0 else f"{args.out}.rank{rank}", "w") as f:
        json.dump(report, f)
    if report["status"] != "ok":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
