"""MasterState bookkeeping: lag, gap, gap probes, refusals, buffers, checkpoints."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
from torch import nn

from lightning_dana.flat import FlatModel
from lightning_dana.rules import ALGORITHMS, ASGD, layer_gap, make_rule
from lightning_dana.state import MasterDivergedError, MasterState, RefusedPushError, resolve_gaps
from lightning_dana.worker import Worker

F64 = torch.float64
SIZES = [2, 3]  # two "layers": a parameter tensor of 2 elements and one of 3
MOMENTUM = 0.9




def quadratic(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=F64)
    hess = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=F64)
    theta0 = torch.randn(dim, generator=gen, dtype=F64)

    def grad(p: torch.Tensor, worker: int) -> torch.Tensor:
        return hess @ p + 0.05 * torch.cos(p * (worker + 1))

    return grad, theta0


class Cluster:
    """N workers around one server; dana workers keep their own Nesterov momentum."""

    def __init__(self, algorithm, n, sizes=SIZES, buffers=None, gap_every=0, lr=0.05, seed=0):
        self.grad, theta0 = quadratic(sum(sizes), seed)
        self.algorithm, self.n, self.lr = algorithm, n, lr
        buffers = torch.zeros(0, dtype=F64) if buffers is None else buffers
        self.server = MasterState(make_rule(algorithm, theta0, n, MOMENTUM), sizes, buffers, gap_every)
        self.pulls = [self.server.pull(i, torch.empty(self.server.payload_numel, dtype=F64)) for i in range(n)]
        self.v = [torch.zeros(sum(sizes), dtype=F64) for _ in range(n)]

    def push_of(self, i):
        numel = self.server.numel
        g = self.grad(self.pulls[i][:numel], i)
        if self.algorithm == "dana":
            self.v[i] = MOMENTUM * self.v[i] + g
            g = -self.lr * (MOMENTUM * self.v[i] + g)
        return torch.cat([g, torch.zeros(self.server.buffers.numel(), dtype=F64)])

    def step(self, i, pass_pulled=True):
        pulled = self.pulls[i].clone() if pass_pulled else None
        record = self.server.serve(i, self.push_of(i), self.lr, out=self.pulls[i], pulled=pulled)
        assert record.worker == i
        return record


def round_robin(n, pushes):
    return [k % n for k in range(pushes)]


# ---------------------------------------------------------------------------------------
# lag
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_round_robin_lag_is_n_minus_one_in_steady_state(n):
    cluster = Cluster("asgd", n)
    lags = [cluster.step(i).lag for i in round_robin(n, 4 * n)]
    assert lags[:n] == list(range(n))  # first round: everyone pulled at version 0
    assert lags[n:] == [n - 1] * (3 * n)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lag_counts_pushes_applied_between_pull_and_push(algorithm):
    n = 4
    cluster = Cluster(algorithm, n)
    rng = random.Random(5)
    last_pull = [0] * n
    applied = 0
    for _ in range(60):
        i = rng.randrange(n)
        if rng.random() < 0.2:  # a worker may pull again without pushing (a fresh start)
            cluster.server.pull(i, cluster.pulls[i])
            last_pull[i] = applied
            continue
        record = cluster.step(i)
        assert record.lag == applied - last_pull[i]
        applied += 1
        last_pull[i] = applied
    assert cluster.server.version == applied


# ---------------------------------------------------------------------------------------
# gap
# ---------------------------------------------------------------------------------------
def test_layer_gap_is_the_sum_of_layerwise_rmse():
    diff = torch.tensor([3.0, 4.0, 2.0, 2.0, 2.0], dtype=F64)
    # ‖(3, 4)‖/√2 + ‖(2, 2, 2)‖/√3 = 5/√2 + 2
    assert float(layer_gap(diff, SIZES)) == pytest.approx(5 / math.sqrt(2) + 2, rel=1e-15)
    assert float(layer_gap(-diff, SIZES)) == pytest.approx(5 / math.sqrt(2) + 2, rel=1e-15)
    assert float(layer_gap(torch.zeros(5, dtype=F64), SIZES)) == 0.0


def test_gap_hand_computed_on_asgd():
    server = MasterState(make_rule("asgd", torch.zeros(5, dtype=F64), 2), SIZES, torch.zeros(0, dtype=F64))
    pulls = [server.pull(i, torch.empty(5, dtype=F64)) for i in range(2)]
    g0 = torch.tensor([3.0, 4.0, 2.0, 2.0, 2.0], dtype=F64)
    first = server.push(0, g0, 1.0, pulled=pulls[0])
    assert first.gap == 0.0 and first.lag == 0  # worker 0's gradient lands where it was computed
    g1 = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    second = server.push(1, g1, 1.0, pulled=pulls[1])
    # worker 1 pulled θ₀ = 0, the master now holds −g0: Δ = g0
    assert second.lag == 1
    assert second.gap == pytest.approx(5 / math.sqrt(2) + 2, rel=1e-15)
    assert torch.equal(server.rule.theta, -(g0 + g1))


NO_LOOK_AHEAD_AT_MASTER = ["asgd", "nag_asgd", "dana"]  # the master's θ (Θ) is what workers pull


@pytest.mark.parametrize("algorithm", NO_LOOK_AHEAD_AT_MASTER)
def test_gap_is_zero_with_one_worker(algorithm):
    cluster = Cluster(algorithm, 1)
    assert [cluster.step(0).gap for _ in range(10)] == [0.0] * 10
    probed = Cluster(algorithm, 1, gap_every=1)
    assert [probed.step(0, pass_pulled=False).gap for _ in range(10)] == [0.0] * 10


def test_asgd_gap_with_a_constant_gradient_is_eta_times_n_minus_one():
    """Steady state of round robin: the master moved by the N − 1 other pushes, η g each."""
    g = torch.tensor([3.0, 4.0, 2.0, 2.0, 2.0], dtype=F64)
    unit = 5 / math.sqrt(2) + 2  # G(g)
    gaps = {}
    for n in (1, 2, 4, 8):
        server = MasterState(make_rule("asgd", torch.zeros(5, dtype=F64), n), SIZES, torch.zeros(0, dtype=F64))
        pulls = [server.pull(i, torch.empty(5, dtype=F64)) for i in range(n)]
        records = [server.serve(i, g, 0.1, out=pulls[i], pulled=pulls[i].clone()) for i in round_robin(n, 3 * n)]
        steady = [r.gap for r in records[n:]]
        assert steady == pytest.approx([0.1 * (n - 1) * unit] * len(steady), rel=1e-12)
        gaps[n] = steady[-1]
    assert gaps[1] < gaps[2] < gaps[4] < gaps[8]


@pytest.mark.parametrize("algorithm", NO_LOOK_AHEAD_AT_MASTER)
def test_gap_grows_with_the_number_of_workers(algorithm):
    def mean_gap(n):
        cluster = Cluster(algorithm, n, sizes=[4, 6], lr=0.01)
        gaps = [cluster.step(i).gap for i in round_robin(n, 30 * n)]
        return sum(gaps[n:]) / len(gaps[n:])

    gaps = [mean_gap(n) for n in (1, 2, 4)]
    assert gaps[0] == 0.0
    assert gaps[0] < gaps[1] < gaps[2]


def test_dana_zero_gap_is_equation_5():
    """θ̂ pulled against the master's θ: η Σ(other workers' g) − ηγvⁱ, no other worker's momentum."""
    n, lr = 3, 0.05
    cluster = Cluster("dana_zero", n, lr=lr)
    grads = {}
    for step, i in enumerate(round_robin(n, 5 * n)):
        v_i = cluster.server.rule.v[i].clone()
        g = cluster.grad(cluster.pulls[i][: cluster.server.numel], i)
        record = cluster.step(i)
        if step >= n:  # steady state: every other worker pushed exactly once since i pulled
            others = sum(grads[j] for j in range(n) if j != i)
            want = layer_gap(lr * others - lr * MOMENTUM * v_i, SIZES)
            assert record.gap == pytest.approx(float(want), rel=1e-9)
        grads[i] = g


