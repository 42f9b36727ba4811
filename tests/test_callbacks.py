"""GradualWarmup and MomentumCorrection driven through the real Trainer."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from tiny import TinyClassifier, loader, trainer

from lightning_dana import GradualWarmup, MomentumCorrection, SimulatedWorkers

STEPS_PER_EPOCH = 16  # 256 samples, batch 16


class LRRecorder(Callback):
    """The lr in force at every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def run(make, callbacks, strategy=None, epochs=3, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = make()
    recorder = LRRecorder()
    t = trainer(max_epochs=epochs, callbacks=[*callbacks, recorder], **({"strategy": strategy} if strategy else {}), **kwargs)
    t.fit(model, loader())
    return model, recorder.lrs


def expected_warmup(step: int, n: int, total: int) -> float:
    return 1 / n + (1 - 1 / n) * min(step / total, 1.0)


def test_warmup_rises_linearly_from_lr_over_n_and_composes_with_step_decay():
    model, lrs = run(
        lambda: TinyClassifier(milestones=(1,)), [GradualWarmup(epochs=2)], SimulatedWorkers(4, "dana")
    )
    total = 2 * STEPS_PER_EPOCH
    for step, lr in enumerate(lrs):
        scheduled = 0.1 if step < STEPS_PER_EPOCH else 0.01  # MultiStepLR decays x0.1 after epoch 1
        assert lr == pytest.approx(scheduled * expected_warmup(step, 4, total), rel=1e-6), step
    assert lrs[0] == pytest.approx(0.1 / 4)
    assert lrs[-1] == pytest.approx(0.01)


def test_warmup_composes_with_a_per_step_closed_form_scheduler():
    class Lambda(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.98**s)
            return [opt], [{"scheduler": sched, "interval": "step"}]

    _, lrs = run(Lambda, [GradualWarmup(epochs=1, num_workers=8)], epochs=2)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(0.1 * 0.98**step * expected_warmup(step, 8, STEPS_PER_EPOCH), rel=1e-6)


def test_warmup_is_a_no_op_for_one_worker():
    _, lrs = run(TinyClassifier, [GradualWarmup()], epochs=1)
    assert lrs == [0.1] * STEPS_PER_EPOCH


def test_warmup_state_survives_resume(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    warmup = GradualWarmup(epochs=4)
    run(lambda: TinyClassifier(milestones=(1,)), [warmup, ModelCheckpoint(tmp_path, save_last=True)], SimulatedWorkers(2), epochs=2, enable_checkpointing=True)
    resumed = GradualWarmup(epochs=4)
    pl.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    t = trainer(max_epochs=3, callbacks=[resumed, recorder], strategy=SimulatedWorkers(2))
    t.fit(TinyClassifier(milestones=(1,)), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    step = 2 * STEPS_PER_EPOCH
    assert recorder.lrs[0] == pytest.approx(0.01 * expected_warmup(step, 2, 4 * STEPS_PER_EPOCH), rel=1e-6)


class LRScaledSGD(torch.optim.Optimizer):
    """Heavy ball with η inside the buffer (v ← γv + ηg, θ ← θ − v), as in Caffe and Goyal et al."""

    lr_scaled_state = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad, alpha=group["lr"])
                p.sub_(buf)
        return loss


def classifier_with(optimizer_cls):
    class Model(TinyClassifier):
        def configure_optimizers(self):
            opt = optimizer_cls(self.parameters(), lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, [1], gamma=0.1)]

    return Model


@pytest.mark.parametrize("strategy", [None, "simulated"])
def test_momentum_correction_makes_lr_scaled_buffers_match_torch_sgd(strategy):
    make = lambda: SimulatedWorkers(3, "dana", schedule="round_robin") if strategy else None  # noqa: E731
    reference, _ = run(classifier_with(torch.optim.SGD), [], make())
    corrected, _ = run(classifier_with(LRScaledSGD), [MomentumCorrection()], make())
    uncorrected, _ = run(classifier_with(LRScaledSGD), [], make())
    ref, cor, unc = (torch.tensor(m.losses) for m in (reference, corrected, uncorrected))
    # identical until the lr decays after epoch 1, then only the corrected buffers keep tracking torch's form
    torch.testing.assert_close(unc[:STEPS_PER_EPOCH + 1], ref[:STEPS_PER_EPOCH + 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cor, ref, atol=1e-5, rtol=1e-4)
    assert (unc - ref).abs().max() > 1e-3


def test_momentum_correction_leaves_torch_sgd_alone():
    plain, _ = run(classifier_with(torch.optim.SGD), [])
    with_callback, _ = run(classifier_with(torch.optim.SGD), [MomentumCorrection()])
    assert plain.losses == with_callback.losses


def test_momentum_correction_by_state_keys():
    explicit, _ = run(classifier_with(LRScaledSGD), [MomentumCorrection({LRScaledSGD: ["momentum_buffer"]})])
    implicit, _ = run(classifier_with(LRScaledSGD), [MomentumCorrection()])
    assert explicit.losses == implicit.losses
