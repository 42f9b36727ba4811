"""The wire protocol between a worker and the master: message types, one fixed-size header, its checks.

Every message is one int64 header, then (for messages that carry one) one flat
payload from the same sender. The header states everything the receiver must
know before it posts a receive: the payload's element count, dtype and byte
size. gloo aborts the whole process on a receive buffer of the wrong size, so
the master checks all three against its model before it reads a payload.

The header also carries a per-worker sequence number (duplicates and replays are
refused), the learning rates in force at the worker (float64 bit patterns), and
a check field over all of it. Pure data and checks, no transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor

MAGIC = 0x44414E41  # "DANA"
FIELDS = 15  # magic, type, worker, seq, numel, nbytes, dtype, version, code, lost_rank, epoch, batches, stop, lr count, check
_MASK = (1 << 62) - 1

# tags keep headers and payloads apart (NCCL ignores tags: the order per pair does it)
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY_HEADER, TAG_REPLY_PAYLOAD = 71, 72, 73, 74

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.float16,
    4: torch.bfloat16,
    5: torch.int64,
    6: torch.uint8,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class Msg(IntEnum):
    # worker -> master
    PUSH = 1  # a push; payload: the flat buffer the rule expects; reply: REPLY/REFUSED with the next pull
    PULL = 2  # this worker's parameters (start of training); reply: REPLY with them
    DEAL = 3  # the next batch of the worker's epoch ``epoch`` (code 1: the first of a new pass over the
    #           worker's DataLoader, so what it was dealt before and has not pushed was abandoned); reply:
    #           BATCH, EPOCH_END or STOP
    DONE = 4  # this worker stopped (code 0: finished, 1: failed); reply: FINAL (finished) or nothing
    EVAL = 5  # the master's model as it is now (for epoch-end callbacks such as SWA); reply: REPLY with it
    # master -> worker
    REPLY = 10  # the push was applied; the worker's next parameters follow
    REFUSED = 11  # the push was refused (``code`` says why); the current parameters follow
    ERROR = 12  # the message was malformed (``code`` says why); nothing follows; the channel is closed
    ABORT = 13  # the run stops on an error (``code``, ``lost_rank``); the reason follows (utf-8 bytes)
    BATCH = 14  # the dataset indices of the next batch follow (int64, ``numel`` of them)
    EPOCH_END = 15  # the worker's epoch ``epoch`` has no batch left
    STOP = 16  # the run is over (max_epochs, max_steps, EarlyStopping, ...): stop after the step in flight
    FINAL = 17  # the master's final model follows (parameters and buffers)


class ErrorCode(IntEnum):
    BAD_HEADER = 1
    WRONG_SIZE = 2
    WRONG_WORKER = 3
    UNEXPECTED = 4
    BROKEN = 5
    WRONG_DTYPE = 6
    BAD_LR = 7
    DUPLICATE = 8
    AFTER_DONE = 9


class RefusalCode(IntEnum):
    NON_FINITE = 1  # NaN or Inf in the payload
    OVERFLOW = 2  # finite, but its squared norm overflows: applying it would wreck the master


class AbortCode(IntEnum):
    MASTER_FAILED = 1
    DIVERGED = 2  # pushes were refused again and again: the run stops with the last good model


ERROR_TEXT = {
    ErrorCode.BAD_HEADER: "its header was malformed",
    ErrorCode.WRONG_SIZE: "its payload size does not match the master's model",
    ErrorCode.WRONG_WORKER: "its header named another worker than the sending rank",
    ErrorCode.UNEXPECTED: "the master did not expect this message type",
    ErrorCode.BROKEN: "an earlier message from this worker was refused, so the master ignores it",
    ErrorCode.WRONG_DTYPE: "its payload dtype does not match the master's model",
    ErrorCode.BAD_LR: "its learning rates are not finite numbers >= 0, or not one per param group",
    ErrorCode.DUPLICATE: "its sequence number was already used (a duplicate or replayed message)",
    ErrorCode.AFTER_DONE: "the worker had already said it was done",
}


def text_payload(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8", "replace")[:4096]), dtype=torch.uint8)


def payload_text(payload: Tensor) -> str:
    return bytes(payload.tolist()).decode("utf-8", "replace")


class ProtocolError(ValueError):
    """A header that is not one of ours, or does not match what the receiver expects."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_HEADER) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Header:
    type: int
    worker: int
    seq: int = 0
    numel: int = 0
    nbytes: int = 0
    dtype: int = 0  # a key of DTYPES, 0 without payload
    version: int = 0
    code: int = 0
    lost_rank: int = -1
    epoch: int = 0  # DEAL: the worker's epoch; BATCH: the batch's epoch
    batches: int = 0  # PUSH, DONE: batches this worker finished since its previous push
    stop: int = 0  # replies: 1 when the run is over (the worker stops after the step in flight)
    lrs: list[float] = field(default_factory=list)

    @classmethod
    def for_payload(cls, type: int, worker: int, payload: Tensor | None, **kwargs: object) -> Header:
        """A header that describes ``payload`` (count, dtype, bytes) truthfully."""
        if payload is None:
            return cls(type, worker, **kwargs)  # type: ignore[arg-type]
        return cls(
            type,
            worker,
            numel=payload.numel(),
            nbytes=payload.numel() * payload.element_size(),
            dtype=DTYPE_CODES[payload.dtype],
            **kwargs,  # type: ignore[arg-type]
        )

    def expect_payload(self, like: Tensor) -> None:
        """Raise :class:`ProtocolError` unless the announced payload fits ``like`` exactly."""
        if self.dtype != DTYPE_CODES.get(like.dtype):
            theirs = DTYPES.get(self.dtype, f"code {self.dtype}")
            raise ProtocolError(f"a payload of dtype {theirs}, the master's model is {like.dtype}", ErrorCode.WRONG_DTYPE)
        if self.numel != like.numel() or self.nbytes != like.numel() * like.element_size():
            raise ProtocolError(
                f"a payload of {self.numel} values ({self.nbytes} bytes), the master's model has {like.numel()} "
                f"({like.numel() * like.element_size()} bytes)",
                ErrorCode.WRONG_SIZE,
            )

    def expect_lrs(self, num_groups: int, limit: float = math.inf) -> list[float]:
        """The learning rates, checked: one per param group, each a number >= 0 and below ``limit``
        (the largest value of the master's dtype)."""
        if len(self.lrs) != num_groups:
            raise ProtocolError(f"{len(self.lrs)} learning rates for {num_groups} param groups", ErrorCode.BAD_LR)
        if not all(math.isfinite(lr) and 0 <= lr < limit for lr in self.lrs):
            raise ProtocolError(f"learning rates {self.lrs} are not all finite, >= 0 and < {limit:.3g}", ErrorCode.BAD_LR)
        return self.lrs


