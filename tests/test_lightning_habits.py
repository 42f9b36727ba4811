"""Lightning habits that must keep working under both strategies (issue 9, items 20 to 23).

SWA leaves its average of the master's parameters in the module and in a checkpoint saved after fit;
validate/test/predict need no fit under SimulatedWorkers; Trainer(deterministic=True) with real workers
warns that arrival order is not reproducible; a tied weight gets the master's value under every name in
every checkpoint. SimulatedWorkers runs in this process; strategy="dana" (devices=2) runs once for the
module, in real processes (tests/scripts/dana_habits.py), and its tests read that run's reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_habits import (  # noqa: E402
    SWA_EPOCH_START,
    SWA_EPOCHS,
    Plain,
    Tied,
    flat,
    loader,
    master_params,
    swa_fit,
    tied_fit,
)
from dana_runner import PYTHON, SCRIPTS, run  # noqa: E402

from lightning_dana import SimulatedWorkers  # noqa: E402

ATOL = 1e-6  # float32 sums of a few values in another order


def _t(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _expected_swa(epoch_end: list[list[float]]) -> torch.Tensor:
    """Lightning's SWA averages at the start of epochs swa_start..max_epochs-1 (0-based, swa_start =
    swa_epoch_start - 1), i.e. the models the epochs swa_start-1 .. max_epochs-2 ended with."""
    start = SWA_EPOCH_START - 1
    assert len(epoch_end) == SWA_EPOCHS, len(epoch_end)
    return _t(epoch_end[start - 1 : SWA_EPOCHS - 1]).mean(0)


def _check_swa(r: dict[str, Any], epoch_end: list[list[float]], checkpoint: bool = True, distinct: bool = True) -> None:
    """``r``: one rank's report of swa_fit; ``epoch_end``: the master's model at each epoch end;
    ``checkpoint``: this rank wrote the checkpoint saved after fit; ``distinct``: the run is known to
    end with a master unlike the average (simulated: yes; real ranks: a rank that started late may see
    the final master at every epoch end, so the SimulatedWorkers test pins the distinction)."""
    expected = _expected_swa(epoch_end)
    assert r["n_averaged"] == SWA_EPOCHS - (SWA_EPOCH_START - 1)
    # SWA's own average is the average of the master's models at the epoch ends it saw
    torch.testing.assert_close(_t(r["swa_average"]), expected, atol=ATOL, rtol=0)
    # ... and it is what the module holds after fit, not the master's final model
    if distinct:
        assert (_t(r["final_master"]) - expected).abs().max() > 1e-3  # the two differ: the test can tell them apart
    torch.testing.assert_close(_t(r["module"]), expected, atol=ATOL, rtol=0)
    if not checkpoint:
        return
    # a checkpoint saved after fit holds the average too
    checkpoint = torch.load(r["checkpoint"], weights_only=False)
    saved = torch.cat([v.reshape(-1) for k, v in checkpoint["state_dict"].items()]).double()
    torch.testing.assert_close(saved, expected, atol=ATOL, rtol=0)
    loaded = Plain.load_from_checkpoint(r["checkpoint"])
    torch.testing.assert_close(_t(flat(loaded)), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------- SimulatedWorkers(4), in this process
def test_swa_averages_the_masters_parameters_under_simulated_workers(tmp_path: Path) -> None:
    r = swa_fit(str(tmp_path), SimulatedWorkers(4, seed=0))
    # the master's model at each epoch end, read from the master's state itself, is what the module showed
    assert all(m is not None for m in r["epoch_end_master"])
    torch.testing.assert_close(_t(r["epoch_end_module"]), _t(r["epoch_end_master"]), atol=0, rtol=0)
    _check_swa(r, r["epoch_end_master"])


def _evaluate(strategy: Any) -> tuple[list, list, list[torch.Tensor], list[float], list[float]]:
    pl.seed_everything(0, verbose=False)
    model = Plain()
    before = flat(model)
    kwargs = {"strategy": strategy} if strategy is not None else {}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **kwargs)
    data = loader(64, shuffle=False, seed=1)
    validated = trainer.validate(model, data, verbose=False)
    tested = trainer.test(model, data, verbose=False)
    predicted = trainer.predict(model, data)
    return validated, tested, predicted, before, flat(model)


def test_validate_test_predict_before_any_fit_under_simulated_workers() -> None:
    """No fit, no optimizer: the module's own weights are evaluated, exactly as without the strategy."""
    validated, tested, predicted, before, after = _evaluate(SimulatedWorkers(4))
    ref_validated, ref_tested, ref_predicted, ref_before, _ = _evaluate(None)
    assert before == ref_before and after == before  # same initial weights; evaluation changed nothing
    assert validated == ref_validated and tested == ref_tested
    assert len(predicted) == len(ref_predicted) == 4
    for p, q in zip(predicted, ref_predicted):
        assert torch.equal(p, q)
    # and those numbers are the module's own: recompute the loss by hand
    pl.seed_everything(0, verbose=False)
    model = Plain()
    x, y = loader(64, shuffle=False, seed=1).dataset.tensors
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert validated[0]["val_loss"] == pytest.approx(loss, abs=1e-5)
    assert tested[0]["test_loss"] == pytest.approx(loss, abs=1e-5)


