"""Lightning habits under the asynchronous strategies: SWA, tied weights, Trainer(deterministic=True).

The models and callbacks here are imported by tests/test_lightning_habits.py (in-process runs under
``SimulatedWorkers``); run as a script, the same fits run under ``DANAStrategy`` with real worker
processes (Lightning's launcher re-runs this script for rank 1) and every rank writes a JSON report:
``--out`` on rank 0, ``--out.rankR`` on the others.

Each part runs in its own ``default_root_dir`` and its failure is reported, not raised, so one broken
habit does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared tiny data

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging  # noqa: E402
from torch import nn  # noqa: E402


import lightning_dana  # noqa: E402,F401  (registers the strategy names)
from tiny import dataset, loader  # noqa: E402,F401  (tests/tiny.py)
from lightning_dana import DANAStrategy  # noqa: E402
from lightning_dana.rules import make_rule  # noqa: E402

SWA_EPOCHS = 4
SWA_EPOCH_START = 2  # Lightning's 1-based start: SWA averages at the start of epochs 1, 2, 3 (0-based)


class Plain(pl.LightningModule):
    """Linear -> ReLU -> Linear, no BatchNorm (SWA then needs no extra BatchNorm epoch)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)


class Tied(pl.LightningModule):
    """Two submodules share one Parameter (``a.weight is b.weight``); no validation loop."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # tied: one tensor, two names in the state_dict
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)


def flat(module: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


def state_lists(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: v.detach().float().reshape(-1).tolist() for k, v in state.items()}


def master_params(saved: dict[str, Any], numel: int) -> list[float]:
    """The master's evaluation parameters, rebuilt from a checkpoint's ``dana`` / ``simulated_workers`` entry."""
    rule = make_rule(saved["algorithm"], torch.zeros(numel), saved["num_workers"], saved["master"]["rule"]["momentum"])
    rule.load_state_dict(saved["master"]["rule"])
    return rule.eval_params().reshape(-1).tolist()


class EpochEndView(Callback):
    """After the strategy's MasterView (which the strategies put first): what the module holds at each epoch
    end, and, where this process hosts the master, the master's own evaluation parameters read directly."""

    def __init__(self) -> None:
        self.module: list[list[float]] = []
        self.master: list[list[float] | None] = []
        self.epoch_start: list[list[float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start.append(flat(pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module.append(flat(pl_module))
        self.master.append(read_master(trainer, pl_module))


def read_master(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float] | None:
    numel = sum(p.numel() for p in pl_module.parameters())
    strategy = trainer.strategy
    state = getattr(strategy, "master_state", None)  # SimulatedWorkers
    if state is not None:
        return state.eval_payload()[:numel].tolist()
    service = getattr(strategy, "service", None)  # DANAStrategy, rank 0
    if service is not None:
        return service.eval_payload(torch.empty(service.state.payload_numel))[:numel].tolist()
    return None


class FinalView(Callback):
    """Put before SWA: the module at the start of on_train_end, after MasterView loaded the master's final model."""

    def __init__(self) -> None:
        self.module: list[float] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = flat(pl_module)


def swa_fit(root: str, strategy: Any, devices: int = 1, deterministic: bool = False) -> dict[str, Any]:
    """Plain under SWA; returns what the tests compare (every rank)."""
    pl.seed_everything(0, verbose=False)
    model = Plain()
    final, swa, epochs = FinalView(), StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=SWA_EPOCH_START), EpochEndView()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=SWA_EPOCHS, default_root_dir=root,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=deterministic, callbacks=[final, swa, epochs],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader())
    path = os.path.join(root, "after_fit.ckpt")
    trainer.save_checkpoint(path)
    average = swa._average_model
    return {
        "rank": trainer.global_rank,
        "warnings": [str(w.message) for w in caught],
        "module": flat(model),
        "swa_average": flat(average) if average is not None else None,
        "n_averaged": int(swa.n_averaged) if swa.n_averaged is not None else None,
        "final_master": final.module,
        "epoch_end_module": epochs.module,
        "epoch_end_master": epochs.master,
        "epoch_start_module": epochs.epoch_start,
        "checkpoint": path,
    }


def tied_fit(root: str, strategy: Any, devices: int = 1, epochs: int = 2) -> dict[str, Any]:
    """Tied under the default ModelCheckpoint and a mid-epoch one (every 2 steps); a checkpoint after fit too."""
    pl.seed_everything(0, verbose=False)
    model = Tied()
    default = ModelCheckpoint()  # what Trainer(enable_checkpointing=True) adds by itself
    mid = ModelCheckpoint(dirpath=os.path.join(root, "mid"), filename="mid-{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, default_root_dir=root,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[default, mid],
    )
    trainer.fit(model, loader())
    path = os.path.join(root, "after_fit.ckpt")
    trainer.save_checkpoint(path)
    return {
        "rank": trainer.global_rank,
        "module": state_lists(model.state_dict()),
        "default_checkpoint": default.best_model_path or default.last_model_path,
        "mid_dir": os.path.join(root, "mid"),
        "after_fit_checkpoint": path,
        "numel": sum(p.numel() for p in model.parameters()),
    }


def options_fit(root: str, strategy: Any, devices: int = 1) -> dict[str, Any]:
    """Plain with Trainer options users set under DDP, all at once: gradient accumulation, clipping,
    bf16 autocast, max_steps, and an lr monitor writing to a CSV logger."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    class MasterVersion(Callback):
        version = None

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            service = getattr(trainer.strategy, "service", None)  # rank 0, before teardown
            self.version = service.state.version if service is not None else None

    pl.seed_everything(0, verbose=False)
    model, version = Plain(), MasterVersion()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=12, accumulate_grad_batches=2,
        gradient_clip_val=0.5, precision="bf16-mixed", default_root_dir=root, logger=CSVLogger(root, name="csv"),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[LearningRateMonitor("step"), version],
    )
    trainer.fit(model, loader(), loader(64, shuffle=False, seed=1))
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "master_version": version.version,
        "metrics_csv": os.path.join(root, "csv", "version_0", "metrics.csv"),
        "module": flat(model),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--parts", default="swa,tied,options")
    args = p.parse_args()
    report: dict[str, Any] = {}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for part in args.parts.split(","):
        strategy = DANAStrategy(algorithm="dana", timeout=120)
        root = os.path.join(args.root, part)
        try:
            if part == "swa":
                report[part] = swa_fit(root, strategy, args.devices, deterministic=True)
            elif part == "tied":
                report[part] = tied_fit(root, strategy, args.devices)
            elif part == "options":
                report[part] = options_fit(root, strategy, args.devices)
            else:
                raise ValueError(f"unknown part {part!r}")
            report[part]["status"] = "ok"
        except BaseException as error:  # noqa: BLE001 - the test reads what happened
            report[part] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()}
        path = args.out if rank == 0 else f"{args.out}.rank{rank}"
        with open(path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
