"""Two gloo ranks on a pair group; rank 1 exits once connected. Rank 0 then starts a send and a
receive on the dead pair and prints how each failed, as JSON (gloo raises at the *start* of an
operation on a pair whose peer is gone, not only in its wait)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_dana.transport import GlooTransport, TransportError

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=120))
transport = GlooTransport({1 - rank: dist.new_group([0, 1], backend="gloo")})
x = torch.zeros(4)
if rank == 1:
    transport.send(x, 0, 1, 120, "the hello")
    os._exit(0)
transport.recv(x, 1, 1, 120, "the hello")
time.sleep(2)  # rank 1 is gone by now: its pair reports the closed connection
result = {}
for op in ("isend", "irecv"):
    try:
        transport.wait(getattr(transport, op)(x, 1, 2), 60, "a message of the dead rank")
        result[op] = "completed"
    except TransportError as error:
        result[op] = f"TransportError: {error}"
    except Exception as error:  # noqa: BLE001 - what the test checks
        result[op] = f"{type(error).__name__}: {error}"
print(json.dumps(result), flush=True)
os._exit(0)
