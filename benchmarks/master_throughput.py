"""How fast the real master serves pushes, against the raw gloo round trip of the same size; its memory.

For a 0.27M- and a 25M-parameter flat model (float32), in the same processes:

* raw: a worker sends n values to rank 0, rank 0 sends n values back (dist.isend/irecv,
  one message each way): the floor any parameter server over gloo pays per push;
* master: the same worker pushes through RemoteClient to rank 0's MasterService thread
  (header, payload, apply under the lock, reply header, reply payload), ``dana`` rule.

Prints pushes/s of both and their ratio (goal >= 0.5), then the master's memory for
``dana`` (MasterState.state_bytes() over parameter bytes, goal <= 1.2) and, apart,
its transport buffers; ``dana_zero`` and ``multi_asgd`` are shown for contrast.
Ratios only, measured in this run; no assertion.

    .venv/bin/python benchmarks/master_throughput.py [--scale 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_dana.client import RemoteClient  # noqa: E402
from lightning_dana.dealer import BatchDealer, sequential_order  # noqa: E402
from lightning_dana.faults import FaultRecord  # noqa: E402
from lightning_dana.rules import make_rule  # noqa: E402
from lightning_dana.service import MasterService  # noqa: E402
from lightning_dana.state import MasterState  # noqa: E402
from lightning_dana.transport import make_transport  # noqa: E402

SIZES = {"0.27M": 270_000, "25M": 25_000_000}
ROUNDS = {"0.27M": 300, "25M": 8}  # per worker, at --scale 1
WORKERS = 2  # ranks 1..WORKERS push; rank 0 is the master


def _run(rank: int, port: int, scale: float, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    world = WORKERS + 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    transport = make_transport("gloo", torch.device("cpu"), timeout=600)
    for label, n in SIZES.items():
        rounds = max(3, int(scale * ROUNDS[label]))
        buf = torch.randn(n)
        dist.barrier()
        if rank == 1:  # raw round trips: n values to rank 0, n values back
            start = time.perf_counter()
            for _ in range(rounds):
                dist.send(buf, 0, tag=5)
                dist.recv(buf, 0, tag=6)
            queue.put(("raw", label, rounds / (time.perf_counter() - start)))
        elif rank == 0:
            for _ in range(rounds):
                dist.recv(buf, 1, tag=5)
                dist.send(buf, 1, tag=6)
        for senders in (1, WORKERS):
            dist.barrier()
            if rank == 0:
                state = MasterState(make_rule("dana", torch.zeros(n), world), [n], torch.zeros(0))
                faults = FaultRecord(world, 20)
                for idle in [0, *range(senders + 1, world)]:  # only `senders` workers take part
                    faults.done(idle)
                service = MasterService(state, faults, transport, 1, timeout=600, idle_timeout=600)
                service.set_dealer(BatchDealer(sequential_order(1), 1, 1))
                start = time.perf_counter()
                service.start()
                assert service.join(600), "master did not finish"
                rate = state.version / (time.perf_counter() - start)
                buffers = senders * n * 4  # one payload buffer per serving thread
                queue.put(("master", label, senders, rate, buffers, _memory(n, world)))
                del service, state
            elif rank <= senders:
                client = RemoteClient(transport, rank, 1, timeout=600, final_timeout=600)
                reply, push = torch.empty(n), torch.full((n,), 1e-6)
                client.pull(reply)
                for _ in range(rounds):
                    client.push(push, [0.1], 1, reply)
                client.finish(0, reply)
    dist.barrier()
    dist.destroy_process_group()


def _memory(n: int, world: int) -> dict[str, float]:
    param_bytes = n * 4
    out = {}
    for algorithm in ("dana", "dana_zero", "multi_asgd"):
        state = MasterState(make_rule(algorithm, torch.zeros(n), world), [n], torch.zeros(0))
        out[algorithm] = state.state_bytes() / param_bytes
        del state
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of round trips")
    parser.add_argument("--port", type=int, default=29790)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_run, args=(args.port, args.scale, queue), nprocs=WORKERS + 1, start_method="spawn")
    results = []
    while not queue.empty():
        results.append(queue.get())
    raw = {r[1]: r[2] for r in results if r[0] == "raw"}
    masters = [r for r in results if r[0] == "master"]
    print(f"master throughput (gloo, loopback, {os.cpu_count()} cores, float32, rule 'dana')")
    print(f"{'model':>6} {'workers':>7} {'raw round trips/s':>18} {'master pushes/s':>16} {'ratio':>6}  (goal >= 0.5)")
    for _, label, senders, rate, _, _ in masters:
        print(f"{label:>6} {senders:>7} {raw[label]:>18.1f} {rate:>16.1f} {rate / raw[label]:>6.2f}")
    print("\nmaster memory over parameter bytes (3 workers)   goal for dana <= 1.2")
    for _, label, senders, _, buffers, memory in masters:
        if senders == 1:
            cells = "  ".join(f"{k} {v:.2f}" for k, v in memory.items())
            print(f"{label:>6}: state {cells};  transport buffers {buffers / (SIZES[label] * 4):.2f} (one push/reply buffer per serving thread)")


if __name__ == "__main__":
    main()
