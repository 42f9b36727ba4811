"""A seeded fuzz of the wire protocol with real processes (issue 9, item 15).

Started once per rank (``--rank R --world W``) over torch.distributed gloo on 127.0.0.1:

* rank 0 hosts a real :class:`~lightning_dana.service.MasterService` (algorithm ``dana``) over
  ``make_transport("gloo", ...)``, and is worker 0 through a ``LocalClient``;
* rank 1 is a good worker (a ``RemoteClient``: pull, pushes, finish);
* ranks 2.. are fuzzers: each sends seeded-random headers (type, worker, seq, numel, nbytes, dtype code,
  learning rates including NaN, Inf, negative and too many or too few, raw garbage, a broken check field)
  and, for a push the master will read, a payload of random values (NaN, Inf, values whose squared norm
  overflows, ...). A fuzzer predicts every answer from the protocol's rules before it reads it, and
  records any answer that differs.

gloo aborts a process that receives a payload of another size than its buffer (documented,
unavoidable), so a fuzzer sends a payload only where its header passes the master's checks, and then
exactly the size it announced. The master closes a fuzzer's channel after an ERROR, so the run is made
of several rounds: each round makes fresh channels and a fresh master, and every fuzzer plays one session
per round (until an ERROR, a DONE, or its message budget).

Every rank writes ``--out.rankR`` (JSON): per round, what it saw.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_dana.client import LocalClient, RemoteClient  # noqa: E402
from lightning_dana.dealer import BatchDealer, sequential_order  # noqa: E402
from lightning_dana.faults import FaultRecord  # noqa: E402
from lightning_dana.protocol import (  # noqa: E402
    DTYPES,
    FIELDS,
    MAGIC,
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_REPLY_HEADER,
    TAG_REPLY_PAYLOAD,
    ErrorCode,
    Header,
    Msg,
    decode,
    encode,
    header_numel,
)
from lightning_dana.rules import make_rule  # noqa: E402
from lightning_dana.service import MasterService  # noqa: E402
from lightning_dana.state import MasterState  # noqa: E402
from lightning_dana.transport import make_transport  # noqa: E402

NUMEL = 40  # the master's model: 40 float32 parameters, no buffers
SAMPLES, BATCH = 32, 4  # the dealt dataset
TIMEOUT = 120.0  # one request and its reply (wide: the machine may be busy)
GOOD_LR = 0.05
#: the master's update rule, round by round (all but dana scale the push by the lr in its header)
ALGORITHMS = ("dana", "asgd", "dana_zero", "nag_asgd", "multi_asgd")
LR_FREE = {"dana"}  # workers push their optimizer's step: the master applies it as it is, whatever the lr
#: finite float64 learning rates that no float32 master can apply (lr * push overflows, or lr itself does)
HUGE_LRS = (1e39, 1e100, 1e300, 1.7976931348623157e308)
MASTER_DTYPE = 1  # float32's code
#: worker -> master requests other than PUSH, and the answer each gets (EVAL: the master's model, if the
#: protocol has it)
REQUESTS = {Msg.PULL: "REPLY", Msg.DEAL: "BATCH|EPOCH_END", Msg.DONE: None}
if hasattr(Msg, "EVAL"):
    REQUESTS[Msg.EVAL] = "REPLY"


# ----------------------------------------------------------------------------- the fuzzer's messages
def random_lrs(rng: random.Random) -> list[float]:
    count = rng.choices([1, 0, 2, 64], weights=[70, 10, 10, 10])[0]
    pool = [lambda: rng.uniform(0, 1), lambda: 0.0, lambda: float("nan"), lambda: float("inf"),
            lambda: -float("inf"), lambda: -rng.uniform(0, 1), lambda: 5e-324, lambda: rng.uniform(1, 10), lambda: -0.0]
    weights = [40, 5, 15, 10, 5, 15, 3, 5, 2]
    return [rng.choices(pool, weights)[0]() for _ in range(count)]


def bad_lrs(rng: random.Random) -> list[float]:
    """Learning rates the master must refuse: not one per param group, or not a finite number >= 0."""
    if rng.random() < 0.4:
        return [rng.uniform(0, 1) for _ in range(rng.choice([0, 2, 3, 64]))]
    return [rng.choice([float("nan"), float("inf"), -float("inf"), -rng.uniform(0, 1), -5e-324, -1e300])]


def valid_lrs(rng: random.Random) -> list[float]:
    return [rng.choices([rng.uniform(0, 1), 0.0, -0.0, 5e-324, rng.uniform(1, 10)], weights=[80, 5, 5, 5, 5])[0]]


def random_payload(rng: random.Random) -> torch.Tensor:
    x = torch.empty(NUMEL).uniform_(-1, 1, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
    kind = rng.choices(["plain", "nan", "inf", "-inf", "overflow", "max", "denormal", "zeros"],
                       weights=[50, 10, 8, 4, 10, 6, 6, 6])[0]
    where = rng.randrange(NUMEL)
    if kind == "nan":
        x[where] = float("nan")
    elif kind == "inf":
        x[where] = float("inf")
    elif kind == "-inf":
        x[where] = -float("inf")
    elif kind == "overflow":  # finite, but the squared norm overflows float32
        x[where] = rng.choice([1e20, -1e25, 3e38])
    elif kind == "max":
        x.fill_(3.4e38)
    elif kind == "denormal":
        x[where] = 1e-45
    elif kind == "zeros":
        x.zero_()
    return x


class Fuzzer:
    """One fuzz rank's session per round: random messages, each answer predicted from the rules."""

    def __init__(self, rank: int, seed: int, skip: tuple[str, ...] = ()) -> None:
        self.rank = rank
        self.faults = tuple(f for f in self.FAULTS if f not in skip)
        self.rng = random.Random(seed * 1000 + rank)
        self.hbuf = torch.empty(header_numel(), dtype=torch.int64)
        self.rbuf = torch.empty_like(self.hbuf)
        self.wild = rank  # which fault the next wild message carries (fuzzers start at different ones)

    FAULTS = ("corrupt", "unknown-type", "negative", "dtype-code", "master-type", "worker", "seq", "push-dtype",
              "push-size", "lr", "huge-lr", "anything")

    def header(self, seq_last: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """A random header (as the int64 buffer sent) and what it is.

        Most messages are well formed (so a session goes deep: refusals, pulls, deals, valid pushes). One in
        eight is "wild": it carries a fault, the kinds taken in turn (so every check is reached), with the
        rest of the message random; the last kind draws every field at random, several faults at once.
        """
        rng = self.rng
        fault = None
        if rng.random() < 0.125:
            fault = self.faults[self.wild % len(self.faults)]
            self.wild += 1
        t: Any = rng.choices([Msg.PUSH, "request", Msg.DONE], weights=[70, 27, 3])[0]
        if t == "request":
            t = rng.choice([m for m in REQUESTS if m != Msg.DONE])
        worker, seq = self.rank, seq_last + 1 if rng.random() < 0.75 else seq_last + rng.randint(2, 1000)
        numel, nbytes, dtype, batches = 0, 0, 0, rng.choice([0, 1, 1, 2, 5])
        lrs: list[float] = []
        corrupt = None
        if fault == "anything":
            t = rng.choice([Msg.PUSH, Msg.PUSH, *REQUESTS, *[m for m in Msg if m not in REQUESTS and m != Msg.PUSH], 6, -1])
            worker = rng.choice([worker, worker, worker, 0, 1, -1, 2**33])
            seq = rng.choice([seq, seq, seq_last, 0, -5, 2**50])
            numel, nbytes, dtype = rng.randint(-3, 100), rng.randint(-3, 400), rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 7, -1])
            batches = rng.choice([0, 1, -1, 2**40])
            lrs = random_lrs(rng)
            corrupt = rng.choice([None, None, None, "magic", "check", "garbage", "lr_count"])
        elif fault == "corrupt":
            corrupt = rng.choice(["magic", "check", "garbage", "lr_count"])
        elif fault == "unknown-type":
            t = rng.choice([v for v in (0, 5, 6, 9, 18, 99, -1, 2**40) if v not in {int(m) for m in Msg}])
        elif fault == "negative":
            which = rng.choice(["seq", "numel", "nbytes", "batches"])
            seq, numel, nbytes, batches = [(-rng.randint(1, 2**40) if name == which else value) for name, value in
                                           (("seq", seq), ("numel", numel), ("nbytes", nbytes), ("batches", batches))]
            if t == Msg.PUSH and which not in ("numel", "nbytes"):
                numel, nbytes, dtype = NUMEL, NUMEL * 4, MASTER_DTYPE
        elif fault == "dtype-code":
            numel, nbytes, dtype = rng.choice([(NUMEL, NUMEL * 4), (0, 0), (3, 7)]) + (rng.choice([0, 7, 99, -1]),)
            if (numel, nbytes) == (0, 0) and dtype == 0:
                dtype = 7
        elif fault == "master-type":
            t = rng.choice([m for m in Msg if m not in REQUESTS and m != Msg.PUSH])
        elif fault == "worker":
            worker = rng.choice([0, 1, self.rank + 1, -1, 2**33])
        elif fault == "seq":
            seq = rng.choice([seq_last, max(seq_last - 1, 0), 0])
        elif fault in ("push-dtype", "push-size", "lr", "huge-lr"):
            t = Msg.PUSH
        if t == Msg.PUSH and fault not in ("anything", "negative", "dtype-code"):
            numel, nbytes, dtype = NUMEL, NUMEL * 4, MASTER_DTYPE
            if fault == "push-dtype":  # a truthful header of another dtype, the right count
                numel, nbytes, dtype = rng.choice([(NUMEL, NUMEL * 8, 2), (NUMEL, NUMEL * 2, 3), (NUMEL, NUMEL * 2, 4),
                                                   (NUMEL, NUMEL * 8, 5), (NUMEL, NUMEL, 6)])
            elif fault == "push-size":
                numel, nbytes = rng.choice([(NUMEL + 1, (NUMEL + 1) * 4), (NUMEL - 1, (NUMEL - 1) * 4), (1, 4),
                                            (10**6, 4 * 10**6), (NUMEL, NUMEL * 4 + 4), (NUMEL, NUMEL * 4 - 1), (0, 0)])
        if t == Msg.PUSH and fault not in ("anything",):
            lrs = bad_lrs(rng) if fault == "lr" else [rng.choice(HUGE_LRS)] if fault == "huge-lr" else valid_lrs(rng)
        fields = dict(type=int(t), worker=worker, seq=seq, numel=numel, nbytes=nbytes, dtype=dtype,
                      epoch=rng.choice([0, 0, 1, 2, -1, 10**6]), batches=batches,
                      code=(1 if rng.random() < 0.5 else 0) if t == Msg.DONE else rng.choice([0, 0, 3]),
                      version=rng.randint(0, 5), lrs=lrs, corrupt=corrupt, fault=fault)
        buf = self.hbuf
        # written field by field, as encode() would, so that negative counts can be sent too
        lr_bits = torch.tensor(lrs + [0.0] * (header_numel() - FIELDS - len(lrs)), dtype=torch.float64).view(torch.int64).tolist()
        values = [MAGIC, int(t), worker, seq, numel, nbytes, dtype, fields["version"], fields["code"], -1,
                  fields["epoch"], batches, 0, len(lrs), 0, *lr_bits]
        values[FIELDS - 1] = _check(values)
        buf.copy_(torch.tensor(values, dtype=torch.int64))
        if corrupt == "magic":
            buf[0] = MAGIC + 1
        elif corrupt == "check":
            buf[FIELDS - 1] ^= 1
        elif corrupt == "garbage":
            buf.copy_(torch.randint(-(2**62), 2**62, (buf.numel(),), generator=torch.Generator().manual_seed(rng.getrandbits(31)), dtype=torch.int64))
        elif corrupt == "lr_count":  # more learning rates than a header holds
            values = buf.tolist()
            values[FIELDS - 2] = header_numel() - FIELDS + 1
            values[FIELDS - 1] = _check(values)
            buf.copy_(torch.tensor(values, dtype=torch.int64))
        return buf, fields