MAX_PARAM_GROUPS = 64  # learning rates a header carries: every header has the same size, whatever the model


def header_numel() -> int:
    """Size of every header: a fixed size, so a worker whose model differs from the master's cannot make a
    receive of the wrong size (which gloo answers by aborting the process)."""
    return FIELDS + MAX_PARAM_GROUPS


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
    lrs = [float(lr) for lr in header.lrs] + [0.0] * (num_lrs - len(header.lrs))
    lr_bits = torch.tensor(lrs, dtype=torch.float64).view(torch.int64).tolist() if lrs else []
    values = [
        int(header.type), header.worker, header.seq, header.numel, header.nbytes, header.dtype,
        header.version, int(header.code), header.lost_rank, header.epoch, header.batches, header.stop, len(header.lrs),
    ]  # fmt: skip
    values.append(_check(values + lr_bits))
    out.copy_(torch.tensor([MAGIC, *values, *lr_bits], dtype=torch.int64))
    return out


def decode(buf: Tensor) -> Header:
    """Read a header; raise :class:`ProtocolError` for anything that is not a well-formed header of ours."""
    values = buf.tolist()
    if len(values) < FIELDS or values[0] != MAGIC:
        raise ProtocolError(f"not a lightning-dana header (magic {values[0] if values else None!r}, expected {MAGIC})")
    fields, check, lr_bits = values[1 : FIELDS - 1], values[FIELDS - 1], values[FIELDS:]
    if check != _check(fields + lr_bits):
        raise ProtocolError("header check field does not match its contents (corrupted or foreign message)")
    msg_type, worker, seq, numel, nbytes, dtype, version, code, lost_rank, epoch, batches, stop, nlr = fields
    if msg_type not in Msg.__members__.values():
        raise ProtocolError(f"unknown message type {msg_type}")
    if not 0 <= nlr <= len(lr_bits) or min(numel, nbytes, seq, batches) < 0:
        raise ProtocolError(
            f"header holds lr count {nlr}, numel {numel}, nbytes {nbytes}, seq {seq}, batches {batches}, which cannot be"
        )
    if (numel or nbytes or dtype) and dtype not in DTYPES:
        raise ProtocolError(f"unknown payload dtype code {dtype}", ErrorCode.WRONG_DTYPE)
    lrs = torch.tensor(lr_bits[:nlr], dtype=torch.int64).view(torch.float64).tolist() if nlr else []
    return Header(Msg(msg_type), worker, seq, numel, nbytes, dtype, version, code, lost_rank, epoch, batches, stop, lrs)
