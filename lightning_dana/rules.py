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

import math
from functools import lru_cache

import torch
from torch import Tensor

LR = float | Tensor  # a scalar, or one value per element of the flat buffer


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
        """A snapshot (copies, like ``MasterState.state_dict``'s buffers): training on leaves it unchanged."""
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


# ---------------------------------------------------------------------------------------------------------
# Staleness mitigations (issue 8). Each needs what the master knows only if it keeps track itself: the lag
# of a push (a version counter and the version each worker last pulled) and, for the gap-aware and
# delay-compensated rules, the parameters it handed out (one copy per worker). ``reply`` records a pull;
# ``eval_params`` does not.
# ---------------------------------------------------------------------------------------------------------

#: Gap-Aware's constants, from Barkai et al.'s implementation (EMA decay of the squared step, and its ε)
GA_BETA, GA_EPS = 0.999, 1e-8
#: DC-ASGD-a's constants, from Zheng et al. (ICML 2017), section 5, and their Multiverso updater
DC_LAMBDA0, DC_M, DC_EPS = 2.0, 0.95, 1e-7


class _Tracking(UpdateRule):
    """Counts pushes and remembers, per worker, the version (and, if ``keeps_pulls``, the parameters) it pulled."""

    keeps_pulls: ClassVar[bool] = False

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.version = 0
        self.pulled_version = [0] * num_workers
        self.pulled = [self.theta.clone() for _ in range(num_workers)] if self.keeps_pulls else []

    def handed_out(self, worker: int) -> Tensor:
        """What ``reply(worker)`` hands out now (the master's Θ or θ)."""
        return self.theta

    def reply(self, worker: int) -> Tensor:
        out = self.handed_out(worker)
        self.pulled_version[worker] = self.version
        if self.keeps_pulls:
            self.pulled[worker].copy_(out)
        return out

    def eval_params(self) -> Tensor:
        return self.handed_out(0)  # not a pull: nothing recorded

    def lag(self, worker: int) -> int:
        """τ of a push from ``worker`` arriving now: pushes applied since its last pull."""
        return self.version - self.pulled_version[worker]

    def apply(self, worker: int, push: Tensor, lr: LR) -> None:
        self._apply(worker, push, lr)
        self.version += 1

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        return {"theta": self.theta, **({"pulled": self.pulled} if self.keeps_pulls else {})}

    def extra_state(self) -> dict:
        return {"version": self.version, "pulled_version": list(self.pulled_version)}

    def load_extra_state(self, extra: dict) -> None:
        self.version = extra["version"]
        self.pulled_version = list(extra["pulled_version"])

    def state_dict(self) -> dict:
        extra = {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.extra_state().items()}
        return {**super().state_dict(), "extra": extra}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_extra_state(state["extra"])


class StalenessAwareASGD(_Tracking):
    """Staleness-aware ASGD (Zhang et al., IJCAI 2016): θ ← θ − (η/τ)g, with η for τ ≤ 1."""

    name = "sa_asgd"
    uses_momentum = False

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        _sub_scaled(self.theta, push, _scale(lr, 1.0 / max(self.lag(worker), 1)))


class _GapAware(_Tracking):
    """Gap-Aware's measurement (Barkai, Hakimi, Schuster, ICLR 2020), shared by ``ga_asgd`` and ``dana_ga``.

    Per element: C = η_max·(√(E[u²]) + ε), E the bias-corrected EMA (β = 0.999) of the master's applied
    steps per unit lr u; gap G = 1 + |θ − P|/C with P the parameters the push was computed on; the
    gradient is divided by G before it is used. C is measured, never tuned. No penalty on the first push
    (no step measured yet).
    """

    keeps_pulls = True

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.step_sq = torch.zeros_like(self.theta)
        self.steps = 0
        self.lr_max: LR = 0.0

    def corrected(self, worker: int, grad: Tensor, lr: LR) -> Tensor:
        """g / G, where G = 1 + |θ − P| / C (elementwise)."""
        self.lr_max = _max_lr(self.lr_max, lr)
        if self.steps == 0:
            return grad
        gap = (self.handed_out(worker) - self.pulled[worker]).abs_()
        scale = (self.step_sq / (1.0 - GA_BETA**self.steps)).sqrt_().add_(GA_EPS).mul_(self.lr_max)
        return grad / gap.div_(scale).add_(1.0)

    def stepped(self, step: Tensor) -> None:
        """The applied step per unit lr enters the running average of the step size."""
        self.step_sq.mul_(GA_BETA).addcmul_(step, step, value=1.0 - GA_BETA)
        self.steps += 1

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "step_sq": self.step_sq}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "steps": self.steps, "lr_max": self.lr_max}

    def load_extra_state(self, extra: dict) -> None:
        super().load_extra_state(extra)
        self.steps, self.lr_max = extra["steps"], extra["lr_max"]


