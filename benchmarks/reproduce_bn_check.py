"""Is a large-N failure in the sweep the trained parameters or the master's BatchNorm statistics?

    python benchmarks/reproduce_bn_check.py --lr 0.1 --workers 8 16 24 32

Under ``SimulatedWorkers`` the master's running statistics are the sum of every
worker's changes, each computed from a stale copy: a delayed update
x ← x − m·x(t−τ) with BatchNorm momentum m = 0.1 and lag τ ≈ N − 1, which is
unstable once m·τ is large (roughly τ > 15 for m = 0.1). This trains the
sweep's runs again and reports the test error twice: with the master's
buffers (what the sweep reports) and with BatchNorm statistics recomputed for
the master's parameters over the training set (an exact average, no
staleness). Same recipe, same seeds, same code path as
``benchmarks/reproduce.py``; it writes ``bn_check.csv`` and ``bn_check.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
import multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce as rp  # noqa: E402


def recalibrated_error(model, train, test) -> float:
    """Test error after recomputing every BatchNorm's running statistics for the current parameters."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for x in train.tensors[0].split(512):
            model(x)
    return rp.evaluate_error(model, test)


def check_one(spec: rp.RunSpec, recipe: rp.Recipe, data_dir: str) -> dict:
    """Train one sweep run, then evaluate it with the master's buffers and with recalibrated ones."""
    rp.quiet_worker()
    import pytorch_lightning as pl

    import lightning_dana as ld
    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    pl.seed_everything(spec.seed, verbose=False)
    data = MNIST1DDataModule(
        num_samples=recipe.num_samples, batch_size=recipe.batch_size, seed=recipe.data_seed, data_dir=data_dir
    )
    model = MNIST1DClassifier(
        channels=recipe.channels, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    kwargs = rp.build_trainer_kwargs(spec, recipe, ld.GapMonitor(logging_interval=recipe.log_every, prog_bar=False))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    master = rp.evaluate_error(model, data.datasets["test"])
    return {
        "workers": spec.workers, "algorithm": spec.algorithm, "seed": spec.seed, "lr": recipe.lr,
        "test_error_master_bn": master,
        "test_error_recalibrated_bn": recalibrated_error(model, data.datasets["train"], data.datasets["test"]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=rp.Recipe().lr)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--algorithms", nargs="+", default=list(rp.ASYNC_ALGORITHMS))
    parser.add_argument("--schedule", default="block_random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=rp.ROOT / "docs" / "results")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    from examples.mnist1d.data import DEFAULT_DATA_DIR

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    recipe = replace(rp.Recipe(), lr=args.lr)
    rp.prepare_data(recipe, data_dir)
    specs = [rp.RunSpec(n, a, args.schedule, args.seed) for n in args.workers for a in args.algorithms]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(check_one, specs, [recipe] * len(specs), [data_dir] * len(specs)))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "bn_check.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"lr {args.lr:g}, {args.schedule}, seed {args.seed}: final test error (%)",
        "",
        "| N | algorithm | master's BN buffers (as in the sweep) | BN statistics recomputed |",
        "| ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {rp.LABELS[r['algorithm']]} | {r['test_error_master_bn']:.2f} | "
            f"{r['test_error_recalibrated_bn']:.2f} |"
        )
    (args.out / "bn_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\n{time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
