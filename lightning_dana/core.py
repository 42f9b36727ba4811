"""What both strategies build from one call and share: model layout, worker, rule, master state, policies.

``DANAStrategy`` (real processes) and ``SimulatedWorkers`` (one process) differ in
how pushes travel, not in what a push is, how the master applies it, what a
refused push does to the worker, or what a checkpoint holds; all of that is here.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dana.flat import FlatModel
from lightning_dana.protocol import MAX_PARAM_GROUPS
from lightning_dana.rules import make_rule
from lightning_dana.state import MasterState
from lightning_dana.worker import Worker, check_optimizer


class DanaCore:
    """The flat layout of ``module``'s trained parameters and buffers, this process's worker and,
    where the master lives, the master's state.

    Every user error is raised here, as :class:`MisconfigurationException` naming the limit and the way out.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        algorithm: str,
        num_workers: int,
        with_master: bool = True,
        gap_every: int = 0,
    ) -> None:
        if len(optimizer.param_groups) > MAX_PARAM_GROUPS:
            raise MisconfigurationException(
                f"the optimizer has {len(optimizer.param_groups)} param groups; a push carries at most "
                f"{MAX_PARAM_GROUPS} learning rates: merge groups that share their hyperparameters"
            )
        try:
            momentum = check_optimizer(algorithm, optimizer)
            self.flat = FlatModel(module, optimizer)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self.algorithm = algorithm
        self.num_workers = num_workers
        self.optimizer = optimizer
        self.worker = Worker(self.flat, optimizer, algorithm)
        self.state: MasterState | None = None
        if with_master:
            rule = make_rule(algorithm, self.flat.read_params(), num_workers, momentum)
            self.state = MasterState(
                rule,
                self.flat.sizes,
                self.flat.read_buffers(),
                gap_every=gap_every,
                counters=self.flat.counter_numel,
                group_sizes=self.flat.group_sizes,
            )

    def empty(self) -> Tensor:
        """A buffer of one payload: parameters then buffers."""
        return self.flat.empty()

    def load(self, payload: Tensor) -> None:
        """Make the module hold ``payload`` (a pull, or the master's model)."""
        self.worker.load(payload)

    def module_state_dict(self, payload: Tensor, module_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``module_state`` with the master's ``payload`` under every name of every trained tensor."""
        return self.flat.state_dict_of(payload, module_state)

    def after_refusal(self, optimizer_state: dict) -> bool:
        """The one policy for a refused push (both strategies): see :meth:`Worker.reset_if_non_finite`."""
        return self.worker.reset_if_non_finite(optimizer_state)

    # --------------------------------------------------------------- checkpoints
    def checkpoint(self, master: dict, **extra: Any) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "num_workers": self.num_workers, "master": master, **extra}

    def resumable_master(self, saved: dict[str, Any]) -> dict:
        """The saved master state, fitted to this run's N; refused clearly where it cannot be."""
        if saved["algorithm"] != self.algorithm:
            raise MisconfigurationException(
                f"the checkpoint was trained with algorithm={saved['algorithm']!r}, this run uses "
                f"{self.algorithm!r}; resume with the same algorithm"
            )
        master = saved["master"]
        if saved["num_workers"] == self.num_workers:
            return master
        rule = master["rule"]
        per_worker = [
            k for k, v in {**rule["tensors"], **rule.get("extra", {})}.items()
            if isinstance(v, (list, tuple)) and len(v) == saved["num_workers"]
        ]
        if per_worker:
            raise MisconfigurationException(
                f"the checkpoint was made by {saved['num_workers']} workers and algorithm={self.algorithm!r} keeps "
                f"state per worker ({', '.join(per_worker)}); resume with {saved['num_workers']} workers, or train "
                "with an algorithm whose master state does not depend on N (dana, asgd, nag_asgd)"
            )
        return {**master, "pulled_version": [master["version"]] * self.num_workers}