def _tied_names(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return state["a.weight"], state["b.weight"]


def _check_mid_checkpoints(mid_dir: Path, section: str, numel: int) -> int:
    """Every mid-epoch checkpoint: both names of the tied weight hold the master's value saved with it."""
    files = sorted(mid_dir.glob("mid-*.ckpt"))
    for path in files:
        checkpoint = torch.load(path, weights_only=False)
        a, b = _tied_names(checkpoint["state_dict"])
        assert torch.equal(a, b), (path.name, (a - b).abs().max().item())
        master = _t(master_params(checkpoint[section], numel))
        torch.testing.assert_close(a.reshape(-1).double(), master[: a.numel()], atol=0, rtol=0, msg=path.name)
    return len(files)


def test_tied_weights_are_saved_under_every_name_under_simulated_workers(tmp_path: Path) -> None:
    r = tied_fit(str(tmp_path), SimulatedWorkers(4, seed=0))
    module = {k: _t(v) for k, v in r["module"].items()}
    assert torch.equal(module["a.weight"], module["b.weight"])
    # the default checkpoint (last epoch's end): both names equal, and equal to the module after fit
    checkpoint = torch.load(r["default_checkpoint"], weights_only=False)
    a, b = _tied_names(checkpoint["state_dict"])
    assert torch.equal(a, b), (a - b).abs().max().item()
    for name, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value.reshape(-1).double(), module[name], atol=0, rtol=0, msg=name)
    # load_from_checkpoint gives the model after fit
    loaded = Tied.load_from_checkpoint(r["default_checkpoint"])
    assert loaded.a.weight is loaded.b.weight
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value.reshape(-1).double(), module[name], atol=0, rtol=0, msg=name)
    # mid-epoch checkpoints (every 2 steps: 16 of them in 2 epochs of 16 batches)
    assert _check_mid_checkpoints(Path(r["mid_dir"]), "simulated_workers", r["numel"]) == 16


# ------------------------------------------------------ strategy="dana", devices=2: real processes
@pytest.fixture(scope="module")
def dana_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dana_habits")
    out = root / "out.json"
    rc, output, _ = run([PYTHON, str(SCRIPTS / "dana_habits.py"), "--root", str(root), "--out", str(out),
                         "--devices", "2"], timeout=300)
    ranks = [json.loads(f.read_text()) if f.exists() else None for f in (out, Path(f"{out}.rank1"))]
    return {"rc": rc, "output": output, "ranks": ranks}


def _part(run_: dict[str, Any], part: str, rank: int) -> dict[str, Any]:
    report = run_["ranks"][rank]
    assert report is not None and part in report, run_["output"][-4000:]
    r = report[part]
    assert r["status"] == "ok", r.get("traceback") or r
    return r


def test_dana_run_exits_cleanly(dana_run: dict[str, Any]) -> None:
    assert dana_run["rc"] == 0, dana_run["output"][-4000:]


