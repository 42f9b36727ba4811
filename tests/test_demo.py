"""The demo's argument checks, the fault callbacks it shares with the whole-run benchmark, and the benchmark's jobs.

Real processes, tiny sizes, no assertion on how long anything takes; the bad-argument
tests check that the demo stops before it imports or trains anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` and `benchmarks` are folders at the repository root
    sys.path.insert(0, str(ROOT))

from examples.faults import CountSamples, KillRankAtStep, PaceSteps, SlowRank, read_counts, samples_per_second  # noqa: E402
from examples.mnist1d.demo import parse_args  # noqa: E402


# The demo's arguments -------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--mode", "real", "--workers", "1"], "--workers 1 is too few for --mode real", "--mode simulated --workers 1"),
    (["--workers", "0", "--mode", "simulated"], "--workers 0 must be >= 1", None),
    (["--schedule", "gamma"], "--schedule gamma applies to --mode simulated only", "--slowdown"),
    (["--mode", "simulated", "--slowdown", "3"], "--slowdown applies to --mode real only", "--mode real"),
    (["--mode", "simulated", "--no-ddp"], "--no-ddp applies to --mode real only", None),
    (["--epochs", "0"], "--epochs 0 must be >= 1", None),
    (["--slowdown", "0.5"], "--slowdown 0.5 must be >= 1", "1: no slowed worker"),
    (["--slowdown", "nan"], "--slowdown nan must be >= 1", None),
    (["--num-samples", "300"], "--num-samples 300 leaves 270 training samples", "--num-samples 427 or more"),
]


@pytest.mark.parametrize(("argv", "message", "way_out"), BAD_ARGUMENTS, ids=lambda v: v if isinstance(v, str) else None)
def test_demo_refuses_bad_arguments_before_training(argv, message, way_out, tmp_path):
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "examples.mnist1d.demo", *argv, "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert message in done.stderr, done.stderr
    if way_out:
        assert way_out in done.stderr, done.stderr
    # Failed before training anything: no Trainer was built, no data was generated, torch was never needed.
    assert "GPU available" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("*.npz"))


def test_demo_checks_other_algorithms_against_the_package(tmp_path, capsys):
    """Names beyond the usual five are checked against lightning_dana.ALGORITHMS (in-process: already imported)."""
    import lightning_dana

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--algorithm", "sgd", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--algorithm sgd is not a rule of lightning_dana; choose one of" in capsys.readouterr().err
    for name in lightning_dana.ALGORITHMS:
        assert parse_args(["--algorithm", name, "--data-dir", str(tmp_path)]).algorithm == name


def test_demo_refuses_an_unusable_data_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data-dir", str(blocker / "cache")])
    assert exit_info.value.code == 2


def test_demo_defaults_per_mode(tmp_path, capsys):
    real = parse_args(["--data-dir", str(tmp_path)])
    assert (real.mode, real.workers, real.slowdown, real.ddp) == ("real", 3, 2.0, True)
    assert real.progress_bar is False  # pytest's stdout is not a terminal: plain per-epoch lines instead
    simulated = parse_args(["--mode", "simulated", "--data-dir", str(tmp_path), "--progress-bar", "on"])
    assert (real.epochs, real.num_samples) == (10, 10000)
    assert (simulated.workers, simulated.schedule, simulated.progress_bar) == (8, "block_random", True)
    assert (simulated.epochs, simulated.num_samples) == (20, 20000)
    assert parse_args(["--slowdown", "1", "--no-ddp", "--data-dir", str(tmp_path)]).slowdown == 1.0
    assert parse_args(["--no-progress-bar", "--data-dir", str(tmp_path)]).progress_bar is False


# The fault callbacks --------------------------------------------------------------------


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_loader(n: int = 20, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randn(n, 1)), batch_size=batch_size)


def test_pace_slow_and_count_on_one_device(tmp_path):
    count, pace, slow = CountSamples(tmp_path), PaceSteps(0.01, factors={0: 2.0}), SlowRank(rank=0, factor=3.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[count, slow, pace])
    trainer.fit(Tiny(), tiny_loader(n=18, batch_size=4))  # 5 batches per epoch, the last one of 2 samples
    records = read_counts(tmp_path)
    assert list(records) == [0]
    assert records[0]["samples"] == 36 and records[0]["steps"] == 10
    samples, seconds, rate = samples_per_second(records)
    assert samples == 36 and seconds > 0 and rate > 0
    assert pace.step_time(0) == 0.02 and pace.step_time(1) == 0.01
    assert slow.slept > 0  # rank 0 is the slowed one here


def test_fault_callbacks_refuse_bad_settings():
    with pytest.raises(ValueError, match="factor"):
        SlowRank(rank=1, factor=0.5)
    with pytest.raises(ValueError, match="seconds"):
        PaceSteps(0)
    with pytest.raises(ValueError, match="step"):
        KillRankAtStep(rank=1, step=0)


def test_kill_rank_at_step_sigkills_its_own_process(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        import pytorch_lightning as pl
        from examples.faults import CountSamples, KillRankAtStep
        from test_demo import Tiny, tiny_loader
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[CountSamples({str(tmp_path)!r}), KillRankAtStep(rank=0, step=7)])
        trainer.fit(Tiny(), tiny_loader())
        print("fit returned")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    assert "killing rank 0" in done.stdout and "after its step 7" in done.stdout
    assert "fit returned" not in done.stdout
    assert read_counts(tmp_path) == {}  # killed before on_train_end: no record


# The whole-run benchmark ----------------------------------------------------------------


def test_whole_run_refuses_short_runs():
    done = subprocess.run([sys.executable, "benchmarks/whole_run.py", "--epochs", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "at least 3 epochs" in done.stderr


def test_whole_run_job_counts_every_rank(tmp_path):
    """One throughput job of the benchmark, tiny: 3 processes, rank 2 paced 2x slower, every sample counted."""
    from pytorch_lightning.strategies import StrategyRegistry

    import lightning_dana  # noqa: F401
    from benchmarks.whole_run import WORKERS, launch

    if "dana" not in StrategyRegistry:
        pytest.skip('Trainer(strategy="dana") is not registered yet')
    cfg = dict(task="tiny", steps_per_epoch=3, epochs=3, step=0.01, slowdown=2.0, straggler=True, kill_at=0,
               strategy="dana", seed=0, num_samples=0, batch_size=0, data_dir=str(tmp_path), out=str(tmp_path / "run"))
    result = launch(cfg, timeout=280)
    assert result["returncode"] == 0 and not result["errors"], result.get("log_tail")
    counts = result["counts"]
    assert sorted(counts) == list(range(WORKERS))
    assert sum(c["samples"] for c in counts.values()) == 3 * WORKERS * 3 * 16  # epochs x batches x batch size
    assert all("work_per_step" in c and c["end"] >= c["start"] for c in counts.values())
    assert (tmp_path / "run" / "model.pt").exists()
    json.dumps(result)  # what --json writes


def test_whole_run_report_prints_ratios_and_a_stopped_kill_run(capsys):
    """The report from recorded results: ratios of samples/s, and a killed run that stopped early."""
    import argparse

    from benchmarks.whole_run import report

    args = argparse.Namespace(epochs=3, step=0.05, slowdown=2.0, steps_per_epoch=40, acc_epochs=8, batch_size=128)
    counts = {r: {"steps": 120, "work_per_step": 0.005, "overruns": 0} for r in range(3)}
    paced = {"step": 0.05}
    runs = {"dana, no straggler": paced, "dana, rank 2 2x slow": paced, "ddp,  rank 2 2x slow": paced,
            "dana, no kill": {"step": 0.0}, "dana, rank 2 killed": {"step": 0.0}}
    results = {
        "dana, no straggler": {"ok": True, "samples": 5760, "seconds": 6.0, "samples_per_s": 960.0, "counts": counts},
        "dana, rank 2 2x slow": {"ok": True, "samples": 5760, "seconds": 7.5, "samples_per_s": 800.0, "counts": counts},
        "ddp,  rank 2 2x slow": {"ok": True, "samples": 5760, "seconds": 12.0, "samples_per_s": 480.0, "counts": counts},
        "dana, no kill": {"ok": True, "test_acc": 0.98, "counts": counts},
        "dana, rank 2 killed": {"ok": False, "timed_out": False, "returncode": 1, "counts": {},
                                "errors": {"error0.txt": "WorkerLostError: rank 2 died"},
                                "checkpoint_test_acc": 0.9, "checkpoint": "dana-master-on-error.ckpt"},
    }
    report(args, runs, results, kill_at=188, batches_per_rank=47)
    out = capsys.readouterr().out
    assert "dana / ddp, both with the straggler:        1.67" in out
    assert "dana with straggler / dana without one:     0.83" in out
    assert "no kill:      test accuracy 98.00%" in out
    assert "did not finish (error0: WorkerLostError: rank 2 died)" in out and "90.00%" in out
