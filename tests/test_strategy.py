"""Real asynchronous training: Trainer(strategy="dana", devices=N), one process per worker (gloo, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import train, train_script  # noqa: E402

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


def _check_boring(root: Path, result: dict) -> None:
    assert result["strategy"] == "DANAStrategy" and result["num_workers"] == 2
    checkpoint = torch.load(result["last_ckpt"], weights_only=False)
    # the module after fit and the checkpoint's state_dict are the master's model
    assert checkpoint["state_dict"]["layer.weight"].reshape(-1).tolist() == pytest.approx(result["weight"])
    assert len(checkpoint["dana"]["worker_optimizer_states"]) == 2
    assert checkpoint["dana"]["server"]["version"] == 2 * 2 * 16  # every push of both workers is in


def test_boring_model_runs_unchanged_under_the_registered_name(tmp_path: Path) -> None:
    """BoringModel with ModelCheckpoint, LearningRateMonitor, GapMonitor, a progress bar and a CSV logger."""
    run = train_script(tmp_path, "dana_boring.py", str(tmp_path), str(tmp_path / "out.json"), "popen")
    assert run["rc"] == 0, run["output"][-4000:]
    result = run["json"]
    _check_boring(tmp_path, result)
    assert result["global_step"] == 32 and result["predictions"] == 32
    header = Path(result["metrics_csv"]).read_text().splitlines()[0].split(",")
    assert {"dana/lag_mean", "dana/lag_max", "dana/pushes_per_s/worker_1", "lr-SGD"} <= set(header)
    assert "Epoch 1" in run["output"]  # the progress bar ran


def test_spawn_start_method(tmp_path: Path) -> None:
    """The spawn launcher pickles the strategy before setup: it must hold no threads or locks yet."""
    run = train_script(tmp_path, "dana_boring.py", str(tmp_path), str(tmp_path / "out.json"), "spawn", "--fit-only")
    assert run["rc"] == 0, run["output"][-4000:]
    _check_boring(tmp_path, run["json"])


def _flat(values: list[list[float]]) -> list[float]:
    return [v for p in values for v in p]


def test_checkpoint_holds_the_master_and_resume_restores_every_worker(tmp_path: Path) -> None:
    first = train(tmp_path / "a", "--max-steps", "8", "--checkpoint-every", "4", devices=3)
    assert first["rc"] == 0, first["output"][-4000:]
    r0 = first["ranks"][0]["dana"]
    checkpoint = torch.load(r0["last_ckpt"], weights_only=False)
    # state_dict is the master's model: what every rank's module holds after fit
    saved = _flat([t.reshape(-1).tolist() for k, t in checkpoint["state_dict"].items() if "running" not in k and "num_batches" not in k])
    assert saved == pytest.approx(_flat(r0["params"]))
    dana = checkpoint["dana"]
    assert dana["server"]["version"] == 24  # 3 workers x 8 pushes, all applied before the snapshot
    states = dana["worker_optimizer_states"]
    assert len(states) == 3
    momenta = [torch.cat([s["momentum_buffer"].reshape(-1) for s in st["state"].values()]) for st in states]
    assert not torch.equal(momenta[0], momenta[1])  # each worker keeps its own optimizer state

    second = train(tmp_path / "b", "--max-steps", "12", "--resume", r0["last_ckpt"], devices=3)
    assert second["rc"] == 0, second["output"][-4000:]
    assert second["ranks"][0]["dana"]["start"]["server_version"] == 24
    for rank in range(3):
        start = second["ranks"][rank]["dana"]["start"]
        assert _flat(start["momentum"]) == pytest.approx(momenta[rank].tolist()), rank
        assert _flat(start["params"]) == pytest.approx(saved), rank  # dana: every worker pulls the master's Θ
    assert second["ranks"][0]["dana"]["global_step"] == 12
