"""Lightning's BoringModel, unchanged, under strategy="dana" with the usual callbacks, then test and predict."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar  # noqa: E402
from pytorch_lightning.demos.boring_classes import BoringModel  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

import lightning_dana  # noqa: E402  (registers "dana")


def main() -> None:
    root, out, start_method = sys.argv[1], sys.argv[2], sys.argv[3]
    fit_only = "--fit-only" in sys.argv
    strategy = "dana" if start_method == "popen" else lightning_dana.DANAStrategy(start_method=start_method, timeout=60)
    model = BoringModel()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, limit_train_batches=16, limit_val_batches=4,
        default_root_dir=root, logger=CSVLogger(root, name="csv"), log_every_n_steps=2,
        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True), LearningRateMonitor(),
                   lightning_dana.GapMonitor(logging_interval=2), TQDMProgressBar(refresh_rate=4)],
    )
    trainer.fit(model)
    test = None if fit_only else trainer.test(model, verbose=False)
    predictions = None if fit_only else trainer.predict(model)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({
                "strategy": type(trainer.strategy).__name__, "num_workers": trainer.strategy.num_workers,
                "global_step": trainer.global_step, "test": test, "predictions": len(predictions or []),
                "metrics_csv": os.path.join(root, "csv", "version_0", "metrics.csv"),
                "weight": model.layer.weight.detach().reshape(-1).tolist(),
                "last_ckpt": os.path.join(root, "ckpt", "last.ckpt"),
            }, f)


if __name__ == "__main__":
    main()
