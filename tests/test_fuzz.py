"""A seeded fuzz of the wire protocol with real processes (issue 9, item 15): tests/scripts/dana_fuzz.py.

Rank 0 hosts a real master over gloo, rank 1 is a good worker, ranks 2.. send seeded-random headers and
payloads. The master must never abort, never apply a bad push, answer every message as the protocol's
rules say, and keep serving the good worker to the end of every round.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import PYTHON, ROOT, SCRIPTS, env, free_port  # noqa: E402

from lightning_dana.protocol import ErrorCode  # noqa: E402

TIMEOUT = 300  # wide: a busy machine is slow, never wrong
WORLD = 5  # the master, a good worker, three fuzzers
ROUNDS, BUDGET, PUSHES = 40, 30, 30



def run_fuzz(tmp: Path, seed: int, *extra: str) -> tuple[list[int | None], str, list[dict | None]]:
    out = tmp / "fuzz.json"
    port = free_port()
    procs = []
    for rank in range(WORLD):
        cmd = [PYTHON, str(SCRIPTS / "dana_fuzz.py"), "--rank", str(rank), "--world", str(WORLD), "--port", str(port),
               "--out", str(out), "--seed", str(seed), "--rounds", str(ROUNDS), "--budget", str(BUDGET),
               "--pushes", str(PUSHES), *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    deadline, output, codes = time.monotonic() + TIMEOUT, "", []
    for rank, p in enumerate(procs):
        try:
            out_text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out_text, _ = p.communicate()
        output += f"--- rank {rank} ---\n{out_text}"
        codes.append(p.returncode)
    reports = []
    for rank in range(WORLD):
        f = Path(f"{out}.rank{rank}")
        reports.append(json.loads(f.read_text()) if f.exists() else None)
    return codes, output, reports


def test_fuzzed_messages_never_abort_the_master_nor_change_it(tmp_path: Path) -> None:
    codes, output, reports = run_fuzz(tmp_path, seed=0)
    assert "terminate called" not in output and "Aborted" not in output, output[-6000:]
    assert codes == [0] * WORLD, (codes, output[-6000:])
    for rank, r in enumerate(reports):
        assert r is not None and r["status"] == "ok", (rank, r and r.get("traceback"), output[-6000:])
    master, good, fuzzers = reports[0], reports[1], reports[2:]
    problems: list[str] = []  # every round is checked, and every problem reported, the first cause first
    seen_errors: Counter = Counter()
    answers: Counter = Counter()
    for i in range(ROUNDS):
        m, g = master["rounds"][i], good["rounds"][i]
        sessions = [f["rounds"][i] for f in fuzzers]
        where = f"round {i} (algorithm {m['algorithm']!r})"
        if m["aborted"] is not None or m["error"] is not None:
            problems.append(f"{where}: the master aborted: {m['aborted'] or m['error']}")
        if not m["finite"]:
            problems.append(f"{where}: the master's parameters are not finite")
        for rank, s in enumerate(sessions, start=2):
            for e in s["mismatches"][:2]:
                problems.append(f"{where}: fuzzer rank {rank}: expected {e['expected']} (code {e['code']}), "
                                f"got {e['actual']} (code {e.get('actual_code')}) for {e['fields']}")
        if not m["joined"]:
            problems.append(f"{where}: a serving thread did not end")
        # the good worker was served to the end: every push applied, and it got the master's final model
        if g["error"] is not None or g["answers"] != ["REPLY"] * PUSHES:
            problems.append(f"{where}: the good worker was not served to the end: {Counter(g['answers'])}, {g['error']}")
        elif g["final"] != m["final"]:
            problems.append(f"{where}: the good worker's final model is not the master's")
        # nothing was applied but the good worker's pushes and the fuzzers' valid ones (answered REPLY)
        applied = PUSHES + sum(s["acked_pushes"] for s in sessions)
        if m["version"] != applied:
            problems.append(f"{where}: the master's version is {m['version']}, {applied} pushes were answered REPLY")
        if m["states"][:2] != ["done", "done"]:
            problems.append(f"{where}: ranks 0 and 1 ended {m['states'][:2]}")
        for rank, s in enumerate(sessions, start=2):
            expected = {"ERROR": "broken", "FINAL": "done", "ABORT": m["states"][rank]}.get(s["ended"], "lost")
            if m["states"][rank] != expected:
                problems.append(f"{where}: fuzzer rank {rank} ended {s['ended']!r}, the master marked it "
                                f"{m['states'][rank]!r}: {m['gone'].get(str(rank))}")
            for entry in s["log"]:
                answers[entry["actual"]] += 1
                if entry["actual"] == "ERROR":
                    seen_errors[ErrorCode(entry["actual_code"]).name] += 1
                if entry.get("reply_finite") is False:
                    problems.append(f"{where}: fuzzer rank {rank} was sent non-finite parameters")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:12])
    # the fuzz reached every check it is meant to reach (a weaker fuzz would pass without testing much)
    assert {"BAD_HEADER", "WRONG_DTYPE", "WRONG_SIZE", "BAD_LR", "WRONG_WORKER", "DUPLICATE", "UNEXPECTED"} <= set(seen_errors), seen_errors
    assert answers["REFUSED"] >= 10 and answers["REPLY"] >= 50 and answers["BATCH"] >= 5, answers
    assert sum(answers.values()) >= 400, answers
    assert all(math.isfinite(v) for v in master["rounds"][-1]["final"])


# ------------------------------------------------ the numbers the master multiplies by: in-process, exact
def _asgd_master(workers: int = 3):
    import torch

    from lightning_dana.client import RemoteClient
    from lightning_dana.dealer import BatchDealer, sequential_order
    from lightning_dana.faults import FaultRecord
    from lightning_dana.rules import make_rule
    from lightning_dana.service import MasterService
    from lightning_dana.state import MasterState
    from lightning_dana.transport import InProcessHub

    hub = InProcessHub()
    state = MasterState(make_rule("asgd", torch.zeros(6), workers), [6], torch.zeros(0))
    service = MasterService(state, FaultRecord(workers, 20), hub.endpoint(0), 1, 60.0, 60.0)
    service.set_dealer(BatchDealer(sequential_order(8), 8, 2))
    service.start()
    clients = [RemoteClient(hub.endpoint(r), r, 1, 60.0, 60.0) for r in range(1, workers)]
    return service, clients


def _push(client, value: float, lr: float):
    import torch

    from lightning_dana.client import MasterRefusedError, TrainingAborted

    pulled = torch.empty(6)
    try:
        return client.push(torch.full((6,), value), [lr], 1, pulled).name
    except (MasterRefusedError, TrainingAborted) as error:
        return type(error).__name__


def test_a_learning_rate_no_float32_master_can_apply_is_refused_and_the_others_go_on() -> None:
    """lr = 1e39 is a finite float64 (the header's type) that the float32 master cannot apply: refused
    (ERROR or REFUSED), never applied, and the run is not aborted for the other workers."""
    import torch

    for lr in (1e39, 1e300):
        service, (hostile, good) = _asgd_master()
        for c in (hostile, good):
            c.pull(torch.empty(6))
        answer = _push(hostile, 1.0, lr)
        assert answer in ("MasterRefusedError", "REFUSED"), (lr, answer, service.faults.aborted)
        assert service.faults.aborted is None, (lr, service.faults.aborted)
        assert torch.equal(service.state.rule.theta, torch.zeros(6)) and service.state.version == 0
        assert _push(good, 1.0, 0.1) == "REPLY"


def test_a_push_that_would_make_the_master_infinite_is_refused_and_the_master_kept() -> None:
    """issue 9, item 4: two pushes of lr 3e38: the first leaves the master finite (-3e38), the second
    would make it -inf; it is refused, the master keeps its finite parameters, the others go on."""
    import torch

    service, (hostile, good) = _asgd_master()
    for c in (hostile, good):
        c.pull(torch.empty(6))
    first = _push(hostile, 1.0, 3e38)  # a step of 3e38: refused at once (within 1e-3 of float32's range)
    assert first in ("REPLY", "REFUSED"), first
    before = service.state.rule.theta.clone()
    assert bool(torch.isfinite(before).all())
    answer = _push(hostile, 1.0, 3e38)
    assert answer in ("REFUSED", "MasterRefusedError"), (answer, service.faults.aborted)
    assert service.faults.aborted is None, service.faults.aborted
    assert torch.equal(service.state.rule.theta, before) and service.state.version == int(first == "REPLY")
    assert _push(good, 1.0, 0.1) == "REPLY"
