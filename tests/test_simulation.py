"""SimulatedWorkers driven through the real Trainer with a tiny BatchNorm classifier."""

from __future__ import annotations

import csv
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from tiny import TinyClassifier, flat_params, loader, trainer

from lightning_dana import GapMonitor, SimulatedWorkers


def fit(strategy=None, make=TinyClassifier, epochs: int = 2, seed: int = 0, **kwargs):
    """Seed, build the model with ``make()``, fit: equal seeds give equal initial weights and data order."""
    pl.seed_everything(seed, verbose=False)
    model = make()
    t = trainer(max_epochs=epochs, **({"strategy": strategy} if strategy else {}), **kwargs)
    t.fit(model, loader(), loader(shuffle=False))
    return t, model


@pytest.mark.parametrize("algorithm", ["dana", "dana_zero", "multi_asgd", "nag_asgd"])
def test_one_worker_is_nesterov_sgd(algorithm):
    _, baseline = fit()
    t, sim = fit(SimulatedWorkers(1, algorithm), TinyClassifier)
    assert len(sim.losses) == len(baseline.losses) == 32
    torch.testing.assert_close(torch.stack(sim.seen_params), torch.stack(baseline.seen_params), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(sim.losses), torch.tensor(baseline.losses), atol=1e-5, rtol=1e-4)
    # BatchNorm running statistics gathered through the master match single-worker training
    torch.testing.assert_close(sim.net[1].running_mean, baseline.net[1].running_mean, atol=1e-5, rtol=1e-4)
    assert sim.net[1].num_batches_tracked.item() == baseline.net[1].num_batches_tracked.item() == 32


def test_one_worker_asgd_is_plain_sgd():
    _, baseline = fit(make=lambda: TinyClassifier(momentum=0.0, nesterov=False))
    _, sim = fit(SimulatedWorkers(1, "asgd"), lambda: TinyClassifier(momentum=0.9))  # asgd ignores momentum
    torch.testing.assert_close(torch.tensor(sim.losses), torch.tensor(baseline.losses), atol=1e-5, rtol=1e-4)


def test_dana_carries_adam():
    _, baseline = fit(make=lambda: TinyClassifier("adam", lr=0.01))
    _, sim = fit(SimulatedWorkers(1, "dana"), lambda: TinyClassifier("adam", lr=0.01))
    torch.testing.assert_close(torch.tensor(sim.losses), torch.tensor(baseline.losses), atol=1e-5, rtol=1e-4)
    t, sim4 = fit(SimulatedWorkers(4, "dana"), lambda: TinyClassifier("adam", lr=0.01), epochs=4)
    assert sum(sim4.losses[-8:]) / 8 < 0.5 * sum(sim4.losses[:8]) / 8
    # four independent Adam states, each stepped by its own worker only
    steps = [next(iter(s.values()))["step"].item() for s in t.strategy.worker_optimizer_states]
    assert sorted(steps) == [16.0] * 4


@pytest.mark.parametrize("algorithm", ["asgd", "nag_asgd", "multi_asgd", "dana_zero", "dana"])
def test_each_algorithm_learns_with_eight_workers(algorithm):
    t, model = fit(SimulatedWorkers(8, algorithm, schedule="gamma"), TinyClassifier, epochs=4)
    assert t.callback_metrics["val_acc"] > 0.7  # chance is 0.5


def test_workers_compute_on_their_own_stale_parameters():
    t, model = fit(SimulatedWorkers(3, "asgd", schedule="round_robin"), lambda: TinyClassifier(momentum=0.0, nesterov=False), epochs=1)
    seen = model.seen_params
    # round robin: the first three steps all start from the initial parameters ...
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    # ... and worker 0's second step starts from the master after exactly one push (its own)
    assert not torch.equal(seen[3], seen[0]) and not torch.equal(seen[3], seen[4])


def test_dana_and_dana_zero_train_identically():
    runs = [fit(SimulatedWorkers(5, alg, schedule="block_random", seed=3), TinyClassifier)[1] for alg in ("dana", "dana_zero")]
    torch.testing.assert_close(torch.stack(runs[0].seen_params), torch.stack(runs[1].seen_params), atol=1e-5, rtol=1e-4)


