"""The master's state around an update rule: versions, lag, gap, buffers, and what it refuses.

Pure state, no transport and no lock: the simulated workers call it in-process,
and the real master's service calls it under its lock for every push. A payload
is one flat buffer ``[parameters | buffers]`` (see :mod:`lightning_dana.flat`).
Every number the master uses is checked before it touches the state: a push
with NaN/Inf, or one so large that applying it would wreck the master, is
refused and leaves the state unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dana.flat import GroupExpander
from lightning_dana.protocol import RefusalCode
from lightning_dana.rules import UpdateRule, layer_gap


class RefusedPushError(ValueError):
    """A push was refused; the master's state is unchanged. ``code`` says why."""

    def __init__(self, message: str, code: RefusalCode) -> None:
        super().__init__(message)
        self.code = code


class MasterDivergedError(RuntimeError):
    """The master's parameters became non-finite: the run cannot go on from this state."""


@dataclass
class PushRecord:
    worker: int
    lag: int  # τ: pushes the master applied between this worker's pull and this push
    gap: float | Tensor | None  # G(pulled − master's θ at apply time), None where not sampled (see resolve_gaps)
    time: float  # time.monotonic() when applied


class MasterState:
    """Applies pushes in arrival order and answers each with the pusher's next parameters.

    ``group_sizes``: elements per param group, in flat order; a push carries one lr per
    group (or one float for all), expanded here and nowhere else.

    ``counters``: how many trailing buffer values are counters, whose changes add
    up; the other buffer values are statistics, replaced by each push's.

    ``gap_every``: where the caller cannot give the parameters a push was computed
    on (real workers), keep a copy of one reply, to each worker in turn, at least
    ``gap_every`` pushes apart, and measure the gap when that worker pushes next
    (0: never). Callers that pass ``pulled`` get the gap of every push.
    """

    def __init__(
        self,
        rule: UpdateRule,
        sizes: list[int],
        buffers: Tensor,
        gap_every: int = 0,
        counters: int = 0,
        group_sizes: list[int] | None = None,
    ) -> None:
        self.rule = rule
        self.sizes = sizes
        self.numel = sum(sizes)
        self.buffers = buffers.detach().clone()
        self.gap_every = gap_every
        self.counters = counters
        template = rule.theta
        self.group_sizes = group_sizes or [self.numel]
        self._expand = GroupExpander(self.group_sizes, template.dtype, template.device)
        self.version = 0
        self.pulled_version = [0] * rule.num_workers
        self.refused = 0
        self._probe: tuple[int, Tensor] | None = None
        self._probe_worker, self._probe_due = 0, 0
        self._unverified: tuple[int, int, DeviceRead] | None = None  # the last push's finiteness, not yet read

    @property
    def payload_numel(self) -> int:
        return self.numel + self.buffers.numel()

    def pull(self, worker: int, out: Tensor) -> Tensor:
        """Write worker ``worker``'s next parameters and the master's buffers into ``out``."""
        out[: self.numel].copy_(self.rule.reply(worker))
        out[self.numel :].copy_(self.buffers)
        self.pulled_version[worker] = self.version
        if self.gap_every and self._probe is None and worker == self._probe_worker and self.version >= self._probe_due:
            self._probe = (worker, out[: self.numel].clone())
        return out

    def reductions(self, payload: Tensor) -> DeviceRead:
        """Start computing the numbers :meth:`check` reads; on a GPU, reading them later waits for them alone."""
        params = payload[: self.numel]
        peak = params.abs().max() if params.numel() else payload.new_zeros(())
        return DeviceRead(torch.stack([payload.sum(), params.square().sum(), peak]))

    def check(
        self, worker: int, payload: Tensor, lrs: float | Sequence[float], read: DeviceRead | None = None
    ) -> list[float]:
        """Raise :class:`RefusedPushError` or ``ValueError`` unless the push can be applied safely.

        ``read``: this payload's :meth:`reductions`, when the caller started them earlier."""
        if payload.numel() != self.payload_numel or payload.dtype != self.rule.theta.dtype:
            raise ValueError(
                f"push from worker {worker} holds {payload.numel()} values of {payload.dtype}, the master expects "
                f"{self.payload_numel} of {self.rule.theta.dtype}"
            )
        limit = torch.finfo(payload.dtype).max
        values = [float(lrs)] * len(self.group_sizes) if isinstance(lrs, (int, float)) else [float(v) for v in lrs]
        if len(values) != len(self.group_sizes) or not all(math.isfinite(v) and 0 <= v < limit for v in values):
            raise ValueError(
                f"push from worker {worker} carries learning rates {values}: need one lr per param group, each "
                f">= 0 and < {limit:.3g} (the largest {payload.dtype})"
            )
        # every number the checks need, in one read from the device (each read waits for the device)
        total, square, peak = (read or self.reductions(payload)).values()
        if not math.isfinite(total) and not bool(torch.isfinite(payload).all()):  # an overflowing sum is settled exactly
            raise RefusedPushError(f"worker {worker} pushed NaN or Inf; push refused, master unchanged", RefusalCode.NON_FINITE)
        if not math.isfinite(square):
            raise RefusedPushError(
                f"worker {worker} pushed values whose squared norm overflows {payload.dtype} (a diverging loss?); "
                "push refused, master unchanged",
                RefusalCode.OVERFLOW,
            )
        # the largest change this push can make (momentum rules amplify a step at most ~1/(1-γ) ≤ 1e3 times):
        # a step within 1e-3 of the dtype's range would make the master infinite, so refuse it before it applies
        scale = 1.0 if self.rule.worker_pushes == "step" else max(values)
        step = scale * peak
        if step > limit * 1e-3:
            raise RefusedPushError(
                f"worker {worker} pushed a step of {step:.3g}, which would overflow the master's {payload.dtype}; "
                "push refused, master unchanged",
                RefusalCode.OVERFLOW,
            )
        return values

    def push(
        self,
        worker: int,
        payload: Tensor,
        lrs: float | Sequence[float],
        pulled: Tensor | None = None,
        read: DeviceRead | None = None,
        defer: bool = False,
    ) -> PushRecord:
        """Apply one push (``lrs``: one per param group, or one for all); refused pushes change nothing.

        ``defer``: do not wait for the device to confirm that the master stayed finite; the next push,
        or the next look at the master (:meth:`verify`), raises :class:`MasterDivergedError` instead, and
        the record's gap stays a device scalar (:func:`resolve_gaps`). One host-device round trip less
        per push, for callers that queue the next step's work first (the simulated workers)."""
        self.verify()
        try:
            values = self.check(worker, payload, lrs, read)
        except RefusedPushError:
            self.refused += 1
            raise
        if pulled is None and self._probe is not None and self._probe[0] == worker:
            pulled = self._probe[1]
            self._probe = None
            # the next probe goes to the next worker, at least gap_every pushes later: every worker gets sampled
            self._probe_worker = (worker + 1) % self.rule.num_workers
            self._probe_due = self.version + self.gap_every
        gap = None
        if pulled is not None:
            # Δθ of section 3: the parameters the push was computed on against the master's own
            # parameters it is applied to (θ, or Θ for dana); for dana_zero this is equation 5
            gap = layer_gap(pulled[: self.numel] - self.rule.theta, self.sizes)
            gap = gap if defer else float(gap)
        lag = self.version - self.pulled_version[worker]
        self.rule.apply(worker, payload[: self.numel], self._expand(values))
        self._unverified = (worker, self.version, DeviceRead(self.rule.theta.sum()))
        if not defer:
            self.verify()
        # running statistics: take the pusher's (adding N stale EMA changes overshoots once N·m > 2);
        # counters (the last ``counters`` values): add the pusher's increment
        split = self.buffers.numel() - self.counters
        self.buffers[:split].copy_(payload[self.numel : self.numel + split])
        self.buffers[split:].add_(payload[self.numel + split :])
        self.version += 1
        return PushRecord(worker, lag, gap, time.monotonic())

    def serve(
        self,
        worker: int,
        payload: Tensor,
        lrs: float | Sequence[float],
        out: Tensor,
        pulled: Tensor | None = None,
        read: DeviceRead | None = None,
        defer: bool = False,
    ) -> PushRecord:
        """Push then pull: the reply to a push is the worker's next pull. ``out`` may alias ``payload``."""
        record = self.push(worker, payload, lrs, pulled, read, defer)
        self.pull(worker, out)
        return record

    def verify(self) -> None:
        """Raise :class:`MasterDivergedError` if the last push made the master non-finite."""
        if self._unverified is None:
            return
        worker, version, read = self._unverified
        self._unverified = None
        (total,) = read.values()
        if not math.isfinite(total) and not bool(torch.isfinite(self.rule.theta).all()):
            raise MasterDivergedError(
                f"the master's parameters became non-finite after a push of worker {worker} (version {version}); "
                "resume from the last good checkpoint with a smaller learning rate"
            )

    def eval_payload(self) -> Tensor:
        """Parameters and buffers for validation, test, predict and checkpoints (a copy)."""
        self.verify()
        return torch.cat([self.rule.eval_params(), self.buffers])

    def state_dict(self) -> dict:
        self.verify()
        return {
            "rule": self.rule.state_dict(),
            "buffers": self.buffers.clone(),
            "version": self.version,
            "pulled_version": list(self.pulled_version),
            "refused": self.refused,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
        self.buffers.copy_(state["buffers"])
        self.version = state["version"]
        self.pulled_version = list(state["pulled_version"])
        self.refused = state["refused"]
        self._probe = None
        self._unverified = None

    def state_bytes(self) -> int:
        return self.rule.state_bytes() + self.buffers.numel() * self.buffers.element_size()


class DeviceRead:
    """Scalars computed on the device, copied to the host as soon as they are ready, without waiting.

    On a GPU every ``.item()`` stalls the host until the device has run everything queued so far,
    which leaves the device idle while the host prepares the next step; here :meth:`values` waits
    only for the work queued before this read began (an event), and not at all on the CPU.
    """

    def __init__(self, scalars: Tensor) -> None:
        scalars = scalars.detach().reshape(-1).to(torch.float64)
        self._event: torch.cuda.Event | None = None
        if scalars.is_cuda:
            self._host = torch.empty(scalars.shape, dtype=scalars.dtype, pin_memory=True)
            self._host.copy_(scalars, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = scalars

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def resolve_gaps(records: Sequence[PushRecord]) -> list[PushRecord]:
    """Records whose gap is still a device scalar (``push(defer=True)``) with the gap as a float, in one read."""
    lazy = [r for r in records if isinstance(r.gap, Tensor)]
    if lazy:
        for record, gap in zip(lazy, torch.stack([r.gap for r in lazy]).tolist()):
            record.gap = gap
    return list(records)

