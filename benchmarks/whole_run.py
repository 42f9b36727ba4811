"""The whole run, one worker twice as slow: samples trained per second of wall time, dana vs DDP; and a worker killed halfway.

Three CPU worker processes (``devices=3``, gloo) train a small MLP (batch 16) for
``--epochs`` epochs of ``3 * --steps-per-epoch`` batches. Every training step is padded by a
sleep to take ``--step`` seconds, and rank 2's to ``--slowdown`` times that
(``examples.faults.PaceSteps``): on a 2-core machine real compute would measure core
contention, not the strategy. The table shows each rank's real work per step and how many
steps overran their pace (raise ``--step`` if many do). Throughput is the samples trained
by all ranks over the wall time from the first rank's ``on_train_start`` to the last
rank's ``on_train_end`` (``examples.faults.CountSamples``): the whole run, epoch ends
included.

Printed, as ratios of runs made by this command:

* dana over DDP, both with the straggler. DDP averages gradients every step, so every
  rank goes at the straggler's pace: 3 batches per slow step. A fully asynchronous run
  trains 1 + 1 + 1/2 = 2.5 batches per fast step: ideal 2.5 / 1.5 = 1.67, goal >= 1.5.
* dana with the straggler over dana without one: ideal 2.5 / 3 = 0.83, goal >= 0.8.

Then the accuracy of a dana run (the MNIST-1D CNN and recipe of ``examples/mnist1d``, no
pacing, ``--acc-epochs`` epochs) in which rank 2 is SIGKILLed halfway through its share of
the steps (``examples.faults.KillRankAtStep``), next to the same run without a kill
(goal: within 0.5 points). Test accuracy is computed
here, in the parent process, on the final model that rank 0 saved: each of the 4000 test
samples exactly once. If the strategy stops the run at the kill instead of finishing it,
that is reported (with the accuracy of the master's error checkpoint, when there is one).

Each configuration runs as its own ``python benchmarks/whole_run.py --child ...`` job
(Lightning's launcher starts ranks 1 and 2), so a killed or hung run cannot take the
others down; ``--timeout`` bounds each. Default: about 4 minutes on 2 busy cores.

    .venv/bin/python benchmarks/whole_run.py                       # everything, default sizes
    .venv/bin/python benchmarks/whole_run.py --only throughput --epochs 5 --step 0.05
    .venv/bin/python benchmarks/whole_run.py --only kill --acc-epochs 20 --num-samples 40000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKERS = 3
STRAGGLER = 2  # the slowed and the killed rank (rank 0 hosts dana's master)
TINY_BATCH = 16
VAL_FRACTION = 0.1  # MNIST1DDataModule's default hold-out


# ---------------------------------------------------------------------------------------
# one configuration: runs in every rank of a 3-process job


def tiny_task(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The throughput runs' task: a 2-layer MLP on random regression data, batch 16, so that a
    step's real work (a few ms) fits well inside its paced length even on a busy machine."""
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class TinyRegression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    n = WORKERS * cfg["steps_per_epoch"] * TINY_BATCH
    generator = torch.Generator().manual_seed(cfg["seed"])
    data = TensorDataset(torch.randn(n, 32, generator=generator), torch.randn(n, 1, generator=generator))
    return TinyRegression(), DataLoader(data, batch_size=TINY_BATCH, shuffle=True)


