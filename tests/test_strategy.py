"""Real asynchronous training: Trainer(strategy="dana", devices=N), one process per worker (gloo, CPU)."""

from __future__ import annotations

import sys
from collections import Counter
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
        # on all 128 validation samples (chance: 0.5); the push order, and so the accuracy, differs
        # between runs: 0.91 to 0.96 is usual, nag_asgd was seen at 0.84 once
        assert r["val_acc"] >= 0.8, (algorithm, r["val_acc"])
        # the master dealt every sample of each of the 3 epochs exactly once, whoever trained it
        counts = Counter(i for rank in run["ranks"] for _, batch in rank[algorithm]["trained"] for i in batch)
        assert sorted(counts) == list(range(384)) and set(counts.values()) == {3}, algorithm
        workers = {w for w, _, _ in r["records"]}
        assert workers == {0, 1, 2}, algorithm
        assert max(lag for _, lag, _ in r["records"]) >= 1  # asynchronous: pushes land on newer parameters
        assert any(gap is not None for _, _, gap in r["records"])
        # after fit every rank's module holds the master's model
        assert r["params"] == rank1[algorithm]["params"] == rank2[algorithm]["params"], algorithm
        assert r["buffers"] == rank1[algorithm]["buffers"], algorithm


def test_fast_workers_take_more_batches_than_a_slowed_one(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "2", "--slow", "0.05", "--slow-rank", "2", devices=3)
    assert run["rc"] == 0, run["output"][-4000:]
    steps = [len(rank["dana"]["trained"]) for rank in run["ranks"]]
    assert sum(steps) == 2 * 24  # 384 samples / batch 16, two epochs
    assert steps[1] > steps[2] and steps[0] > steps[2], steps  # nobody waits for the slowed rank 2
    per_epoch = [Counter(i for rank in run["ranks"] for e, b in rank["dana"]["trained"] if e == epoch for i in b)
                 for epoch in (0, 1)]
    assert all(sorted(c) == list(range(384)) and set(c.values()) == {1} for c in per_epoch)


def _check_boring(root: Path, result: dict) -> None:
    assert result["strategy"] == "DANAStrategy" and result["num_workers"] == 2
    checkpoint = torch.load(result["last_ckpt"], weights_only=False)
    # the module after fit and the checkpoint's state_dict are the master's model
    assert checkpoint["state_dict"]["layer.weight"].reshape(-1).tolist() == pytest.approx(result["weight"])
    assert checkpoint["dana"]["num_workers"] == 2 and checkpoint["dana"]["master"]["version"] > 0


def test_boring_model_runs_unchanged_under_the_registered_name(tmp_path: Path) -> None:
    """BoringModel with ModelCheckpoint, LearningRateMonitor, GapMonitor, a progress bar and a CSV logger."""
    run = train_script(tmp_path, "dana_boring.py", str(tmp_path), str(tmp_path / "out.json"), "popen")
    assert run["rc"] == 0, run["output"][-4000:]
    result = run["json"]
    _check_boring(tmp_path, result)
    assert result["predictions"] == 32
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


def test_checkpoint_holds_the_master_and_resume_goes_on_from_it(tmp_path: Path) -> None:
    first = train(tmp_path / "a", "--max-steps", "24", "--checkpoint-every", "4", devices=3)
    assert first["rc"] == 0, first["output"][-4000:]
    r0 = first["ranks"][0]["dana"]
    checkpoint = torch.load(r0["last_ckpt"], weights_only=False)
    dana = checkpoint["dana"]
    # max_steps counts the master's pushes, as one worker's steps; the last checkpoint came at or before the end
    assert sum(len(rank["dana"]["trained"]) for rank in first["ranks"]) == 24
    assert 0 < dana["master"]["version"] <= 24
    # resume with a different number of workers: dana's master state does not depend on N
    second = train(tmp_path / "b", "--max-steps", "30", "--resume", r0["last_ckpt"], devices=2)
    assert second["rc"] == 0, second["output"][-4000:]
    start = second["ranks"][0]["dana"]["start"]
    assert start["server_version"] == dana["master"]["version"]
    assert sum(len(rank["dana"]["trained"]) for rank in second["ranks"]) == 30 - dana["master"]["version"]
    assert "resumes with the optimizer state saved by rank 0" in second["output"]


