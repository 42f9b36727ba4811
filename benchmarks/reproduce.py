"""Reproduce the shape of every accuracy claim of the DANA paper on MNIST-1D, with one command.

    python benchmarks/reproduce.py                  # full sweep (about an hour on 2 CPU cores), resumable
    python benchmarks/reproduce.py --preset quick   # a few N, fewer epochs, 1 seed (< 10 min)
    python benchmarks/reproduce.py --lr-sweep       # the N = 1 lr sweep that chose the recipe
    python benchmarks/reproduce.py --report-only    # table and plots from the CSV, no training

Every run trains the same single-worker recipe (Nesterov SGD, step decays,
warm-up and momentum correction as in the paper, section 5) through the real
Lightning Trainer: asynchronous algorithms under ``SimulatedWorkers``, the
synchronous baseline ``ssgd`` as one worker with batch N*B and lr N*lr (the
linear scaling rule, warmed up from lr). The recipe is chosen at N = 1 only and
never changed per N or per algorithm: that is the paper's "out of the box".

Outputs under ``--out`` (default ``docs/results``): ``runs.csv`` (one row per
run; runs already there are skipped, so an interrupted sweep resumes),
``table.md`` (tables 3 and 4 of the paper, per schedule), ``fig2_error_vs_workers.png``,
``fig1_gap.png`` (from ``GapMonitor.history``, kept in ``gaps/``) and
``fig5_speedup.png`` (Monte Carlo of the gamma model).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import multiprocessing as mp

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # reproduce_tasks, the second task
    sys.path.insert(0, str(ROOT / "benchmarks"))

from lightning_dana.state import MasterDivergedError  # noqa: E402

PAPER_ALGORITHMS = ("asgd", "nag_asgd", "multi_asgd", "dana_zero", "dana")
#: staleness mitigations (issue 8): on ASGD, on DANA, and ours (dana_sm, dana_smp; dana_sa is an ablation)
MITIGATIONS = ("sa_asgd", "ga_asgd", "dc_asgd", "dana_ga", "dana_dc", "dana_sm", "dana_smp", "dana_smpn", "dana_sa")
ON_ASGD = ("asgd", "sa_asgd", "ga_asgd", "dc_asgd")  # no momentum: their N = 1 is plain SGD, the asgd run
ASYNC_ALGORITHMS = (*PAPER_ALGORITHMS, *MITIGATIONS)
ALGORITHMS = (*ASYNC_ALGORITHMS, "ssgd")
SHARED = "shared"  # the schedule column of runs that no schedule affects (N = 1, ssgd)
LABELS = {
    "baseline": "Baseline",
    "asgd": "ASGD",
    "nag_asgd": "NAG-ASGD",
    "multi_asgd": "Multi-ASGD",
    "dana_zero": "DANA-Zero",
    "dana": "DANA",
    "ssgd": "SSGD",
    "sa_asgd": "SA-ASGD",
    "ga_asgd": "GA-ASGD",
    "dc_asgd": "DC-ASGD-a",
    "dana_ga": "DANA-GA",
    "dana_dc": "DANA-DC",
    "dana_sm": "DANA-SM (ours)",
    "dana_smp": "DANA-SMP (ours)",
    "dana_smpn": "DANA-SMP-N (ours)",
    "dana_sa": "DANA-SA (ablation)",
}
CSV_FIELDS = (
    "workers", "algorithm", "schedule", "seed", "test_error", "val_error", "train_loss",
    "runtime_s", "gap_mean", "lag_mean", "refused_pushes", "lr", "epochs", "num_samples",
)


# --- what is trained -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The single-worker recipe, shared by every run of a preset (never retuned per N or algorithm)."""

    num_samples: int = 20000  # generated MNIST-1D training samples (10% held out for validation)
    channels: int = 16  # width of the 1-D CNN (examples/mnist1d/model.py)
    batch_size: int = 128  # per worker
    epochs: int = 8  # lr x0.1 at 50% and 75% of the epochs
    lr: float = 0.4  # chosen by --lr-sweep: best mean validation error at N = 1 (docs/results.md)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # from lr/N to lr (a no-op at N = 1)
    data_seed: int = 0  # the data set is the same for every run; seeds vary init, data order, schedule
    log_every: int = 10  # GapMonitor interval in steps (bookkeeping, not training)
    task: str = "mnist1d"  # or "teacher": the second task (benchmarks/reproduce_tasks.py), regression


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``algorithm`` is ``baseline`` (N = 1 NAG), one of ``ALGORITHMS``."""

    workers: int
    algorithm: str
    schedule: str
    seed: int

    @property
    def key(self) -> tuple[int, str, str, int]:
        return (self.workers, self.algorithm, self.schedule, self.seed)

    @property
    def name(self) -> str:
        return f"N{self.workers}_{self.algorithm}_{self.schedule}_s{self.seed}"


@dataclass(frozen=True)
class Preset:
    """A sweep: which N, algorithms, schedules (each with its seeds), and where to record gaps."""

    recipe: Recipe
    workers: tuple[int, ...]
    algorithms: tuple[str, ...]
    schedule_seeds: dict[str, tuple[int, ...]] = field(hash=False)
    gap_workers: int = 16  # N whose gap history is kept for figure 1 (seed 0)


# the lr of the second recipe and of the second task: the --lr-sweep's pick at N = 1 (best mean validation
# error; the rule was written before any N > 1 run of either): see docs/results.md
LONG_LR = 0.4
TEACHER_LR = 0.1

PRESETS = {
    "full": Preset(
        Recipe(),
        (1, 2, 4, 8, 12, 16, 24, 32),
        ALGORITHMS,
        {"block_random": (0, 1, 2), "gamma": (0, 1, 2), "round_robin": (0,)},
        gap_workers=16,
    ),
    "quick": Preset(
        replace(Recipe(), epochs=4),
        (1, 8, 32),
        ALGORITHMS,
        {"block_random": (0,), "gamma": (0,)},
        gap_workers=8,
    ),
    # issue 8: the staleness mitigations against their bases, at the main recipe (lr 0.4, chosen at N = 1)
    "mitigations": Preset(
        Recipe(),
        (1, 2, 4, 8, 12, 16, 24, 32),
        ("asgd", "nag_asgd", "dana", *MITIGATIONS),
        {"block_random": (0, 1, 2), "gamma": (0, 1, 2)},
        gap_workers=16,
    ),
    # the second recipe: 4x the data, so 4x the steps per run and per epoch (lag at N = 32: 5.7 % of an
    # epoch, the paper's CIFAR-10 8 %); lr chosen by its own N = 1 --lr-sweep (docs/results.md)
    "long": Preset(
        replace(Recipe(), num_samples=80000, lr=LONG_LR),
        (1, 2, 4, 8, 12, 16, 24, 32),
        ("asgd", "dana", *MITIGATIONS),
        {"block_random": (0, 1, 2), "gamma": (0, 1, 2)},
        gap_workers=16,
    ),
    # the second task: teacher-student regression (no BatchNorm, MSE), its own N = 1-chosen lr
    "teacher": Preset(
        replace(Recipe(), task="teacher", channels=64, weight_decay=0.0, lr=TEACHER_LR),
        (1, 2, 4, 8, 12, 16, 24, 32),
        ("asgd", "dana", *MITIGATIONS),
        {"block_random": (0, 1, 2), "gamma": (0, 1, 2)},
        gap_workers=16,
    ),
    # the test suite's preset: seconds, not minutes
    "smoke": Preset(
        replace(Recipe(), num_samples=1200, epochs=1, warmup_epochs=0.5, log_every=2),
        (1, 4),
        ("dana", "nag_asgd"),
        {"block_random": (0,)},
        gap_workers=4,
    ),
}

LR_SWEEP = (0.025, 0.05, 0.1, 0.2, 0.4)
LR_SWEEP_SEEDS = (0, 1)


def plan(preset: Preset) -> list[RunSpec]:
    """Every run of a sweep, seed-major so a cut-off sweep has all N for the first seeds.

    At N = 1 every momentum algorithm is the single-worker NAG baseline and no
    schedule matters, so it runs once per seed (``baseline``); ``asgd`` (no
    momentum) has its own N = 1 run. ``ssgd`` is synchronous: no schedule.
    """
    all_seeds = sorted({s for seeds in preset.schedule_seeds.values() for s in seeds})
    specs: list[RunSpec] = []
    for seed in all_seeds:
        if 1 in preset.workers:
            specs.append(RunSpec(1, "baseline", SHARED, seed))
            if "asgd" in preset.algorithms:
                specs.append(RunSpec(1, "asgd", SHARED, seed))
        for n in (n for n in preset.workers if n > 1):
            if "ssgd" in preset.algorithms and seed in preset.schedule_seeds.get("block_random", ()):
                specs.append(RunSpec(n, "ssgd", SHARED, seed))
            for schedule, seeds in preset.schedule_seeds.items():
                if seed in seeds:
                    specs += [RunSpec(n, a, schedule, seed) for a in preset.algorithms if a in ASYNC_ALGORITHMS]
    # round-robin is optional in the paper's sense: run it after the main schedules
    return sorted(specs, key=lambda s: (s.schedule == "round_robin", s.seed))


# --- one run (in a pool process) -------------------------------------------------------------------------


def quiet_worker() -> None:
    """One intra-op thread per run (the jobs share the cores) and no per-run chatter."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_trainer_kwargs(spec: RunSpec, recipe: Recipe, monitor) -> dict:
    """Strategy and callbacks of one run: the paper's warm-up and momentum correction for every algorithm."""
    import lightning_dana as ld

    callbacks = [ld.GradualWarmup(epochs=recipe.warmup_epochs), ld.MomentumCorrection()]
    if spec.algorithm == "ssgd":
        callbacks[0] = ld.GradualWarmup(epochs=recipe.warmup_epochs, num_workers=spec.workers)
        return {"callbacks": callbacks}
    if spec.algorithm == "baseline":
        return {"callbacks": callbacks}
    strategy = ld.SimulatedWorkers(
        num_workers=spec.workers,
        algorithm=spec.algorithm,
        schedule=spec.schedule if spec.schedule != SHARED else "round_robin",
        seed=spec.seed,
        batch_size=recipe.batch_size,
    )
    return {"strategy": strategy, "callbacks": [*callbacks, monitor]}