def _check(values: list[int]) -> int:
    """The header's check field over ``values`` (a full header): the protocol's own function."""
    from lightning_dana.protocol import _check as check

    return check(values[1 : FIELDS - 1] + values[FIELDS:])


def predict(fields: dict[str, Any], rank: int, seq_last: int) -> tuple[str, int]:
    """What the master must answer, restated from the protocol's documented rules (not from its code):
    ('ERROR', code), or the message kind the master serves ('PUSH', 'PULL', 'DEAL', 'DONE')."""
    if fields["corrupt"] is not None:
        return "ERROR", int(ErrorCode.BAD_HEADER)  # not a well-formed header of ours
    t = fields["type"]
    if t not in {int(m) for m in Msg}:
        return "ERROR", int(ErrorCode.BAD_HEADER)
    if min(fields["seq"], fields["numel"], fields["nbytes"], fields["batches"]) < 0:
        return "ERROR", int(ErrorCode.BAD_HEADER)
    if (fields["numel"] or fields["nbytes"] or fields["dtype"]) and fields["dtype"] not in DTYPES:
        return "ERROR", int(ErrorCode.WRONG_DTYPE)
    if fields["worker"] != rank:
        return "ERROR", int(ErrorCode.WRONG_WORKER)
    if fields["seq"] <= seq_last:
        return "ERROR", int(ErrorCode.DUPLICATE)
    if t == Msg.PUSH:
        if fields["dtype"] != MASTER_DTYPE:
            return "ERROR", int(ErrorCode.WRONG_DTYPE)
        if fields["numel"] != NUMEL or fields["nbytes"] != NUMEL * 4:
            return "ERROR", int(ErrorCode.WRONG_SIZE)
        lrs = fields["lrs"]
        if len(lrs) != 1 or not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
            return "ERROR", int(ErrorCode.BAD_LR)
        return "PUSH", 0
    if t in REQUESTS:
        return Msg(t).name, 0
    return "ERROR", int(ErrorCode.UNEXPECTED)


