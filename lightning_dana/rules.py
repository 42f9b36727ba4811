"""Master-side update rules of every algorithm, as pure tensor math on flat buffers.

A rule knows nothing of processes, Lightning or schedules: the simulated workers
and the real parameter server drive the same objects push by push. Notation as in
the paper and ``DESIGN.md``: η the learning rate carried by the push, γ the
momentum, θ the master's parameters, vⁱ worker i's update vector.

Every rule answers two questions:

* ``apply(worker, push, lr)``: fold one push into the master's state, in arrival
  order, with no barrier;
* ``reply(worker)``: the parameters worker ``worker`` should compute its next
  gradient on (its pull).

What a worker pushes is given by :attr:`UpdateRule.worker_pushes`:
``"gradient"`` (g = ∇J(P) + λP, computed on the pulled P) or ``"step"`` (the
change its own optimizer made to P, the DANA delta protocol).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

LR = float | Tensor  # a scalar, or one value per element of the flat buffer

ALGORITHMS = ("asgd", "nag_asgd", "multi_asgd", "dana_zero", "dana")


class UpdateRule:
    """Base class: the master's parameters ``theta`` and nothing else."""

    name: ClassVar[str]
    worker_pushes: ClassVar[Literal["gradient", "step"]] = "gradient"
    #: whether the rule reads γ from the worker's optimizer
    uses_momentum: ClassVar[bool] = True

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.theta = params.detach().clone()
        self.num_workers = num_workers
        self.momentum = float(momentum) if self.uses_momentum else 0.0

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        raise NotImplementedError

    def reply(self, worker: int) -> Tensor:
        """Parameters handed to ``worker``; may be a view of live state: copy before the next apply."""
        return self.theta

    def eval_params(self) -> Tensor:
        """The parameters validation, test, predict and checkpoints see."""
        return self.reply(0)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"theta": self.theta}

    def state_dict(self) -> dict:
        """A snapshot (copies, like ``ParameterServer.state_dict``'s buffers): training on leaves it unchanged."""
        tensors = {
            key: [t.clone() for t in value] if isinstance(value, list) else value.clone()
            for key, value in self.state_tensors().items()
        }
        return {"name": self.name, "momentum": self.momentum, "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint holds algorithm {state['name']!r}, this run uses {self.name!r}")
        self.momentum = state["momentum"]
        for key, value in state["tensors"].items():
            mine = getattr(self, key)
            if isinstance(mine, list):
                for dst, src in zip(mine, value):
                    dst.copy_(src)
            else:
                mine.copy_(value)

    def state_bytes(self) -> int:
        """Bytes of tensor state the master keeps: what the paper's 'no overhead' is about."""
        total = 0
        for value in self.state_tensors().values():
            for t in value if isinstance(value, list) else [value]:
                total += t.numel() * t.element_size()
        return total


class ASGD(UpdateRule):
    """Algorithm 2: θ ← θ − ηg; reply θ. No momentum (the paper's ASGD)."""

    name = "asgd"
    uses_momentum = False

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        _sub_scaled(self.theta, push, lr)


class NagASGD(UpdateRule):
    """One shared Nesterov optimizer at the master: v ← γv + g; θ ← θ − η(γv + g)."""

    name = "nag_asgd"

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.v = torch.zeros_like(self.theta)

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        self.v.mul_(self.momentum).add_(push)
        _sub_scaled(self.theta, push.add(self.v, alpha=self.momentum), lr)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"theta": self.theta, "v": self.v}


class MultiASGD(UpdateRule):
    """One Nesterov optimizer per worker, each with its own look-ahead only.

    vⁱ ← γvⁱ + g; θ ← θ − ηvⁱ; reply θ − ηγvⁱ.
    """

    name = "multi_asgd"

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.v = [torch.zeros_like(self.theta) for _ in range(num_workers)]
        self.lr: LR = 0.0  # η of the latest push, for the look-ahead

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        self.v[worker].mul_(self.momentum).add_(push)
        _sub_scaled(self.theta, self.v[worker], lr)
        self.lr = lr

    def reply(self, worker: int) -> Tensor:
        return _look_ahead(self.theta, self.v[worker], self.lr, self.momentum)

    def eval_params(self) -> Tensor:
        return self.theta

    def state_tensors(self) -> dict[str, Tensor]:
        return {"theta": self.theta, "v": self.v}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lr": self.lr.clone() if isinstance(self.lr, Tensor) else self.lr}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lr = state["lr"]


class DanaZero(MultiASGD):
    """Algorithm 3: per-worker vⁱ at the master; reply the look-ahead of all workers.

    vⁱ ← γvⁱ + g; θ ← θ − ηvⁱ; reply θ̂ = θ − ηγ Σⱼ vʲ (equation 4). Σⱼ vʲ is
    kept up to date incrementally, so a push costs O(1) flat operations, not O(N).
    """

    name = "dana_zero"

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.v_sum = torch.zeros_like(self.theta)

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        v = self.v[worker]
        # Σv changes by the change of vⁱ: (γ − 1)vⁱ + g
        self.v_sum.add_(v, alpha=self.momentum - 1.0).add_(push)
        super().apply(worker, push, lr)

    def reply(self, worker: int) -> Tensor:
        return _look_ahead(self.theta, self.v_sum, self.lr, self.momentum)

    def eval_params(self) -> Tensor:
        return self.reply(0)

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "v_sum": self.v_sum}


class Dana(UpdateRule):
    """Algorithm 4 with the ASGD master: workers push their own optimizer's step Δ; Θ ← Θ + Δ.

    For ``torch.optim.SGD(nesterov=True)`` Δ = −η(γvⁱ + g) (equation 9); any other
    optimizer (Adam, NAdam, ...) is carried by the same protocol. The master keeps
    Θ and nothing per worker.
    """

    name = "dana"
    worker_pushes = "step"
    uses_momentum = False

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        self.theta.add_(push)


RULES: dict[str, type[UpdateRule]] = {
    rule.name: rule for rule in (ASGD, NagASGD, MultiASGD, DanaZero, Dana)
}


def make_rule(algorithm: str, params: Tensor, num_workers: int, momentum: float = 0.0) -> UpdateRule:
    return RULES[check_algorithm(algorithm)](params, num_workers, momentum)


def check_algorithm(algorithm: str) -> str:
    if algorithm not in RULES:
        raise ValueError(
            f"algorithm={algorithm!r} is not known; choose one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


def layer_gap(diff: Tensor, sizes: list[int]) -> Tensor:
    """G(Δθ) = Σ over layers of ‖ψ‖/√m (section 3), one layer per parameter tensor."""
    norms = torch._foreach_norm(list(diff.split(sizes)))
    scale = diff.new_tensor([m**-0.5 for m in sizes])
    return torch.dot(torch.stack(norms), scale)


def _sub_scaled(target: Tensor, update: Tensor, lr: LR) -> None:
    if isinstance(lr, Tensor):
        target.sub_(update * lr)
    else:
        target.add_(update, alpha=-lr)


def _look_ahead(theta: Tensor, v: Tensor, lr: LR, momentum: float) -> Tensor:
    if isinstance(lr, Tensor):
        return theta - v * (lr * momentum)
    return theta.add(v, alpha=-lr * momentum)