def evaluate_error(model, dataset) -> float:
    """Top-1 error in percent of the model (the master's parameters after fit) on a TensorDataset."""
    import torch

    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        logits = torch.cat([model(chunk) for chunk in x.split(2048)])
    wrong = (logits.argmax(1) != y) | ~torch.isfinite(logits).all(1)
    return 100.0 * wrong.float().mean().item()


# a run whose master's parameters became non-finite (MasterDivergedError) has no model left to test: it
# is recorded, as 100 % error, so that a mean over seeds counts it instead of silently dropping it
DIVERGED_ERROR = 100.0


def run_one(spec: RunSpec, recipe: Recipe, data_dir: str, gap_dir: str | None) -> dict:
    """Train one run through the real Trainer and return its CSV row."""
    quiet_worker()
    import lightning_dana as ld

    scale = spec.workers if spec.algorithm == "ssgd" else 1  # linear scaling rule
    start = time.perf_counter()
    pl.seed_everything(spec.seed, verbose=False)
    data, model, evaluate = build_task(recipe, scale, data_dir)
    monitor = ld.GapMonitor(logging_interval=recipe.log_every, prog_bar=False)
    losses = LastEpochLoss()
    kwargs = build_trainer_kwargs(spec, recipe, monitor)
    kwargs["callbacks"].append(losses)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs,
    )  # fmt: skip
    try:
        trainer.fit(model, datamodule=data)
        test_error, val_error, train_loss = (evaluate(model, data.datasets["test"]),
                                             evaluate(model, data.datasets["val"]), losses.mean())
    except MasterDivergedError as error:  # a measured outcome, not a broken run: the model is lost
        print(f"{spec.name} diverged ({error}); recorded as {DIVERGED_ERROR:g} % error", flush=True)
        test_error, val_error, train_loss = DIVERGED_ERROR, DIVERGED_ERROR, math.nan
    row = {
        "workers": spec.workers, "algorithm": spec.algorithm, "schedule": spec.schedule, "seed": spec.seed,
        "test_error": test_error, "val_error": val_error,
        "train_loss": train_loss, "runtime_s": time.perf_counter() - start,
        "refused_pushes": refused_pushes(trainer.strategy),
        "lr": recipe.lr, "epochs": recipe.epochs, "num_samples": recipe.num_samples,
    }  # fmt: skip
    row.update(history_means(monitor.history))
    if gap_dir is not None and monitor.history:
        Path(gap_dir).mkdir(parents=True, exist_ok=True)
        (Path(gap_dir) / f"{spec.name}.json").write_text(json.dumps(compact_history(monitor.history)))
    return row