def push_verdict(payload: torch.Tensor) -> str:
    if not bool(torch.isfinite(payload).all()):
        return "REFUSED"
    if not bool(torch.isfinite(payload.square().sum())):
        return "REFUSED"
    return "REPLY"


def fuzz_session(f: Fuzzer, t: Any, budget: int, log: list[dict[str, Any]], algorithm: str) -> dict[str, Any]:
    """One session on a fresh channel; returns counts. ``log``: every message and its answer."""
    seq_last, acked, refused, mismatches = 0, 0, 0, []
    ended = "budget"
    for i in range(budget):
        buf, fields = f.header(seq_last)
        kind, code = predict(fields, f.rank, seq_last)
        payload = None
        if kind == "PUSH":
            payload = random_payload(f.rng)
            expected = push_verdict(payload)
            if fields["fault"] == "huge-lr":
                # lr * push is not a float32 number: refused (ERROR or REFUSED), never applied, never an abort;
                # a rule that does not scale by the lr (dana) may also apply the push as it is
                lr_free = algorithm in LR_FREE and expected == "REPLY"
                expected = "REPLY|ERROR|REFUSED" if lr_free else "ERROR|REFUSED"
        elif kind == "DONE":
            expected = "FINAL" if fields["code"] == 0 else "NONE"
        elif kind != "ERROR":
            expected = REQUESTS[Msg[kind]]
        else:
            expected = "ERROR"
        entry = {"i": i, "fields": {k: (str(v) if isinstance(v, float) else v) for k, v in fields.items()},
                 "expected": expected, "code": code}
        sent = t.isend(buf, 0, TAG_HEADER)
        payload_sent = t.isend(payload, 0, TAG_PAYLOAD) if payload is not None else None
        t.wait(sent, TIMEOUT, "the master to take a fuzz header")
        if expected == "NONE":  # DONE with a failure code: the master answers nothing, and stops reading
            entry["actual"] = "NONE"
            log.append(entry)
            ended = "done-failed"
            break
        t.recv(f.rbuf, 0, TAG_REPLY_HEADER, TIMEOUT, "the master's answer to a fuzz message")
        reply = decode(f.rbuf)
        actual = Msg(reply.type).name
        entry["actual"], entry["actual_code"] = actual, reply.code
        if payload_sent is not None and reply.type in (Msg.REPLY, Msg.REFUSED):
            t.wait(payload_sent, TIMEOUT, "the master to take a fuzz payload")
        if reply.numel or reply.nbytes:  # the answer's payload, as its header announces it
            dtype = DTYPES[reply.dtype]
            data = torch.empty(reply.numel, dtype=dtype)
            assert reply.numel * data.element_size() == reply.nbytes and reply.numel <= 1 << 20, reply
            t.recv(data, 0, TAG_REPLY_PAYLOAD, TIMEOUT, "the payload of the master's answer")
            if actual in ("REPLY", "REFUSED", "FINAL"):
                entry["reply_finite"] = bool(torch.isfinite(data).all())
        log.append(entry)
        ok = actual in expected.split("|") and (actual != "ERROR" or reply.code == code or fields["fault"] == "huge-lr")
        if not ok:
            mismatches.append(entry)
        if actual == "REPLY" and kind == "PUSH":
            acked += 1
        if actual == "REFUSED":
            refused += 1
        if kind != "ERROR" and actual != "ERROR":
            seq_last = fields["seq"]
        if actual in ("ERROR", "ABORT", "FINAL"):
            ended = actual
            break
        if not ok:  # the answer was not the rules': stop this session cleanly (a failed worker says so,
            # with a sequence number no earlier message can have used)
            encode(Header(Msg.DONE, f.rank, seq=2**40, code=1), f.hbuf)
            t.send(f.hbuf, 0, TAG_HEADER, TIMEOUT, "the master to take a fuzzer's failure")
            ended = "mismatch"
            break
    else:
        # the budget is spent with the channel still open: say done (failed), the master answers nothing
        encode(Header(Msg.DONE, f.rank, seq=seq_last + 1, code=1), f.hbuf)
        t.send(f.hbuf, 0, TAG_HEADER, TIMEOUT, "the master to take a fuzzer's failure")
    return {"acked_pushes": acked, "refused": refused, "mismatches": mismatches, "ended": ended,
            "messages": len(log)}


