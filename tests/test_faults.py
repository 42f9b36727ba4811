"""Faults with real processes: a worker killed mid-epoch, the master killed, a NaN push."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import train  # noqa: E402


def test_a_killed_worker_does_not_stop_the_run(tmp_path: Path) -> None:
    """Rank 2 is SIGKILLed mid-epoch: the master deals its batches to the others and the run finishes."""
    trace = tmp_path / "trace"
    result = train(tmp_path, "--epochs", "3", "--kill-rank", "2", "--kill-step", "4", "--timeout", "60",
                   "--slow", "0.02", "--checkpoint-every", "4", "--master-checkpoint-every", "8",
                   devices=3, timeout=300, extra_env={"DANA_TEST_TRACE": str(trace)})  # every rank appends its pushes
    rank0, rank1, rank2 = result["ranks"]
    assert rank2 is None  # SIGKILLed
    r0, r1 = rank0["dana"], rank1["dana"]
    assert r0["status"] == "ok" and r1["status"] == "ok", (r0.get("error"), r1.get("error"))
    # the launcher's watcher (exit code -9) or the closed channel, whichever tells the master first
    assert "worker rank 2" in r0["lost_workers"]["2"]
    assert r0["params"] == r1["params"]  # both hold the master's final model
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    # every sample of the 3 epochs was pushed exactly once, rank 2's 4 pushes included (its trace survives it);
    # the batches it had been dealt but not pushed went to the others
    pushed = Counter(i for r in range(3) for line in Path(f"{trace}.{r}").read_text().splitlines() for i in json.loads(line))
    assert sorted(pushed) == list(range(384)) and set(pushed.values()) == {3}
    assert len(Path(f"{trace}.2").read_text().splitlines()) == 4
    checkpoint = torch.load(r0["last_ckpt"], weights_only=False)
    assert checkpoint["dana"]["master"]["version"] > 0
    # DANAStrategy(checkpoint_every=8): the master's model on a cadence of pushes, whoever died
    periodic = torch.load(tmp_path / "dana-master-latest.ckpt", weights_only=False)
    assert periodic["dana"]["master"]["version"] >= 8 and periodic["dana"]["dealer"] is not None
    assert all(torch.isfinite(t).all() for t in periodic["state_dict"].values())
    assert r0["val_acc"] >= 0.85


def test_killed_master_makes_every_worker_exit_with_a_clear_error(tmp_path: Path) -> None:
    result = train(tmp_path, "--epochs", "20", "--kill-rank", "0", "--kill-step", "5", "--timeout", "30",
                   devices=3, timeout=180, wait_ranks=[1, 2])
    assert result["ranks"][0] is None  # SIGKILLed with its master
    for rank in (1, 2):
        r = result["ranks"][rank]["dana"]
        assert r["status"] == "error"
        assert "master" in r["error"], r["error"]
        assert r["seconds"] < 120  # within the 30 s timeout (plus start-up), never the 30-minute default


def test_nan_push_is_refused_and_training_goes_on(tmp_path: Path) -> None:
    # rank 1's first step pushes NaN; rank 0 (whose master is in-process, so it is the faster worker)
    # is slowed so that a rank 1 started late on a busy machine still gets a batch before the run ends
    result = train(tmp_path, "--epochs", "2", "--nan-rank", "1", "--nan-step", "0", "--slow", "0.05",
                   "--slow-rank", "0", devices=2)
    assert result["rc"] == 0, result["output"][-4000:]
    r0, r1 = result["ranks"][0]["dana"], result["ranks"][1]["dana"]
    assert r1["refused"] == 1 and r0["refused"] == 0
    assert r0["master_refused"] == [0, 1]
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    assert "refused" in result["output"]  # the warning


def test_a_slow_worker_finishing_is_not_a_failure(tmp_path: Path) -> None:
    """A worker at 1 s per step with timeout=5: the end of the run waits for it, and nobody fails."""
    result = train(tmp_path, "--epochs", "1", "--slow", "1.0", "--slow-rank", "1", "--timeout", "5", devices=2, timeout=300)
    assert result["rc"] == 0, result["output"][-4000:]
    r0, r1 = result["ranks"][0]["dana"], result["ranks"][1]["dana"]
    assert r0["status"] == "ok" and r1["status"] == "ok", (r0.get("error"), r1.get("error"))
    assert len(r1["trained"]) >= 1 and r0["params"] == r1["params"]
