"""Point-to-point channels between the master (global rank 0) and each worker, every wait bounded.

One channel per worker, not one shared by all: each worker's channel is a process
group of two ranks ``[0, i]``, so a dead worker breaks only its own channel and the
master goes on serving the others (on a shared gloo group, one peer's death fails
every pending receive), and no receive from any source is needed (NCCL has none).
The master serves each channel in a thread of its own (:mod:`lightning_dana.service`).

Four transports share that shape:

* ``gloo``: headers and payloads on the pair's gloo group (CPU tensors);
* ``nccl``: headers on the pair's gloo group, payloads on the pair's NCCL group (CUDA);
* ``mpi``: mpi4py point-to-point on a duplicate of ``COMM_WORLD``, for jobs started by ``mpiexec``;
* :class:`InProcessTransport`: queues between threads of one process, so the master's
  serving loop is tested without processes.

gloo closes a group's connections when a wait times out, so a timeout is final
for that channel, and is reported as such.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dana.protocol import TAG_PAYLOAD, TAG_REPLY_PAYLOAD

TRANSPORTS = ("auto", "gloo", "nccl", "mpi")


class TransportError(RuntimeError):
    """A message could not be sent or received in time, or its peer is gone."""


class SizeMismatchError(TransportError):
    """A message arrived with another size than the receive buffer's (MPI reports it; gloo cannot)."""


class Transport:
    """Messages between this rank and ``peer``; ``wait`` returns when done or raises :class:`TransportError`."""

    name = "base"

    def isend(self, tensor: Tensor, peer: int, tag: int) -> Any:
        raise NotImplementedError

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float, what: str) -> None:
        raise NotImplementedError

    def payload_tensor(self, tensor: Tensor) -> Tensor:
        """The tensor payloads travel in (NCCL: the CUDA tensor itself)."""
        return tensor

    def send(self, tensor: Tensor, peer: int, tag: int, timeout: float, what: str) -> None:
        self.wait(self.isend(tensor, peer, tag), timeout, what)

    def recv(self, tensor: Tensor, peer: int, tag: int, timeout: float, what: str) -> None:
        self.wait(self.irecv(tensor, peer, tag), timeout, what)


def _timeout_error(what: str, timeout: float, error: BaseException) -> TransportError:
    text = str(error)
    if "Timed out" in text or "timeout" in text.lower():
        return TransportError(f"timed out after {timeout:.0f}s waiting for {what}")
    return TransportError(f"lost the connection while waiting for {what}: {text.strip()}")


def _start_error(what: str, peer: int, error: BaseException) -> TransportError:
    """An operation refused at its start: the pair already holds an error (its peer died, or an earlier
    wait timed out), which is not a timeout of this operation."""
    return TransportError(f"could not start {what} rank {peer}, its connection is broken: {str(error).strip()}")


class GlooTransport(Transport):
    """torch.distributed point-to-point, one gloo group per worker ``[0, i]``."""

    name = "gloo"

    def __init__(self, groups: dict[int, Any]) -> None:
        self.groups = groups  # peer rank -> the pair's group

    def _group(self, peer: int, tag: int) -> Any:
        return self.groups[peer]

    def isend(self, tensor: Tensor, peer: int, tag: int) -> Any:
        try:
            return dist.isend(tensor, peer, group=self._group(peer, tag), tag=tag)
        except RuntimeError as error:  # gloo raises at once on a pair whose peer is already gone
            raise _start_error("a send to", peer, error) from error

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> Any:
        try:
            return dist.irecv(tensor, peer, group=self._group(peer, tag), tag=tag)
        except RuntimeError as error:
            raise _start_error("a receive from", peer, error) from error

    def wait(self, handle: Any, timeout: float, what: str) -> None:
        try:
            handle.wait(timeout=timedelta(seconds=timeout))
        except RuntimeError as error:
            raise _timeout_error(what, timeout, error) from error


