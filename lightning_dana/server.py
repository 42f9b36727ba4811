"""The master's bookkeeping around an update rule: versions, lag, gap, buffers, refusals.

Pure state, no transport: the simulated workers call it in-process and the real
parameter server loop calls it for every message it receives. A payload is one
flat buffer ``[parameters | buffers]`` (see :mod:`lightning_dana.flat`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dana.rules import LR, UpdateRule, layer_gap


class NonFinitePushError(ValueError):
    """A push held NaN or Inf; it was refused and the master's state is unchanged."""


@dataclass
class PushRecord:
    worker: int
    lag: int  # τ: pushes the master applied between this worker's pull and this push
    gap: float | None  # G(pulled − master's θ at apply time), None where not sampled
    time: float  # time.monotonic() when applied


class ParameterServer:
    """Applies pushes in arrival order and answers each with the pusher's next parameters.

    ``counters``: how many trailing buffer values are counters, whose changes add
    up; the other buffer values are statistics, replaced by each push's.

    ``gap_every``: where the caller cannot give the parameters a push was computed
    on (real workers), the server keeps a copy of one reply, to each worker in
    turn, at least ``gap_every`` pushes apart, and measures the gap when that
    worker pushes next (0: never). Callers that pass ``pulled`` get the gap of every push for free.
    """

    def __init__(
        self,
        rule: UpdateRule,
        sizes: list[int],
        buffers: Tensor,
        gap_every: int = 0,
        counters: int = 0,
    ) -> None:
        self.rule = rule
        self.sizes = sizes
        self.numel = sum(sizes)
        self.buffers = buffers.detach().clone()
        self.gap_every = gap_every
        self.counters = counters
        self.version = 0
        self.pulled_version = [0] * rule.num_workers
        self.refused = 0
        self._probe: tuple[int, Tensor] | None = None
        self._probe_worker, self._probe_due = 0, 0

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

    def push(self, worker: int, payload: Tensor, lr: LR, pulled: Tensor | None = None) -> PushRecord:
        """Apply one push; raise :class:`NonFinitePushError` (state unchanged) on NaN or Inf."""
        if payload.numel() != self.payload_numel:
            raise ValueError(
                f"push from worker {worker} holds {payload.numel()} values, the master expects {self.payload_numel}"
            )
        if not _all_finite(payload):
            self.refused += 1
            raise NonFinitePushError(f"worker {worker} pushed NaN or Inf; push refused, master unchanged")
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
            gap = float(layer_gap(pulled[: self.numel] - self.rule.theta, self.sizes))
        lag = self.version - self.pulled_version[worker]
        self.rule.apply(worker, payload[: self.numel], lr)
        # running statistics: take the pusher's (adding N stale EMA changes overshoots once N·m > 2);
        # counters (the last ``counters`` values): add the pusher's increment
        split = self.buffers.numel() - self.counters
        self.buffers[:split].copy_(payload[self.numel : self.numel + split])
        self.buffers[split:].add_(payload[self.numel + split :])
        self.version += 1
        return PushRecord(worker, lag, gap, time.monotonic())

    def serve(self, worker: int, payload: Tensor, lr: LR, out: Tensor, pulled: Tensor | None = None) -> PushRecord:
        """Push then pull: the reply to a push is the worker's next pull. ``out`` may alias ``payload``."""
        record = self.push(worker, payload, lr, pulled)
        self.pull(worker, out)
        return record

    def eval_payload(self) -> Tensor:
        """Parameters and buffers for validation, test, predict and checkpoints."""
        return torch.cat([self.rule.eval_params(), self.buffers])

    def state_dict(self) -> dict:
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

    def state_bytes(self) -> int:
        return self.rule.state_bytes() + self.buffers.numel() * self.buffers.element_size()


def _all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``. A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves it
    with one reduction (25x faster than ``isfinite(t).all()`` on 25M values); a non-finite sum (or an
    overflow) is settled by the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
