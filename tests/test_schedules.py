"""Which simulated worker pushes next: orders, seeds, speeds, checkpoints."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from lightning_dana.schedules import SCHEDULES, BlockRandom, Gamma, RoundRobin, make_schedule


def take(schedule, count):
    return [schedule.next_worker() for _ in range(count)]


def test_round_robin_order():
    schedule = make_schedule("round_robin", 3)
    assert isinstance(schedule, RoundRobin)
    assert take(schedule, 8) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert schedule.clock == 8.0
    assert take(make_schedule("round_robin", 1), 3) == [0, 0, 0]


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_block_random_holds_every_worker_once_per_block(n):
    schedule = make_schedule("block_random", n, seed=4)
    assert isinstance(schedule, BlockRandom)
    order = take(schedule, 20 * n)
    blocks = [order[k : k + n] for k in range(0, len(order), n)]
    assert all(sorted(block) == list(range(n)) for block in blocks)
    if n >= 5:
        assert len({tuple(block) for block in blocks}) > 1  # shuffled per block, not one fixed order


def test_block_random_is_seeded():
    a = take(make_schedule("block_random", 6, seed=1), 60)
    b = take(make_schedule("block_random", 6, seed=1), 60)
    c = take(make_schedule("block_random", 6, seed=2), 60)
    assert a == b
    assert a != c


def test_gamma_is_seeded_and_every_worker_pushes():
    a = take(make_schedule("gamma", 5, seed=1), 200)
    b = take(make_schedule("gamma", 5, seed=1), 200)
    c = take(make_schedule("gamma", 5, seed=2), 200)
    assert a == b
    assert a != c
    counts = Counter(a)
    assert set(counts) == set(range(5))
    assert all(30 <= counts[w] <= 50 for w in range(5))  # equal speeds: about 200 / 5 each


def test_gamma_mean_time_between_pushes_of_one_worker():
    schedule = make_schedule("gamma", 4, seed=3, mean_time=10.0)
    assert isinstance(schedule, Gamma)
    last = [0.0] * 4
    gaps: list[list[float]] = [[] for _ in range(4)]
    clock = 0.0
    for _ in range(2000):
        worker = schedule.next_worker()
        assert schedule.clock >= clock  # simulated time never goes back
        clock = schedule.clock
        gaps[worker].append(clock - last[worker])
        last[worker] = clock
    for worker_gaps in gaps:
        mean = sum(worker_gaps) / len(worker_gaps)
        assert mean == pytest.approx(10.0, rel=0.02)  # Gamma(100, 0.1): mean 10, sd 1
        assert min(worker_gaps) > 5.0  # V = 0.1: batch times stay near their mean


def test_faster_worker_pushes_proportionally_more():
    schedule = make_schedule([2.0, 1.0, 1.0], 3, seed=0, mean_time=1.0)
    counts = Counter(take(schedule, 4000))
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.05)
    assert counts[0] / counts[2] == pytest.approx(2.0, rel=0.05)
    assert counts[1] / counts[2] == pytest.approx(1.0, rel=0.05)


def test_speeds_are_validated():
    with pytest.raises(ValueError, match=r"schedule=.*3 speeds for num_workers=2"):
        make_schedule([1.0, 1.0, 1.0], 2)
    with pytest.raises(ValueError, match=r"schedule=.*1 speeds for num_workers=2"):
        make_schedule([1.0], 2)
    for bad in ([1.0, 0.0], [1.0, -2.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"schedule=.*> 0"):
            make_schedule(bad, 2)


def test_unknown_schedule_and_bad_arguments():
    with pytest.raises(ValueError, match="schedule='fifo'") as info:
        make_schedule("fifo", 2)
    for name in SCHEDULES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="num_workers"):
        make_schedule("round_robin", 0)
    with pytest.raises(ValueError, match="variation"):
        Gamma(2, variation=0.0)


@pytest.mark.parametrize("schedule", [*SCHEDULES, [1.0, 3.0, 0.5, 2.0]])
def test_state_dict_round_trip_resumes_the_exact_sequence(schedule):
    straight = make_schedule(schedule, 4, seed=11)
    take(straight, 13)  # stop mid-block for block_random
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # as inside a Lightning checkpoint
    expected = take(straight, 50)
    clock = straight.clock

    resumed = make_schedule(schedule, 4, seed=99)
    take(resumed, 3)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert take(resumed, 50) == expected
    assert resumed.clock == clock


def test_state_dict_is_a_snapshot():
    schedule = make_schedule("block_random", 5, seed=0)
    take(schedule, 2)
    state = schedule.state_dict()
    expected = take(schedule, 20)
    take(schedule, 7)
    schedule.load_state_dict(state)
    assert take(schedule, 20) == expected