def run_child(cfg: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    import torch

    import lightning_dana
    from examples.faults import CountSamples, KillRankAtStep, PaceSteps
    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    torch.set_num_threads(1)
    out = Path(cfg["out"])
    pl.seed_everything(cfg["seed"], verbose=False)
    if cfg["task"] == "tiny":
        model, data = tiny_task(cfg)
        fit_kwargs = {"train_dataloaders": data}
    else:
        model = MNIST1DClassifier()
        data = MNIST1DDataModule(num_samples=cfg["num_samples"], batch_size=cfg["batch_size"], seed=cfg["seed"],
                                 data_dir=cfg["data_dir"])
        fit_kwargs = {"datamodule": data}
    counter = CountSamples(out)
    callbacks: list[pl.Callback] = [counter]
    pace = None
    if cfg["step"] > 0:
        pace = PaceSteps(cfg["step"], {STRAGGLER: cfg["slowdown"]} if cfg["straggler"] else {})
        callbacks.append(pace)
    if cfg["kill_at"] > 0:
        callbacks.append(KillRankAtStep(STRAGGLER, cfg["kill_at"]))
    if cfg["strategy"] != "ddp":
        callbacks += [lightning_dana.GradualWarmup(epochs=min(5, cfg["epochs"])), lightning_dana.MomentumCorrection()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORKERS, strategy=cfg["strategy"], max_epochs=cfg["epochs"],
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(out),
    )
    try:
        trainer.fit(model, **fit_kwargs)
    except BaseException as err:  # recorded for the parent, then re-raised
        (out / f"error{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
        raise
    if pace is not None:  # how well the sleep held the step time: real work per step, steps that overran
        counter.write(trainer.global_rank, work_per_step=pace.work / max(1, counter.steps), overruns=pace.overruns)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), out / "model.pt")


# ---------------------------------------------------------------------------------------
# the parent: starts each configuration, reads what the ranks wrote, evaluates, prints


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(cfg: dict[str, Any], timeout: float, grace: float = 60.0) -> dict[str, Any]:
    """Run one configuration as its own job; return what its ranks recorded."""
    from examples.faults import read_counts

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    log = open(out / "log.txt", "w")
    start = time.perf_counter()
    # Its own session and process group: the ranks Lightning starts join it. When rank 0
    # has returned, the others get `grace` seconds to finish (and write their records);
    # on a timeout, or after the grace, whatever is left of the job is killed by group id.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out, returncode = True, None
    deadline = time.monotonic() + (0 if timed_out else min(grace, max(0.0, timeout - (time.perf_counter() - start))))
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()
    errors = {p.name: p.read_text() for p in sorted(out.glob("error*.txt"))}
    return {
        "returncode": returncode,
        "timed_out": timed_out,
        "job_seconds": time.perf_counter() - start,
        "counts": read_counts(out),
        "errors": errors,
        "log_tail": (out / "log.txt").read_text()[-2000:],
    }


def exact_test_accuracy(weights: Path, cfg: dict[str, Any]) -> float:
    """Exact accuracy on the test set: every sample once, counted in this process."""
    import torch

    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    model = MNIST1DClassifier()
    if weights.suffix == ".ckpt":
        state = torch.load(weights, map_location="cpu", weights_only=False)["state_dict"]
    else:
        state = torch.load(weights, map_location="cpu")
    model.load_state_dict(state)
    model.eval()
    data = MNIST1DDataModule(num_samples=cfg["num_samples"], batch_size=1000, seed=cfg["seed"],
                             data_dir=cfg["data_dir"])
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def describe_failure(result: dict[str, Any]) -> str:
    if result["timed_out"]:
        return "timed out"
    if result["errors"]:
        name, text = next(iter(result["errors"].items()))
        return f"{name[:-4]}: {text.splitlines()[0][:160] if text else '?'}"
    return f"exit code {result['returncode']}"


def steps_per_rank(result: dict[str, Any]) -> str:
    counts = result["counts"]
    return "/".join(str(counts[r]["steps"]) if r in counts else "-" for r in range(WORKERS))


