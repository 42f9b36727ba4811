"""The real transports' failure modes, with real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import PYTHON, ROOT, SCRIPTS, env, free_port  # noqa: E402


def test_an_operation_started_on_a_dead_gloo_peer_is_a_transport_error(tmp_path: Path) -> None:
    """gloo raises when a send or receive *starts* on a pair whose peer is gone. That must read as the
    peer lost (TransportError: the master marks that worker lost and goes on), not as a bug in the
    master's thread, which aborts the whole run (seen once under load: a worker SIGKILLed between two
    messages stopped every rank)."""
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, str(SCRIPTS / "dead_peer.py"), str(rank), port], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    result = json.loads(outputs[0].strip().splitlines()[-1])
    assert result["isend"].startswith("TransportError") and result["irecv"].startswith("TransportError"), result
    assert "rank 1" in result["isend"] and "Connection closed" in result["isend"], result