def refused_pushes(strategy) -> int:
    """NaN/Inf pushes the master refused (the shared core's MasterState counts them)."""
    return getattr(getattr(getattr(strategy, "_core", None), "state", None), "refused", 0)


def build_task(recipe: Recipe, scale: int, data_dir: str):
    """Data module, model and error metric (in %) of the recipe's task; ``scale``: ssgd's linear scaling."""
    if recipe.task == "teacher":
        from reproduce_tasks import TeacherDataModule, TeacherRegressor, unexplained_variance

        data = TeacherDataModule(num_samples=recipe.num_samples, batch_size=recipe.batch_size * scale, seed=recipe.data_seed)
        model = TeacherRegressor(
            width=recipe.channels, lr=recipe.lr * scale, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        return data, model, unexplained_variance
    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    data = MNIST1DDataModule(
        num_samples=recipe.num_samples, batch_size=recipe.batch_size * scale, seed=recipe.data_seed, data_dir=data_dir
    )
    model = MNIST1DClassifier(
        channels=recipe.channels, lr=recipe.lr * scale, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, nesterov=True,
    )  # fmt: skip
    return data, model, evaluate_error


class LastEpochLoss(pl.Callback):
    """Mean training loss over the last epoch (a single step's loss would be too noisy)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_start(self, *args) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))

    def mean(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


def history_means(history: Sequence[dict]) -> dict[str, float]:
    """Push-weighted mean lag and gap over the whole run (NaN where nothing was recorded, e.g. ssgd)."""
    rows = [h for h in history if h.get("dana/pushes")]
    weight = sum(h["dana/pushes"] for h in rows)
    if not weight:
        return {"gap_mean": math.nan, "lag_mean": math.nan}
    gaps = [h for h in rows if "dana/gap_mean" in h]
    gap_weight = sum(h["dana/pushes"] for h in gaps)
    return {
        "lag_mean": sum(h["dana/lag_mean"] * h["dana/pushes"] for h in rows) / weight,
        "gap_mean": sum(h["dana/gap_mean"] * h["dana/pushes"] for h in gaps) / gap_weight if gap_weight else math.nan,
    }


def compact_history(history: Sequence[dict]) -> dict[str, list[float]]:
    """Only what figure 1 plots: step, gap, lag."""
    return {
        "step": [h["step"] for h in history],
        "gap": [h.get("dana/gap_mean", math.nan) for h in history],
        "lag": [h["dana/lag_mean"] for h in history],
    }


# --- the sweep: CSV, resume, process pool ----------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """Rows of the CSV with numbers parsed; [] if it does not exist yet."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("workers", "seed"):
            row[key] = int(row[key])
        for key in CSV_FIELDS[4:]:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
    return rows


def done_keys(path: Path) -> set[tuple[int, str, str, int]]:
    return {(r["workers"], r["algorithm"], r["schedule"], r["seed"]) for r in read_rows(path)}


def append_row(path: Path, row: dict) -> None:
    """Append one run at once (header first if new), so a killed sweep loses at most the runs in flight."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def prepare_data(recipe: Recipe, data_dir: str) -> None:
    """Generate the cached data set once, before the pool starts, so jobs never race to build it."""
    if recipe.task != "mnist1d":
        return  # generated in memory, in a fraction of a second
    from examples.mnist1d.data import MNIST1DDataModule

    MNIST1DDataModule(num_samples=recipe.num_samples, seed=recipe.data_seed, data_dir=data_dir).prepare_data()


def run_sweep(specs: Sequence[RunSpec], recipe: Recipe, out: Path, jobs: int, data_dir: str, gap_workers: int) -> None:
    """Run the specs not yet in ``runs.csv`` on a pool of ``jobs`` processes, appending each row as it ends."""
    csv_path = out / "runs.csv"
    todo = [s for s in specs if s.key not in done_keys(csv_path)]
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already in {csv_path}; {len(todo)} to go", flush=True)
    if not todo:
        return
    prepare_data(recipe, data_dir)
    gap_dir = str(out / "gaps")
    started = time.perf_counter()
    args = {s: (s, recipe, data_dir, gap_dir if keeps_gaps(s, gap_workers) else None) for s in todo}
    if jobs <= 1:  # in-process: no pool start-up (the smoke test)
        for i, spec in enumerate(todo, 1):
            record(csv_path, spec, lambda: run_one(*args[spec]), i, len(todo), started)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, *args[s]): s for s in todo}
        for i, future in enumerate(as_completed(futures), 1):
            record(csv_path, futures[future], future.result, i, len(todo), started)


def record(csv_path: Path, spec: RunSpec, result, i: int, total: int, started: float) -> None:
    """Append a finished run to the CSV and print progress; a failed run is reported, not fatal."""
    try:
        row = result()
    except Exception as err:  # one broken run must not lose the others
        print(f"[{i}/{total}] {spec.name} FAILED: {err!r}", flush=True)
        return
    append_row(csv_path, row)
    elapsed = time.perf_counter() - started
    print(
        f"[{i}/{total}] {spec.name}: test error {row['test_error']:.2f}%, {row['runtime_s']:.1f}s "
        f"(elapsed {elapsed / 60:.1f} min, eta {elapsed / i * (total - i) / 60:.1f} min)",
        flush=True,
    )


def keeps_gaps(spec: RunSpec, gap_workers: int) -> bool:
    return spec.workers == gap_workers and spec.seed == 0 and spec.algorithm in ASYNC_ALGORITHMS


# --- the paper-shaped table ------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]  # a diverged run's gap can be inf
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_errors(rows: Iterable[dict], schedule: str) -> dict[tuple[int, str], list[float]]:
    """Test errors per (N, algorithm) for one schedule: its own runs plus the shared N = 1 and ssgd runs."""
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["schedule"] in (schedule, SHARED):
            groups[(r["workers"], r["algorithm"])].append(r["test_error"])
    return groups


def schedules_in(rows: Iterable[dict]) -> list[str]:
    order = ("block_random", "gamma", "round_robin")
    present = {r["schedule"] for r in rows}
    return [s for s in order if s in present]


def table_markdown(rows: list[dict]) -> str:
    """Tables 3 and 4 of the paper (mean and std of final test error per N and algorithm), per schedule."""
    parts = []
    for schedule in schedules_in(rows):
        groups = group_errors(rows, schedule)
        parts.append(f"### Final test error (%), {schedule.replace('_', ' ')} schedule\n")
        parts.append("| #Workers | Algorithm | mean | std | runs | mean lag | mean gap |")
        parts.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        extra = lag_gap(rows, schedule)
        for (n, algorithm), errors in sorted(groups.items(), key=lambda kv: (kv[0][0], order_of(kv[0][1]))):
            m, s = mean_std(errors)
            lag, gap = extra.get((n, algorithm), (math.nan, math.nan))
            parts.append(
                f"| {n} | {LABELS[algorithm]} | {m:.2f} | {s:.2f} | {len(errors)} | {fmt(lag, 1)} | {fmt(gap, 4)} |"
            )
        parts.append("")
        parts.append(pivot_markdown(groups))
        parts.append("")
    return "\n".join(parts)


def pivot_markdown(groups: dict[tuple[int, str], list[float]]) -> str:
    """The same numbers as mean ± std, one row per algorithm and one column per N (figure 2 as a table)."""
    workers = sorted({n for n, _ in groups})
    algorithms = sorted({a for _, a in groups}, key=order_of)
    lines = ["| Algorithm | " + " | ".join(f"N={n}" for n in workers) + " |", "| --- |" + " ---: |" * len(workers)]
    for a in algorithms:
        cells = []
        for n in workers:
            errors = groups.get((n, a), [])
            m, s = mean_std(errors)
            runs = "" if len(errors) >= 3 else f" [{len(errors)}]"  # fewer seeds than the sweep's 3: say how many
            cells.append("" if math.isnan(m) else f"{m:.2f} ± {s:.2f}{runs}")
        lines.append(f"| {LABELS[a]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lag_gap(rows: Iterable[dict], schedule: str) -> dict[tuple[int, str], tuple[float, float]]:
    sums: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["schedule"] == schedule:
            sums[(r["workers"], r["algorithm"])].append((r["lag_mean"], r["gap_mean"]))
    return {k: (mean_std([a for a, _ in v])[0], mean_std([b for _, b in v])[0]) for k, v in sums.items()}


def order_of(algorithm: str) -> int:
    return list(LABELS).index(algorithm)


def fmt(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


# --- figures ---------------------------------------------------------------------------------------------


def plot_error_vs_workers(rows: list[dict], path: Path) -> None:
    """Figure 2 (and 3): mean final test error against N per algorithm, std bands, one panel per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = schedules_in([r for r in rows if r["schedule"] != SHARED]) or ["block_random"]
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.2 * len(schedules), 4.2), squeeze=False)
    for ax, schedule in zip(axes[0], schedules):
        groups = group_errors(rows, schedule)
        base = mean_std(groups.get((1, "baseline"), []))[0]
        for algorithm in ALGORITHMS:
            points = curve(groups, algorithm)
            if len(points) < 2:
                continue
            ns, means, stds = zip(*points)
            line = ax.plot(ns, means, marker="o", ms=3, label=LABELS[algorithm], **line_style(algorithm))[0]
            lo = [max(m - s, 1e-2) for m, s in zip(means, stds)]
            ax.fill_between(ns, lo, [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
        if not math.isnan(base):
            ax.axhline(base, color="k", ls="--", lw=1, label="Baseline (N=1)")
        ax.set(xscale="log", yscale="log", xlabel="workers N", ylabel="final test error (%)")
        ax.set_title(f"MNIST-1D, {schedule.replace('_', ' ')}")
        ax.set_xticks(sorted({n for n, _ in groups}), labels=[str(n) for n in sorted({n for n, _ in groups})])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def line_style(algorithm: str) -> dict:
    """One colour per algorithm (tab20), dashed for the issue 8 mitigations."""
    import matplotlib.pyplot as plt

    i = ALGORITHMS.index(algorithm)
    return {"color": plt.cm.tab20(i % 20), "ls": "--" if algorithm in MITIGATIONS else "-"}


def curve(groups: dict[tuple[int, str], list[float]], algorithm: str) -> list[tuple[int, float, float]]:
    """(N, mean, std) of one algorithm; N = 1 is the baseline for every algorithm but asgd."""
    points = []
    for (n, a), errors in groups.items():
        base = "asgd" if algorithm in ON_ASGD else "baseline"
        if a == algorithm or (n == 1 and a == base and algorithm != base):
            points.append((n, *mean_std(errors)))
    return sorted(points)


def plot_gaps(rows: list[dict], gap_dir: Path, path: Path, schedule: str = "block_random") -> None:
    """Figure 1: (a) mean gap against N per algorithm (from the CSV), (b) the gap over training at one N (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm in ASYNC_ALGORITHMS:
        points = sorted(
            (n, mean_std(v)[0]) for (n, alg), v in gap_by_workers(rows, schedule).items() if alg == algorithm
        )
        if points:
            a.plot(*zip(*points), marker="o", ms=3, label=LABELS[algorithm], **line_style(algorithm))
    a.set(xscale="log", yscale="log", xlabel="workers N", ylabel="mean gap over training")
    ticks = sorted({n for n, _ in gap_by_workers(rows, schedule)})
    a.set_xticks(ticks, labels=[str(n) for n in ticks])
    a.minorticks_off()
    a.set_title(f"(a) gap against N, {schedule.replace('_', ' ')}")
    workers = None
    for algorithm in ASYNC_ALGORITHMS:
        for f in sorted(gap_dir.glob(f"N*_{algorithm}_{schedule}_s0.json")):
            n, name = f.stem.split("_", 1)  # "N16", "nag_asgd_block_random_s0": glob's * also matches "16_nag"
            if name != f"{algorithm}_{schedule}_s0":
                continue
            h = json.loads(f.read_text())
            b.plot(h["step"], h["gap"], lw=1, label=LABELS[algorithm], **line_style(algorithm))
            workers = n[1:]
    b.set(yscale="log", xlabel="training step (pushes)", ylabel="gap G(θ_t − θ_{t+τ})")
    b.set_title(f"(b) gap during training, N = {workers}, seed 0")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def gap_by_workers(rows: Iterable[dict], schedule: str) -> dict[tuple[int, str], list[float]]:
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["schedule"] == schedule and r["workers"] > 1:
            groups[(r["workers"], r["algorithm"])].append(r["gap_mean"])
    return groups


def gamma_speedups(
    workers: Sequence[int], batch: float = 128.0, variation: float = 0.1, batches: int = 4000, seed: int = 0
) -> dict[str, list[float]]:
    """Monte Carlo of figure 5: speedup over one worker of async and sync training under Gamma batch times.

    Batch times ~ Gamma(shape 1/V², scale B·V²) (mean B). Async: each of N
    workers runs back to back; throughput = batches finished by a horizon over
    the horizon. Sync: every step waits for the slowest of N draws and
    yields N batches. One worker's throughput is 1/B.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    shape, scale = 1.0 / variation**2, batch * variation**2
    result: dict[str, list[float]] = {"workers": list(workers), "async": [], "sync": []}
    for n in workers:
        finish = np.cumsum(rng.gamma(shape, scale, size=(n, batches)), axis=1)
        horizon = finish[:, -1].min()
        async_rate = (finish <= horizon).sum() / horizon
        sync_rate = n / rng.gamma(shape, scale, size=(batches, n)).max(axis=1).mean()
        result["async"].append(async_rate * batch)
        result["sync"].append(sync_rate * batch)
    result["ratio"] = [a / s for a, s in zip(result["async"], result["sync"])]
    return result


def plot_speedup(path: Path, workers: Sequence[int] = tuple(range(1, 65))) -> dict[str, list[float]]:
    """Figure 5 (a) async and sync speedup against N, (b) async over sync."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = gamma_speedups(workers)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(s["workers"], s["async"], label="async (DANA, any ASGD)")
    a.plot(s["workers"], s["sync"], label="sync (SSGD)")
    a.plot(s["workers"], s["workers"], "k:", lw=1, label="linear")
    a.set(xlabel="workers N", ylabel="speedup over one worker", title="(a) theoretical speedup, Γ(1/V², B·V²), V=0.1")
    a.legend(fontsize=8)
    b.plot(s["workers"], [100 * (r - 1) for r in s["ratio"]])
    b.set(xlabel="workers N", ylabel="async faster than sync (%)", title="(b) async over sync")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return s


GOALS = {8: 0.5, 16: 1.0, 32: 2.0}  # issue 8: the best variant's target, points above the N = 1 baseline


def best_markdown(rows: list[dict]) -> str:
    """Per schedule and N: the baseline, dana, and the mitigation with the lowest mean test error (issue 8's table)."""
    parts = []
    for schedule in [s for s in schedules_in(rows) if s != "round_robin"]:
        groups = group_errors(rows, schedule)
        base = mean_std(groups.get((1, "baseline"), []))
        parts.append(f"**{schedule.replace('_', ' ')}** (baseline, N = 1: {base[0]:.2f} ± {base[1]:.2f}, "
                     f"{len(groups.get((1, 'baseline'), []))} runs)\n")  # fmt: skip
        parts.append("| N | DANA | best mitigation | its error | runs | goal (baseline + points) | met |")
        parts.append("| ---: | ---: | --- | ---: | ---: | ---: | --- |")
        for n in sorted({n for n, _ in groups if n > 1}):
            dana = groups.get((n, "dana"), [])
            cands = [(mean_std(v)[0], a, v) for (m, a), v in groups.items() if m == n and a in MITIGATIONS and v]
            if not cands:
                continue
            m, a, v = min(cands)
            goal = base[0] + GOALS[n] if n in GOALS else math.nan
            met = "" if math.isnan(goal) else ("yes" if m <= goal else "no")
            dana_cell = f"{mean_std(dana)[0]:.2f} [{len(dana)}]" if dana else ""
            parts.append(
                f"| {n} | {dana_cell} | {LABELS[a]} | {m:.2f} ± {mean_std(v)[1]:.2f} | {len(v)} | {fmt(goal, 2)} | {met} |"
            )
        parts.append("")
    return "\n".join(parts)


def write_report(out: Path) -> None:
    """table.md and the three figures, from runs.csv and gaps/ alone (so it works on a partial sweep)."""
    rows = read_rows(out / "runs.csv")
    if rows:
        (out / "table.md").write_text(table_markdown(rows))
        if any(r["algorithm"] in MITIGATIONS for r in rows):
            (out / "best.md").write_text(best_markdown(rows))
        plot_error_vs_workers(rows, out / "fig2_error_vs_workers.png")
        plot_gaps(rows, out / "gaps", out / "fig1_gap.png")
    s = plot_speedup(out / "fig5_speedup.png")
    picks = [n for n in (1, 2, 4, 8, 16, 24, 32, 64) if n in s["workers"]]
    lines = ["| N | async speedup | sync speedup | async / sync |", "| ---: | ---: | ---: | ---: |"]
    for n in picks:
        i = s["workers"].index(n)
        lines.append(f"| {n} | {s['async'][i]:.2f} | {s['sync'][i]:.2f} | {s['ratio'][i]:.3f} |")
    (out / "speedup.md").write_text("\n".join(lines) + "\n")


# --- the N = 1 lr sweep that picks the recipe ------------------------------------------------------------


def lr_sweep(recipe: Recipe, out: Path, jobs: int, data_dir: str, grid=LR_SWEEP, seeds=LR_SWEEP_SEEDS) -> None:
    """Single-worker NAG baseline at each lr; the recipe's lr is the best mean validation error (N = 1 only)."""
    csv_path = out / "lr_sweep.csv"
    for lr in grid:
        specs = [RunSpec(1, "baseline", SHARED, s) for s in seeds]
        # lr is part of the recipe, so each lr gets its own CSV slice via a temporary file
        part = out / "lr_sweep" / f"lr_{lr:g}"
        part.mkdir(parents=True, exist_ok=True)
        run_sweep(specs, replace(recipe, lr=lr), part, jobs, data_dir, gap_workers=0)
    rows = []
    for lr in grid:
        rows += read_rows(out / "lr_sweep" / f"lr_{lr:g}" / "runs.csv")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| lr | val error (%) | test error (%) | train loss | runs |", "| ---: | ---: | ---: | ---: | ---: |"]
    for lr in grid:
        sel = [r for r in rows if math.isclose(r["lr"], lr)]
        lines.append(
            f"| {lr:g} | {mean_std([r['val_error'] for r in sel])[0]:.2f} | "
            f"{mean_std([r['test_error'] for r in sel])[0]:.2f} | {mean_std([r['train_loss'] for r in sel])[0]:.4f} | {len(sel)} |"
        )
    (out / "lr_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- command line ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default="full",
        help="full (the paper's algorithms), mitigations / long / teacher (issue 8: main recipe, 4x-steps recipe, second task)",
    )  # fmt: skip
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None, help="lrs of --lr-sweep (default: 0.025 to 0.4)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (few N, 4 epochs, 1 seed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results, quick: runs/reproduce_quick)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (default: cores)")
    parser.add_argument("--data-dir", default=None, help="cache of the generated MNIST-1D arrays")
    parser.add_argument("--lr-sweep", action="store_true", help="run the N = 1 lr sweep instead of the sweep")
    parser.add_argument("--report-only", action="store_true", help="only write table.md and plots from runs.csv")
    parser.add_argument("--no-round-robin", action="store_true", help="skip the optional round-robin runs")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr (a sensitivity check)")
    parser.add_argument(
        "--lr-from-sweep", action="store_true",
        help="use the lr of --out's lr_sweep.csv with the best mean validation error (the N = 1 rule), and its N = 1 runs",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="keep only the first k seeds of each schedule")
    parser.add_argument("--schedules", nargs="+", default=None, help="keep only these schedules")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="keep only these N (ablations)")
    parser.add_argument("--algorithms", nargs="+", default=None, help="keep only these algorithms (ablations)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="override the warm-up (an ablation)")
    parser.add_argument("--num-samples", type=int, default=None, help="override the data size (an ablation)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    if args.out is None:
        folders = {"full": "docs/results", "mitigations": "docs/results/mitigations", "long": "docs/results/long",
                   "teacher": "docs/results/teacher"}  # fmt: skip
        args.out = ROOT / folders.get(args.preset, f"runs/reproduce_{args.preset}")
    if args.data_dir is None:
        from examples.mnist1d.data import DEFAULT_DATA_DIR

        args.data_dir = DEFAULT_DATA_DIR
    return args


def narrow(preset: Preset, args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides: sensitivity checks and ablations, each into its own --out."""
    seeds = dict(preset.schedule_seeds)
    if args.no_round_robin:
        seeds.pop("round_robin", None)
    if args.schedules:
        seeds = {k: v for k, v in seeds.items() if k in args.schedules}
    if args.seeds is not None:
        seeds = {k: v[: args.seeds] for k, v in seeds.items()}
    overrides = {"lr": args.lr, "warmup_epochs": args.warmup_epochs, "num_samples": args.num_samples}
    recipe = replace(preset.recipe, **{k: v for k, v in overrides.items() if v is not None})
    workers = tuple(args.workers) if args.workers else preset.workers
    algorithms = tuple(args.algorithms) if args.algorithms else preset.algorithms
    return replace(preset, recipe=recipe, schedule_seeds=seeds, workers=workers, algorithms=algorithms)


def pick_lr(out: Path) -> float:
    """The N = 1 rule: the lr of ``lr_sweep.csv`` with the best mean validation error (ties: the larger lr)."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in read_rows(out / "lr_sweep.csv"):
        by_lr[r["lr"]].append(r["val_error"])
    if not by_lr:
        raise SystemExit(f"--lr-from-sweep: no {out / 'lr_sweep.csv'}; run --lr-sweep first")
    return min(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), -lr))


def reuse_sweep_baselines(out: Path, lr: float) -> None:
    """Copy the lr sweep's N = 1 runs at the chosen lr into runs.csv: the same recipe, already trained."""
    done = done_keys(out / "runs.csv")
    for row in read_rows(out / "lr_sweep" / f"lr_{lr:g}" / "runs.csv"):
        if (row["workers"], row["algorithm"], row["schedule"], row["seed"]) not in done:
            append_row(out / "runs.csv", row)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.lr_from_sweep and not args.lr_sweep:
        args.lr = pick_lr(args.out)
        print(f"lr {args.lr:g}: the N = 1 lr sweep's pick ({args.out / 'lr_sweep.csv'})", flush=True)
    preset = narrow(preset, args)
    if args.lr_from_sweep and not args.lr_sweep and not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        reuse_sweep_baselines(args.out, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:  # the recipe the runs in this folder were trained with
        (args.out / "recipe.json").write_text(json.dumps({"preset": args.preset, **asdict(preset.recipe)}, indent=1))
    if args.lr_sweep:
        seeds = LR_SWEEP_SEEDS[: args.seeds] if args.seeds else LR_SWEEP_SEEDS
        lr_sweep(preset.recipe, args.out, args.jobs, args.data_dir, tuple(args.lr_grid or LR_SWEEP), seeds)
        return
    if not args.report_only:
        run_sweep(plan(preset), preset.recipe, args.out, args.jobs, args.data_dir, preset.gap_workers)
    write_report(args.out)
    print(f"wrote {args.out / 'runs.csv'}, table.md, speedup.md and the figures", flush=True)


if __name__ == "__main__":
    main()
