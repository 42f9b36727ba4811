"""Same recipe, one worker vs N workers: test accuracy and training time side by side.

    python -m examples.mnist1d.demo                      # baseline, then 3 processes, one 2x slower: DDP, then dana
    python -m examples.mnist1d.demo --slowdown 1         # no slowed worker
    python -m examples.mnist1d.demo --mode simulated --workers 8 --epochs 20

Real mode (default) trains the single-worker baseline, then the same recipe on N
worker processes of this machine twice, with the last worker made ``--slowdown``
times slower (it sleeps after each step as long as the step took; a worker on a
slower machine): with Lightning's synchronous DDP (``strategy="ddp"``), which waits
for the slowest worker at every step, then asynchronously (``strategy="dana"``). It
prints each run's test accuracy and training time (``on_train_start`` to
``on_train_end`` on rank 0, so process start-up is not counted).

DANA's claim is out-of-the-box accuracy: the N-worker run uses exactly the
single-worker LightningModule, optimizer and LR schedule; only the strategy and
the paper's two stabilisers (warm-up from lr/N over 5 epochs, momentum
correction) are added. DDP gets the recipe as it is.

Every argument is checked before anything trains. Test accuracy is counted in the
main process on the final model, each test sample exactly once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Heavy imports (torch, Lightning) happen after the arguments are checked, so a bad
# command line fails at once. Other rules of lightning_dana.ALGORITHMS are checked
# against the package (an import of a few seconds, still before anything trains).
ALGORITHMS = ("dana", "dana_zero", "multi_asgd", "nag_asgd", "asgd")
SCHEDULES = ("round_robin", "block_random", "gamma")
# Per mode: real mode trains three runs on several processes, so it is kept to ~2 minutes on 2 cores.
DEFAULTS = {
    "workers": {"simulated": 8, "real": 3},
    "epochs": {"simulated": 20, "real": 10},
    "num_samples": {"simulated": 20000, "real": 10000},
    "schedule": "block_random",
    "slowdown": 2.0,
}
BATCH_SIZE = 128
VAL_FRACTION = 0.1  # MNIST1DDataModule's default hold-out
WARMUP_EPOCHS = 5


@dataclass
class Result:
    name: str
    workers: int
    test_acc: float
    seconds: float  # training time: on_train_start to on_train_end, in this process
    kind: str = "single"  # single, ddp, or the asynchronous rule
    test_samples: int = 0


def is_launched_child() -> bool:
    """True in the extra processes Lightning's launcher starts (they re-run this script)."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