def pacing(result: dict[str, Any]) -> str:
    """Real work per step (ms) and steps whose work overran the pace, per rank."""
    counts = result["counts"]
    cells = []
    for r in range(WORKERS):
        c = counts.get(r, {})
        cells.append(f"{1000 * c['work_per_step']:.0f}ms/{c['overruns']}" if "work_per_step" in c else "-")
    return " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("all", "throughput", "kill"), default="all")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the throughput runs (>= 3)")
    parser.add_argument("--step", type=float, default=0.05, help="seconds of a normal step in the throughput runs")
    parser.add_argument("--steps-per-epoch", type=int, default=40,
                        help="throughput runs: an epoch is this many batches of 16 per worker")
    parser.add_argument("--slowdown", type=float, default=2.0, help="the straggler's step time over a normal one")
    parser.add_argument("--acc-epochs", type=int, default=8, help="epochs of the kill / no-kill accuracy runs")
    parser.add_argument("--num-samples", type=int, default=20000, help="accuracy runs: generated MNIST-1D samples")
    parser.add_argument("--batch-size", type=int, default=128, help="accuracy runs: batch size per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="MNIST-1D cache (default: the examples' cache)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each configuration may take")
    parser.add_argument("--keep", default=None, help="keep each run's folder (logs, rank records) under this path")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(json.loads(args.child))
        return
    if args.epochs < 3 and args.only != "kill":
        parser.error(f"--epochs {args.epochs}: the whole-run measure needs at least 3 epochs")
    for name in ("step", "slowdown"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0")
    if args.acc_epochs < 1 or args.batch_size < 1 or args.steps_per_epoch < 1:
        parser.error("--acc-epochs, --batch-size and --steps-per-epoch must be >= 1")
    train_samples = args.num_samples - round(args.num_samples * VAL_FRACTION)
    if train_samples < 2 * WORKERS * args.batch_size:
        parser.error(f"--num-samples {args.num_samples}: each of the {WORKERS} workers needs at least 2 batches "
                     f"of {args.batch_size} per epoch; use >= {math.ceil(2 * WORKERS * args.batch_size / (1 - VAL_FRACTION))}")

    from examples.mnist1d.data import DEFAULT_DATA_DIR, MNIST1DDataModule

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    if args.only != "throughput":  # generate (or find) the data once, here, before the jobs start
        MNIST1DDataModule(num_samples=args.num_samples, seed=args.seed, data_dir=data_dir).prepare_data()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="whole_run_"))
    base = dict(task="mnist1d", num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                data_dir=data_dir, slowdown=args.slowdown, straggler=False, kill_at=0)
    paced = dict(base, task="tiny", steps_per_epoch=args.steps_per_epoch, epochs=args.epochs, step=args.step)
    batches_per_rank = math.ceil(math.ceil(train_samples / WORKERS) / args.batch_size)  # DistributedSampler's share
    runs: dict[str, dict[str, Any]] = {}
    if args.only in ("all", "throughput"):
        runs["dana, no straggler"] = dict(paced, strategy="dana")
        runs[f"dana, rank {STRAGGLER} {args.slowdown:g}x slow"] = dict(paced, strategy="dana", straggler=True)
        runs[f"ddp,  rank {STRAGGLER} {args.slowdown:g}x slow"] = dict(paced, strategy="ddp", straggler=True)
    kill_at = max(1, args.acc_epochs * batches_per_rank // 2)
    if args.only in ("all", "kill"):
        runs["dana, no kill"] = dict(base, strategy="dana", epochs=args.acc_epochs, step=0.0)
        runs[f"dana, rank {STRAGGLER} killed"] = dict(base, strategy="dana", epochs=args.acc_epochs, step=0.0,
                                                     kill_at=kill_at)

    print(f"whole-run benchmark: {WORKERS} CPU worker processes (devices={WORKERS}), {len(runs)} runs, "
          f"each its own job", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for i, (name, cfg) in enumerate(runs.items()):
        cfg["out"] = str(root / f"run{i}")
        print(f"  running {name} ...", flush=True)
        result = launch(cfg, args.timeout)
        ok = result["returncode"] == 0 and not result["errors"] and (Path(cfg["out"]) / "model.pt").exists()
        result["ok"] = ok
        if cfg["kill_at"] == 0 or ok:
            result.pop("log_tail")
        if cfg["step"] > 0 and ok:
            samples, seconds, rate = _rate(result)
            result.update(samples=samples, seconds=seconds, samples_per_s=rate)
        weights = Path(cfg["out"]) / "model.pt"
        ckpts = sorted(Path(cfg["out"]).glob("*.ckpt"))
        if cfg["step"] == 0:
            if weights.exists():
                result["test_acc"] = exact_test_accuracy(weights, cfg)
            elif ckpts:
                result["checkpoint_test_acc"] = exact_test_accuracy(ckpts[0], cfg)
                result["checkpoint"] = ckpts[0].name
        results[name] = result

    report(args, runs, results, kill_at, batches_per_rank)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "results": results}, indent=1,
                                              default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _rate(result: dict[str, Any]) -> tuple[int, float, float]:
    from examples.faults import samples_per_second

    return samples_per_second(result["counts"])


def report(args: argparse.Namespace, runs: dict, results: dict, kill_at: int, batches_per_rank: int) -> None:
    paced = [n for n in runs if runs[n]["step"] > 0]
    if paced:
        print(f"\nthroughput: a small MLP, {args.epochs} epochs of {WORKERS * args.steps_per_epoch} batches of "
              f"{TINY_BATCH}; every step padded to {1000 * args.step:.0f} ms, rank {STRAGGLER}'s to "
              f"{1000 * args.step * args.slowdown:.0f} ms where slowed")
        width = max(len(n) for n in paced)
        print(f"{'run':<{width}}  {'samples':>8}  {'wall s':>7}  {'samples/s':>9}  {'steps per rank':>14}  "
              f"work per step / overrun steps, per rank")
        for name in paced:
            r = results[name]
            if r["ok"]:
                print(f"{name:<{width}}  {r['samples']:>8}  {r['seconds']:7.2f}  {r['samples_per_s']:9.1f}  "
                      f"{steps_per_rank(r):>14}  {pacing(r)}")
            else:
                print(f"{name:<{width}}  failed: {describe_failure(r)}")
        print("(work: a step's time before its padding; under ddp the fast ranks' steps include waiting for the "
              "straggler in the gradient all-reduce, so they overrun)")
        rate = {n: results[n].get("samples_per_s") for n in paced}
        even, slow_dana, slow_ddp = (rate[n] for n in paced)
        ideal_async = (WORKERS - 1 + 1 / args.slowdown)
        print("ratios, measured in this run:")
        if slow_dana and slow_ddp:
            print(f"  dana / ddp, both with the straggler:        {slow_dana / slow_ddp:.2f}   "
                  f"(ideal {ideal_async:.2f}/{WORKERS / args.slowdown:.2f} = {ideal_async * args.slowdown / WORKERS:.2f}; goal >= 1.5)")
        if slow_dana and even:
            print(f"  dana with straggler / dana without one:     {slow_dana / even:.2f}   "
                  f"(ideal {ideal_async:.2f}/{WORKERS} = {ideal_async / WORKERS:.2f}; goal >= 0.8)")
    killed = [n for n in runs if runs[n]["step"] == 0]
    if killed:
        clean, kill = (results[n] for n in killed)
        print(f"\naccuracy: dana, MNIST-1D CNN, {args.acc_epochs} epochs, batch {args.batch_size}, unpaced; rank "
              f"{STRAGGLER} SIGKILLed after its step {kill_at} (half of an equal share, "
              f"{args.acc_epochs} x {batches_per_rank} steps)")
        if "test_acc" in clean:
            print(f"  no kill:      test accuracy {100 * clean['test_acc']:.2f}%  (steps per rank {steps_per_rank(clean)})")
        else:
            print(f"  no kill:      failed: {describe_failure(clean)}")
        if "test_acc" in kill:
            line = f"  rank killed:  test accuracy {100 * kill['test_acc']:.2f}%"
            if "test_acc" in clean:
                diff = 100 * (kill["test_acc"] - clean["test_acc"])
                line += f"  ({diff:+.2f} points; goal within 0.5)"
            print(line + f"  (steps per rank {steps_per_rank(kill)})")
        else:
            line = f"  rank killed:  the run did not finish ({describe_failure(kill)})"
            if "checkpoint_test_acc" in kill:
                line += (f"; the master's {kill['checkpoint']} at the stop: test accuracy "
                         f"{100 * kill['checkpoint_test_acc']:.2f}%")
            print(line)


if __name__ == "__main__":
    main()