# ------------------------------------------------------------------------------ the other two roles
def master_round(world: int, t: Any, algorithm: str) -> dict[str, Any]:
    torch.manual_seed(0)
    state = MasterState(make_rule(algorithm, torch.randn(NUMEL), world, 0.9), [NUMEL], torch.zeros(0))
    faults = FaultRecord(world, 10**9)  # refused pushes in a row never stop this run: fuzzers send many
    service = MasterService(state, faults, t, 1, TIMEOUT, TIMEOUT)
    service.set_dealer(BatchDealer(sequential_order(SAMPLES), SAMPLES, BATCH))
    service.start()
    me = LocalClient(service)
    out = torch.empty(NUMEL)
    error = None
    try:
        me.pull(out)
        me.finish(0, out)  # returns when every other worker is done, lost or broken
    except Exception as e:  # noqa: BLE001 - recorded; the test says what went wrong
        error = f"{type(e).__name__}: {e}"
    joined = service.join(TIMEOUT)
    final = state.eval_payload()
    return {
        "version": state.version,
        "finite": bool(torch.isfinite(state.rule.theta).all()) and bool(torch.isfinite(final).all()),
        "final": final.tolist(),
        "aborted": faults.aborted.reason if faults.aborted is not None else None,
        "states": [faults.state(r).value for r in range(world)],
        "gone": {str(k): v for k, v in faults.gone().items()},
        "joined": joined,
        "error": error,
        "algorithm": algorithm,
    }