def test_early_stopping_on_rank_0_stops_every_worker(tmp_path: Path) -> None:
    """EarlyStopping decides on rank 0, at its epoch end; the others hear it in the master's replies."""
    run = train(tmp_path, "--epochs", "50", "--stop-at-acc", "0.6", "--slow", "0.01", devices=3, timeout=300)
    assert run["rc"] == 0, run["output"][-4000:]
    ranks = [r["dana"] for r in run["ranks"]]
    assert all(r["status"] == "ok" for r in ranks)
    assert ranks[0]["val_acc"] >= 0.6 and ranks[0]["current_epoch"] < 49
    assert sum(len(r["trained"]) for r in ranks) < 50 * 24  # the run stopped early, on every rank
    assert ranks[0]["params"] == ranks[1]["params"] == ranks[2]["params"]


def test_validation_on_rank_0_does_not_hold_the_other_workers(tmp_path: Path) -> None:
    """Rank 0 validates for seconds at each epoch end; meanwhile the master applies the others' pushes."""
    run = train(tmp_path, "--epochs", "3", "--slow", "0.02", devices=3, timeout=300,
                extra_env={"DANA_TEST_VAL_SLEEP": "1.0"})  # per validation batch (two batches), on rank 0
    assert run["rc"] == 0, run["output"][-4000:]
    r0 = run["ranks"][0]["dana"]
    first = r0["validations"][0]
    during = [w for w, t in r0["record_times"] if first[0] < t < first[1]]
    assert during and set(during) <= {1, 2}, (first, r0["record_times"][:50])


def test_test_after_fit_evaluates_every_sample_exactly_once(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "1", "--test-samples", "37", devices=3)
    assert run["rc"] == 0, run["output"][-4000:]
    tested = sorted(i for rank in run["ranks"] for i in rank["dana"]["tested"])
    assert tested == list(range(37))  # 37 samples on 3 ranks: no sample padded in twice
    assert "replicates some samples" not in run["output"]


def test_gradual_warmup_follows_the_masters_pushes(tmp_path: Path) -> None:
    """A one-epoch warm-up ends after one epoch of the master's batches on every worker, as with one worker
    (counted in each worker's own steps it would last N epochs)."""
    run = train(tmp_path, "--epochs", "2", "--warmup-epochs", "1", devices=3)
    assert run["rc"] == 0, run["output"][-4000:]
    assert [r["dana"]["final_lr"] for r in run["ranks"]] == [pytest.approx(0.1)] * 3


def test_per_step_schedules_follow_the_master_and_rank_0_validates_every_sample(tmp_path: Path) -> None:
    """OneCycleLR sized by trainer.estimated_stepping_batches in configure_optimizers, as users write it:
    the estimate is one worker's step count, the training batches are still dealt (the estimate built the
    DataLoader before the master could deal it: that hung the run), and at every step of every worker the
    lr is the schedule's lr at the master's push count (stepped by its own steps, a worker would reach about
    1/N of the schedule). Rank 0 validates the master on the whole validation set, not a 1/N shard."""
    run = train(tmp_path, "--epochs", "2", "--onecycle", devices=3)
    assert run["rc"] == 0, run["output"][-4000:]
    total = 2 * 384 // 16
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    schedule = [opt.param_groups[0]["lr"]]
    for _ in range(total):
        opt.step()
        sched.step()
        schedule.append(opt.param_groups[0]["lr"])
    for rank in run["ranks"]:
        r = rank["dana"]
        assert r["stepping_batches"] == total
        assert [lr for _, lr in r["lrs"]] == [pytest.approx(schedule[v], rel=1e-9) for v, _ in r["lrs"]]
    assert max(v for rank in run["ranks"] for v, _ in rank["dana"]["lrs"]) > total // 2
    counts = Counter(i for rank in run["ranks"] for _, batch in rank["dana"]["trained"] for i in batch)
    assert sorted(counts) == list(range(384)) and set(counts.values()) == {2}
    validated = [Counter(rank["dana"]["validated"]) for rank in run["ranks"]]
    assert sorted(validated[0]) == list(range(128)) and set(validated[0].values()) == {2}  # 2 epochs, all samples
    assert validated[1:] == [Counter(), Counter()]

