"""Launchers other than Lightning's own: torchrun (one node, two nodes of localhost), a SLURM-shaped launch.

Each run checks that the master dealt every sample of every epoch once, and that every rank ends with the
master's final model. Ports are chosen free on 127.0.0.1, so two suites can run at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import PYTHON, SCRIPTS, env, free_port  # noqa: E402

TIMEOUT = 300  # wide: a busy machine is slow, never wrong



def start(cmd: list[str], extra_env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**env(), **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen]) -> tuple[list[int | None], str]:
    deadline, output = time.monotonic() + TIMEOUT, ""
    codes: list[int | None] = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        output += out
        codes.append(p.returncode)
    return codes, output


def reports(out: Path, world: int) -> list[dict | None]:
    files = [out] + [Path(f"{out}.rank{r}") for r in range(1, world)]
    return [json.loads(f.read_text())["dana"] if f.exists() else None for f in files]


def train_cmd(tmp: Path, *args: str) -> list[str]:
    return [str(SCRIPTS / "dana_train.py"), "--root", str(tmp), "--out", str(tmp / "out.json"), "--epochs", "2", *args]


def check_dealt(ranks: list[dict | None], epochs: int = 2) -> None:
    counts = Counter(i for r in ranks if r is not None for _, batch in r["trained"] for i in batch)
    assert sorted(counts) == list(range(384)) and set(counts.values()) == {epochs}


def test_torchrun_one_node(tmp_path: Path) -> None:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=3", f"--master-port={free_port()}",
           *train_cmd(tmp_path, "--devices", "3")]
    codes, output = finish([start(cmd, {})])
    assert codes == [0], output[-4000:]
    assert "TorchElastic" in output or "transport='gloo'" in output
    ranks = reports(tmp_path / "out.json", 3)
    assert all(r is not None and r["status"] == "ok" for r in ranks), output[-4000:]
    check_dealt(ranks)
    assert ranks[0]["params"] == ranks[1]["params"] == ranks[2]["params"]


def test_torchrun_two_nodes_of_localhost(tmp_path: Path) -> None:
    port = free_port()
    procs = [
        start([PYTHON, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={port}", *train_cmd(tmp_path, "--devices", "2", "--num-nodes", "2")], {})
        for node in (0, 1)
    ]
    codes, output = finish(procs)
    assert codes == [0, 0], output[-4000:]
    ranks = reports(tmp_path / "out.json", 4)
    assert all(r is not None and r["status"] == "ok" for r in ranks), output[-4000:]
    check_dealt(ranks)
    assert all(r["params"] == ranks[0]["params"] for r in ranks)


def slurm_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables srun sets, by hand, as Lightning's own SLURM tests do."""
    return {
        "SLURM_NTASKS": str(world), "SLURM_NTASKS_PER_NODE": str(world), "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dana-test", "MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1",
    }


def test_slurm_shaped_launch_keeps_going_when_a_worker_dies(tmp_path: Path) -> None:
    """Each task started by hand with srun's variables (srun --kill-on-bad-exit=0): rank 2 is SIGKILLed
    mid-epoch, the others finish the run, its batches trained by them."""
    port = free_port()
    cmd = [PYTHON, *train_cmd(tmp_path, "--devices", "3", "--kill-rank", "2", "--kill-step", "1", "--timeout", "60",
                              "--slow", "0.03")]
    trace = tmp_path / "trace"
    procs = [start(cmd, {**slurm_env(rank, 3, port), "DANA_TEST_TRACE": str(trace)}) for rank in range(3)]
    codes, output = finish(procs)
    assert codes[0] == 0 and codes[1] == 0 and codes[2] == -signal.SIGKILL, (codes, output[-4000:])
    assert "SLURM" in output or "GLOBAL_RANK: 0" in output
    r0, r1, r2 = reports(tmp_path / "out.json", 3)
    assert r2 is None and r0["status"] == "ok" and r1["status"] == "ok"
    assert "2" in r0["lost_workers"]
    # every sample of both epochs was pushed exactly once, the dead worker's pushes included (its trace
    # survives it); the batch it died in was dealt again
    pushed = Counter(i for r in range(3) for line in Path(f"{trace}.{r}").read_text().splitlines() for i in json.loads(line))
    assert sorted(pushed) == list(range(384)) and set(pushed.values()) == {2}
    assert r0["params"] == r1["params"]
