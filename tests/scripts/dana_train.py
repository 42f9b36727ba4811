"""One real multi-process training run, configured from the command line; rank 0 writes a JSON report.

Driven by tests/test_strategy*.py, tests/test_faults.py and tests/test_mpi.py through
subprocess (Lightning's own launcher re-runs this script for ranks 1..N-1).
Fault injection: ``--kill-rank R --kill-step S`` (the process dies with SIGKILL at
its step S), ``--nan-rank R --nan-step S`` (that step's loss is NaN),
``--die-rank 0`` with ``--kill-step`` kills the master.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_dana  # noqa: E402,F401  (registers the strategy names)
from lightning_dana import DANAStrategy, GradualWarmup  # noqa: E402


VAL_SLEEP = float(os.environ.get("DANA_TEST_VAL_SLEEP", 0))
TRACE = os.environ.get("DANA_TEST_TRACE")  # a path prefix: every rank appends the batches it pushed


def dataset(n: int = 384, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] > 0).long()
    return TensorDataset(x, y, torch.arange(n))  # the index: tests count which samples each worker trained


class Tiny(pl.LightningModule):
    """Linear -> BatchNorm -> ReLU -> Linear: BatchNorm buffers travel with the pushes."""

    def __init__(self, lr: float = 0.1, optimizer: str = "sgd", nan_rank: int = -1, nan_step: int = -1,
                 kill_rank: int = -1, kill_step: int = -1, slow: float = 0.0, slow_rank: int = -1,
                 onecycle: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        self.steps = 0
        self.trained: list[tuple[int, list[int]]] = []  # (epoch, sample indices) of every batch
        self.tested: list[int] = []  # sample indices this rank evaluated in trainer.test
        self.validated: list[int] = []  # sample indices this rank validated during fit (sanity check excluded)
        self.lrs: list[tuple[int, float]] = []  # (the master's pushes at this step's pull, lr) of every step
        self.stepping_batches: float | None = None  # trainer.estimated_stepping_batches, as configure_optimizers saw it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        rank = self.global_rank
        if rank == h.kill_rank and self.steps == h.kill_step:
            print(f"[test] rank {rank} killing itself at step {self.steps}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if h.slow and h.slow_rank in (-1, rank):
            time.sleep(h.slow)
        x, y, index = batch
        self.trained.append((self.current_epoch, index.tolist()))
        progress = self.trainer.strategy.progress()
        self.lrs.append((progress[0] if progress else -1, self.trainer.optimizers[0].param_groups[0]["lr"]))
        loss = nn.functional.cross_entropy(self(x), y)
        if rank == h.nan_rank and self.steps == h.nan_step:
            loss = loss * float("nan")
        self.steps += 1
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the push: append the batch's indices to this rank's trace, which survives a SIGKILL."""
        if TRACE:
            with open(f"{TRACE}.{self.global_rank}", "a") as f:
                f.write(json.dumps(batch[2].tolist()) + "\n")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y, index = batch
        self.tested.extend(index.tolist())
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if VAL_SLEEP and not self.trainer.sanity_checking:
            time.sleep(VAL_SLEEP)  # a long validation on rank 0: the other workers must not wait for it
        x, y, index = batch
        if not self.trainer.sanity_checking:
            self.validated.extend(index.tolist())
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
        if self.hparams.onecycle:  # a per-step schedule sized by Lightning's own step estimate, as users write it
            self.stepping_batches = self.trainer.estimated_stepping_batches
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=int(self.stepping_batches))
            return [opt], [{"scheduler": sched, "interval": "step"}]
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]