def good_round(t: Any, pushes: int, seed: int) -> dict[str, Any]:
    client = RemoteClient(t, 1, 1, TIMEOUT, TIMEOUT * 2)
    pulled = torch.empty(NUMEL)
    client.pull(pulled)
    g = torch.Generator().manual_seed(seed)
    answers: list[str] = []
    try:
        for _ in range(pushes):
            answers.append(Msg(client.push(torch.randn(NUMEL, generator=g) * 0.1, [GOOD_LR], 1, pulled)).name)
        client.finish(0, pulled)
    except Exception as e:  # noqa: BLE001 - recorded; the test says what went wrong
        return {"answers": answers, "final": None, "error": f"{type(e).__name__}: {e}"}
    return {"answers": answers, "final": pulled.tolist(), "error": None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--budget", type=int, default=30, help="messages of a fuzz session at most")
    p.add_argument("--pushes", type=int, default=30, help="the good worker's pushes per round")
    p.add_argument("--skip-faults", default="", help="comma-separated kinds of Fuzzer.FAULTS not to send (diagnosis)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank = args.rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=TIMEOUT))
    report: dict[str, Any] = {"rank": rank, "rounds": []}
    fuzzer = Fuzzer(rank, args.seed, tuple(filter(None, args.skip_faults.split(",")))) if rank >= 2 else None
    start = time.time()
    try:
        for round_ in range(args.rounds):
            t = make_transport("gloo", torch.device("cpu"), TIMEOUT, None)  # fresh channels: a collective
            algorithm = ALGORITHMS[round_ % len(ALGORITHMS)]
            if rank == 0:
                result = master_round(args.world, t, algorithm)
            elif rank == 1:
                result = good_round(t, args.pushes, args.seed * 100 + round_)
            else:
                log: list[dict[str, Any]] = []
                result = fuzz_session(fuzzer, t, args.budget, log, algorithm)
                result["log"] = log
            report["rounds"].append(result)
            dist.barrier()  # the round is over on every rank before the next channels are made
        report["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - the test reads what happened
        report.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    report["seconds"] = time.time() - start
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(report, f)
    if report["status"] != "ok":
        sys.stdout.flush()
        os._exit(1)  # channels may still wait on a peer: do not let a teardown hang on them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
