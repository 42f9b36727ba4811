"""Per-step LR schedulers paced by the master's pushes (lightning_dana.pacing), without processes."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.utilities.types import LRSchedulerConfig

from lightning_dana.pacing import MasterPaced, catch_up, pace, unpace


def sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_a_paced_scheduler_is_where_one_workers_would_be_after_as_many_steps():
    pushes = 0
    opt, ref_opt = sgd(), sgd()
    paced = MasterPaced(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), lambda: pushes)
    ref = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=0.9)
    for pushes in [3, 3, 7, 12]:  # this worker's steps, while the others pushed in between
        paced.step()
        while ref.last_epoch < pushes:
            ref.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] and paced.last_epoch == pushes
    pushes = 5  # behind the scheduler (a resumed run): it waits, it never steps back
    paced.step()
    assert paced.last_epoch == 12


def test_frequency_counts_pushes_per_scheduler_step():
    paced = MasterPaced(torch.optim.lr_scheduler.StepLR(sgd(), step_size=1), lambda: 10, frequency=4)
    paced.step()
    assert paced.last_epoch == 2


def test_pace_wraps_per_step_schedulers_only_and_unpace_gives_them_back():
    opt = sgd()
    step = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    configs = [
        LRSchedulerConfig(step, interval="step"),
        LRSchedulerConfig(epoch, interval="epoch"),
        LRSchedulerConfig(plateau, interval="step", reduce_on_plateau=True, monitor="loss"),
    ]
    unpaced = pace(configs, lambda: 4)
    assert isinstance(configs[0].scheduler, MasterPaced) and configs[1].scheduler is epoch
    assert unpaced == [plateau] and configs[2].scheduler is plateau
    assert pace(configs, lambda: 4) == [plateau] and configs[0].scheduler.scheduler is step  # never twice
    catch_up(configs)
    assert step.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert configs[0].scheduler.state_dict() == step.state_dict()  # checkpoints hold the user's scheduler
    unpace(configs)
    assert [c.scheduler for c in configs] == [step, epoch, plateau]


def test_warmup_then_cosine_in_one_sequential_scheduler_is_paced_exactly():
    """The usual per-step recipe (LinearLR warm-up, then CosineAnnealingLR, in a SequentialLR)."""

    def recipe(opt: torch.optim.SGD) -> torch.optim.lr_scheduler.SequentialLR:
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[5])

    pushes = 0
    opt, ref_opt = sgd(), sgd()
    paced, ref = MasterPaced(recipe(opt), lambda: pushes), recipe(ref_opt)
    for pushes in [2, 3, 7, 11, 12, 20]:
        paced.step()
        while ref.last_epoch < pushes:
            ref_opt.step()
            ref.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