def test_dana_and_dana_zero_hand_out_the_same_parameters():
    order = [0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 0, 1, 2, 2, 1]
    dana, zero = Cluster("dana", 3), Cluster("dana_zero", 3)
    for i in order:
        a, b = dana.step(i), zero.step(i)
        assert a.lag == b.lag
        torch.testing.assert_close(dana.pulls[i], zero.pulls[i], rtol=1e-10, atol=1e-13)


def test_gap_probe_measures_what_an_explicit_pulled_would():
    n, k = 3, 4
    explicit = Cluster("dana_zero", n)
    probed = Cluster("dana_zero", n, gap_every=k)
    never = Cluster("dana_zero", n, gap_every=0)
    rng = random.Random(2)
    order = [rng.randrange(n) for _ in range(80)]
    sampled = 0
    for i in order:
        want = explicit.step(i).gap
        got = probed.step(i, pass_pulled=False)
        assert never.step(i, pass_pulled=False).gap is None
        if got.gap is not None:
            sampled += 1
            assert got.gap == pytest.approx(want, rel=1e-12, abs=1e-15)
    # one probe at a time, at least gap_every pushes apart
    assert len(order) / (2 * k + 2 * n) <= sampled <= len(order) / k + 1


def test_gap_probe_visits_every_worker_in_turn():
    n = 4
    cluster = Cluster("asgd", n, gap_every=5)
    measured = [r.worker for r in (cluster.step(i, pass_pulled=False) for i in round_robin(n, 40 * n)) if r.gap is not None]
    assert measured[:8] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_gap_probe_keeps_its_own_copy_of_the_reply():
    server = MasterState(make_rule("asgd", torch.zeros(5, dtype=F64), 1), SIZES, torch.zeros(0, dtype=F64), 1)
    out = server.pull(0, torch.empty(5, dtype=F64))
    out.fill_(123.0)  # the worker reuses its receive buffer for the push
    g = torch.ones(5, dtype=F64)
    record = server.serve(0, g, 0.5, out=out)
    assert record.gap == 0.0  # measured against the copy, not the overwritten buffer
    record = server.serve(0, g, 0.5, out=out)
    assert record.gap == 0.0 and torch.equal(out, torch.full((5,), -1.0, dtype=F64))


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------
def snapshot(server):
    rule_state = server.rule.state_dict()
    return (
        {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in rule_state["tensors"].items()},
        rule_state.get("lr"),
        server.buffers.clone(),
        server.version,
        list(server.pulled_version),
        server._probe,
    )