class NcclTransport(GlooTransport):
    """Headers on the pair's gloo group, payloads (CUDA tensors) on the pair's NCCL group."""

    name = "nccl"

    def __init__(self, groups: dict[int, Any], data_groups: dict[int, Any]) -> None:
        super().__init__(groups)
        self.data_groups = data_groups

    def _group(self, peer: int, tag: int) -> Any:
        return self.data_groups[peer] if tag in (TAG_PAYLOAD, TAG_REPLY_PAYLOAD) else self.groups[peer]

    def isend(self, tensor: Tensor, peer: int, tag: int) -> Any:
        work = super().isend(tensor, peer, tag)
        return ("cuda", work) if tensor.is_cuda else work

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> Any:
        work = super().irecv(tensor, peer, tag)
        return ("cuda", work) if tensor.is_cuda else work

    def wait(self, handle: Any, timeout: float, what: str) -> None:
        if not isinstance(handle, tuple):
            return super().wait(handle, timeout, what)
        work = handle[1]  # an NCCL payload: poll its completion with a deadline instead of blocking forever
        deadline = time.monotonic() + timeout
        try:
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TransportError(f"timed out after {timeout:.0f}s waiting for {what} (NCCL)")
                time.sleep(0.0002)
            work.wait()  # completed: returns at once, and raises if the operation failed
        except RuntimeError as error:
            if isinstance(error, TransportError):
                raise
            raise _timeout_error(what, timeout, error) from error


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

    def isend(self, tensor: Tensor, peer: int, tag: int) -> Any:
        return (self.comm.Isend(self._buffer(tensor), dest=peer, tag=tag), tensor, None)

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> Any:
        return (self.comm.Irecv(self._buffer(tensor), source=peer, tag=tag), tensor, tensor.numel() * tensor.element_size())

    def wait(self, handle: Any, timeout: float, what: str) -> None:
        request, _keepalive, expected = handle
        status = self.MPI.Status()
        deadline = time.monotonic() + timeout
        spins = 0
        try:
            while not request.Test(status):
                if time.monotonic() > deadline:
                    try:
                        request.Cancel()
                    except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                        pass
                    raise TransportError(f"timed out after {timeout:.0f}s waiting for {what}")
                spins += 1
                time.sleep(0 if spins < 200 else 0.0005)  # spin briefly, then yield the core
        except self.MPI.Exception as error:  # e.g. MPI_ERR_TRUNCATE: a message larger than the buffer
            raise SizeMismatchError(f"{what}: {error}") from error
        if expected is not None and status.Get_count(self.MPI.BYTE) != expected:
            raise SizeMismatchError(f"{what}: {status.Get_count(self.MPI.BYTE)} bytes arrived, {expected} expected")


class InProcessTransport(Transport):
    """Channels between threads of one process (tests): a send is complete when the receiver has it."""

    name = "in_process"

    def __init__(self, rank: int, hub: InProcessHub) -> None:
        self.rank = rank
        self.hub = hub

    def isend(self, tensor: Tensor, peer: int, tag: int) -> Any:
        done = threading.Event()
        self.hub.queue(self.rank, peer, tag).put((tensor.detach().clone(), done))
        return ("send", done)

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> Any:
        return ("recv", self.hub.queue(peer, self.rank, tag), tensor)

    def wait(self, handle: Any, timeout: float, what: str) -> None:
        if handle[0] == "send":
            if not handle[1].wait(timeout):
                raise TransportError(f"timed out after {timeout:.0f}s waiting for {what}")
            return
        _, channel, tensor = handle
        try:
            item = channel.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"timed out after {timeout:.0f}s waiting for {what}") from None
        if item is None:
            raise TransportError(f"lost the connection while waiting for {what}: peer closed")
        value, done = item
        if value.numel() * value.element_size() != tensor.numel() * tensor.element_size():
            raise SizeMismatchError(f"{what}: {value.numel()} values of {value.dtype} arrived for a buffer of {tensor.numel()}")
        tensor.view(torch.uint8).copy_(value.reshape(-1).view(torch.uint8).view_as(tensor.view(torch.uint8)))
        done.set()


class InProcessHub:
    """The queues of :class:`InProcessTransport`; ``close(rank)`` makes that rank's peers' receives fail."""

    def __init__(self) -> None:
        self._queues: dict[tuple[int, int, int], queue.Queue] = {}
        self._lock = threading.Lock()

    def queue(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self._lock:
            return self._queues.setdefault((src, dst, tag), queue.Queue())

    def endpoint(self, rank: int) -> InProcessTransport:
        return InProcessTransport(rank, self)

    def close(self, rank: int) -> None:
        """Rank ``rank`` died: every receive from it fails (as a closed connection does)."""
        with self._lock:
            channels = [q for (src, _, _), q in self._queues.items() if src == rank]
        for channel in channels:
            channel.put(None)


def make_transport(kind: str, device: torch.device, timeout: float, cluster_environment: Any = None) -> Transport:
    """Create every worker's channel; a collective: every rank calls it, in the same order. ``timeout``:
    the groups' own (set-up) timeout; every wait on a channel passes its own."""
    kind = resolve_transport(kind, device, cluster_environment)
    pg_timeout = timedelta(seconds=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "mpi":
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() != world:
            raise TransportError(
                f"transport='mpi' needs every worker started by mpiexec (MPI world size "
                f"{MPI.COMM_WORLD.Get_size()}, torch.distributed world size {world}); "
                "launch with `mpiexec -n N python train.py` or use transport='gloo'"
            )
        return MPITransport(MPI.COMM_WORLD.Dup())
    if kind == "nccl" and device.type != "cuda":
        raise TransportError(f"transport='nccl' needs CUDA tensors, the model is on {device}; use 'gloo'")
    if kind == "gloo" and device.type != "cpu":
        raise TransportError(f"transport='gloo' carries CPU tensors, the model is on {device}; use transport='nccl' (or 'auto')")
    groups, data_groups = {}, {}
    for peer in range(1, world):  # every rank creates every pair's group, in the same order
        group = dist.new_group([0, peer], backend="gloo", timeout=pg_timeout)
        data = dist.new_group([0, peer], backend="nccl", timeout=pg_timeout) if kind == "nccl" else None
        if rank in (0, peer):
            other = peer if rank == 0 else 0
            groups[other], data_groups[other] = group, data
    return NcclTransport(groups, data_groups) if kind == "nccl" else GlooTransport(groups)


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