class Report(Callback):
    """Collects what the tests check: push records, refusals, the optimizer state."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.validations: list[list[float]] = []  # [start, end] of each validation (time.monotonic)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.records.extend(trainer.strategy.drain_push_records())

    def on_validation_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.validations.append([time.monotonic()])

    def on_validation_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.validations[-1].append(time.monotonic())
            self.records.extend(trainer.strategy.drain_push_records())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algorithm", default="dana")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--transport", default="auto")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--resume", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="ModelCheckpoint every n train steps")
    p.add_argument("--nan-rank", type=int, default=-1)
    p.add_argument("--nan-step", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--slow", type=float, default=0.0, help="seconds each step sleeps (on --slow-rank only, if given)")
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader(num_workers=...) for training")
    p.add_argument("--master-checkpoint-every", type=int, default=0, help="DANAStrategy(checkpoint_every=...)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="GradualWarmup over this many epochs")
    p.add_argument("--test-samples", type=int, default=0, help="after fit, trainer.test on this many samples")
    p.add_argument("--stop-at-acc", type=float, default=0.0, help="EarlyStopping once val_acc reaches this")
    p.add_argument("--start-method", default="popen")
    p.add_argument("--reload", action="store_true", help="Trainer(reload_dataloaders_every_n_epochs=1)")
    p.add_argument("--onecycle", action="store_true", help="OneCycleLR per step over trainer.estimated_stepping_batches")
    p.add_argument("--strategy-name", action="store_true", help="use the registered name, not DANAStrategy(...)")
    args = p.parse_args()

    results: dict[str, Any] = {}
    rank = 0
    for algorithm in args.algorithm.split(","):
        rank, results[algorithm] = fit(args, algorithm)
        _write(args.out, rank, results)
        if results[algorithm]["status"] != "ok":
            raise SystemExit(1)


class StartState(Callback):
    """What training starts from: the master's version (rank 0) and this worker's optimizer state."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        service = trainer.strategy.service
        self.state["server_version"] = service.state.version if service is not None else None
        opt = trainer.optimizers[0]
        self.state["momentum"] = [s["momentum_buffer"].reshape(-1).tolist() for s in opt.state.values()
                                  if "momentum_buffer" in s]
        self.state["params"] = [p.detach().reshape(-1).tolist() for p in pl_module.parameters()]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        service = trainer.strategy.service
        if service is not None:
            self.state["master_refused"] = list(service.faults.refused)


def fit(args: Any, algorithm: str) -> tuple[int, dict[str, Any]]:
    pl.seed_everything(0, workers=True)
    model = Tiny(args.lr, args.optimizer, args.nan_rank, args.nan_step, args.kill_rank, args.kill_step, args.slow,
                 args.slow_rank, args.onecycle)
    if args.strategy_name:
        strategy: Any = algorithm
    else:
        strategy = DANAStrategy(algorithm=algorithm, transport=args.transport, timeout=args.timeout,
                                gap_every=2, start_method=args.start_method,
                                checkpoint_every=args.master_checkpoint_every)
    report, start_state = Report(), StartState()
    callbacks: list[Callback] = [report, start_state]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.root, "ckpts"), every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1, save_last=True))
        callbacks.append(EarlyStopping(monitor="val_loss", patience=100))
    if args.warmup_epochs:
        callbacks.append(GradualWarmup(epochs=args.warmup_epochs))
    if args.stop_at_acc:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", stopping_threshold=args.stop_at_acc, patience=100))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, max_epochs=args.epochs, max_steps=args.max_steps,
        default_root_dir=args.root, logger=False, enable_checkpointing=bool(args.checkpoint_every),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1, callbacks=callbacks,
        reload_dataloaders_every_n_epochs=int(args.reload),
    )
    train = DataLoader(dataset(), batch_size=args.batch, shuffle=True, num_workers=args.loader_workers,
                       persistent_workers=args.loader_workers > 0)
    val = DataLoader(dataset(128, seed=1), batch_size=64)
    start = time.time()
    result: dict[str, Any] = {}
    try:
        trainer.fit(model, train, val, ckpt_path=args.resume)
        result["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - the test reads what happened
        result.update(status="error", error_type=type(error).__name__, error=str(error), trained=model.trained,
                      seconds=time.time() - start, error_checkpoint=getattr(trainer.strategy, "error_checkpoint_path", None))
        return trainer.global_rank, result
    result["seconds"] = time.time() - start
    if args.test_samples:
        trainer.test(model, DataLoader(dataset(args.test_samples, seed=2), batch_size=8), verbose=False)
        result["tested"] = model.tested
    result["val_acc"] = float(trainer.callback_metrics.get("val_acc", float("nan")))
    result["val_loss"] = float(trainer.callback_metrics.get("val_loss", float("nan")))
    result["global_step"] = trainer.global_step
    result["refused"] = trainer.strategy.refused_pushes
    result["master_refused"] = trainer.strategy.master_refused
    result["records"] = [(r.worker, r.lag, r.gap) for r in report.records]
    result["record_times"] = [(r.worker, r.time) for r in report.records]
    result["validations"] = report.validations
    result["current_epoch"] = trainer.current_epoch
    result["final_lr"] = trainer.optimizers[0].param_groups[0]["lr"]
    result["params"] = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    result["buffers"] = {n: b.reshape(-1).tolist() for n, b in model.named_buffers()}
    result["start"] = start_state.state
    result["trained"] = model.trained
    result["lrs"] = model.lrs
    result["validated"] = model.validated
    result["stepping_batches"] = model.stepping_batches
    result["lost_workers"] = {str(k): v for k, v in trainer.strategy.lost_workers.items()}
    if args.checkpoint_every:
        result["last_ckpt"] = os.path.join(args.root, "ckpts", "last.ckpt")
    return trainer.global_rank, result


def _write(out: str, rank: int, result: dict[str, Any]) -> None:
    path = out if rank == 0 else f"{out}.rank{rank}"
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