# Arguments ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.mnist1d.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mode", choices=("simulated", "real"), default="real",
        help="real: N worker processes on this machine, under DDP and under the asynchronous --algorithm "
        "(default); simulated: N virtual "
        "workers in one process (SimulatedWorkers)",
    )
    parser.add_argument("--workers", type=int, default=None, help="N (default: 3 real, 8 simulated; real needs >= 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: 10 real, 20 simulated)")
    parser.add_argument("--algorithm", default="dana",
                        help=f"the asynchronous rule: {', '.join(ALGORITHMS)}, or another of lightning_dana.ALGORITHMS "
                        "(default: dana)")
    parser.add_argument("--schedule", default=None, choices=SCHEDULES,
                        help=f"simulated mode only: which worker pushes when (default: {DEFAULTS['schedule']})")
    parser.add_argument("--slowdown", type=float, default=None, metavar="FACTOR",
                        help="real mode only: the last worker is FACTOR times slower (default: 2; 1: none)")
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", default=None,
                        help="real mode only: skip the DDP run")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="generated training samples, 10%% held out for validation (default: 10000 real, 20000 simulated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="cache of the generated data (default: ~/.cache/lightning_dana/mnist1d)")
    parser.add_argument("--progress-bar", choices=("auto", "on", "off"), default="auto",
                        help="auto (default): a progress bar on a terminal, one line per epoch otherwise")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_const", const="off",
                        help="same as --progress-bar off")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument; ``parser.error`` (exit 2, a message naming the way out) on any problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    real = args.mode == "real"

    def refuse(option: str, why: str) -> None:
        parser.error(f"{option} {why}")

    # Options that do not apply to the mode are refused, never silently ignored.
    if real and args.schedule is not None:
        refuse(f"--schedule {args.schedule}", "applies to --mode simulated only: real workers run at their own "
               "speed (use --slowdown FACTOR to slow one down), or add --mode simulated")
    if not real:
        for option, value in (("--slowdown", args.slowdown), ("--no-ddp", args.ddp)):
            if value is not None:
                refuse(option, "applies to --mode real only: in simulated mode --schedule decides who pushes "
                       "when, and there is no DDP run; drop it, or use --mode real")
    args.schedule = args.schedule or DEFAULTS["schedule"]
    args.slowdown = DEFAULTS["slowdown"] if args.slowdown is None else args.slowdown
    args.ddp = True if args.ddp is None else args.ddp
    for name in ("workers", "epochs", "num_samples"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[name][args.mode])

    if real and args.workers < 2:
        refuse(f"--workers {args.workers}", "is too few for --mode real, which needs at least 2 worker processes "
               "(the single-worker run is the baseline, trained first anyway): use --workers 2 or more, or "
               f"--mode simulated --workers {max(args.workers, 1)}")
    if args.workers < 1:
        refuse(f"--workers {args.workers}", "must be >= 1")
    if args.epochs < 1:
        refuse(f"--epochs {args.epochs}", "must be >= 1")
    if not args.slowdown >= 1:  # also refuses NaN
        refuse(f"--slowdown {args.slowdown:g}", "must be >= 1 (1: no slowed worker; 2: the last worker takes twice "
               "as long per step)")
    train = args.num_samples - round(args.num_samples * VAL_FRACTION)
    need = args.workers * BATCH_SIZE
    if args.num_samples < 100 or train < need:
        least = max(100, need)
        while least - round(least * VAL_FRACTION) < need:
            least += 1
        refuse(f"--num-samples {args.num_samples}", f"leaves {max(train, 0)} training samples, less than one batch "
               f"of {BATCH_SIZE} for each of the {args.workers} workers; use --num-samples {least} or more, or "
               "fewer --workers")
    if args.data_dir is None:
        args.data_dir = os.path.join(os.path.expanduser("~"), ".cache", "lightning_dana", "mnist1d")
    data_dir = Path(args.data_dir).expanduser()
    try:  # the cache folder is made now, so that a bad path fails before anything trains
        data_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(data_dir, os.W_OK | os.X_OK)
    except OSError as err:
        refuse(f"--data-dir {args.data_dir}", f"cannot be made ({err.strerror}); name a writable folder for the "
               "data cache")
    if not writable:
        refuse(f"--data-dir {args.data_dir}", "is not writable; name a writable folder for the data cache")
    if args.algorithm not in ALGORITHMS:
        known = known_algorithms()
        if args.algorithm not in known:
            refuse(f"--algorithm {args.algorithm}", f"is not a rule of lightning_dana; choose one of {', '.join(known)}")
    if importlib.util.find_spec("mnist1d") is None:
        parser.error("the mnist1d package is missing: pip install -e '.[examples]' (bash scripts/demo installs it)")
    if args.progress_bar == "auto":
        args.progress_bar = "on" if sys.stdout.isatty() else "off"
    args.progress_bar = args.progress_bar == "on"
    return args


def known_algorithms() -> tuple[str, ...]:
    """Every rule lightning_dana offers (imports it, with torch and Lightning)."""
    import lightning_dana

    return tuple(getattr(lightning_dana, "ALGORITHMS", ALGORITHMS))


# Runs -----------------------------------------------------------------------------------


