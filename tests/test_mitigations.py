"""Staleness mitigations (issue 8): each reduces to its base algorithm at N = 1, and does what its paper says.

Float64, pushes driven by hand or by the same SimWorker harness as test_rules.py; then each through the
real Trainer under SimulatedWorkers (tiny model, few steps).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_rules import (
    MOMENTUM,
    SimWorker,
    drive,
    make_batches,
    make_model,
    make_server,
    push_order,
    quadratic_problem,
    reference_run,
    sgd,
)

from lightning_dana.rules import (
    DC_EPS,
    DC_LAMBDA0,
    DC_M,
    GA_BETA,
    GA_EPS,
    RULES,
    _DanaMaster,
    make_rule,
    stability_edge,
    stability_scale,
)

F64 = torch.float64
ON_ASGD = ["sa_asgd", "ga_asgd", "dc_asgd"]  # base: asgd (plain SGD at N = 1)
ON_DANA = ["dana_ga", "dana_dc", "dana_sm", "dana_smp", "dana_smpn", "dana_sa"]  # base: dana (Nesterov SGD at N = 1)
NEW = ON_ASGD + ON_DANA


def t(*values):
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------------
# N = 1: the base algorithm, to float64 round-off
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", NEW)
def test_single_worker_is_the_base_algorithm(algorithm):
    momentum = 0.0 if algorithm in ON_ASGD else MOMENTUM
    ref_losses, ref_seen, ref_final, _ = reference_run(momentum)
    model = make_model()
    worker = SimWorker(model, sgd(model.parameters(), momentum), algorithm)
    server = make_server(algorithm, [worker])
    losses = [worker.step(server, 0, batch)[0] for batch in make_batches()]
    assert losses == pytest.approx(ref_losses, rel=1e-11, abs=1e-12)
    for mine, ref in zip(worker.seen, ref_seen):
        torch.testing.assert_close(mine, ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(worker.pulled[: worker.flat.numel], ref_final, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("algorithm", NEW)
def test_single_worker_matches_base_rule_with_an_lr_schedule(algorithm):
    """Rule against rule on a quadratic, lr changing mid-run: asgd's θ, or dana's Θ (its worker's Nesterov step)."""
    grad, theta0 = quadratic_problem(4)
    base = make_rule("asgd" if algorithm in ON_ASGD else "dana", theta0, 1)
    mine = make_rule(algorithm, theta0, 1, MOMENTUM)
    v = torch.zeros_like(theta0)
    p_base, p_mine = base.reply(0).clone(), mine.reply(0).clone()
    for k in range(30):
        lr = 0.05 if k < 12 else 0.01
        g = grad(p_base, 0)
        if algorithm in ON_ASGD:
            base.apply(0, g, lr)
        else:  # dana's worker: torch's Nesterov step, pushed as a delta
            v = MOMENTUM * v + g
            base.apply(0, -lr * (MOMENTUM * v + g), lr)
        mine.apply(0, grad(p_mine, 0), lr)
        p_base, p_mine = base.reply(0).clone(), mine.reply(0).clone()
        torch.testing.assert_close(p_mine, p_base, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(mine.eval_params(), base.eval_params(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("order", ["round_robin", "gamma", "random_with_repeats"])
def test_dana_master_form_hands_out_what_dana_zero_hands_out(n, order):
    """The shared core of dana_ga/dana_dc/dana_sm (no correction, s = 1) is DANA at any N: Θ = θ − ηγΣvʲ."""
    grad, theta0 = quadratic_problem(5)
    core, zero = _DanaMaster(theta0, n, MOMENTUM), make_rule("dana_zero", theta0, n, MOMENTUM)
    pulls = [core.reply(i).clone() for i in range(n)]
    for i in push_order(order, n, 10 * n):
        g = grad(pulls[i], i)
        core.apply(i, g, 0.05)
        zero.apply(i, g, 0.05)
        pulls[i] = core.reply(i).clone()
        torch.testing.assert_close(pulls[i], zero.reply(i), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------
# each rule's own formula, by hand
# ---------------------------------------------------------------------------------------
def test_lag_is_tracked_and_eval_params_is_not_a_pull():
    rule = make_rule("sa_asgd", t(0.0), 3)
    for i in range(3):
        rule.reply(i)
    rule.apply(0, t(1.0), 1.0)  # lag 0: full step
    rule.reply(0)
    rule.apply(1, t(1.0), 1.0)  # lag 1: full step
    rule.reply(1)
    assert rule.eval_params().item() == -2.0
    rule.apply(0, t(1.0), 1.0)
    rule.eval_params()
    rule.eval_params()
    rule.apply(2, t(1.0), 1.0)  # pulled at version 0, applied at version 3: lag 3, η/3
    assert rule.lag(1) == 2 and rule.lag(0) == 3
    assert rule.theta.item() == pytest.approx(-3.0 - 1.0 / 3.0, abs=1e-15)


def test_gap_aware_divides_by_one_plus_gap_over_average_step():
    rule = make_rule("ga_asgd", t(0.0, 0.0), 2)
    rule.reply(0), rule.reply(1)
    rule.apply(0, t(2.0, 0.0), 0.5)  # first push: no penalty, θ = (−1, 0); E[u²] = (1−β)·(4, 0)
    assert torch.equal(rule.theta, t(-1.0, 0.0))
    rule.reply(0)
    # worker 1 pulled (0, 0): gap (1, 0); C = η_max(√(E/(1−β)) + ε) = 0.5·(2 + ε), 0.5·ε
    c = 0.5 * (2.0 + GA_EPS)
    rule.apply(1, t(3.0, 1.0), 0.5)
    expected0 = -1.0 - 0.5 * 3.0 / (1.0 + 1.0 / c)
    assert rule.theta[0].item() == pytest.approx(expected0, rel=1e-14)
    assert rule.theta[1].item() == pytest.approx(-0.5, rel=1e-14)  # no gap in that element: G = 1
    # the running average took the penalised step
    g0 = 3.0 / (1.0 + 1.0 / c)
    assert rule.step_sq[0].item() == pytest.approx(GA_BETA * (1 - GA_BETA) * 4 + (1 - GA_BETA) * g0**2, rel=1e-12)


def test_delay_compensation_is_the_taylor_term_with_adaptive_lambda():
    rule = make_rule("dc_asgd", t(1.0), 2)
    rule.reply(0), rule.reply(1)
    rule.apply(0, t(2.0), 0.1)  # θ = 0.8, worker 0's own pull was θ = 1: shift 0.8 − 1 ... but it pushes at lag 0
    assert rule.theta.item() == pytest.approx(0.8, abs=1e-15)
    rule.reply(0)
    g = 3.0
    ms = (1 - DC_M) * g * g
    expected = 0.8 - 0.1 * (g + DC_LAMBDA0 / math.sqrt(ms + DC_EPS) * g * g * (0.8 - 1.0))
    rule.apply(1, t(g), 0.1)  # worker 1 computed on θ = 1, the master is at 0.8
    assert rule.theta.item() == pytest.approx(expected, rel=1e-14)


def test_dana_dc_compensates_between_look_aheads():
    rule = make_rule("dana_dc", t(0.0), 2, 0.5)
    rule.reply(0), rule.reply(1)
    rule.apply(0, t(1.0), 0.1)  # v0 = 1, Θ = −0.1·(0.5 + 1) = −0.15
    assert rule.theta.item() == pytest.approx(-0.15, abs=1e-15)
    g = 2.0
    ms = (1 - DC_M) * g * g
    gc = g + DC_LAMBDA0 / math.sqrt(ms + DC_EPS) * g * g * (-0.15 - 0.0)
    rule.apply(1, t(g), 0.1)
    assert rule.theta.item() == pytest.approx(-0.15 - 0.1 * (0.5 * gc + gc), rel=1e-13)
    assert rule.v[1].item() == pytest.approx(gc, rel=1e-13)


def test_stability_edges_of_the_linear_models():
    # one worker: plain GD 2, Nesterov 2(1 + γ)/(1 + 2γ)
    assert stability_edge("asgd", 0, 0.9) == pytest.approx(2.0, rel=1e-9)
    assert stability_edge("dana", 0, 0.9) == pytest.approx(3.8 / 2.8, rel=1e-9)
    assert stability_edge("nag_asgd", 0, 0.9) == pytest.approx(3.8 / 2.8, rel=1e-9)
    # delayed GD (x ← x − a x(t−τ)): edge 2 sin(π / (2(2τ + 1)))
    for lag in (1, 3, 7):
        assert stability_edge("asgd", lag, 0.0) == pytest.approx(2 * math.sin(math.pi / (2 * (2 * lag + 1))), rel=1e-8)
    # the ordering the sweeps show at every N > 1: NAG-ASGD breaks first, then DANA, then ASGD
    for lag in (1, 7, 15):
        assert stability_edge("nag_asgd", lag, 0.9) < stability_edge("dana", lag, 0.9) < stability_edge("asgd", lag, 0.9)
    assert stability_scale(0, 0.9) == 1.0
    scales = [stability_scale(lag, 0.9) for lag in (1, 3, 7, 15, 31)]
    assert all(a > b for a, b in zip(scales, scales[1:]))


def test_dana_sm_and_dana_sa_scale_the_step_by_the_lag():
    for name, factor in (("dana_sm", stability_scale(2, 0.5)), ("dana_sa", 0.5)):
        rule = make_rule(name, t(0.0), 3, 0.5)
        for i in range(3):
            rule.reply(i)
        rule.apply(0, t(1.0), 0.1)
        rule.apply(1, t(1.0), 0.1)  # lag 1: dana_sa 1/1, dana_sm s(1)
        theta = rule.theta.item()
        rule.apply(2, t(1.0), 0.1)  # lag 2
        assert rule.theta.item() - theta == pytest.approx(-0.1 * factor * 1.5, rel=1e-12), name


def test_dana_smp_caps_the_lr_at_the_peak_lrs_stable_step():
    rule = make_rule("dana_smp", t(0.0), 2, 0.5)
    rule.reply(0), rule.reply(1)
    rule.apply(0, t(1.0), 0.4)  # lag 0: η itself, and η_max = 0.4
    assert rule.theta.item() == pytest.approx(-0.4 * 1.5, rel=1e-14)
    theta = rule.theta.item()
    rule.apply(1, t(1.0), 0.4)  # lag 1 at the peak lr: η·s(1)
    assert rule.theta.item() - theta == pytest.approx(-0.4 * stability_scale(1, 0.5) * 1.5, rel=1e-12)
    cap = 0.4 * stability_scale(1, 0.5)
    for lr, expected in ((0.9 * cap, 0.9 * cap), (1.5 * cap, cap)):  # after a decay: min(η, cap)
        rule.reply(0)
        rule.apply(1, t(0.0), 0.4)  # a zero gradient from worker 1 only to make worker 0's next lag 1
        theta, v0 = rule.theta.item(), rule.v[0].item()
        rule.apply(0, t(1.0), lr)
        assert rule.theta.item() - theta == pytest.approx(-expected * (0.5 * (0.5 * v0 + 1.0) + 1.0), rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_master_memory_over_parameter_bytes(n):
    theta0 = torch.zeros(1000)
    expected = {
        "sa_asgd": 1, "ga_asgd": n + 2, "dc_asgd": 2 * n + 1,
        "dana_ga": 2 * n + 2, "dana_dc": 3 * n + 1, "dana_sm": n + 1, "dana_smp": n + 1, "dana_smpn": n + 1, "dana_sa": n + 1,
    }  # fmt: skip
    for name, copies in expected.items():
        assert make_rule(name, theta0, n, MOMENTUM).state_bytes() == copies * 4000, name


def test_every_new_name_is_registered():
    assert set(NEW) <= set(RULES)


@pytest.mark.parametrize("algorithm", NEW)
def test_resume_mid_run_continues_identically_with_lag_and_pulls(algorithm):
    grad, theta0 = quadratic_problem(6)
    n, order = 3, push_order("gamma", 3, 40)
    straight = make_rule(algorithm, theta0, n, MOMENTUM)
    pulls = [straight.reply(i).clone() for i in range(n)]
    drive(straight, grad, pulls, order[:20], lambda k: 0.02)
    state = straight.state_dict()
    resumed = make_rule(algorithm, torch.zeros_like(theta0), n, 0.0)
    resumed.load_state_dict(state)
    pulls2 = [p.clone() for p in pulls]
    drive(straight, grad, pulls, order[20:], lambda k: 0.01)
    drive(resumed, grad, pulls2, order[20:], lambda k: 0.01)
    assert torch.isfinite(straight.eval_params()).all()
    assert torch.equal(resumed.eval_params(), straight.eval_params())
    assert [resumed.lag(i) for i in range(n)] == [straight.lag(i) for i in range(n)]


# ---------------------------------------------------------------------------------------
# through the real Trainer, under SimulatedWorkers (tiny BatchNorm classifier)
# ---------------------------------------------------------------------------------------
def fit(strategy=None, make=None, epochs: int = 2):
    import pytorch_lightning as pl
    from tiny import TinyClassifier, loader, trainer

    pl.seed_everything(0, verbose=False)
    model = (make or TinyClassifier)()
    t = trainer(max_epochs=epochs, **({"strategy": strategy} if strategy else {}))
    t.fit(model, loader(), loader(shuffle=False))
    return t, model


@pytest.mark.parametrize("algorithm", NEW)
def test_one_simulated_worker_trains_like_its_base(algorithm):
    from tiny import TinyClassifier

    from lightning_dana import SimulatedWorkers

    if algorithm in ON_ASGD:
        make = lambda: TinyClassifier(momentum=0.0, nesterov=False)  # noqa: E731
    else:
        make = TinyClassifier
    _, baseline = fit(make=make)
    _, sim = fit(SimulatedWorkers(1, algorithm), make)
    assert len(sim.losses) == len(baseline.losses) == 32
    torch.testing.assert_close(torch.tensor(sim.losses), torch.tensor(baseline.losses), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algorithm", NEW)
def test_each_mitigation_learns_with_eight_gamma_workers(algorithm):
    from tiny import TinyClassifier

    from lightning_dana import SimulatedWorkers

    t, _ = fit(SimulatedWorkers(8, algorithm, schedule="gamma"), TinyClassifier, epochs=4)
    assert t.callback_metrics["val_acc"] > 0.7  # chance is 0.5


def test_dana_smpn_caps_every_push_at_the_steady_state_lag():
    rule = make_rule("dana_smpn", t(0.0), 4, 0.5)
    for i in range(4):
        rule.reply(i)
    rule.apply(0, t(1.0), 0.4)  # own lag 0, but capped as if N − 1 = 3
    assert rule.theta.item() == pytest.approx(-0.4 * stability_scale(3, 0.5) * 1.5, rel=1e-12)
    assert make_rule("dana_smpn", t(0.0), 1, 0.5).lag(0) == 0
