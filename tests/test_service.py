"""The master's serving loop, driven through the in-process transport: no processes, real threads.

Workers are threads with a RemoteClient on an InProcessTransport, exactly the client
the real ranks use; the master is a MasterService with a thread per remote worker.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_dana.client import LocalClient, MasterRefusedError, RemoteClient, TrainingAborted
from lightning_dana.dealer import BatchDealer, DealKind, sequential_order, shuffled_order
from lightning_dana.faults import FaultRecord, MasterFailedError, WorkerState
from lightning_dana.protocol import TAG_HEADER, TAG_PAYLOAD, TAG_REPLY_HEADER, Header, Msg, decode, encode, header_numel
from lightning_dana.rules import make_rule
from lightning_dana.service import MasterService
from lightning_dana.state import MasterState
from lightning_dana.transport import InProcessHub

N_PARAMS = 6
TIMEOUT = 30.0  # wide: these tests assert behaviour, never timing


def make_master(workers: int, algorithm: str = "asgd", samples: int = 40, batch: int = 4, hub=None, epochs=None, **kwargs):
    hub = hub or InProcessHub()
    state = MasterState(make_rule(algorithm, torch.zeros(N_PARAMS), workers), [N_PARAMS], torch.zeros(0))
    faults = FaultRecord(workers, kwargs.pop("max_refused", 5))
    service = MasterService(state, faults, hub.endpoint(0), 1, TIMEOUT, kwargs.pop("idle", TIMEOUT))
    service.set_dealer(BatchDealer(sequential_order(samples), samples, batch, max_epochs=epochs))
    service.start()
    return hub, service


def client(hub: InProcessHub, rank: int) -> RemoteClient:
    return RemoteClient(hub.endpoint(rank), rank, 1, TIMEOUT, TIMEOUT)


def run_worker(c, epochs: int, trained: list, push_value: float = 1.0, delay: threading.Event | None = None) -> None:
    """Pull, then for each epoch: take batches until EPOCH_END, one push per batch; then finish."""
    pulled = torch.empty(N_PARAMS)
    c.pull(pulled)
    for epoch in range(epochs):
        while True:
            deal = c.deal(epoch)
            if deal.kind is not DealKind.BATCH:
                break
            trained.append((c.rank, deal.epoch, deal.indices))
            if delay is not None:
                delay.wait(0.01)
            c.push(torch.full((N_PARAMS,), push_value), [0.1], 1, pulled)
    c.finish(0, pulled)
    trained.append((c.rank, "final", tuple(pulled.tolist())))


def test_every_sample_of_every_epoch_is_trained_once_and_all_get_the_final_model():
    hub, service = make_master(3)
    trained: list = []
    threads = [threading.Thread(target=run_worker, args=(client(hub, r), 2, trained)) for r in (1, 2)]
    for t in threads:
        t.start()
    run_worker(LocalClient(service), 2, trained)  # rank 0 in-process
    for t in threads:
        t.join(TIMEOUT)
    batches = [row for row in trained if row[1] != "final"]
    for epoch in (0, 1):
        seen = sorted(i for _, e, idx in batches if e == epoch for i in idx)
        assert seen == list(range(40)), epoch
    finals = {row[2] for row in trained if row[1] == "final"}
    assert len(finals) == 1  # every worker got the same final model
    assert service.state.version == 20  # 2 epochs x 10 batches, one push each
    assert finals.pop() == pytest.approx((-2.0,) * N_PARAMS)  # 20 pushes of lr 0.1 x 1.0
    assert service.join(TIMEOUT)
    assert all(service.faults.state(r) is WorkerState.DONE for r in range(3))


def test_a_lost_worker_gives_its_batches_back():
    hub, service = make_master(2)
    lost = client(hub, 1)
    pulled = torch.empty(N_PARAMS)
    lost.pull(pulled)
    taken = [lost.deal(0).indices, lost.deal(0).indices]  # dealt (prefetched), never pushed
    hub.close(1)  # the process dies: its channel closes
    assert service.faults.wait(lambda: service.faults.state(1) is WorkerState.LOST, TIMEOUT)
    trained: list = []
    run_worker(LocalClient(service), 1, trained)
    seen = sorted(i for _, e, idx in trained if e == 0 for i in idx)
    assert seen == list(range(40))  # rank 0 trained the lost worker's batches too
    assert set(taken[0]) | set(taken[1]) <= set(seen)
    assert service.faults.state(1) is WorkerState.LOST
    assert "worker rank 1 is lost" in service.faults.gone()[1]


def test_the_last_epoch_waits_for_a_worker_that_may_die_with_its_batches():
    """With the last epoch fully dealt, rank 0 waits while rank 1 holds batches; rank 1 dies and rank 0
    trains them: the run ends with every sample trained, not with a hole."""
    hub, service = make_master(2, epochs=1)
    doomed = client(hub, 1)
    doomed.pull(torch.empty(N_PARAMS))
    taken = [doomed.deal(0).indices for _ in range(2)]
    trained: list = []
    rank0 = threading.Thread(target=run_worker, args=(LocalClient(service), 1, trained))
    rank0.start()
    deadline = time.monotonic() + TIMEOUT
    while 0 not in service._waiting and time.monotonic() < deadline:  # rank 0 has taken the rest and waits
        time.sleep(0.01)
    assert 0 in service._waiting
    hub.close(1)
    rank0.join(TIMEOUT)
    seen = sorted(i for _, e, idx in trained if e == 0 for i in idx)
    assert seen == list(range(40)) and set(taken[0]) <= set(seen)
    assert service.state.version == 10


def test_malformed_messages_get_an_error_and_the_others_are_served():
    hub, service = make_master(3)
    bad = hub.endpoint(1)
    header = torch.empty(header_numel(), dtype=torch.int64)
    reply = torch.empty_like(header)
    # a push of float64 values with the right count: refused before the payload is read
    encode(Header(Msg.PUSH, 1, seq=1, numel=N_PARAMS, nbytes=N_PARAMS * 8, dtype=2, lrs=[0.1]), header)
    bad.send(header, 0, TAG_HEADER, TIMEOUT, "header")
    bad.recv(reply, 0, TAG_REPLY_HEADER, TIMEOUT, "reply")
    assert decode(reply).type == Msg.ERROR
    # a good worker is served as if nothing happened
    good = client(hub, 2)
    pulled = torch.empty(N_PARAMS)
    good.pull(pulled)
    assert good.push(torch.ones(N_PARAMS), [0.1], 1, pulled) == Msg.REPLY
    assert service.faults.state(1) is WorkerState.BROKEN
    assert "float64" in service.faults.gone()[1]


@pytest.mark.parametrize(
    "lrs, payload, expected",
    [
        ([float("nan")], torch.ones(N_PARAMS), Msg.ERROR),  # a NaN lr is never applied
        ([-0.1], torch.ones(N_PARAMS), Msg.ERROR),
        ([0.1, 0.1], torch.ones(N_PARAMS), Msg.ERROR),  # two lrs for one param group
        ([0.1], torch.full((N_PARAMS,), float("nan")), Msg.REFUSED),
        ([0.1], torch.full((N_PARAMS,), 3e38), Msg.REFUSED),  # finite, but would make the master Inf
    ],
)
def test_every_number_the_master_uses_is_checked(lrs, payload, expected):
    hub, service = make_master(2)
    c = client(hub, 1)
    pulled = torch.empty(N_PARAMS)
    c.pull(pulled)
    if expected == Msg.ERROR:
        with pytest.raises(MasterRefusedError):
            c.push(payload, lrs, 1, pulled)
    else:
        assert c.push(payload, lrs, 1, pulled) == Msg.REFUSED
    assert torch.equal(service.state.rule.theta, torch.zeros(N_PARAMS))  # the master is unchanged
    assert service.state.version == 0


def test_duplicate_and_after_done_messages_are_refused():
    hub, service = make_master(2)
    ep = hub.endpoint(1)
    header = torch.empty(header_numel(), dtype=torch.int64)
    reply = torch.empty_like(header)
    payload = torch.ones(N_PARAMS)
    push = Header.for_payload(Msg.PUSH, 1, payload, seq=1, batches=0, lrs=[0.1])
    for _ in range(2):  # the same push twice: the replay is refused
        ep.send(encode(push, header), 0, TAG_HEADER, TIMEOUT, "header")
        if decode(header).seq == 1 and service.state.version == 0:
            ep.send(payload, 0, TAG_PAYLOAD, TIMEOUT, "payload")
        ep.recv(reply, 0, TAG_REPLY_HEADER, TIMEOUT, "reply")
        answer = decode(reply)
        if answer.type == Msg.REPLY:
            ep.recv(torch.empty(N_PARAMS), 0, 74, TIMEOUT, "params")
    assert answer.type == Msg.ERROR and service.state.version == 1


def test_repeated_refusals_stop_the_run_with_the_cause():
    hub, service = make_master(2, max_refused=3)
    c = client(hub, 1)
    pulled = torch.empty(N_PARAMS)
    c.pull(pulled)
    for _ in range(3):
        assert c.push(torch.full((N_PARAMS,), float("inf")), [0.1], 1, pulled) == Msg.REFUSED
    with pytest.raises(TrainingAborted, match="3 pushes in a row were refused"):
        c.push(torch.ones(N_PARAMS), [0.1], 1, pulled)
    assert service.faults.aborted is not None


def test_a_master_failure_reaches_every_worker_with_its_cause():
    hub, service = make_master(3)
    clients = [client(hub, r) for r in (1, 2)]
    pulled = torch.empty(N_PARAMS)
    for c in clients:
        c.pull(pulled)
    service.faults.abort(1, "rank 0 (the master's process) stopped on ValueError: bad lr list")
    for c in clients:
        with pytest.raises(TrainingAborted, match="bad lr list"):
            c.push(torch.ones(N_PARAMS), [0.1], 1, pulled)


def test_a_dead_master_ends_a_worker_with_a_clear_error():
    hub, _ = make_master(2)
    c = client(hub, 1)
    c.pull(torch.empty(N_PARAMS))
    hub.close(0)
    with pytest.raises(MasterFailedError, match="no usable answer from the master"):
        c.deal(0)


def test_fast_workers_take_more_batches():
    hub, service = make_master(2, samples=200, batch=2)
    trained: list = []
    slow = threading.Thread(target=run_worker, args=(client(hub, 1), 1, trained, 1.0, threading.Event()))
    slow.start()
    run_worker(LocalClient(service), 1, trained)
    slow.join(TIMEOUT)
    counts = {r: sum(1 for row in trained if row[0] == r and row[1] == 0) for r in (0, 1)}
    assert counts[0] + counts[1] == 100
    assert counts[0] > counts[1]  # the slow one waits 10 ms a batch; rank 0 does not


def test_dealer_order_is_deterministic_and_resumes():
    order = shuffled_order(10, seed=3)
    assert list(order(0)) == list(shuffled_order(10, seed=3)(0)) and list(order(0)) != list(order(1))
    dealer = BatchDealer(order, 10, 3)
    first = [dealer.deal(0, 0) for _ in range(2)]
    dealer.trained_batches(0, 1)
    state = dealer.state_dict()
    resumed = BatchDealer(order, 10, 3)
    resumed.load_state_dict(state)
    # the batch dealt but not trained at save time is dealt again first, then the order goes on
    assert resumed.deal(1, 0).indices == first[1].indices
    assert resumed.deal(1, 0).indices == dealer.deal(0, 0).indices
    assert [len(dealer.deal(0, 0).indices), dealer.deal(0, 0).kind] == [1, DealKind.EPOCH_END]


def test_a_new_pass_gives_back_what_an_abandoned_pass_was_dealt():
    """A DataLoader iterator dropped after one batch (Lightning makes the DataLoader again with
    reload_dataloaders_every_n_epochs): the worker's next pass starts with that batch, not past it."""
    hub, service = make_master(2)
    worker = client(hub, 1)
    worker.pull(torch.empty(N_PARAMS))
    abandoned = worker.deal(0, new_pass=True).indices  # prefetched by an iterator nobody reads again
    assert worker.deal(0, new_pass=True).indices == abandoned
    assert worker.deal(0).indices != abandoned  # within one pass, batches are not given back


def test_a_dataloader_made_again_goes_on_dealing_with_batches_in_flight_left_with_their_workers():
    hub, service = make_master(2)
    worker = client(hub, 1)
    worker.pull(torch.empty(N_PARAMS))
    in_flight = worker.deal(0).indices
    service.set_dealer(BatchDealer(sequential_order(40), 40, 4))  # rank 0 made its DataLoader again
    rank0 = LocalClient(service)
    following = [rank0.deal(0).indices for _ in range(9)]
    assert in_flight not in following and sorted(i for b in following + [in_flight] for i in b) == list(range(40))

def test_eval_returns_the_masters_model_without_changing_it():
    hub, service = make_master(2, algorithm="dana")
    c = client(hub, 1)
    pulled = torch.empty(N_PARAMS)
    c.pull(pulled)
    c.push(torch.full((N_PARAMS,), 0.5), [0.1], 1, pulled)
    seen = torch.empty(N_PARAMS)
    c.evaluate(seen)
    assert torch.equal(seen, service.state.eval_payload()) and service.state.version == 1
