"""Step time of SimulatedWorkers(num_workers=16) over plain single-device training, in the same run.

A ResNet-20 (about 0.27 M parameters) on 32x32x3 inputs, batch 128, on the CPU (or ``--accelerator gpu``).
Both variants train the same model on the same data through the real Trainer;
runs alternate (plain, simulated, plain, ...) so drifts in machine speed hit
both alike, and the ratio of median step times is printed. Goal: <= 1.05.

    python benchmarks/sim_overhead.py [--steps 30] [--repeats 3] [--algorithms dana nag_asgd] [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.cifar.models import resnet20  # noqa: E402

from lightning_dana import SimulatedWorkers  # noqa: E402


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = resnet20(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def step_time(strategy, steps: int, accelerator: str = "cpu", warmup: int = 3) -> float:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(128 * (steps + warmup), 3, 32, 32), torch.randint(0, 10, (128 * (steps + warmup),)))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **({"strategy": strategy} if strategy is not None else {}),
    )
    trainer.fit(Classifier(), DataLoader(data, batch_size=128))
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--algorithms", nargs="+", default=["dana"])
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu (one device)")
    args = parser.parse_args()
    params = sum(p.numel() for p in resnet20(num_classes=10).parameters())
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU threads {torch.get_num_threads()}"
    print(f"ResNet-20: {params / 1e6:.3f} M parameters, batch 128, {where}")
    for algorithm in args.algorithms:
        plain, simulated = [], []
        for _ in range(args.repeats):
            plain.append(step_time(None, args.steps, args.accelerator))
            simulated.append(step_time(SimulatedWorkers(args.workers, algorithm), args.steps, args.accelerator))
        p, s = statistics.median(plain), statistics.median(simulated)
        print(
            f"{algorithm:>10}: plain {p * 1e3:.1f} ms/step, SimulatedWorkers({args.workers}) {s * 1e3:.1f} ms/step, "
            f"ratio {s / p:.3f} (goal <= 1.05)"
        )


if __name__ == "__main__":
    main()
