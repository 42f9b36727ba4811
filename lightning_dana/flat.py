"""One flat buffer per push: a module's trained parameters and its buffers, end to end.

Parameters are taken in the order of the optimizer's param groups, so each group
is one contiguous slice (its lr and weight decay apply slice by slice). Buffers
follow the parameters in the same message: floating-point statistics (BatchNorm
running mean and variance) first, integer counters (``num_batches_tracked``)
last, as floating point (exact below 2**24 steps in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dana.rules import LR


class FlatModel:
    """Copies a module's parameters and buffers to and from flat tensors."""

    def __init__(self, module: nn.Module, optimizer: Optimizer) -> None:
        self.params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears in several param groups of the optimizer")
        if not self.params:
            raise ValueError("the optimizer has no parameters to train")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all trained parameters must share one dtype, found {sorted(map(str, dtypes))}")
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.group_sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
        # every name of a tensor: a tied weight is one parameter under several names, all saved
        names: dict[int, list[str]] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        self.param_names = [names.get(id(p), []) for p in self.params]
        buffer_names: dict[int, list[str]] = {}
        for n, b in module.named_buffers(remove_duplicate=False):
            if b is not None:
                buffer_names.setdefault(id(b), []).append(n)
        named = [(n, b) for n, b in module.named_buffers() if b is not None]
        named.sort(key=lambda item: not item[1].dtype.is_floating_point)  # statistics, then counters
        self.buffer_names = [buffer_names[id(b)] for _, b in named]
        self.buffers: list[Tensor] = [b for _, b in named]
        #: trailing buffer values that count (the master adds their changes instead of taking them)
        self.counter_numel = sum(b.numel() for b in self.buffers if not b.dtype.is_floating_point)
        self.buffer_sizes = [b.numel() for b in self.buffers]
        self._stats = [b for b in self.buffers if b.dtype.is_floating_point]
        self._counters = self.buffers[len(self._stats) :]
        self._stat_sizes = self.buffer_sizes[: len(self._stats)]
        self._counter_sizes = self.buffer_sizes[len(self._stats) :]
        self.buffer_numel = sum(self.buffer_sizes)
        self.payload_numel = self.numel + self.buffer_numel

    # parameters ---------------------------------------------------------------------
    def empty(self, numel: int | None = None) -> Tensor:
        return torch.empty(self.payload_numel if numel is None else numel, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def read_params(self, out: Tensor | None = None) -> Tensor:
        out = self.empty(self.numel) if out is None else out
        _gather(out, self.params, self.sizes)
        return out

    @torch.no_grad()
    def write_params(self, flat: Tensor) -> None:
        _scatter(flat, self.params, self.sizes)

    @torch.no_grad()
    def read_grads(self, out: Tensor | None = None) -> Tensor:
        """Flat gradient; a parameter that got no gradient this step contributes zeros."""
        out = self.empty(self.numel) if out is None else out
        views, grads = [], []
        for view, p in zip(out.split(self.sizes), self.params):
            if p.grad is None:
                view.zero_()
            else:
                views.append(view)
                grads.append(p.grad.reshape(-1))
        if views:  # one fused copy: per-tensor copies cost a kernel launch each on a GPU
            torch._foreach_copy_(views, grads)
        return out

    # buffers ------------------------------------------------------------------------
    @torch.no_grad()
    def read_buffers(self, out: Tensor | None = None) -> Tensor:
        out = self.empty(self.buffer_numel) if out is None else out
        split = self.buffer_numel - self.counter_numel
        # one fused copy per dtype (a copy that converts falls back to one kernel per tensor on a GPU)
        if self._stats:
            _gather(out[:split], self._stats, self._stat_sizes)
        if self._counters:
            counts = torch.empty(self.counter_numel, dtype=torch.int64, device=out.device)
            _gather(counts, self._counters, self._counter_sizes)
            out[split:].copy_(counts)
        return out

    @torch.no_grad()
    def write_buffers(self, flat: Tensor) -> None:
        split = self.buffer_numel - self.counter_numel
        if self._stats:
            _scatter(flat[:split], self._stats, self._stat_sizes)
        if self._counters:  # counters travelled as floating point
            _scatter(flat[split:].round().to(torch.int64), self._counters, self._counter_sizes)

    # checkpoints --------------------------------------------------------------------
    @torch.no_grad()
    def state_dict_of(self, payload: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (the module's state_dict) with ``payload``'s parameters and buffers in their places.

        Leaves the module itself untouched, so a checkpoint of the master can be taken mid-fit.
        """
        params = zip(self.param_names, payload[: self.numel].split(self.sizes), self.params)
        buffers = zip(self.buffer_names, payload[self.numel :].split(self.buffer_sizes), self.buffers)
        for names, view, p in params:
            value = view.view_as(p).clone()
            for name in names:
                if name in state:
                    state[name] = value
        for names, view, b in buffers:
            value = _as_buffer(view, b).to(b.dtype, copy=True)
            for name in names:
                if name in state:
                    state[name] = value
        return state

    # per-group hyperparameters ---------------------------------------------------
    def expander(self) -> GroupExpander:
        """A cached per-group expansion; keep one per hyperparameter (lr, weight decay)."""
        return GroupExpander(self.group_sizes, self.dtype, self.device)


class GroupExpander:
    """Per-group values as one scalar when all agree, else one value per element of the flat buffer.

    The last expansion is cached: hyperparameters change rarely, steps are many.
    """

    def __init__(self, group_sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.group_sizes = group_sizes
        self.dtype = dtype
        self.device = device
        self._cache: tuple[tuple, Tensor] | None = None

    def __call__(self, values: list[float]) -> LR:
        if all(v == values[0] for v in values):
            return float(values[0])
        key = tuple(values)
        if self._cache is None or self._cache[0] != key:
            counts = torch.tensor(self.group_sizes, device=self.device)
            values_t = torch.tensor(values, dtype=self.dtype, device=self.device)
            self._cache = (key, values_t.repeat_interleave(counts))
        return self._cache[1]


def optimizer_values(optimizer: Optimizer, key: str) -> list[float]:
    return [float(g.get(key, 0.0)) for g in optimizer.param_groups]


def _gather(flat: Tensor, tensors: list[Tensor], sizes: list[int]) -> None:
    """``tensors`` end to end into ``flat``, in one fused copy (one kernel launch per tensor costs on a GPU)."""
    torch._foreach_copy_(list(flat.split(sizes)), [t.reshape(-1) for t in tensors])


def _scatter(flat: Tensor, tensors: list[Tensor], sizes: list[int]) -> None:
    """The inverse of :func:`_gather`."""
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split(sizes), tensors)])


def _as_buffer(view: Tensor, buffer: Tensor) -> Tensor:
    """A flat slice shaped as ``buffer``; counters travelled as floating point and are rounded back."""
    value = view.view_as(buffer)
    return value if buffer.dtype.is_floating_point else value.round()