def same(a, b):
    tensors_a, lr_a, buf_a, version_a, pulled_a, probe_a = a
    tensors_b, lr_b, buf_b, version_b, pulled_b, probe_b = b
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        for x, y in zip(*(v if isinstance(v, list) else [v] for v in (tensors_a[key], tensors_b[key]))):
            assert torch.equal(x, y), key
    assert lr_a == lr_b and torch.equal(buf_a, buf_b)
    assert (version_a, pulled_a) == (version_b, pulled_b)
    assert (probe_a is None) == (probe_b is None)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["params", "buffers"])
def test_non_finite_push_is_refused_and_changes_nothing(algorithm, bad, where):
    cluster = Cluster(algorithm, 2, buffers=torch.tensor([1.0, 2.0], dtype=F64), gap_every=1)
    for i in [0, 1, 0]:
        cluster.step(i, pass_pulled=False)
    reply_before = cluster.server.rule.reply(1).clone()
    before = snapshot(cluster.server)
    push = cluster.push_of(1)
    push[1 if where == "params" else -1] = bad
    with pytest.raises(RefusedPushError, match="worker 1"):
        cluster.server.serve(1, push, cluster.lr, out=torch.empty_like(push))
    assert issubclass(RefusedPushError, ValueError)
    same(before, snapshot(cluster.server))
    assert torch.equal(cluster.server.rule.reply(1), reply_before)
    assert cluster.server.refused == 1
    cluster.step(1)  # and the master goes on
    assert cluster.server.version == 4



# ---------------------------------------------------------------------------------------
# deferred pushes (the simulated workers' path: no wait for the device per push)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dana", "dana_ga", "dc_asgd"])
def test_deferred_pushes_apply_exactly_as_eager_ones_and_resolve_the_same_gaps(algorithm):
    eager, deferred = Cluster(algorithm, 3), Cluster(algorithm, 3)
    order = [0, 1, 2, 2, 0, 1, 1, 0, 2]
    want = [eager.step(i) for i in order]
    got = []
    for i in order:
        push, pulled = deferred.push_of(i), deferred.pulls[i].clone()
        read = deferred.server.reductions(push)
        got.append(deferred.server.serve(i, push, deferred.lr, deferred.pulls[i], pulled, read=read, defer=True))
    assert all(isinstance(r.gap, torch.Tensor) for r in got)
    resolve_gaps(got)
    assert [(r.worker, r.lag, r.gap) for r in got] == [(r.worker, r.lag, r.gap) for r in want]
    assert torch.equal(deferred.server.eval_payload(), eager.server.eval_payload())


