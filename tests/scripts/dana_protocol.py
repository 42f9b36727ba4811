"""The master's protocol over real gloo processes, without Lightning: malformed messages, NaN, stop.

Rank 0 runs the Master's serving thread; rank 1 sends a header that is not ours, then a
proper push (refused: its channel is broken); rank 2 announces a payload of the wrong
size; rank 3 pushes a good step, a NaN step, and stops. Every rank writes a JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_dana.master import Master  # noqa: E402
from lightning_dana.rules import make_rule  # noqa: E402
from lightning_dana.server import ParameterServer  # noqa: E402
from lightning_dana.transport import (  # noqa: E402
    TAG_HEADER, TAG_REPLY_HEADER, MasterRefusedError, Msg, WorkerClient, decode, header_numel, make_transport,
)

SIZES, BUFFERS, WORLD = [6, 4], 2, 4


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    transport = make_transport("gloo", torch.device("cpu"), timeout=20.0)
    numel = sum(SIZES) + BUFFERS
    result: dict = {"rank": rank}
    if rank == 0:
        theta = torch.arange(sum(SIZES), dtype=torch.float32)
        server = ParameterServer(make_rule("dana", theta, WORLD), SIZES, torch.zeros(BUFFERS))
        master = Master(server, transport, WORLD, group_sizes=[sum(SIZES)], timeout=20.0, idle_timeout=30.0)
        master.start()
        result["stopped"] = master.join(60)
        result.update(version=server.version, refused=master.refused, error=repr(master.error),
                      broken=sorted(master.broken), done=sorted(master.done),
                      theta=server.rule.theta.tolist())
    else:
        client = WorkerClient(transport, rank, num_lrs=1, timeout=20.0)
        reply = torch.empty(numel)
        if rank == 1:
            garbage = torch.full((header_numel(1),), 12345, dtype=torch.int64)
            answer = torch.empty(header_numel(1), dtype=torch.int64)
            handle = transport.irecv(answer, 0, TAG_REPLY_HEADER)
            transport.wait(transport.isend(garbage, 0, TAG_HEADER), 20, "the master to take the garbage")
            transport.wait(handle, 20, "the master's answer to the garbage")
            header = decode(answer)
            result["answer"] = [int(header.type), int(header.code)]
            try:
                WorkerClient(transport, rank, 1, 20.0).exchange(Msg.PUSH, torch.zeros(numel), [0.1], reply)
            except MasterRefusedError as error:
                result["second"] = str(error)
        elif rank == 2:
            try:
                client.exchange(Msg.PUSH, torch.zeros(numel + 3), [0.1], reply)
            except MasterRefusedError as error:
                result["error"] = str(error)
        else:
            time.sleep(1.0)  # after the bad messages: the master still serves
            assert client.exchange(Msg.PULL, None, [], reply) == Msg.REPLY
            result["pulled"] = reply.tolist()
            result["good"] = int(client.exchange(Msg.PUSH, torch.ones(numel), [0.1], reply))
            result["after_good"] = reply.tolist()
            nan = torch.ones(numel)
            nan[3] = float("nan")
            result["nan"] = int(client.exchange(Msg.PUSH, nan, [0.1], reply))
            result["after_nan"] = reply.tolist()
            client.send_done()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
