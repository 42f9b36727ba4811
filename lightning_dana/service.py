"""The master of real training: its state and data dealer behind one lock, served to every worker.

Global rank 0 hosts it. Every remote worker has a serving thread of its own on
its own channel (:mod:`lightning_dana.transport`), so one worker's death or
silence is that worker's problem only: its thread marks it lost, its dealt
batches go back into the epoch, and the other threads go on. Rank 0's own
worker calls :meth:`MasterService.handle` in-process, through the same client
interface (:class:`~lightning_dana.client.LocalClient`).

The lock is held only while a push is applied, a batch dealt or a snapshot
copied, never while waiting for a message. Every message is checked before it
touches the state (:meth:`MasterService.check`); a malformed one gets an ERROR
reply that says why, and the other workers never notice.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dana.dealer import BatchDealer, DealKind
from lightning_dana.faults import FaultRecord, WorkerState
from lightning_dana.protocol import (
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_REPLY_HEADER,
    TAG_REPLY_PAYLOAD,
    ERROR_TEXT,
    AbortCode,
    ErrorCode,
    Header,
    Msg,
    ProtocolError,
    decode,
    encode,
    header_numel,
    text_payload,
)
from lightning_dana.state import MasterDivergedError, MasterState, PushRecord, RefusedPushError
from lightning_dana.transport import SizeMismatchError, Transport, TransportError

log = logging.getLogger(__name__)

MAX_RECORDS = 100_000  # push records kept for GapMonitor; the oldest are dropped if nobody drains them


@dataclass
class Reply:
    header: Header
    payload: Tensor | None = None


class MasterService:
    """Serves the master's state to N workers: rank 0 in-process, ranks 1..N-1 each from a thread.

    Args:
        state: the master's parameters and rule.
        faults: the run's fault record (shared with the strategy and the launcher's watcher).
        transport: rank 0's channels to the other workers (``None`` with one worker).
        num_groups: param groups of the optimizer (learning rates per push).
        timeout: seconds one message may take to arrive once its sender started it.
        idle_timeout: seconds a worker may stay silent before it is declared lost.
    """

    def __init__(
        self,
        state: MasterState,
        faults: FaultRecord,
        transport: Transport | None,
        num_groups: int,
        timeout: float,
        idle_timeout: float,
    ) -> None:
        self.state = state
        self.faults = faults
        self.transport = transport
        self.num_workers = state.rule.num_workers
        self.num_groups = num_groups
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.lock = threading.Condition()  # notified at every push, loss and deal: waiting deals look again
        self._waiting: set[int] = set()  # workers whose DEAL waits for the run's last batches
        self.records: deque[PushRecord] = deque(maxlen=MAX_RECORDS)
        self.dealer: BatchDealer | None = None
        self._ready = threading.Event()
        self._stop_requested = False
        self._resumed_dealer: dict | None = None
        self._seq = [0] * self.num_workers
        self._threads: list[threading.Thread] = []
        template = state.rule.theta
        self._like = torch.empty(state.payload_numel, dtype=template.dtype, device=template.device)

    # ------------------------------------------------------------------- control
    def set_dealer(self, dealer: BatchDealer) -> None:
        with self.lock:
            if self.dealer is not None:  # the DataLoader was made again: go on, batches in flight included
                dealer.take_over(self.dealer)
            elif self._resumed_dealer is not None:  # a resumed run: from the checkpoint's position
                dealer.load_state_dict(self._resumed_dealer)
            self.dealer, self._resumed_dealer = dealer, None
        self._ready.set()  # rank 0 restored its checkpoint before it made its dataloaders: serve from now on

    def _wait_ready(self) -> None:
        if not self._ready.wait(self.idle_timeout):
            raise TransportError(f"rank 0 did not set up its training data within idle_timeout={self.idle_timeout:.0f}s")

    def request_stop(self) -> None:
        """The run is over (rank 0 decided: EarlyStopping, max_steps, ...): every worker stops after its step."""
        with self.lock:
            self._stop_requested = True
            if self.dealer is not None:
                self.dealer.stop()

    @property
    def stopping(self) -> bool:
        """Rank 0 asked every worker to stop after its step in flight (max_steps, by contrast, only ends
        the dealing: the batches already dealt are still trained)."""
        return self._stop_requested

    def start(self) -> None:
        if self.transport is None or self._threads:
            return
        for rank in range(1, self.num_workers):
            thread = threading.Thread(target=self._serve, args=(rank,), name=f"dana-master-{rank}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        """Wait for every serving thread to end; False if one still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in self._threads)

    def lose(self, rank: int, reason: str, broken: bool = False) -> None:
        """``rank`` is gone (its process died, it failed, went silent, or sent a malformed message):
        its batches go back into the epoch before anyone can see it gone."""
        with self.lock:
            if self.faults.state(rank) is not WorkerState.ACTIVE:
                return
            returned = self.dealer.lose(rank) if self.dealer is not None else 0
            (self.faults.break_ if broken else self.faults.lose)(rank, reason)
            self.lock.notify_all()
        if returned:
            log.warning(f"[dana master] {returned} batches dealt to worker rank {rank} go back into the epoch")

    def run_over(self) -> bool:
        """No worker is still training, or the run was aborted."""
        return self.faults.aborted is not None or not self.faults.active()

    # ----------------------------------------------------------------- snapshots
    def eval_payload(self, out: Tensor) -> Tensor:
        with self.lock:
            return out.copy_(self.state.eval_payload())

    def snapshot(self) -> tuple[Tensor, dict, dict | None]:
        """The master's evaluation parameters, full state and dealing position, copied together."""
        with self.lock:
            dealer = self.dealer.state_dict() if self.dealer is not None else None
            return self.state.eval_payload(), self.state.state_dict(), dealer

    def load_state_dict(self, state: dict, dealer: dict | None) -> None:
        with self.lock:
            self.state.load_state_dict(state)
            if dealer is not None and self.dealer is not None:
                self.dealer.load_state_dict(dealer)
            elif dealer is not None:
                self._resumed_dealer = dealer  # the dealer is made later, with the train dataloader

    def drain_records(self) -> list[PushRecord]:
        with self.lock:
            records = list(self.records)
            self.records.clear()
        return records

    # --------------------------------------------------- one message, any worker
    def check(self, rank: int, header: Header) -> None:
        """Raise :class:`ProtocolError` for a message the master must not act on."""
        if header.worker != rank:
            raise ProtocolError(f"rank {rank} sent a header naming worker {header.worker}", ErrorCode.WRONG_WORKER)
        if header.seq <= self._seq[rank]:
            raise ProtocolError(
                f"rank {rank} sent sequence number {header.seq} after {self._seq[rank]}", ErrorCode.DUPLICATE
            )
        state = self.faults.state(rank)
        if state is WorkerState.DONE:
            raise ProtocolError(f"rank {rank} sent {Msg(header.type).name} after it said it was done", ErrorCode.AFTER_DONE)
        if state is not WorkerState.ACTIVE:
            raise ProtocolError(f"rank {rank} is {state.value}; its messages are not read", ErrorCode.BROKEN)
        if header.type == Msg.PUSH:
            header.expect_payload(self._like)
            header.expect_lrs(self.num_groups, torch.finfo(self._like.dtype).max)
        elif header.type not in (Msg.PULL, Msg.DEAL, Msg.DONE, Msg.EVAL):
            raise ProtocolError(f"rank {rank} sent message type {header.type!r} to the master", ErrorCode.UNEXPECTED)
        self._seq[rank] = header.seq

    def handle(self, rank: int, header: Header, payload: Tensor | None, out: Tensor) -> Reply:
        """Answer one checked message; ``out`` (which may alias ``payload``) receives parameters."""
        abort = self.faults.aborted
        if abort is not None and header.type != Msg.DONE:
            return self._abort_reply(rank)
        if header.type in (Msg.PULL, Msg.DEAL):
            self._wait_ready()
        if header.type == Msg.DEAL:
            return self._deal(rank, header.epoch, bool(header.code))
        if header.type == Msg.DONE:
            return self._done(rank, header, out)
        with self.lock:
            if self.faults.aborted is not None:  # checked again under the lock: no push lands after an abort
                return self._abort_reply(rank)
            if header.type == Msg.PULL:
                self.state.pull(rank, out)
                return self._params(Msg.REPLY, rank, out)
            if header.type == Msg.EVAL:
                out.copy_(self.state.eval_payload())
                return self._params(Msg.REPLY, rank, out)
            assert payload is not None
            if self.dealer is not None:
                self.dealer.trained_batches(rank, header.batches)
            self.lock.notify_all()  # batches were trained: a worker waiting for the run's last ones looks again
            try:
                self.records.append(self.state.serve(rank, payload, header.lrs, out))
            except RefusedPushError as refused:
                return self._refused(rank, refused, out)
            except MasterDivergedError as error:
                self.faults.abort(AbortCode.DIVERGED, str(error))
                return self._abort_reply(rank)
        self.faults.accepted()
        return self._params(Msg.REPLY, rank, out)

    def _params(self, kind: Msg, rank: int, out: Tensor, code: int = 0) -> Reply:
        header = Header.for_payload(kind, rank, out, version=self.state.version, code=code, stop=int(self.stopping))
        return Reply(header, out)

    def _refused(self, rank: int, refused: RefusedPushError, out: Tensor) -> Reply:
        """Caller holds the lock. The worker gets the current parameters; refusals in a row stop the run."""
        warnings.warn(f"lightning-dana master: {refused}")
        self.state.pull(rank, out)
        if self.faults.refuse(rank):
            self.faults.abort(
                AbortCode.DIVERGED,
                f"{self.faults.max_refused_in_a_row} pushes in a row were refused (the last: {refused}); training "
                "diverges. The master's model is the last one every refused push left unchanged",
            )
        return self._params(Msg.REFUSED, rank, out, code=int(refused.code))

    def _deal(self, rank: int, epoch: int, new_pass: bool = False) -> Reply:
        self._wait_ready()
        deadline = time.monotonic() + self.idle_timeout
        with self.lock:
            if self.dealer is None:
                raise ProtocolError(f"rank {rank} asked for a batch, but rank 0's training data is not dealt", ErrorCode.UNEXPECTED)
            if new_pass:
                self.dealer.lose(rank)  # batches of an abandoned pass are dealt again, first
            self._waiting.add(rank)
            self.lock.notify_all()  # another waiter may now see every busy worker waiting
            try:
                while (deal := self.dealer.deal(rank, epoch, frozenset(self._waiting))).kind is DealKind.WAIT:
                    if self.faults.aborted is not None:
                        return self._abort_reply(rank)
                    if not self.lock.wait(max(deadline - time.monotonic(), 0.0)) and time.monotonic() >= deadline:
                        raise TransportError(f"the run's last batches were not trained within idle_timeout={self.idle_timeout:.0f}s")
            finally:
                self._waiting.discard(rank)
        if deal.kind is DealKind.BATCH:
            indices = torch.tensor(deal.indices, dtype=torch.int64)
            return Reply(Header.for_payload(Msg.BATCH, rank, indices, epoch=deal.epoch), indices)
        kind = Msg.EPOCH_END if deal.kind is DealKind.EPOCH_END else Msg.STOP
        return Reply(Header(kind, rank, epoch=deal.epoch, stop=int(kind == Msg.STOP)))

    def _done(self, rank: int, header: Header, out: Tensor) -> Reply:
        """A worker stopped. Finished: wait for the run to be over, then hand it the final model."""
        with self.lock:
            if self.dealer is not None:
                self.dealer.trained_batches(rank, header.batches)
                if header.code == 0:
                    self.dealer.release(rank)
                self.lock.notify_all()
        if header.code:
            self.lose(rank, f"worker rank {rank} reported a failure and stopped")
            return Reply(Header(Msg.DONE, rank))  # nothing is sent back to a failed worker
        self.faults.done(rank)
        if not self.faults.wait(self.run_over, self.idle_timeout):
            raise TransportError(
                f"the run did not end within idle_timeout={self.idle_timeout:.0f}s after worker rank {rank} finished "
                f"(workers still active: {self.faults.active()})"
            )
        if self.faults.aborted is not None:
            return self._abort_reply(rank)
        self.eval_payload(out)
        return Reply(Header.for_payload(Msg.FINAL, rank, out, version=self.state.version), out)

    def _abort_reply(self, rank: int) -> Reply:
        abort = self.faults.aborted
        assert abort is not None
        reason = text_payload(abort.reason)
        return Reply(Header.for_payload(Msg.ABORT, rank, reason, code=abort.code, lost_rank=abort.lost_rank), reason)

    # -------------------------------------------------------- a remote worker's thread
    def _serve(self, rank: int) -> None:
        assert self.transport is not None
        t = self.transport
        header_buf = torch.empty(header_numel(), dtype=torch.int64)
        reply_buf = torch.empty_like(header_buf)
        payload = t.payload_tensor(torch.empty_like(self._like))
        try:
            while self.faults.state(rank) is WorkerState.ACTIVE:
                try:
                    t.recv(header_buf, rank, TAG_HEADER, self.idle_timeout, f"the next message of worker rank {rank}")
                except TransportError as error:
                    self.lose(rank, f"worker rank {rank} is lost: {error}")
                    return
                try:
                    header = decode(header_buf)
                    self.check(rank, header)
                except ProtocolError as error:
                    self._refuse_message(rank, error, reply_buf)
                    return
                if header.type == Msg.PUSH:
                    try:
                        t.recv(payload, rank, TAG_PAYLOAD, self.timeout, f"the payload of worker rank {rank}'s push")
                    except SizeMismatchError as error:  # MPI tells; gloo cannot (the header's size was checked)
                        self._refuse_message(rank, ProtocolError(str(error), ErrorCode.WRONG_SIZE), reply_buf)
                        return
                reply = self.handle(rank, header, payload, payload)
                if header.type == Msg.DONE and header.code:
                    return
                self._send(rank, reply, reply_buf)
                if reply.header.type in (Msg.FINAL, Msg.ABORT):
                    return
        except TransportError as error:
            self.lose(rank, f"worker rank {rank} is lost: {error}")
        except BaseException as error:  # noqa: BLE001 - a bug here must stop the run with its cause
            log.exception(f"[dana master] serving worker rank {rank} failed")
            self.faults.abort(AbortCode.MASTER_FAILED, f"the master's thread for worker rank {rank} failed: {error!r}")
            try:
                self._send(rank, self._abort_reply(rank), reply_buf)
            except TransportError:
                pass

    def _refuse_message(self, rank: int, error: ProtocolError, reply_buf: Tensor) -> None:
        """A malformed message: say why, answer ERROR, read nothing more from that worker."""
        message = f"worker rank {rank}: {error}"
        warnings.warn(f"lightning-dana master: {message}; answered ERROR ({ERROR_TEXT[error.code]})")
        self.lose(rank, message, broken=True)
        reason = text_payload(message)
        try:
            self._send(rank, Reply(Header.for_payload(Msg.ERROR, rank, reason, code=int(error.code)), reason), reply_buf)
        except TransportError as send_error:
            log.warning(f"[dana master] {send_error}")

    def _send(self, rank: int, reply: Reply, reply_buf: Tensor) -> None:
        assert self.transport is not None
        t = self.transport
        encode(reply.header, reply_buf)
        handles = [t.isend(reply_buf, rank, TAG_REPLY_HEADER)]
        if reply.payload is not None:
            handles.append(t.isend(reply.payload, rank, TAG_REPLY_PAYLOAD))
        deadline = time.monotonic() + self.timeout
        for handle in handles:
            t.wait(handle, max(deadline - time.monotonic(), 0.001), f"worker rank {rank} to take the master's reply")