def test_validation_and_final_model_are_the_masters():
    class Probe(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            server = self.trainer.strategy.master_state
            assert torch.equal(flat_params(self), server.rule.eval_params())
            return super().validation_step(batch, batch_idx)

    t, model = fit(SimulatedWorkers(4, "dana_zero"), Probe)
    assert torch.equal(flat_params(model), t.strategy.master_state.rule.eval_params())
    t.test(model, loader(shuffle=False), verbose=False)
    assert t.callback_metrics["test_acc"] > 0.7


def test_lag_and_gap_reach_the_logger(tmp_path):
    monitor = GapMonitor(logging_interval=4)
    t, _ = fit(
        SimulatedWorkers(4, "nag_asgd", schedule="round_robin"),
        epochs=2,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[monitor],
    )
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    lags = [float(r["dana/lag_mean"]) for r in rows if r.get("dana/lag_mean")]
    gaps = [float(r["dana/gap_mean"]) for r in rows if r.get("dana/gap_mean")]
    # every 4 steps, and at the end the push the master applied after the last of them (one step late)
    assert len(lags) == t.global_step // 4 + 1 and lags[-1] == 3.0  # round robin with 4 workers: τ = N - 1
    assert all(g > 0 for g in gaps)
    assert any(k.startswith("dana/pushes_per_s/worker_3") for k in rows[-1])
    assert len(monitor.history) == len(lags) and sum(h["dana/pushes"] for h in monitor.history) == t.global_step



def test_every_push_is_applied_and_recorded_though_the_master_applies_each_one_step_late():
    monitor = GapMonitor(logging_interval=3)
    t, model = fit(SimulatedWorkers(4, "dana_ga", schedule="gamma"), epochs=2, callbacks=[monitor])
    assert t.strategy.master_state.version == t.global_step  # the last step's push too
    assert sum(h["dana/pushes"] for h in monitor.history) == t.global_step  # each logged once, the last at the end
    assert all(isinstance(h["dana/gap_mean"], float) and h["dana/gap_mean"] > 0 for h in monitor.history)
    assert t.strategy.drain_push_records() == []
    assert torch.equal(flat_params(model), t.strategy.master_state.rule.eval_params())

def test_lag_and_gap_are_logged_without_asking(tmp_path):
    t, _ = fit(SimulatedWorkers(2, "dana"), epochs=1, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=4)
    assert sum(isinstance(c, GapMonitor) for c in t.callbacks) == 1
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [float(r["dana/lag_mean"]) for r in rows if r.get("dana/lag_mean")][-1] == 1.0


@pytest.mark.parametrize("schedule", ["block_random", "gamma"])
def test_resume_continues_bit_for_bit(tmp_path, schedule):
    strategy = lambda: SimulatedWorkers(3, "dana", schedule=schedule, seed=7)  # noqa: E731
    _, straight = fit(strategy(), epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(strategy(), epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    pl.seed_everything(0, verbose=False)
    resumed = TinyClassifier()
    t = trainer(max_epochs=4, strategy=strategy())
    t.fit(resumed, loader(), loader(shuffle=False), ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert torch.equal(torch.tensor(resumed.losses), torch.tensor(straight.losses[len(straight.losses) - len(resumed.losses) :]))


def test_checkpoint_holds_the_master(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t, model = fit(SimulatedWorkers(4, "dana_zero"), callbacks=[ckpt], enable_checkpointing=True)
    loaded = TinyClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(flat_params(loaded), t.strategy.master_state.rule.eval_params())
    assert torch.equal(loaded.net[1].running_var, model.net[1].running_var)


def test_refuses_non_finite_push():
    class Poisoned(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 3 else loss

    with pytest.warns(UserWarning, match="NaN or Inf"):
        t, model = fit(SimulatedWorkers(2, "dana"), Poisoned, epochs=1)
    assert t.strategy.master_state.refused == 1
    assert torch.isfinite(t.strategy.master_state.rule.theta).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "sgd"}, "algorithm='sgd' is not known"),
        ({"schedule": "fifo"}, "schedule='fifo' is not known"),
        ({"num_workers": 0}, "num_workers must be an integer >= 1"),
        ({"num_workers": 2, "schedule": [1.0]}, "list of 1 speeds for num_workers=2"),
        ({"num_workers": 2, "schedule": [1.0, 0.0]}, "speeds must all be > 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        SimulatedWorkers(**kwargs)


def test_unsupported_training_fails_at_setup():
    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    class TwoOptimizers(TinyClassifier):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]

    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        fit(SimulatedWorkers(2), Manual)
    with pytest.raises(MisconfigurationException, match="one optimizer"):
        fit(SimulatedWorkers(2), TwoOptimizers)
    with pytest.raises(MisconfigurationException, match="use algorithm='dana'"):
        fit(SimulatedWorkers(2, "nag_asgd"), lambda: TinyClassifier("adam"))


def test_devices_beyond_one_are_refused_not_ignored():
    with pytest.raises(MisconfigurationException, match=r"Trainer\(devices=2, num_nodes=1\) would be ignored"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=SimulatedWorkers(4), max_steps=1, logger=False).fit(
            TinyClassifier(), loader()
        )
