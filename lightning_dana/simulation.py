"""N asynchronous workers simulated in one process, on one device, as the paper ran its accuracy tables.

Each training step is one push by one virtual worker, picked by a schedule: the
model is loaded with that worker's stale parameters (its last pull), the user's
``training_step`` and backward run as usual, the worker's push goes to the
:class:`~lightning_dana.state.MasterState`, and the reply is stored as that
worker's next pull. An epoch is still one pass over the data, shared by all
workers, so the single-worker schedule (epochs, milestones, warm-up) keeps its
meaning.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

import pytorch_lightning as pl
from lightning_dana.callbacks import MasterView, ensure_gap_monitor
from lightning_dana import compat
from lightning_dana.compat import ONE_OPTIMIZER, one_optimizer
from lightning_dana.core import DanaCore
from lightning_dana.rules import check_algorithm
from lightning_dana.schedules import make_schedule
from lightning_dana.state import DeviceRead, MasterState, PushRecord, RefusedPushError, resolve_gaps
from lightning_dana.worker import StepProxy


class SimulatedWorkers(SingleDeviceStrategy):
    """Simulate ``num_workers`` asynchronous workers and one master on a single device.

    Args:
        num_workers: N, the number of virtual workers.
        algorithm: ``"dana"``, ``"dana_zero"``, ``"multi_asgd"``, ``"nag_asgd"`` or ``"asgd"``.
        schedule: ``"round_robin"``, ``"block_random"``, ``"gamma"`` (V = 0.1, mean batch
            time = batch size), or a list of N per-worker mean speeds (gamma-distributed
            batch times around ``batch_size / speed``).
        seed: seeds the schedule, so a run and its resumption replay the same pushes.
        device: where model and buffers live; default: the Trainer's accelerator
            (``cuda`` for GPU, else ``cpu``).
        batch_size: mean batch time of the gamma schedules (only sets the simulated clock).
    """

    strategy_name = "simulated_workers"

    def __init__(
        self,
        num_workers: int = 1,
        algorithm: str = "dana",
        schedule: str | Sequence[float] = "block_random",
        seed: int = 0,
        device: str | torch.device | None = None,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device or "cpu", **kwargs)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise MisconfigurationException(f"SimulatedWorkers(num_workers={num_workers!r}): num_workers must be an integer >= 1")
        self.num_workers = num_workers
        try:  # one kind of error for every bad argument, as DANAStrategy raises
            self.algorithm = check_algorithm(algorithm)
            self.schedule_spec = schedule if isinstance(schedule, str) else [float(s) for s in schedule]
            self.schedule = make_schedule(self.schedule_spec, num_workers, seed, mean_time=float(batch_size))
        except ValueError as error:
            raise MisconfigurationException(f"SimulatedWorkers: {error}") from error
        self.seed = seed
        self._device_given = device is not None
        self._core: DanaCore | None = None
        self._fit_done = False
        self._records: deque[PushRecord] = deque(maxlen=100_000)  # bounded if nobody drains
        self._active: int | None = None
        self._pending: _Pending | None = None

    # set-up -------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        if not self._device_given and isinstance(self.accelerator, CUDAAccelerator):
            self._root_device = torch.device("cuda", torch.cuda.current_device())
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if (devices := compat.requested_devices(trainer)) > 1 or trainer.num_nodes > 1:
            raise MisconfigurationException(
                f"SimulatedWorkers({self.num_workers}) simulates its workers in one process on one device; "
                f"Trainer(devices={devices}, num_nodes={trainer.num_nodes}) would be ignored: set devices=1, or train "
                "with real worker processes: Trainer(strategy='dana', devices=N)"
            )
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.lightning_module.automatic_optimization:
            raise MisconfigurationException(
                "SimulatedWorkers needs automatic optimization (each optimizer step is one push); "
                "set `self.automatic_optimization = True` or train without SimulatedWorkers"
            )
        super().setup(trainer)
        if not fitting:
            return  # validate, test and predict need no optimizer: they run on the module as it is
        if len(self.optimizers) != 1:
            raise MisconfigurationException(ONE_OPTIMIZER.format(who="SimulatedWorkers", count=len(self.optimizers)))
        optimizer = self.optimizers[0]
        self._fit_done = False
        self._core = core = DanaCore(self.lightning_module, optimizer, self.algorithm, self.num_workers)
        assert core.state is not None
        self._pulled = core.empty().repeat(self.num_workers, 1)
        for w in range(self.num_workers):
            core.state.pull(w, self._pulled[w])
        self._pushes = [core.empty(), core.empty()]  # the pending push and the one being computed
        self._pending = None
        self._optimizer = optimizer
        # dana: every worker runs its own copy of the user's optimizer state
        self._worker_states = [optimizer.state] + [defaultdict(dict) for _ in range(self.num_workers - 1)]
        self._proxy = StepProxy(optimizer, self._push_pull)
        ensure_gap_monitor(trainer)
        trainer.callbacks.insert(0, MasterView())

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        with one_optimizer("SimulatedWorkers"):
            super().setup_optimizers(trainer)

    # the worker's step --------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._active is None:
            self._active = self.schedule.next_worker()
        if self._pending is not None and self._pending.worker == self._active:
            self._settle()  # this worker computes on the reply to its pending push
        self._core.load(self._pulled[self._active])
        if self._core.worker.pushes_step:
            self._optimizer.state = self._worker_states[self._active]
        return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._core is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        return super().optimizer_step(self._proxy, closure, model, **kwargs)

    def _push_pull(self) -> None:
        """Compute this step's push, then apply the previous step's: the master's checks read values
        from the device, and by now this step's forward and backward are queued, so it never idles."""
        core, worker = self._core, self._active
        assert core.state is not None and worker is not None
        push = self._pushes[0] if self._pending is None or self._pending.push is self._pushes[1] else self._pushes[1]
        lrs = core.worker.lrs()
        core.worker.compute(self._pulled[worker], push)
        read = core.state.reductions(push)
        self._settle()
        self._pending = _Pending(worker, push, lrs, read)
        self._active = None

    def _settle(self) -> None:
        """Apply the pending push (the same pushes in the same order as applying each at once)."""
        if self._pending is None:
            return
        core, (worker, push, lrs, read) = self._core, self._pending
        self._pending = None
        assert core is not None and core.state is not None
        pulled = self._pulled[worker]
        try:
            self._records.append(core.state.serve(worker, push, lrs, out=pulled, pulled=pulled, read=read, defer=True))
        except RefusedPushError as err:
            reset = core.after_refusal(self._worker_states[worker])
            rank_zero_warn(
                f"{err} (total refused: {core.state.refused}); the worker restarts from the master"
                + ("; its optimizer state held NaN/Inf and was reset" if reset else "")
            )
            core.state.pull(worker, pulled)
        if len(self._records) % 1024 == 0:  # keep few device scalars alive when nobody drains
            resolve_gaps(self._records)

    def _settled_state(self) -> MasterState | None:
        """The master with every push applied and verified: what anything outside the steps must see."""
        if self._core is None or self._core.state is None:
            return None
        self._settle()
        self._core.state.verify()
        return self._core.state

    # the master's parameters outside training ------------------------------------
    def _load_master(self) -> None:
        if (state := self._settled_state()) is not None:
            self._core.load(state.eval_payload())

    @override
    def on_validation_start(self) -> None:
        self._load_master()

    @override
    def on_test_start(self) -> None:
        self._load_master()

    @override
    def on_predict_start(self) -> None:
        self._load_master()

    def show_master(self) -> None:
        """At each epoch end (MasterView): epoch-end callbacks such as SWA see the master's model."""
        self._load_master()

    def finish_fit(self) -> None:
        """First thing at the end of fit (MasterView): the module holds the trained (master's) model;
        from now on checkpoints save the module (which SWA's on_train_end may still change)."""
        self._load_master()
        self._fit_done = True

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            callbacks = module.trainer.callbacks
            callbacks[:] = [c for c in callbacks if not isinstance(c, MasterView)]
        super().teardown()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if self._fit_done or (master := self._settled_state()) is None:
            return state
        return self._core.module_state_dict(master.eval_payload(), state)

    # checkpoints --------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._core is not None:
            checkpoint["simulated_workers"] = self._state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if "simulated_workers" in checkpoint and self._core is not None:
            self._load_state_dict(checkpoint["simulated_workers"])

    def _state_dict(self) -> dict[str, Any]:
        core, state = self._core, self._settled_state()
        assert core is not None and state is not None
        return core.checkpoint(
            state.state_dict(),
            schedule=self.schedule.state_dict(),
            pulled=self._pulled.clone(),
            active=self._active,
            rng=_rng_states(),  # the data order of the next epochs
            worker_optimizer_states=[self._optimizer_state(s) for s in self._worker_states]
            if core.worker.pushes_step
            else None,
        )

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        core = self._core
        assert core is not None and core.state is not None
        if state["num_workers"] != self.num_workers:
            raise MisconfigurationException(
                f"the checkpoint was made by SimulatedWorkers(algorithm={state['algorithm']!r}, "
                f"num_workers={state['num_workers']}); resume with the same algorithm and num_workers"
            )
        core.state.load_state_dict(core.resumable_master(state))
        self._pending = None
        self.schedule.load_state_dict(state["schedule"])
        self._pulled.copy_(state["pulled"])
        self._active = state["active"]
        _set_rng_states(state["rng"])
        if state["worker_optimizer_states"] is not None:
            self._worker_states = [self._load_optimizer_state(s) for s in state["worker_optimizer_states"]]
            self._optimizer.state = self._worker_states[0]

    def _optimizer_state(self, state: defaultdict) -> dict:
        current, self._optimizer.state = self._optimizer.state, state
        try:
            return self._optimizer.state_dict()["state"]
        finally:
            self._optimizer.state = current

    def _load_optimizer_state(self, saved: dict) -> defaultdict:
        groups = self._optimizer.state_dict()["param_groups"]
        self._optimizer.load_state_dict({"state": saved, "param_groups": groups})
        return self._optimizer.state

    # what the callbacks read ---------------------------------------------------------
    def drain_push_records(self) -> list[PushRecord]:
        """Pushes applied since the last call: worker, lag τ, gap G and time of each."""
        records = resolve_gaps(self._records)
        self._records.clear()
        return records

    @property
    def worker_optimizer_states(self) -> list[defaultdict]:
        """Each virtual worker's optimizer state (``dana``); MomentumCorrection rescales them all."""
        return self._worker_states if self._core is not None and self._core.worker.pushes_step else []

    @property
    def master_state(self) -> MasterState | None:
        """The master's state (rule, version, buffers) during and after ``fit``."""
        return self._settled_state()

    @property
    def simulated_time(self) -> float:
        return self.schedule.clock


class _Pending(NamedTuple):
    """A push computed but not yet applied: who pushed, the payload, the lrs in force, its checks' read."""

    worker: int
    push: torch.Tensor
    lrs: list[float]
    read: DeviceRead


def _rng_states() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)),
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
