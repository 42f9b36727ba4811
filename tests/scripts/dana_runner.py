"""Run a multi-process script under subprocess, with a deadline, and read the JSON each rank wrote."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent
PYTHON = sys.executable


_PORTS = random.SystemRandom()  # not the seeded `random`: after seed_everything(0) in two pytest workers, the
# module-level generator gives both the same "random" ports; the second rank 0 then fails to bind, and its
# other ranks can join the first run's rendezvous (the likely cause of a CI run that hung there)


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range, so no connection of another
    process (gloo opens many) can take it between this choice and the launcher's bind; random, so
    two suites at once rarely pick the same one, and checked by binding it."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = _PORTS.randrange(max(low - 12000, 1024), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("LOCAL_RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update(PYTHONWARNINGS="ignore::DeprecationWarning", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONFAULTHANDLER="1",
             MASTER_PORT=str(free_port()))
    return e


def run(cmd: list[str], timeout: float, cwd: Path = ROOT, wait_for: list[Path] | None = None,
        extra_env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run ``cmd`` in its own session; kill the whole session at the end (orphaned ranks included).

    ``wait_for``: files to wait for (up to ``timeout``) after the main process exits, for ranks
    that outlive it (when rank 0 is killed).
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _dump_stacks(proc)  # every process's threads, into the output: where it hung
        _kill(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd} ran past {timeout}s; output:\n{out[-12000:]}")
    if wait_for:
        while time.monotonic() - start < timeout and not all(p.exists() for p in wait_for):
            time.sleep(0.5)
    _kill(proc)
    return proc.returncode, out, time.monotonic() - start


def _dump_stacks(proc: subprocess.Popen) -> None:
    """SIGABRT the session: with PYTHONFAULTHANDLER set (env()), each Python process prints every thread's stack."""
    try:
        os.killpg(proc.pid, signal.SIGABRT)
        time.sleep(3)
    except ProcessLookupError:
        pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def train(tmp: Path, *args: str, devices: int = 3, timeout: float = 240, wait_ranks: list[int] | None = None,
          extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run tests/scripts/dana_train.py; return {'rc', 'output', 'seconds', 'ranks': [rank0 json, rank1 json, ...]}.

    ``wait_ranks``: ranks whose report to wait for after the main process ended (they may outlive it).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "out.json"
    cmd = [PYTHON, str(SCRIPTS / "dana_train.py"), "--root", str(tmp), "--out", str(out), "--devices", str(devices), *args]
    files = [out] + [Path(f"{out}.rank{r}") for r in range(1, devices)]
    rc, output, seconds = run(cmd, timeout, wait_for=[files[r] for r in wait_ranks] if wait_ranks else None,
                              extra_env=extra_env)
    ranks = [json.loads(f.read_text()) if f.exists() else None for f in files]
    return {"rc": rc, "output": output, "seconds": seconds, "ranks": ranks}


def train_script(tmp: Path, script: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run tests/scripts/<script> with ``args``; read ``tmp/out.json`` if rank 0 wrote it."""
    rc, output, seconds = run([PYTHON, str(SCRIPTS / script), *args], timeout)
    out = tmp / "out.json"
    return {"rc": rc, "output": output, "seconds": seconds, "json": json.loads(out.read_text()) if out.exists() else None}