class GapAwareASGD(_GapAware):
    """Gap-Aware ASGD: θ ← θ − η·g/G (see :class:`_GapAware`); the running step size is that of g/G."""

    name = "ga_asgd"
    uses_momentum = False

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        g = self.corrected(worker, push, lr)
        _sub_scaled(self.theta, g, lr)
        self.stepped(g)


class DelayCompensatedASGD(_Tracking):
    """DC-ASGD-a (Zheng et al., ICML 2017), with the adaptive λ of their paper and Multiverso updater.

    On a push g from worker i: Mᵢ ← m·Mᵢ + (1 − m)g²; g̃ = g + λ₀/√(Mᵢ + ε) ⊙ g ⊙ g ⊙ (θ − Pᵢ); θ ← θ − ηg̃,
    with λ₀ = 2, m = 0.95 (the paper's CIFAR setting), ε = 1e-7, Pᵢ the parameters worker i pulled.
    """

    name = "dc_asgd"
    uses_momentum = False
    keeps_pulls = True

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.mean_square = [torch.zeros_like(self.theta) for _ in range(num_workers)]

    def compensated(self, worker: int, grad: Tensor) -> Tensor:
        ms = self.mean_square[worker]
        ms.mul_(DC_M).addcmul_(grad, grad, value=1.0 - DC_M)
        shift = self.handed_out(worker) - self.pulled[worker]
        return grad + shift.mul_(grad).mul_(grad).div_(ms.add(DC_EPS).sqrt_()).mul_(DC_LAMBDA0)

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        _sub_scaled(self.theta, self.compensated(worker, push), lr)

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "mean_square": self.mean_square}


class _DanaMaster(_Tracking):
    """DANA with the momentum at the master, in the look-ahead variable Θ (the variable ``dana`` keeps).

    Workers push g; vⁱ ← γvⁱ + g̃; Θ ← Θ − η·s·(γvⁱ + g̃); reply Θ. With g̃ = g and s = 1 this is
    exactly ``dana`` with SGD(nesterov=True) (same Θ, same replies: the worker's optimizer step moved
    to the master), and ``dana_zero`` in the other variable. Subclasses change g̃ (the gradient) or s
    (the scale of the step) from what they measure; the master keeps Θ and one vⁱ per worker.
    """

    worker_pushes = "gradient"
    uses_momentum = True

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.v = [torch.zeros_like(self.theta) for _ in range(num_workers)]

    def corrected(self, worker: int, grad: Tensor, lr: LR) -> Tensor:
        return grad

    def scale(self, worker: int) -> float:
        return 1.0

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        g = self.corrected(worker, push, lr)
        v = self.v[worker].mul_(self.momentum).add_(g)
        step = g.add(v, alpha=self.momentum)
        _sub_scaled(self.theta, step, self.effective_lr(_scale(lr, self.scale(worker))))
        self.stepped(step)

    def effective_lr(self, lr: LR) -> LR:
        return lr

    def stepped(self, step: Tensor) -> None:
        pass

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "v": self.v}


class GapAwareDana(_GapAware, _DanaMaster):
    """Gap-Aware on DANA (Barkai et al., ICLR 2020): the gradient is divided by 1 + |Θ − Pᵢ|/C before it
    enters vⁱ, comparing look-ahead with look-ahead; C from the master's applied steps γvⁱ + g̃ per unit lr."""

    name = "dana_ga"


