"""Messages between real workers and the master: one header and one flat buffer each way.

Every message starts with a fixed-size int64 header (:class:`Header`), received
from *any* worker; a push's payload then comes from that same sender, after the
header's size was checked. Why: gloo receives from any source but aborts the
process on a receive buffer of the wrong size, and NCCL cannot receive from any
source at all, so the small fixed-size header is what says who is next and how
much follows. A reply is a header, then (for ``REPLY`` and ``REFUSED``) the
worker's next parameters as one flat buffer.

Three transports share that protocol:

* ``gloo``: headers and payloads on one gloo group (CPU tensors);
* ``nccl``: headers on a gloo group (the control plane), payloads on an NCCL group
  (CUDA tensors), from the sender the header named;
* ``mpi``: mpi4py on a duplicate of ``COMM_WORLD`` (``Irecv`` from ``ANY_SOURCE``),
  for jobs started by ``mpiexec``.

Every wait has a deadline; gloo closes a group's connections when a wait times
out, so a timeout here is final and is reported as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TRANSPORTS = ("auto", "gloo", "nccl", "mpi")

MAGIC = 0x44414E41  # "DANA"
FIELDS = 8  # magic, type, worker, numel, version, code, lr count, check
_MASK = (1 << 62) - 1

# tags keep headers and payloads apart on gloo (NCCL ignores tags: order per pair does it)
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY_HEADER, TAG_REPLY_PAYLOAD = 71, 72, 73, 74


class Msg(IntEnum):
    # worker -> master
    PUSH = 1  # a push; payload follows
    PULL = 2  # ask for this worker's parameters (start of training); no payload
    DONE = 3  # this worker stopped (code 0: finished, 1: failed); no payload, no reply
    # master -> worker
    REPLY = 10  # the push was applied; the worker's next parameters follow
    REFUSED = 11  # the push held NaN/Inf and was refused; the current parameters follow
    ERROR = 12  # the message was malformed; ``code`` says why; nothing follows
    ABORT = 13  # training is stopping (``code`` says why, ``version`` the lost rank); nothing follows


class ErrorCode(IntEnum):
    BAD_HEADER = 1
    WRONG_SIZE = 2
    WRONG_WORKER = 3
    UNEXPECTED = 4
    BROKEN = 5  # an earlier message from this worker was refused; nothing from it is read any more


class AbortCode(IntEnum):
    WORKER_LOST = 1
    MASTER_FAILED = 2


class TransportError(RuntimeError):
    """A message could not be sent or received in time, or its peer is gone."""


class ProtocolError(ValueError):
    """A header that is not one of ours, or does not match what the receiver expects."""


@dataclass
class Header:
    type: int
    worker: int
    numel: int = 0
    version: int = 0
    code: int = 0
    lrs: list[float] = field(default_factory=list)


def header_numel(num_lrs: int) -> int:
    """Size of the header for a model whose optimizer has ``num_lrs`` param groups."""
    return FIELDS + num_lrs


def _check(values: list[int]) -> int:
    total = MAGIC
    for i, v in enumerate(values):
        total = (total * 1000003 + (v & _MASK) + i) & _MASK
    return total


def encode(header: Header, out: Tensor) -> Tensor:
    """Write ``header`` into the int64 tensor ``out`` (lrs as float64 bit patterns, padded with zeros)."""
    num_lrs = out.numel() - FIELDS
    if len(header.lrs) > num_lrs:
        raise ProtocolError(f"{len(header.lrs)} learning rates do not fit a header made for {num_lrs}")
    lrs = list(header.lrs) + [0.0] * (num_lrs - len(header.lrs))
    lr_bits = torch.tensor(lrs, dtype=torch.float64).view(torch.int64).tolist() if lrs else []
    values = [header.type, header.worker, header.numel, header.version, header.code, len(header.lrs)]
    values.append(_check(values + lr_bits))
    out.copy_(torch.tensor([MAGIC, *values, *lr_bits], dtype=torch.int64))
    return out


def decode(buf: Tensor) -> Header:
    """Read a header; raise :class:`ProtocolError` for anything that is not a well-formed header of ours."""
    values = buf.tolist()
    if len(values) < FIELDS or values[0] != MAGIC:
        raise ProtocolError(f"not a lightning-dana header (magic {values[0] if values else None!r}, expected {MAGIC})")
    msg_type, worker, numel, version, code, nlr, check = values[1:FIELDS]
    lr_bits = values[FIELDS:]
    if check != _check([msg_type, worker, numel, version, code, nlr] + lr_bits):
        raise ProtocolError("header check field does not match its contents (corrupted or foreign message)")
    if msg_type not in Msg.__members__.values():
        raise ProtocolError(f"unknown message type {msg_type}")
    if not 0 <= nlr <= len(lr_bits) or numel < 0:
        raise ProtocolError(f"header holds lr count {nlr} and numel {numel}, which cannot be")
    lrs = torch.tensor(lr_bits[:nlr], dtype=torch.int64).view(torch.float64).tolist() if nlr else []
    return Header(Msg(msg_type), worker, numel, version, code, lrs)


# --------------------------------------------------------------------------------------
# transports
# --------------------------------------------------------------------------------------
class Transport:
    """Point-to-point messages between global ranks, every wait bounded by a deadline."""

    name = "base"

    def isend(self, tensor: Tensor, dst: int, tag: int) -> Any:
        raise NotImplementedError

    def irecv(self, tensor: Tensor, src: int | None, tag: int) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float, what: str) -> int | None:
        """Wait for ``handle``; return the sender of a receive from any source."""
        raise NotImplementedError

    def payload_tensor(self, tensor: Tensor) -> Tensor:
        """The tensor payloads travel in (NCCL: the CUDA tensor itself)."""
        return tensor


def _timeout_error(what: str, timeout: float, error: BaseException) -> TransportError:
    text = str(error)
    if "Timed out" in text or "timeout" in text.lower():
        return TransportError(f"timed out after {timeout:.0f}s waiting for {what}")
    return TransportError(f"lost the connection while waiting for {what}: {text.strip()}")


class GlooTransport(Transport):
    """torch.distributed point-to-point on a gloo group of its own (the master's group)."""

    name = "gloo"

    def __init__(self, group: Any, data_group: Any | None = None) -> None:
        self.group = group
        self.data_group = data_group or group

    def _group_for(self, tag: int) -> Any:
        return self.data_group if tag in (TAG_PAYLOAD, TAG_REPLY_PAYLOAD) else self.group

    def isend(self, tensor: Tensor, dst: int, tag: int) -> Any:
        return dist.isend(tensor, dst, group=self._group_for(tag), tag=tag)

    def irecv(self, tensor: Tensor, src: int | None, tag: int) -> Any:
        return dist.irecv(tensor, src, group=self._group_for(tag), tag=tag)

    def wait(self, handle: Any, timeout: float, what: str) -> int | None:
        try:
            handle.wait(timeout=timedelta(seconds=timeout))
        except RuntimeError as error:
            raise _timeout_error(what, timeout, error) from error
        try:
            return int(handle._source_rank())
        except (RuntimeError, ValueError, AttributeError):
            return None


class NcclTransport(GlooTransport):
    """Headers on a gloo group (any source), payloads on an NCCL group, from the sender the header named."""

    name = "nccl"

    def wait(self, handle: Any, timeout: float, what: str) -> int | None:
        if isinstance(handle, tuple):  # an NCCL payload: wait for the stream work, then the host
            work, device = handle
            try:
                work.wait()
                torch.cuda.synchronize(device)
            except RuntimeError as error:
                raise _timeout_error(what, timeout, error) from error
            return None
        return super().wait(handle, timeout, what)

    def isend(self, tensor: Tensor, dst: int, tag: int) -> Any:
        work = super().isend(tensor, dst, tag)
        return (work, tensor.device) if tensor.is_cuda else work

    def irecv(self, tensor: Tensor, src: int | None, tag: int) -> Any:
        work = super().irecv(tensor, src, tag)
        return (work, tensor.device) if tensor.is_cuda else work


class MPITransport(Transport):
    """mpi4py on a duplicate of COMM_WORLD: buffers are byte views of the tensors (CPU only)."""

    name = "mpi"

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm

    def _buffer(self, tensor: Tensor) -> list:
        if tensor.is_cuda:
            raise TransportError("transport='mpi' carries CPU tensors only; use transport='nccl' for CUDA")
        return [tensor.view(torch.uint8).numpy(), self.MPI.BYTE]

    def isend(self, tensor: Tensor, dst: int, tag: int) -> Any:
        return (self.comm.Isend(self._buffer(tensor), dest=dst, tag=tag), tensor)

    def irecv(self, tensor: Tensor, src: int | None, tag: int) -> Any:
        source = self.MPI.ANY_SOURCE if src is None else src
        return (self.comm.Irecv(self._buffer(tensor), source=source, tag=tag), tensor)

    def wait(self, handle: Any, timeout: float, what: str) -> int | None:
        request, _keepalive = handle
        status = self.MPI.Status()
        deadline = time.monotonic() + timeout
        spins = 0
        while not request.Test(status):
            if time.monotonic() > deadline:
                try:
                    request.Cancel()
                except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                    pass
                raise TransportError(f"timed out after {timeout:.0f}s waiting for {what}")
            spins += 1
            time.sleep(0 if spins < 200 else 0.0005)  # spin briefly, then yield the core
        source = status.Get_source()
        return int(source) if source >= 0 else None


def make_transport(kind: str, device: torch.device, timeout: float, cluster_environment: Any = None) -> Transport:
    """Create the master's channels; a collective: every rank calls it, in the same order.

    ``auto`` picks ``mpi`` under Lightning's MPIEnvironment with CPU tensors, ``nccl``
    for CUDA tensors, else ``gloo``.
    """
    kind = resolve_transport(kind, device, cluster_environment)
    pg_timeout = timedelta(seconds=timeout)
    if kind == "mpi":
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() != dist.get_world_size():
            raise TransportError(
                f"transport='mpi' needs every worker started by mpiexec (MPI world size "
                f"{MPI.COMM_WORLD.Get_size()}, torch.distributed world size {dist.get_world_size()}); "
                "launch with `mpiexec -n N python train.py` or use transport='gloo'"
            )
        return MPITransport(MPI.COMM_WORLD.Dup())
    control = dist.new_group(backend="gloo", timeout=pg_timeout)
    if kind == "nccl":
        if device.type != "cuda":
            raise TransportError(f"transport='nccl' needs CUDA tensors, the model is on {device}; use 'gloo'")
        return NcclTransport(control, dist.new_group(backend="nccl", timeout=pg_timeout))
    if device.type != "cpu":
        raise TransportError(
            f"transport='gloo' carries CPU tensors, the model is on {device}; use transport='nccl' (or 'auto')"
        )
    return GlooTransport(control)


def resolve_transport(kind: str, device: torch.device, cluster_environment: Any = None) -> str:
    if kind not in TRANSPORTS:
        raise ValueError(f"transport={kind!r} is not known; choose one of {', '.join(TRANSPORTS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "nccl"
    if type(cluster_environment).__name__ == "MPIEnvironment":
        return "mpi"
    return "gloo"


# --------------------------------------------------------------------------------------
# the worker's side of the protocol
# --------------------------------------------------------------------------------------
class MasterRefusedError(RuntimeError):
    """The master answered ERROR: the worker's message was malformed (see the message)."""


class TrainingAborted(RuntimeError):
    """The master answered ABORT: training stops on every rank (a worker was lost, or the master failed)."""


_ERRORS = {
    ErrorCode.BAD_HEADER: "its header was malformed",
    ErrorCode.WRONG_SIZE: "its payload size does not match the master's model",
    ErrorCode.WRONG_WORKER: "its header named another worker than the sending rank",
    ErrorCode.UNEXPECTED: "the master did not expect this message type",
    ErrorCode.BROKEN: "an earlier message from this worker was refused, so the master ignores it",
}


class WorkerClient:
    """Sends this rank's pushes to the master (global rank 0) and receives the replies."""

    def __init__(self, transport: Transport, rank: int, num_lrs: int, timeout: float, master: int = 0) -> None:
        self.transport = transport
        self.rank = rank
        self.master = master
        self.timeout = timeout
        self._header = torch.empty(header_numel(num_lrs), dtype=torch.int64)
        self._reply = torch.empty(header_numel(num_lrs), dtype=torch.int64)
        self.broken = False
        self.last_version = 0

    def exchange(self, msg: Msg, payload: Tensor | None, lrs: list[float], out: Tensor) -> Msg:
        """Send a PUSH (with ``payload``) or a PULL and write the reply's parameters into ``out``.

        Returns ``REPLY`` or ``REFUSED``; raises on ERROR, ABORT and every failure.
        """
        if self.broken:
            raise TransportError("this worker's channel to the master failed earlier; it cannot be used again")
        t = self.transport
        data_out = t.payload_tensor(out)
        numel = 0 if payload is None else payload.numel()
        encode(Header(msg, self.rank, numel, lrs=lrs), self._header)
        try:
            # post the receives first, so the master's replies complete as soon as they are sent
            reply_header = t.irecv(self._reply, self.master, TAG_REPLY_HEADER)
            reply_payload = t.irecv(data_out, self.master, TAG_REPLY_PAYLOAD)
            header_sent = t.isend(self._header, self.master, TAG_HEADER)
            payload_sent = t.isend(payload, self.master, TAG_PAYLOAD) if payload is not None else None
            deadline = time.monotonic() + self.timeout
            t.wait(header_sent, _left(deadline), f"the master (rank {self.master}) to take this worker's {msg.name}")
            t.wait(reply_header, _left(deadline), f"the master's reply to this worker's {msg.name}")
            reply = decode(self._reply)
            # a refused message's payload is never read: wait for it only when the master took it
            if reply.type in (Msg.REPLY, Msg.REFUSED):
                if payload_sent is not None:
                    t.wait(payload_sent, _left(deadline), f"the master to take this worker's {msg.name} payload")
                t.wait(reply_payload, _left(deadline), "the parameters in the master's reply")
        except (TransportError, ProtocolError) as error:
            self.broken = True
            raise TransportError(
                f"worker rank {self.rank}: no usable reply from the master (rank {self.master}), which may have "
                f"died or stopped: {error}"
            ) from error
        self.last_version = reply.version
        if reply.type == Msg.ERROR:
            self.broken = True
            raise MasterRefusedError(
                f"the master refused a {msg.name} from worker rank {self.rank}: "
                f"{_ERRORS.get(reply.code, f'error code {reply.code}')}"
                f" (sent {numel} values, the master expects {reply.numel})"
            )
        if reply.type == Msg.ABORT:
            self.broken = True
            if reply.code == AbortCode.WORKER_LOST:
                raise TrainingAborted(
                    f"training stops: worker rank {reply.version} was lost, so Lightning's collectives can no "
                    "longer complete; rank 0 saves the master's parameters to a checkpoint (see its log)"
                )
            raise TrainingAborted(
                "training stops: rank 0 (the master) stopped on an error and saved the master's model; see rank 0's "
                "log for the cause"
            )
        if reply.type not in (Msg.REPLY, Msg.REFUSED):
            self.broken = True
            raise ProtocolError(f"the master answered with message type {reply.type!r}, expected a reply")
        return Msg(reply.type)

    def send_done(self, failed: bool = False, timeout: float | None = None) -> None:
        """Tell the master this worker stopped; it sends no reply."""
        if self.broken:
            return
        encode(Header(Msg.DONE, self.rank, code=int(failed)), self._header)
        seconds = self.timeout if timeout is None else timeout
        handle = self.transport.isend(self._header, self.master, TAG_HEADER)
        try:
            self.transport.wait(handle, seconds, f"the master (rank {self.master}) to take this worker's stop message")
        finally:
            self.broken = True  # nothing is sent after DONE


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