def test_swa_averages_the_masters_parameters_under_dana(dana_run: dict[str, Any]) -> None:
    """Rank 0: SWA's average (of what the module showed at each epoch end: the master's model) stays in
    the module and in a checkpoint saved after fit; the master's final model does not replace it."""
    r = _part(dana_run, "swa", 0)
    _check_swa(r, r["epoch_end_module"], distinct=False)


def test_swa_averages_the_masters_parameters_on_the_other_ranks_too(dana_run: dict[str, Any]) -> None:
    """docs/real-training.md: each rank averages (the master's model, shown at its own epoch ends) and
    its average stays in its module; the checkpoint after fit is rank 0's."""
    r0, r1 = _part(dana_run, "swa", 0), _part(dana_run, "swa", 1)
    assert r1["final_master"] == r0["final_master"]  # every rank was handed the same final model
    _check_swa(r1, r1["epoch_end_module"], checkpoint=False, distinct=False)


def test_deterministic_with_real_workers_warns_at_setup(dana_run: dict[str, Any]) -> None:
    r = _part(dana_run, "swa", 0)  # the SWA fit runs with Trainer(deterministic=True)
    hits = [w for w in r["warnings"] if w.startswith("Trainer(deterministic=True) with strategy=")]
    assert len(hits) == 1, r["warnings"]
    assert "'dana'" in hits[0] and "SimulatedWorkers" in hits[0]


def test_tied_weights_are_saved_under_every_name_under_dana(dana_run: dict[str, Any]) -> None:
    r = _part(dana_run, "tied", 0)
    module = {k: _t(v) for k, v in r["module"].items()}
    assert torch.equal(module["a.weight"], module["b.weight"])
    # the default checkpoint (rank 0's last epoch end): both names hold the master's value saved with it
    # (the other worker may push after it, so the module after fit can be newer)
    checkpoint = torch.load(r["default_checkpoint"], weights_only=False)
    a, b = _tied_names(checkpoint["state_dict"])
    assert torch.equal(a, b), (a - b).abs().max().item()
    master = _t(master_params(checkpoint["dana"], r["numel"]))
    torch.testing.assert_close(a.reshape(-1).double(), master[: a.numel()], atol=0, rtol=0)
    loaded = Tied.load_from_checkpoint(r["default_checkpoint"])
    assert torch.equal(loaded.a.weight, a) and torch.equal(loaded.b.weight, a)
    # a checkpoint saved after fit, and load_from_checkpoint of it, is the model after fit
    after = torch.load(r["after_fit_checkpoint"], weights_only=False)
    for name, value in after["state_dict"].items():
        torch.testing.assert_close(value.reshape(-1).double(), module[name], atol=0, rtol=0, msg=name)
    loaded = Tied.load_from_checkpoint(r["after_fit_checkpoint"])
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value.reshape(-1).double(), module[name], atol=0, rtol=0, msg=name)
    # rank 1 holds the same model after fit
    assert _part(dana_run, "tied", 1)["module"] == r["module"]
    # mid-epoch checkpoints, rank 0's every 2 of its steps
    assert _check_mid_checkpoints(Path(r["mid_dir"]), "dana", r["numel"]) >= 1


def test_trainer_options_under_dana(dana_run: dict[str, Any]) -> None:
    """accumulate_grad_batches=2, gradient_clip_val, precision="bf16-mixed", max_steps=12 and
    LearningRateMonitor, as under DDP: the master deals max_steps x 2 batches (over 2 epochs of 16), in
    12 full pushes and one more for each epoch whose end cut both workers' windows short (each pushes
    what it accumulated); every rank ends with the master's model; the lr reaches rank 0's logger."""
    r0, r1 = _part(dana_run, "options", 0), _part(dana_run, "options", 1)
    assert 12 <= r0["master_version"] <= 14 and r0["global_step"] + r1["global_step"] == r0["master_version"]
    assert r0["module"] == r1["module"]
    assert "lr-SGD" in Path(r0["metrics_csv"]).read_text().splitlines()[0].split(",")