def test_dataloaders_made_again_each_epoch_still_train_every_sample_once(tmp_path: Path) -> None:
    """reload_dataloaders_every_n_epochs=1: each epoch Lightning drops a DataLoader iterator that has
    prefetched a dealt batch, and rank 0 hands the master a new DataLoader while batches are in flight.
    Neither loses a batch nor trains one twice."""
    run = train(tmp_path, "--epochs", "3", "--reload", devices=2)
    assert run["rc"] == 0, run["output"][-4000:]
    per_epoch = [Counter(i for rank in run["ranks"] for e, b in rank["dana"]["trained"] if e == epoch for i in b)
                 for epoch in range(3)]
    assert all(sorted(c) == list(range(384)) and set(c.values()) == {1} for c in per_epoch)

def test_dataloader_worker_processes_and_prefetching(tmp_path: Path) -> None:
    """DataLoader(num_workers=2, persistent_workers=True) prefetches dealt batches ahead: still once each."""
    run = train(tmp_path, "--epochs", "2", "--loader-workers", "2", devices=2)
    assert run["rc"] == 0, run["output"][-4000:]
    counts = Counter(i for rank in run["ranks"] for _, batch in rank["dana"]["trained"] for i in batch)
    assert sorted(counts) == list(range(384)) and set(counts.values()) == {2}


def test_the_staleness_mitigations_run_with_real_workers(tmp_path: Path) -> None:
    """Every rule added for issue 8 runs under real processes through the same shared rule code."""
    from lightning_dana import ALGORITHMS as ALL

    new = [a for a in ALL if a not in ALGORITHMS]
    run = train(tmp_path, "--algorithm", ",".join(new), "--epochs", "2", devices=2, timeout=600)
    assert run["rc"] == 0, run["output"][-4000:]
    for algorithm in new:
        r = run["ranks"][0][algorithm]
        assert r["status"] == "ok" and r["val_acc"] >= 0.7, (algorithm, r.get("val_acc"))
        assert r["params"] == run["ranks"][1][algorithm]["params"], algorithm


def test_last_checkpoint_holds_the_final_master_when_rank_0_takes_no_batch_in_the_last_epoch(tmp_path: Path) -> None:
    """Rank 0 validates for seconds after epoch 0 while the others take every batch of epoch 1, so rank 0's
    own global_step does not move in epoch 1; ModelCheckpoint must still save the master's final model
    (it skipped the save and left last.ckpt one epoch behind, seen under load in the spawn test)."""
    run = train(tmp_path, "--epochs", "2", "--checkpoint-every", "1000", devices=3, timeout=300,
                extra_env={"DANA_TEST_VAL_SLEEP": "1.5"})  # per validation batch, on rank 0
    assert run["rc"] == 0, run["output"][-4000:]
    r0 = run["ranks"][0]["dana"]
    checkpoint = torch.load(r0["last_ckpt"], weights_only=False)
    final = [v for p in r0["params"] for v in p]
    saved = [v for k, t in checkpoint["state_dict"].items() if "running_" not in k and "num_batches" not in k
             for v in t.reshape(-1).tolist()]
    assert checkpoint["dana"]["master"]["version"] == 2 * 24  # every push of both epochs
    assert saved == pytest.approx(final)
