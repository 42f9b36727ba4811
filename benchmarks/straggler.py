"""One worker twice as slow: how much do the fast workers slow down, under dana and under Lightning's DDP?

Three processes (``devices=3``, CPU, gloo) train a small model whose step is made to
take ``--step`` seconds (a sleep: on a 2-core machine real compute would measure core
contention, not the protocol); the straggler, rank 2, sleeps twice as long. Each
configuration runs twice, without and with the straggler, in the same processes:
the fast workers' (ranks 0 and 1) steps per second with a straggler over their rate
without one. DDP averages gradients every step, so its fast workers wait for the
straggler (expected ~0.5); dana's only wait at epoch ends (goal >= 0.9).
Ratios measured in this run; no assertion.

    .venv/bin/python benchmarks/straggler.py [--steps 60] [--step 0.03]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_dana  # noqa: E402,F401  (registers "dana")

STRAGGLER = 2


class Timed(pl.LightningModule):
    def __init__(self, step: float, straggler: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        self.step_time, self.straggler = step, straggler
        self.stamps: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        slow = self.straggler and self.global_rank == STRAGGLER
        time.sleep(self.step_time * (2 if slow else 1))
        x, y = batch
        self.stamps.append(time.perf_counter())
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def rate(stamps: list[float]) -> float:
    stamps = stamps[5:]  # skip the start
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="steps per worker per run")
    parser.add_argument("--step", type=float, default=0.03, help="seconds of a normal worker's step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(3 * args.steps * 8, 32), torch.randn(3 * args.steps * 8, 1))
    results: dict[str, dict[str, float]] = {}
    rank = 0
    for strategy in ("dana", "ddp"):
        for straggler in (False, True):
            model = Timed(args.step, straggler)
            trainer = pl.Trainer(accelerator="cpu", devices=3, strategy=strategy, max_epochs=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 num_sanity_val_steps=0)
            trainer.fit(model, DataLoader(data, batch_size=8))
            rank = trainer.global_rank
            results.setdefault(strategy, {})["straggler" if straggler else "even"] = rate(model.stamps)
    gathered: list[Any] = [None] * 3 if rank == 0 else []
    torch.distributed.gather_object(results, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return
    print(f"fast workers' steps/s with rank {STRAGGLER} twice as slow, over their rate without a straggler")
    print(f"(3 CPU processes, step {args.step * 1000:.0f} ms, {args.steps} steps per worker)")
    summary = {}
    for strategy in ("dana", "ddp"):
        fast = [gathered[r][strategy] for r in (0, 1)]
        even = sum(f["even"] for f in fast) / 2
        slow = sum(f["straggler"] for f in fast) / 2
        straggler = gathered[STRAGGLER][strategy]["straggler"]
        summary[strategy] = slow / even
        goal = "goal >= 0.9" if strategy == "dana" else "DDP waits for the straggler every step"
        print(f"{strategy:>5}: fast {even:6.1f} -> {slow:6.1f} steps/s, ratio {slow / even:.2f}  "
              f"(straggler {straggler:.1f} steps/s)  {goal}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
