"""Same recipe, one worker vs N asynchronous workers: final test accuracy side by side.

    python -m examples.mnist1d.demo                      # 3 real asynchronous worker processes
    python -m examples.mnist1d.demo --mode simulated --workers 8 --epochs 20

DANA's claim is out-of-the-box accuracy: the N-worker run uses exactly the
single-worker LightningModule, optimizer and LR schedule; only the strategy and
the paper's two stabilisers (warm-up from lr/N over 5 epochs, momentum
correction) are added.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import lightning_dana
from examples.mnist1d.data import DEFAULT_DATA_DIR, MNIST1DDataModule
from examples.mnist1d.model import MNIST1DClassifier
from examples.mnist1d.train import limit_cpu_threads


@dataclass
class Result:
    name: str
    workers: int
    test_acc: float
    seconds: float


def is_launched_child() -> bool:
    """True in the extra processes Lightning's launcher starts (they re-run this script)."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


def make_recipe(args: argparse.Namespace) -> tuple[MNIST1DClassifier, MNIST1DDataModule]:
    """The one recipe both runs share (milestones at 50% and 75% of the epochs)."""
    pl.seed_everything(args.seed, verbose=False)
    model = MNIST1DClassifier(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    data = MNIST1DDataModule(num_samples=args.num_samples, batch_size=128, seed=args.seed, data_dir=args.data_dir)
    return model, data


def fit_and_test(name: str, workers: int, args: argparse.Namespace, **trainer_kwargs) -> Result:
    model, data = make_recipe(args)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress_bar,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return Result(name, workers, float(metrics["test_acc"]), time.perf_counter() - start)


def run_baseline(args: argparse.Namespace) -> Result:
    return fit_and_test("baseline (1 worker, Nesterov SGD)", 1, args, devices=1)


def async_callbacks() -> list[pl.Callback]:
    return [lightning_dana.GradualWarmup(epochs=5), lightning_dana.MomentumCorrection()]


def run_simulated(args: argparse.Namespace) -> Result:
    strategy = lightning_dana.SimulatedWorkers(
        num_workers=args.workers, algorithm=args.algorithm, schedule=args.schedule, seed=args.seed
    )
    name = f"{args.algorithm}, {args.workers} simulated workers ({args.schedule})"
    return fit_and_test(name, args.workers, args, strategy=strategy, callbacks=async_callbacks())


def run_real(args: argparse.Namespace) -> Result:
    """N real asynchronous worker processes on this machine's CPU (``strategy="dana"``).

    Lightning's launcher re-runs this script in each extra process, which is
    why ``main`` skips the baseline there (``is_launched_child``). Each worker
    sees 1/N of every epoch (DistributedSampler), so an epoch is still one pass
    over the data and the recipe's schedule keeps its meaning.
    """
    name = f"{args.algorithm}, {args.workers} worker processes"
    return fit_and_test(
        name, args.workers, args, strategy=args.algorithm, devices=args.workers, callbacks=async_callbacks()
    )


def print_table(results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"\n{'run':<{width}}  {'test acc':>8}  {'time':>7}")
    for r in results:
        print(f"{r.name:<{width}}  {100 * r.test_acc:7.2f}%  {r.seconds:6.1f}s")
    base, rest = results[0], results[1:]
    for r in rest:
        print(f"{r.name}: {100 * (r.test_acc - base.test_acc):+.2f} points vs. baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode",
        choices=("simulated", "real"),
        default="real",
        help="real: N asynchronous worker processes (strategy='dana', default); simulated: N virtual "
        "workers in one process (SimulatedWorkers)",
    )
    parser.add_argument("--workers", type=int, default=None, help="N (default: 8 simulated, 3 real)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--algorithm", default="dana", choices=sorted(lightning_dana.ALGORITHMS))
    parser.add_argument("--schedule", default="block_random", help="simulated mode only")
    parser.add_argument("--num-samples", type=int, default=20000, help="generated training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="cache of the generated data")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 8 if args.mode == "simulated" else 3
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    limit_cpu_threads()
    if args.mode == "real" and is_launched_child():
        run_real(args)  # a worker process: only the asynchronous run
        return []
    results = [run_baseline(args)]
    results.append(run_simulated(args) if args.mode == "simulated" else run_real(args))
    print_table(results)
    return results


if __name__ == "__main__":
    main()