class DelayCompensatedDana(_DanaMaster):
    """DANA-DC (Hakimi et al., 2019, "Taming Momentum in a Distributed Asynchronous Environment"): DC-ASGD-a's
    compensation g̃ = g + λ₀/√(Mᵢ + ε) ⊙ g ⊙ g ⊙ (Θ − Pᵢ) between DANA's look-ahead now and the one worker i
    computed on, then DANA's update with g̃; λ₀, m, ε as ``dc_asgd``."""

    name = "dana_dc"
    keeps_pulls = True

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.mean_square = [torch.zeros_like(self.theta) for _ in range(num_workers)]

    def corrected(self, worker: int, grad: Tensor, lr: LR) -> Tensor:
        return DelayCompensatedASGD.compensated(self, worker, grad)

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "mean_square": self.mean_square}


class StalenessAwareDana(_DanaMaster):
    """DANA with the staleness-aware step (an ablation of ``dana_sm``): s = 1/τ (1 for τ ≤ 1)."""

    name = "dana_sa"

    def scale(self, worker: int) -> float:
        return 1.0 / max(self.lag(worker), 1)


class StabilityMatchedDana(_DanaMaster):
    """Ours: DANA whose step keeps the single worker's stability margin at the push's measured lag τ.

    On a quadratic of curvature h, one Nesterov worker (γ) is stable for ηh < a₁ = 2(1 + γ)/(1 + 2γ);
    N = τ + 1 DANA workers taking turns (every push has lag τ) only for ηh < a(τ), computed exactly from
    the linear recursion (:func:`stability_edge`). Each push's step is scaled by s = a(τ)/a₁, so
    whatever curvature the single-worker recipe was stable on stays stable at any N. No constant: s
    is a property of γ and τ alone; τ = 0 gives s = 1, i.e. ``dana``.
    """

    name = "dana_sm"

    def scale(self, worker: int) -> float:
        return stability_scale(self.lag(worker), self.momentum)


class PeakStabilityDana(_DanaMaster):
    """Ours, refined by the diagnosis: DANA whose lr never exceeds the stable lr of the *peak* lr.

    The single-worker recipe is stable at its largest lr η_max, so every curvature h it meets has
    η_max·h < a(0). At lag τ those are all stable while η·h < a(τ): the push's lr is capped at
    η_max·a(τ)/a(0) (elementwise), η_eff = min(η, η_max·a(τ)/a(0)). At the peak lr this is ``dana_sm``;
    once the schedule has decayed below the cap the recipe's own lr is used again, since the instability
    the diagnosis found is set by the peak lr. η_max is the largest lr seen so far (warm-up included),
    measured, not tuned; τ = 0 gives η, i.e. ``dana``.
    """

    name = "dana_smp"

    def __init__(self, params: Tensor, num_workers: int, momentum: float = 0.0) -> None:
        super().__init__(params, num_workers, momentum)
        self.lr_max: LR = 0.0

    def _apply(self, worker: int, push: Tensor, lr: LR) -> None:
        self.lr_max = _max_lr(self.lr_max, lr)
        self._lag = self.lag(worker)
        super()._apply(worker, push, lr)

    def effective_lr(self, lr: LR) -> LR:
        cap = _scale(self.lr_max, stability_scale(self._lag, self.momentum))
        if isinstance(lr, Tensor) or isinstance(cap, Tensor):
            return torch.minimum(torch.as_tensor(lr), torch.as_tensor(cap))
        return min(lr, cap)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "lr_max": self.lr_max}

    def load_extra_state(self, extra: dict) -> None:
        super().load_extra_state(extra)
        self.lr_max = extra["lr_max"]


class PeakStabilityDanaN(PeakStabilityDana):
    """``dana_smp`` with the lag of N workers in steady state, N − 1, for every push instead of the push's own τ.

    Under block-random and gamma schedules a push's own lag ranges from 0 to about 2N; the others' momentum
    is in flight whatever this push's lag, so this variant caps every push at η_max·a(N − 1)/a(0), the
    linear model's exact case (all pushes at lag N − 1). N = 1 is ``dana``.
    """

    name = "dana_smpn"

    def lag(self, worker: int) -> int:
        return self.num_workers - 1


