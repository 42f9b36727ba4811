"""What a worker pushes, computed from the user's own model and optimizer.

Shared by the simulated and the real workers. Gradient-pushing rules send
g = ∇J(P) + λP (λ from the optimizer's param groups) and carry the lr in force;
``dana`` runs the user's optimizer step on the pulled P and sends the change,
so any optimizer (SGD with Nesterov, Adam, ...) works. Buffers travel beside:
running statistics as the worker's values (the master takes the latest, an
average of averages that stays stable however stale), counters as the change
since the pull (the master adds it, so ``num_batches_tracked`` counts every
worker's batches).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_dana.flat import FlatModel, optimizer_values
from lightning_dana.rules import RULES, check_algorithm


def check_optimizer(algorithm: str, optimizer: Optimizer) -> float:
    """Refuse optimizers a rule cannot honour; return γ for master-side momentum rules."""
    rule = RULES[check_algorithm(algorithm)]
    if rule.worker_pushes == "step":
        return 0.0
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"algorithm={algorithm!r} applies SGD at the master and reads lr, momentum and weight_decay from a "
            f"torch.optim.SGD, but configure_optimizers returned {type(optimizer).__name__}; return torch.optim.SGD, "
            "or use algorithm='dana', which carries any optimizer's step"
        )
    if any(g.get("dampening", 0) for g in optimizer.param_groups):
        raise ValueError(f"algorithm={algorithm!r} does not support SGD(dampening != 0); set dampening=0 or use 'dana'")
    momenta = set(optimizer_values(optimizer, "momentum"))
    if rule.uses_momentum and len(momenta) != 1:
        raise ValueError(
            f"algorithm={algorithm!r} keeps its momentum at the master and needs one momentum for all param groups, "
            f"got {sorted(momenta)}; use algorithm='dana' for per-group momentum"
        )
    if rule.uses_momentum and momenta != {0.0} and not all(g.get("nesterov") for g in optimizer.param_groups):
        warnings.warn(
            f"algorithm={algorithm!r} applies Nesterov momentum at the master, as the paper does; "
            "the optimizer's nesterov=False is ignored (set nesterov=True to silence this)",
            stacklevel=2,
        )
    return momenta.pop() if rule.uses_momentum else 0.0


class Worker:
    """One worker's side of every rule: computes its push from the model holding its pulled parameters."""

    def __init__(self, flat: FlatModel, optimizer: Optimizer, algorithm: str) -> None:
        self.flat = flat
        self.optimizer = optimizer
        self.pushes_step = RULES[check_algorithm(algorithm)].worker_pushes == "step"
        self._decay = flat.expander()

    def lrs(self) -> list[float]:
        """η in force now, one per param group (the master expands them)."""
        return optimizer_values(self.optimizer, "lr")

    @torch.no_grad()
    def compute(self, pulled: Tensor, out: Tensor) -> Tensor:
        """Fill ``out`` with the push; ``pulled`` is this worker's last pull (params and buffers)."""
        n = self.flat.numel
        params, buffers = out[:n], out[n:]
        if self.pushes_step:
            self.optimizer.step()
            self.flat.read_params(params).sub_(pulled[:n])
        else:
            self.flat.read_grads(params)
            # the optimizer never steps here: tell torch's LR schedulers a step happened all the same
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            decay = self._decay(optimizer_values(self.optimizer, "weight_decay"))
            if isinstance(decay, Tensor):
                params.addcmul_(decay, pulled[:n])
            elif decay:
                params.add_(pulled[:n], alpha=decay)
        self.flat.read_buffers(buffers)
        counters = self.flat.counter_numel
        if counters:
            buffers[-counters:].sub_(pulled[-counters:])
        return out

    def load(self, pulled: Tensor) -> None:
        """Make the model hold ``pulled`` (parameters and buffers)."""
        self.flat.write_params(pulled[: self.flat.numel])
        self.flat.write_buffers(pulled[self.flat.numel :])

    def reset_if_non_finite(self, state: dict) -> bool:
        """The one policy for a refused push: a step-pushing worker whose optimizer state holds NaN/Inf
        restarts that state (it produced the bad push and would again); returns whether it did."""
        if not self.pushes_step or _finite_state(state):
            return False
        state.clear()
        return True


def _finite_state(state: dict) -> bool:
    return all(
        bool(torch.isfinite(v).all()) for per_param in state.values() for v in per_param.values() if isinstance(v, Tensor)
    )


class StepProxy:
    """Stands in for the user's optimizer inside Lightning's precision plugin.

    The plugin runs the closure (forward, backward, ``on_before_optimizer_step``,
    gradient clipping, GradScaler unscaling) and then calls ``step``; our step
    runs the push and the pull instead of updating parameters locally. Every
    other attribute is the user's optimizer's.
    """

    def __init__(self, optimizer: Optimizer, push_pull: Callable[[], None]) -> None:
        self.__dict__["_optimizer"] = optimizer
        self.__dict__["_push_pull"] = push_pull

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if result is None:  # training_step returned None: Lightning skips this step
                return None
        self._push_pull()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)
