"""A worker's side of the protocol: one interface to the master, in-process or over a transport.

Rank 0 talks to the master it hosts through :class:`LocalClient`, every other
rank through :class:`RemoteClient`; the strategy never asks which. Each call is
one request and its reply; any failure is raised as one of the errors below,
whose message says what the worker was waiting for.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lightning_dana.dealer import Deal, DealKind
from lightning_dana.faults import MasterFailedError
from lightning_dana.protocol import (
    ERROR_TEXT,
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_REPLY_HEADER,
    TAG_REPLY_PAYLOAD,
    DTYPES,
    ErrorCode,
    Header,
    Msg,
    ProtocolError,
    decode,
    encode,
    header_numel,
    payload_text,
)
from lightning_dana.service import MasterService, Reply
from lightning_dana.transport import Transport, TransportError


class MasterRefusedError(RuntimeError):
    """The master answered ERROR: this worker's message was malformed (the message says why)."""


class TrainingAborted(RuntimeError):
    """The master answered ABORT: the run stops on an error (the message gives the master's reason)."""


class MasterClient:
    """The requests a worker makes; ``stop`` is set once a reply said the run is over."""

    rank: int
    stop: bool = False
    version: int = 0

    def pull(self, out: Tensor) -> None:
        """This worker's parameters (and the master's buffers) into ``out``."""
        self._expect(self._request(Header(Msg.PULL, self.rank), None, out), (Msg.REPLY,))

    def evaluate(self, out: Tensor) -> None:
        """The master's model as it is now (parameters and buffers) into ``out``."""
        self._expect(self._request(Header(Msg.EVAL, self.rank), None, out), (Msg.REPLY,))

    def push(self, payload: Tensor, lrs: list[float], batches: int, out: Tensor) -> Msg:
        """Send a push covering ``batches`` batches; ``out`` receives the next pull. Returns REPLY or REFUSED."""
        header = Header.for_payload(Msg.PUSH, self.rank, payload, batches=batches, lrs=list(lrs))
        return self._expect(self._request(header, payload, out), (Msg.REPLY, Msg.REFUSED))

    def deal(self, epoch: int, new_pass: bool = False) -> Deal:
        """The next batch of this worker's epoch ``epoch`` (or the end of that epoch, or of the run).
        ``new_pass``: the first request of a new iterator over the DataLoader (see Msg.DEAL)."""
        header = Header(Msg.DEAL, self.rank, epoch=epoch, code=int(new_pass))
        kind = self._expect(self._request(header, None, None), (Msg.BATCH, Msg.EPOCH_END, Msg.STOP))
        if kind == Msg.BATCH:
            return Deal(DealKind.BATCH, self._reply.epoch, tuple(self._indices))
        return Deal(DealKind.EPOCH_END if kind == Msg.EPOCH_END else DealKind.STOP, self._reply.epoch)

    def finish(self, batches: int, out: Tensor) -> None:
        """Say this worker is done; returns when the run is over, with the master's final model in ``out``."""
        self._expect(self._request(Header(Msg.DONE, self.rank, batches=batches), None, out), (Msg.FINAL,))

    def fail(self) -> None:
        """Say this worker stopped on an error (its batches are dealt to the others); no reply."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    _reply: Header
    _indices: list[int]

    def _request(self, header: Header, payload: Tensor | None, out: Tensor | None) -> Header:
        raise NotImplementedError

    def _expect(self, reply: Header, kinds: tuple[Msg, ...]) -> Msg:
        self._reply = reply
        if reply.type in (Msg.REPLY, Msg.REFUSED, Msg.FINAL):
            self.version = reply.version  # pushes the master has applied, as of this reply
        self.stop = self.stop or bool(reply.stop)
        if reply.type in kinds:
            return Msg(reply.type)
        if reply.type == Msg.ABORT:
            raise TrainingAborted(f"worker rank {self.rank}: the master stopped the run: {self._text}")
        if reply.type == Msg.ERROR:
            why = ERROR_TEXT.get(ErrorCode(reply.code), f"error code {reply.code}") if reply.code in ErrorCode._value2member_map_ else f"error code {reply.code}"
            raise MasterRefusedError(f"the master refused a message from worker rank {self.rank}: {why} ({self._text})")
        raise ProtocolError(f"the master answered {Msg(reply.type).name}, expected {' or '.join(k.name for k in kinds)}")

    _text: str = ""


class LocalClient(MasterClient):
    """Rank 0's worker: requests go straight to the master's service, under its lock."""

    def __init__(self, service: MasterService, rank: int = 0) -> None:
        self.service = service
        self.rank = rank
        self._seq = 0

    def _request(self, header: Header, payload: Tensor | None, out: Tensor | None) -> Header:
        self._seq += 1
        header.seq = self._seq
        try:
            self.service.check(self.rank, header)
        except ProtocolError as error:
            raise MasterRefusedError(f"the master refused a message from worker rank {self.rank}: {error}") from error
        reply = self.service.handle(self.rank, header, payload, out if out is not None else self.service._like)
        self._read(reply)
        return reply.header

    def _read(self, reply: Reply) -> None:
        if reply.header.type == Msg.BATCH:
            assert reply.payload is not None
            self._indices = reply.payload.tolist()
        elif reply.header.type in (Msg.ABORT, Msg.ERROR) and reply.payload is not None:
            self._text = payload_text(reply.payload)

    def fail(self) -> None:
        self._seq += 1
        self.service.handle(self.rank, Header(Msg.DONE, self.rank, seq=self._seq, code=1), None, self.service._like)


class RemoteClient(MasterClient):
    """Ranks 1..N-1: requests and replies over this worker's channel to the master (global rank 0).

    Args:
        timeout: seconds one request and its reply may take.
        final_timeout: seconds :meth:`finish` waits for the run to end (the other workers' last steps).
    """

    def __init__(
        self, transport: Transport, rank: int, num_lrs: int, timeout: float, final_timeout: float, master: int = 0
    ) -> None:
        self.transport = transport
        self.rank = rank
        self.master = master
        self.timeout = timeout
        self.final_timeout = final_timeout
        self._seq = 0
        self._header = torch.empty(header_numel(), dtype=torch.int64)
        self._reply_buf = torch.empty_like(self._header)
        self.broken = False

    def _request(self, header: Header, payload: Tensor | None, out: Tensor | None) -> Header:
        if self.broken:
            raise MasterFailedError(f"worker rank {self.rank}: the channel to the master failed earlier; it cannot be used again")
        t = self.transport
        self._seq += 1
        header.seq = self._seq
        encode(header, self._header)
        what = f"the master (rank {self.master}) to answer worker rank {self.rank}'s {Msg(header.type).name}"
        timeout = self.final_timeout if header.type == Msg.DONE else self.timeout
        try:
            deadline = time.monotonic() + timeout
            sent = t.isend(self._header, self.master, TAG_HEADER)
            payload_sent = t.isend(payload, self.master, TAG_PAYLOAD) if payload is not None else None
            t.wait(sent, _left(deadline), what)
            t.recv(self._reply_buf, self.master, TAG_REPLY_HEADER, _left(deadline), what)
            reply = decode(self._reply_buf)
            if payload_sent is not None and reply.type in (Msg.REPLY, Msg.REFUSED):
                t.wait(payload_sent, _left(deadline), f"the master to take worker rank {self.rank}'s payload")
            self._receive_payload(reply, out, deadline)
        except (TransportError, ProtocolError) as error:
            self.broken = True
            raise MasterFailedError(
                f"worker rank {self.rank}: no usable answer from the master (rank {self.master}), which may have died "
                f"or stopped: {error}"
            ) from error
        if reply.type in (Msg.ERROR, Msg.ABORT):
            self.broken = True
        return reply

    def _receive_payload(self, reply: Header, out: Tensor | None, deadline: float) -> None:
        t = self.transport
        if reply.numel == 0 and reply.nbytes == 0:
            return
        if reply.type in (Msg.REPLY, Msg.REFUSED, Msg.FINAL):
            assert out is not None
            buffer = t.payload_tensor(out)
            reply.expect_payload(buffer)
            t.recv(buffer, self.master, TAG_REPLY_PAYLOAD, _left(deadline), "the parameters in the master's reply")
            if buffer is not out:
                out.copy_(buffer)
            return
        dtype = DTYPES.get(reply.dtype)
        if dtype not in (torch.int64, torch.uint8) or reply.numel > 1 << 20:
            raise ProtocolError(f"the master's {Msg(reply.type).name} announced {reply.numel} values of {dtype}")
        data = torch.empty(reply.numel, dtype=dtype)
        t.recv(data, self.master, TAG_REPLY_PAYLOAD, _left(deadline), f"the master's {Msg(reply.type).name}")
        if reply.type == Msg.BATCH:
            self._indices = data.tolist()
        else:
            self._text = payload_text(data)

    def fail(self) -> None:
        """Tell the master this worker failed (best effort, bounded: the original error is what matters)."""
        if self.broken:
            return
        self._seq += 1
        encode(Header(Msg.DONE, self.rank, seq=self._seq, code=1), self._header)
        try:
            self.transport.send(self._header, self.master, TAG_HEADER, min(self.timeout, 10.0), "the master to take this worker's failure")
        finally:
            self.broken = True


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