class _Exploding(ASGD):
    """A rule whose second apply makes the master NaN: what a diverging run does, on demand."""

    def apply(self, worker, push, lr):
        super().apply(worker, push, lr)
        if worker == 1:
            self.theta[0] = float("nan")


@pytest.mark.parametrize("look", ["push", "verify", "eval_payload", "state_dict"])
def test_a_deferred_push_that_makes_the_master_non_finite_is_reported_at_the_next_look(look):
    server = MasterState(_Exploding(torch.ones(5, dtype=F64), 2), SIZES, torch.zeros(0, dtype=F64))
    push = torch.full((5,), 0.1, dtype=F64)
    server.push(0, push, 0.1, defer=True)
    server.push(1, push, 0.1, defer=True)  # the master is NaN from here, and nothing has read it yet
    with pytest.raises(MasterDivergedError, match=r"after a push of worker 1 \(version 1\)"):
        if look == "push":
            server.push(0, push, 0.1, defer=True)
        else:
            getattr(server, look)()


def test_an_eager_push_that_makes_the_master_non_finite_raises_at_once():
    server = MasterState(_Exploding(torch.ones(5, dtype=F64), 2), SIZES, torch.zeros(0, dtype=F64))
    push = torch.full((5,), 0.1, dtype=F64)
    server.push(0, push, 0.1)
    with pytest.raises(MasterDivergedError, match=r"after a push of worker 1 \(version 1\)"):
        server.push(1, push, 0.1)

def test_wrong_size_push_is_refused():
    cluster = Cluster("dana_zero", 2, buffers=torch.zeros(3, dtype=F64))
    before = snapshot(cluster.server)
    for numel in (4, 5, 7, 9):
        with pytest.raises(ValueError, match=f"holds {numel} values of torch.float64, the master expects 8"):
            cluster.server.push(0, torch.zeros(numel, dtype=F64), 0.1)
    same(before, snapshot(cluster.server))
    assert cluster.server.refused == 0


# ---------------------------------------------------------------------------------------
# buffers
# ---------------------------------------------------------------------------------------
def test_statistics_are_taken_counters_added_and_the_reply_carries_the_masters_buffers():
    server = MasterState(
        make_rule("asgd", torch.zeros(5, dtype=F64), 2), SIZES, torch.tensor([10.0, 0.0], dtype=F64), counters=1
    )
    pulls = [server.pull(i, torch.empty(7, dtype=F64)) for i in range(2)]
    assert torch.equal(pulls[0][5:], torch.tensor([10.0, 0.0], dtype=F64))
    push0 = torch.cat([torch.ones(5, dtype=F64), torch.tensor([9.0, 1.0], dtype=F64)])
    server.serve(0, push0, 0.5, out=pulls[0])
    push1 = torch.cat([torch.ones(5, dtype=F64), torch.tensor([12.0, 1.0], dtype=F64)])
    server.serve(1, push1, 0.5, out=pulls[1])
    assert torch.equal(server.buffers, torch.tensor([12.0, 2.0], dtype=F64))  # latest statistic, summed count
    assert torch.equal(pulls[1][5:], server.buffers)
    assert torch.equal(pulls[1][:5], torch.full((5,), -1.0, dtype=F64))
    assert torch.equal(server.eval_payload(), pulls[1])


def test_running_statistics_stay_bounded_with_many_stale_workers():
    """32 stale EMA updates (m = 0.1) toward 5: adding their changes would overshoot; taking the latest cannot."""
    n = 32
    server = MasterState(
        make_rule("asgd", torch.zeros(5, dtype=F64), n), SIZES, torch.tensor([1.0, 0.0], dtype=F64), counters=1
    )
    pulls = [server.pull(i, torch.empty(7, dtype=F64)) for i in range(n)]
    for k in range(40 * n):  # each worker moves its own stale copy: 0.9 per round
        i = k % n
        statistic = 0.9 * pulls[i][5] + 0.1 * 5.0
        server.serve(i, torch.cat([torch.zeros(5, dtype=F64), statistic.view(1), torch.ones(1, dtype=F64)]), 0.0, out=pulls[i])
        assert 1.0 <= float(server.buffers[0]) <= 5.0
    assert float(server.buffers[0]) > 4.9 and float(server.buffers[1]) == 40 * n


