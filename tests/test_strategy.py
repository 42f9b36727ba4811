"""Real asynchronous training: Trainer(strategy="dana", devices=N), one process per worker (gloo, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import train  # noqa: E402

ALGORITHMS = ("dana", "dana_zero", "asgd", "nag_asgd", "multi_asgd")


def test_every_algorithm_converges_with_three_workers(tmp_path: Path) -> None:
    """Three processes train the tiny problem under each algorithm, one after another in the same processes."""
    run = train(tmp_path, "--algorithm", ",".join(ALGORITHMS), "--epochs", "3", devices=3)
    assert run["rc"] == 0, run["output"][-4000:]
    rank0, rank1, rank2 = run["ranks"]
    for algorithm in ALGORITHMS:
        r = rank0[algorithm]
        assert r["status"] == "ok"
        assert r["val_acc"] >= 0.85, (algorithm, r["val_acc"])
        assert r["global_step"] == 24  # 384 samples / 3 workers / batch 16 = 8 steps per epoch, per worker
        workers = {w for w, _, _ in r["records"]}
        assert workers == {0, 1, 2}, algorithm
        assert max(lag for _, lag, _ in r["records"]) >= 1  # asynchronous: pushes land on newer parameters
        assert any(gap is not None for _, _, gap in r["records"])
        # after fit every rank's module holds the master's model
        assert r["params"] == rank1[algorithm]["params"] == rank2[algorithm]["params"], algorithm
        assert r["buffers"] == rank1[algorithm]["buffers"], algorithm
