"""The parameter server of real training: a :class:`ParameterServer` behind a lock, served by a thread.

It lives in global rank 0, which is also worker 0 and runs Lightning's training
loop like every rank (barriers, checkpoints and ``sync_dist`` need all ranks).
Rank 0's own pushes are applied in-process (:meth:`Master.serve_local`); every
other worker's push arrives over a :class:`~lightning_dana.transport.Transport`
and the serving thread applies them one at a time, in arrival order. The lock
is held only while a push is applied or a snapshot copied, never while waiting
for a message.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque

import torch
from torch import Tensor

from lightning_dana.flat import GroupExpander
from lightning_dana.rules import LR
from lightning_dana.server import NonFinitePushError, ParameterServer, PushRecord
from lightning_dana.transport import (
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_REPLY_HEADER,
    TAG_REPLY_PAYLOAD,
    AbortCode,
    ErrorCode,
    Header,
    Msg,
    ProtocolError,
    Transport,
    TransportError,
    decode,
    encode,
    header_numel,
)

log = logging.getLogger(__name__)

MAX_RECORDS = 100_000  # push records kept for GapMonitor; the oldest are dropped if nobody drains them


class LRExpander(GroupExpander):
    """A push's per-group learning rates, checked against the model's param groups, then expanded."""

    def __call__(self, values: list[float]) -> LR:
        if len(values) != len(self.group_sizes):
            raise ProtocolError(f"push carries {len(values)} learning rates, the model has {len(self.group_sizes)} param groups")
        return super().__call__(values)


class Master:
    """Rank 0's parameter server: in-process for worker 0, a serving thread for workers 1..N-1."""

    def __init__(
        self,
        server: ParameterServer,
        transport: Transport,
        num_workers: int,
        group_sizes: list[int],
        timeout: float,
        idle_timeout: float,
    ) -> None:
        self.server = server
        self.transport = transport
        self.num_workers = num_workers
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        template = server.rule.theta
        self.expand_lr = LRExpander(group_sizes, template.dtype, template.device)
        self._local_expand = LRExpander(group_sizes, template.dtype, template.device)
        self.lock = threading.Lock()
        self.records: deque[PushRecord] = deque(maxlen=MAX_RECORDS)
        self.refused = [0] * num_workers  # NaN/Inf pushes refused, per worker
        self.done: set[int] = set()  # remote workers that sent DONE
        self.lost: dict[int, str] = {}  # rank -> why it is considered lost
        self.broken: set[int] = set()  # ranks whose messages are no longer read
        self.notified: set[int] = set()  # ranks told to ABORT
        self.abort_code: int | None = None
        self.abort_rank = -1
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._header = torch.empty(header_numel(len(group_sizes)), dtype=torch.int64)
        self._reply = torch.empty_like(self._header)
        # one buffer receives a push and then holds the reply (ParameterServer.serve allows aliasing)
        self._buffer = transport.payload_tensor(torch.empty(server.payload_numel, dtype=template.dtype, device=template.device))
        self.bytes_in = 0
        self.bytes_out = 0

    # ----------------------------------------------------------------- in-process (rank 0)
    def serve_local(self, worker: int, payload: Tensor, lrs: list[float], out: Tensor) -> Msg:
        """Rank 0's own push: apply it and write its next parameters into ``out``."""
        with self.lock:
            return self._apply(worker, payload, self._local_expand(lrs), out)

    def _apply(self, worker: int, payload: Tensor, lr: LR, out: Tensor) -> Msg:
        """Serve one push (caller holds the lock); a NaN/Inf push is refused and answered with the current parameters."""
        try:
            self.records.append(self.server.serve(worker, payload, lr, out))
            return Msg.REPLY
        except NonFinitePushError:
            self.refused[worker] += 1
            self.server.pull(worker, out)
            return Msg.REFUSED

    def pull_local(self, worker: int, out: Tensor) -> None:
        with self.lock:
            self.server.pull(worker, out)

    def eval_payload(self, out: Tensor) -> Tensor:
        with self.lock:
            return out.copy_(self.server.eval_payload())

    def snapshot(self) -> tuple[Tensor, dict]:
        """The master's evaluation parameters and full state, copied together under the lock."""
        with self.lock:
            return self.server.eval_payload(), self.server.state_dict()  # both are copies

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self.server.load_state_dict(state)

    def drain_records(self) -> list[PushRecord]:
        with self.lock:
            records = list(self.records)
            self.records.clear()
        return records

    def state_bytes(self) -> int:
        return self.server.state_bytes()

    def buffer_bytes(self) -> int:
        """Bytes of the serving thread's message buffers (beside the server's state)."""
        return self._buffer.numel() * self._buffer.element_size() + 2 * self._header.numel() * 8

    # ------------------------------------------------------------------------ control
    def start(self) -> None:
        if self.num_workers > 1 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dana-master", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def mark_lost(self, rank: int, reason: str) -> None:
        """A worker is gone (its process exited, or it reported a failure): stop every rank."""
        if rank not in self.lost:
            self.lost[rank] = reason
            log.error(f"[dana master] {reason}")
        self.abort(AbortCode.WORKER_LOST, rank)

    def abort(self, code: int = AbortCode.MASTER_FAILED, rank: int = -1) -> None:
        """Answer every further push with ABORT, so remote workers stop with a clear error."""
        if self.abort_code is None:
            self.abort_code, self.abort_rank = int(code), rank

    def join(self, timeout: float) -> bool:
        """Wait for the serving thread to end; False if it is still running after ``timeout``."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _remote_active(self) -> set[int]:
        gone = self.done | set(self.lost) | self.broken | self.notified
        return {r for r in range(1, self.num_workers) if r not in gone}

    # ------------------------------------------------------------------ serving thread
    def _run(self) -> None:
        try:
            while self._remote_active():
                self._serve_one()
        except BaseException as error:  # noqa: BLE001 - reported to rank 0's training loop
            self.error = error
            log.error(f"[dana master] stopped: {error}")

    def _serve_one(self) -> None:
        t = self.transport
        handle = t.irecv(self._header, None, TAG_HEADER)
        src = t.wait(handle, self.idle_timeout, f"a message from any worker ({sorted(self._remote_active())} active)")
        try:
            header = decode(self._header)
        except ProtocolError as error:
            self._refuse(src, ErrorCode.BAD_HEADER, f"malformed header from rank {src}: {error}")
            return
        if src is None:
            src = header.worker
        if src in self.broken:
            self._send(src, Header(Msg.ERROR, src, self._buffer.numel(), code=ErrorCode.BROKEN))
            return
        if header.worker != src:
            self._refuse(src, ErrorCode.WRONG_WORKER, f"rank {src} sent a header naming worker {header.worker}")
            return
        if header.type == Msg.DONE:
            self.done.add(src)
            if header.code:
                self.mark_lost(src, f"worker rank {src} reported a failure and stopped")
            return
        if header.type == Msg.PULL:
            if self.abort_code is not None:
                return self._send_abort(src)
            with self.lock:
                self.server.pull(src, self._buffer)
            self._send(src, Header(Msg.REPLY, src, self._buffer.numel(), self.server.version), self._buffer)
            return
        if header.type != Msg.PUSH:
            self._refuse(src, ErrorCode.UNEXPECTED, f"rank {src} sent message type {header.type!r} to the master")
            return
        if header.numel != self._buffer.numel():
            self._refuse(
                src,
                ErrorCode.WRONG_SIZE,
                f"rank {src} announced a push of {header.numel} values, the master's model has {self._buffer.numel()}",
            )
            return
        t.wait(t.irecv(self._buffer, src, TAG_PAYLOAD), self.timeout, f"the payload of rank {src}'s push")
        self.bytes_in += self._buffer.numel() * self._buffer.element_size()
        if self.abort_code is not None:
            return self._send_abort(src)
        lr = self.expand_lr(header.lrs)
        with self.lock:
            kind = self._apply(src, self._buffer, lr, self._buffer)
            version = self.server.version
        if kind == Msg.REFUSED:
            warnings.warn(f"lightning-dana: the master refused a push with NaN/Inf from worker rank {src}; master unchanged")
        self._send(src, Header(kind, src, self._buffer.numel(), version), self._buffer)

    def _refuse(self, src: int | None, code: ErrorCode, message: str) -> None:
        """A malformed message: report it, answer ERROR, never read from that rank again."""
        warnings.warn(f"lightning-dana master: {message}; answered ERROR")
        log.error(f"[dana master] {message}")
        if src is None:
            return
        self.broken.add(src)
        self._send(src, Header(Msg.ERROR, src, self._buffer.numel(), code=code))

    def _send_abort(self, src: int) -> None:
        self.notified.add(src)
        self._send(src, Header(Msg.ABORT, src, version=self.abort_rank, code=self.abort_code or 0))

    def _send(self, dst: int, header: Header, payload: Tensor | None = None) -> None:
        t = self.transport
        encode(header, self._reply)
        handles = [t.isend(self._reply, dst, TAG_REPLY_HEADER)]
        if payload is not None:
            handles.append(t.isend(payload, dst, TAG_REPLY_PAYLOAD))
            self.bytes_out += payload.numel() * payload.element_size()
        deadline = time.monotonic() + self.timeout
        for handle in handles:
            try:
                t.wait(handle, max(deadline - time.monotonic(), 0.001), f"worker rank {dst} to take the master's reply")
            except TransportError as error:
                if header.type in (Msg.ERROR, Msg.ABORT):  # the worker is going away anyway
                    log.warning(f"[dana master] {error}")
                    return
                raise