def test_batchnorm_statistics_gather_every_workers_batches():
    n, pushes = 3, 7
    models = []
    for _ in range(n):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).double())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    flats = [FlatModel(m, o) for m, o in zip(models, opts)]
    workers = [Worker(f, o, "asgd") for f, o in zip(flats, opts)]
    server = MasterState(
        make_rule("asgd", flats[0].read_params(), n), flats[0].sizes, flats[0].read_buffers(), counters=flats[0].counter_numel
    )
    pulls = [server.pull(i, flats[i].empty()) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    for k in range(pushes):
        i = k % n
        workers[i].load(pulls[i])
        opts[i].zero_grad()
        models[i](torch.randn(8, 4, generator=gen, dtype=F64)).square().mean().backward()
        push = workers[i].compute(pulls[i], flats[i].empty())
        server.serve(i, push, workers[i].lrs(), out=pulls[i])
    workers[0].load(server.eval_payload())
    assert int(models[0][1].num_batches_tracked) == pushes  # int buffer travelled as float
    assert models[0][1].num_batches_tracked.dtype == torch.int64


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_dict_round_trip_continues_identically(algorithm):
    rng = random.Random(7)
    order = [rng.randrange(3) for _ in range(30)]
    straight = Cluster(algorithm, 3, buffers=torch.tensor([0.5], dtype=F64))
    for i in order[:15]:
        straight.step(i)
    buffer = io.BytesIO()
    torch.save(straight.server.state_dict(), buffer)
    pulls = [p.clone() for p in straight.pulls]
    v = [x.clone() for x in straight.v]
    after = [straight.step(i) for i in order[15:]]

    resumed = Cluster(algorithm, 3, buffers=torch.tensor([0.0], dtype=F64))
    for i in [2, 2, 1]:  # a server in some other state, which loading must overwrite entirely
        resumed.step(i, pass_pulled=False)
    buffer.seek(0)
    resumed.server.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.pulls, resumed.v = pulls, v  # the workers' own state is theirs to checkpoint
    again = [resumed.step(i) for i in order[15:]]
    assert [(r.worker, r.lag, r.gap) for r in again] == [(r.worker, r.lag, r.gap) for r in after]
    assert torch.equal(resumed.server.eval_payload(), straight.server.eval_payload())
    assert resumed.server.version == straight.server.version == 30
    assert resumed.server.pulled_version == straight.server.pulled_version


def test_state_dict_is_a_snapshot():
    cluster = Cluster("dana_zero", 2, buffers=torch.tensor([0.5], dtype=F64))
    cluster.step(0)
    state = cluster.server.state_dict()
    theta = state["rule"]["tensors"]["theta"].clone()
    cluster.step(1)
    assert torch.equal(state["rule"]["tensors"]["theta"], theta)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_server_state_bytes_adds_the_buffers(algorithm):
    server = MasterState(make_rule(algorithm, torch.zeros(10), 3, MOMENTUM), [10], torch.zeros(4))
    assert server.state_bytes() == server.rule.state_bytes() + 16
    assert server.payload_numel == 14


@pytest.mark.parametrize(
    ("algorithm", "resumable"),
    [("dana", True), ("asgd", True), ("nag_asgd", True), ("dana_zero", False), ("multi_asgd", False), ("sa_asgd", False), ("dana_ga", False)],
)
def test_resuming_with_another_number_of_workers(algorithm, resumable):
    """Allowed where the master's state does not depend on N; refused with the reason where it does."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_dana.core import DanaCore

    def core(n):
        model = torch.nn.Linear(3, 2)
        return DanaCore(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), algorithm, n)

    three = core(3)
    saved = three.checkpoint(three.state.state_dict())
    if resumable:
        master = core(2).resumable_master(saved)
        assert master["pulled_version"] == [master["version"]] * 2
    else:
        with pytest.raises(MisconfigurationException, match="keeps state per worker.*resume with 3 workers"):
            core(2).resumable_master(saved)