def stability_edge(algorithm: str, lag: int, momentum: float) -> float:
    """Largest ηh for which ``lag + 1`` workers taking turns (every push has lag ``lag``) are stable on
    f(x) = h x²/2, for ``asgd``, ``nag_asgd`` (one shared momentum) or ``dana`` (one momentum per worker,
    gradients at the look-ahead). Computed from the spectral radius of one round of pushes (bisection)."""
    return _stability_edge(algorithm, int(lag), round(float(momentum), 12))


def stability_scale(lag: int, momentum: float) -> float:
    """``dana_sm``'s step factor: DANA's stability edge at this lag over the single worker's (1 at lag 0)."""
    if lag <= 0:
        return 1.0
    return stability_edge("dana", lag, momentum) / stability_edge("dana", 0, momentum)


@lru_cache(maxsize=None)
def _stability_edge(algorithm: str, lag: int, momentum: float) -> float:
    def unstable(a: float) -> bool:
        return _round_radius(algorithm, lag + 1, a, momentum) > 1.0 + 1e-12

    hi = 4.0  # every edge is below 2 (asgd's at lag 0): scan down from there in coarse steps, then bisect
    lo = hi
    while lo > 1e-9 and unstable(lo):
        hi, lo = lo, lo / 1.25
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if unstable(mid) else (mid, hi)
    return lo


def _round_radius(algorithm: str, n: int, a: float, momentum: float) -> float:
    """Spectral radius of the linear map of n pushes (workers 0..n−1 in turn) on f = x²/2 with ηh = a."""
    g = momentum
    if algorithm == "asgd":  # state: θ, P_1..P_n
        dim = n + 1
    elif algorithm == "nag_asgd":  # θ, v, P_1..P_n
        dim = n + 2
    elif algorithm == "dana":  # Θ, P_1..P_n, v_1..v_n
        dim = 2 * n + 1
    else:
        raise ValueError(f"no linear model for {algorithm!r}")
    x = torch.eye(dim, dtype=torch.float64)  # columns: the images of the basis vectors
    for i in range(n):
        if algorithm == "asgd":
            x[0] = x[0] - a * x[1 + i]
            x[1 + i] = x[0]
        elif algorithm == "nag_asgd":
            x[1] = g * x[1] + x[2 + i]
            x[0] = x[0] - a * (g * x[1] + x[2 + i])
            x[2 + i] = x[0]
        else:
            p = x[1 + i].clone()
            x[1 + n + i] = g * x[1 + n + i] + p
            x[0] = x[0] - a * (g * x[1 + n + i] + p)
            x[1 + i] = x[0]
    return float(torch.linalg.eigvals(x).abs().max())


RULES: dict[str, type[UpdateRule]] = {
    rule.name: rule
    for rule in (
        ASGD, NagASGD, MultiASGD, DanaZero, Dana,
        StalenessAwareASGD, GapAwareASGD, DelayCompensatedASGD,
        GapAwareDana, DelayCompensatedDana, StabilityMatchedDana, PeakStabilityDana,
        PeakStabilityDanaN, StalenessAwareDana,
    )
}  # fmt: skip
ALGORITHMS = tuple(RULES)


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
    return torch.dot(torch.stack(norms), _inverse_sqrt(tuple(sizes), diff.dtype, diff.device))


@lru_cache(maxsize=16)
def _inverse_sqrt(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """1/√m per layer, made once: building it per push would copy it to the device every time."""
    return torch.tensor([m**-0.5 for m in sizes], dtype=dtype, device=device)


def _sub_scaled(target: Tensor, update: Tensor, lr: LR) -> None:
    if isinstance(lr, Tensor):
        target.sub_(update * lr)
    else:
        target.add_(update, alpha=-lr)


def _scale(lr: LR, factor: float) -> LR:
    return lr * factor if factor != 1.0 else lr


def _max_lr(current: LR, lr: LR) -> LR:
    """Elementwise running maximum of the lr (a float while every push carries a float)."""
    if isinstance(lr, Tensor):
        return torch.maximum(lr, torch.as_tensor(current, dtype=lr.dtype, device=lr.device))
    if isinstance(current, Tensor):
        return current.clamp(min=lr)
    return max(current, lr)


def _look_ahead(theta: Tensor, v: Tensor, lr: LR, momentum: float) -> Tensor:
    if isinstance(lr, Tensor):
        return theta - v * (lr * momentum)
    return theta.add(v, alpha=-lr * momentum)
