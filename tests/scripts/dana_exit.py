"""A short, successful real run (strategy="dana", devices=2), then a normal exit: issue 9, item 13.

Rank 0 waits for the worker process Lightning's launcher started, and writes its exit code to ``--out``
(JSON) before rank 0 itself exits: the test reads rank 0's exit code from the process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402

from dana_habits import Plain, loader  # noqa: E402
from lightning_dana import DANAStrategy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    pl.seed_everything(0, verbose=False)
    strategy = DANAStrategy(timeout=120)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=args.epochs, default_root_dir=args.root,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Plain(), loader())
    if trainer.global_rank != 0:
        return
    children = getattr(strategy.launcher, "procs", [])
    codes = []
    for proc in children:
        try:
            codes.append(proc.wait(timeout=240))
        except Exception as error:  # noqa: BLE001 - the test reads it
            codes.append(f"{type(error).__name__}: {error}")
    with open(args.out, "w") as f:
        json.dump({"children": codes, "global_step": trainer.global_step}, f)
    print("[dana_exit] rank 0 done, exiting", flush=True)


if __name__ == "__main__":
    main()
