"""Faults with real processes: a worker killed, the master killed, a NaN push, malformed messages."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import PYTHON, SCRIPTS, run, train  # noqa: E402


def test_killed_worker_stops_every_rank_and_the_master_is_saved(tmp_path: Path) -> None:
    result = train(tmp_path, "--epochs", "20", "--kill-rank", "2", "--kill-step", "5", "--timeout", "30",
                   "--slow", "0.05", devices=3, timeout=120, wait_ranks=[0, 1])
    rank0, rank1, rank2 = result["ranks"]
    assert rank2 is None  # SIGKILLed
    r0 = rank0["dana"]
    assert r0["status"] == "error"
    assert "worker rank 2" in r0["error"] and "exited with code -9" in r0["error"], r0["error"]
    assert r0["error_checkpoint"] == str(tmp_path / "dana-master-on-error.ckpt")
    checkpoint = torch.load(r0["error_checkpoint"], weights_only=False)
    assert checkpoint["dana"]["server"]["version"] > 0
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    # the other worker stops too, with a message that says why, well within its timeout
    r1 = rank1["dana"]
    assert r1["status"] == "error"
    assert "worker rank 2" in r1["error"] or "lost a peer" in r1["error"], r1["error"]
    assert r1["seconds"] < 60

    # the error checkpoint resumes training
    resumed = train(tmp_path / "resume", "--max-steps", "12", "--resume", r0["error_checkpoint"], devices=3)
    assert resumed["rc"] == 0, resumed["output"][-4000:]
    assert resumed["ranks"][0]["dana"]["start"]["server_version"] == checkpoint["dana"]["server"]["version"]


def test_killed_master_makes_every_worker_exit_with_a_clear_error(tmp_path: Path) -> None:
    result = train(tmp_path, "--epochs", "20", "--kill-rank", "0", "--kill-step", "5", "--timeout", "30",
                   devices=3, timeout=120, wait_ranks=[1, 2])
    assert result["ranks"][0] is None  # SIGKILLed with its master
    for rank in (1, 2):
        r = result["ranks"][rank]["dana"]
        assert r["status"] == "error"
        assert "master" in r["error"] or "lost a peer" in r["error"], r["error"]
        assert r["seconds"] < 60  # within the 30 s timeout (plus start-up)


def test_nan_push_is_refused_and_training_goes_on(tmp_path: Path) -> None:
    result = train(tmp_path, "--max-steps", "10", "--nan-rank", "1", "--nan-step", "3", devices=2)
    assert result["rc"] == 0, result["output"][-4000:]
    r0, r1 = result["ranks"][0]["dana"], result["ranks"][1]["dana"]
    assert r1["refused"] == 1 and r0["refused"] == 0
    assert r0["master_refused"] == [0, 1]
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    assert "refused" in result["output"]  # the warning


def test_malformed_messages_get_clear_errors_and_the_master_keeps_serving(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, output, _ = run([PYTHON, str(SCRIPTS / "dana_protocol.py"), "29731", str(out)], timeout=120)
    assert rc == 0, output[-4000:]
    import json

    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(4)]
    master, bad_header, wrong_size, good = ranks
    assert master["error"] == "None" and master["stopped"]
    assert master["broken"] == [1, 2] and master["done"] == [3]
    assert master["version"] == 1 and master["refused"] == [0, 0, 0, 1]
    assert bad_header["answer"] == [12, 1]  # ERROR, BAD_HEADER
    assert "earlier message from this worker was refused" in bad_header["second"]
    assert "sent 15 values, the master expects 12" in wrong_size["error"]
    assert good["good"] == 10 and good["nan"] == 11  # REPLY, then REFUSED
    assert good["after_nan"] == good["after_good"]  # the NaN push changed nothing; the worker got the current params
    assert "malformed header from rank 1" in output