def make_recipe(args: argparse.Namespace) -> tuple[Any, Any]:
    """The one recipe every run shares (milestones at 50% and 75% of the epochs)."""
    import pytorch_lightning as pl

    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    pl.seed_everything(args.seed, verbose=False)
    model = MNIST1DClassifier(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    data = MNIST1DDataModule(num_samples=args.num_samples, batch_size=BATCH_SIZE, seed=args.seed, data_dir=args.data_dir)
    return model, data


def exact_test_accuracy(model: Any, data: Any) -> tuple[float, int]:
    """(correct / total, total) on the whole test set, each sample once, in this process."""
    import torch

    data.setup("test")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total, total


def epoch_line(name: str) -> Any:
    """A callback that prints one plain line per epoch on rank 0 (instead of progress-bar redraws)."""
    import pytorch_lightning as pl

    class EpochLine(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.global_rank != 0:
                return
            metrics = trainer.callback_metrics
            parts = [f"[{name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
            if "train_loss" in metrics:
                parts.append(f"train_loss {float(metrics['train_loss']):.3f}")
            if "val_acc" in metrics:
                parts.append(f"val_acc {100 * float(metrics['val_acc']):.2f}%")
            parts.append(f"{time.perf_counter() - self.start:.0f}s")
            print("  ".join(parts), flush=True)

    return EpochLine()


def fit_and_test(name: str, workers: int, args: argparse.Namespace, kind: str, **trainer_kwargs: Any) -> Result:
    """Fit one run; on rank 0, its exact test accuracy and training time. ``kind``: single, ddp or the rule."""
    import pytorch_lightning as pl

    from examples.faults import CountSamples

    model, data = make_recipe(args)
    clock = CountSamples()
    callbacks = [clock, *trainer_kwargs.pop("callbacks", [])]
    if not args.progress_bar:
        callbacks.append(epoch_line("baseline" if kind == "single" else kind))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress_bar,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    seconds = (clock.end or 0.0) - (clock.start or 0.0)
    if trainer.global_rank != 0:
        return Result(name, workers, float("nan"), seconds, kind)
    accuracy, samples = exact_test_accuracy(model, data)
    return Result(name, workers, accuracy, seconds, kind, samples)


def run_baseline(args: argparse.Namespace) -> Result:
    return fit_and_test("baseline (1 worker, Nesterov SGD)", 1, args, "single", devices=1)


def async_callbacks() -> list[Any]:
    import lightning_dana

    return [lightning_dana.GradualWarmup(epochs=WARMUP_EPOCHS), lightning_dana.MomentumCorrection()]


def run_simulated(args: argparse.Namespace) -> Result:
    import lightning_dana

    strategy = lightning_dana.SimulatedWorkers(
        num_workers=args.workers, algorithm=args.algorithm, schedule=args.schedule, seed=args.seed
    )
    workers = "1 simulated worker" if args.workers == 1 else f"{args.workers} simulated workers"
    name = f"{args.algorithm}, {workers} ({args.schedule})"
    return fit_and_test(name, args.workers, args, args.algorithm, devices=1, strategy=strategy,
                        callbacks=async_callbacks())


def slowed(args: argparse.Namespace) -> str:
    return f" (rank {args.workers - 1} {args.slowdown:g}x slower)" if args.slowdown > 1 else ""


def slow_callbacks(args: argparse.Namespace) -> list[Any]:
    from examples.faults import SlowRank

    return [SlowRank(rank=args.workers - 1, factor=args.slowdown)] if args.slowdown > 1 else []


def run_real(args: argparse.Namespace) -> Result:
    """N asynchronous worker processes on this machine's CPU (``strategy=args.algorithm``).

    Lightning's launcher re-runs this script in each extra process, which is
    why ``main`` skips the baseline there (``is_launched_child``).
    """
    name = f"{args.algorithm}, {args.workers} worker processes{slowed(args)}"
    return fit_and_test(name, args.workers, args, args.algorithm, strategy=args.algorithm, devices=args.workers,
                        callbacks=[*slow_callbacks(args), *async_callbacks()])


def run_ddp(args: argparse.Namespace) -> Result:
    """The same processes, the same recipe and slowed worker, under Lightning's synchronous DDP."""
    name = f"ddp, {args.workers} worker processes{slowed(args)}"
    return fit_and_test(name, args.workers, args, "ddp", strategy="ddp", devices=args.workers,
                        callbacks=slow_callbacks(args))


def print_table(results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"\n{'run':<{width}}  {'test acc':>8}  {'train time':>10}")
    for r in results:
        print(f"{r.name:<{width}}  {100 * r.test_acc:7.2f}%  {r.seconds:9.1f}s")
    base, rest = results[0], results[1:]
    for r in rest:
        print(f"{r.name}: {100 * (r.test_acc - base.test_acc):+.2f} points vs. baseline")
    asynchronous = [r for r in rest if r.kind not in ("ddp", "single")]
    ddp = [r for r in rest if r.kind == "ddp"]
    if asynchronous and ddp and asynchronous[0].seconds > 0:
        a, d = asynchronous[0], ddp[0]
        print(f"{a.kind} trained in {d.seconds / a.seconds:.2f}x less time than ddp on the same setup "
              f"({a.seconds:.1f}s vs {d.seconds:.1f}s)")


def quiet_lightning() -> None:
    """Drop Lightning's advice that does not apply to this demo's tiny in-memory tensors."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 with torch >= 2.10, at import


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)  # every check before anything is imported or trained
    quiet_lightning()
    from examples.mnist1d.train import limit_cpu_threads

    limit_cpu_threads()
    if args.mode == "real" and is_launched_child():
        if args.ddp:  # a worker process: only the multi-process runs, in rank 0's order
            run_ddp(args)
        run_real(args)
        return []
    started = time.perf_counter()
    results = [run_baseline(args)]
    if args.mode == "simulated":
        results.append(run_simulated(args))
    else:
        # DDP first: its teardown leaves the process group to the next Trainer, as Lightning's own
        # strategies do; the asynchronous run then starts in the processes DDP used.
        ddp = run_ddp(args) if args.ddp else None
        results.append(run_real(args))
        if ddp is not None:
            results.append(ddp)
    print_table(results)
    print(f"(whole demo {time.perf_counter() - started:.0f}s; test accuracy: each of the {results[0].test_samples} "
          "test samples counted once, on the final model)")
    return results


if __name__ == "__main__":
    main()
