"""Real asynchronous training: ``Trainer(strategy="dana", devices=N)``, one process per worker.

A thin adapter over Lightning's :class:`~pytorch_lightning.strategies.DDPStrategy`:
the launchers (local subprocesses, spawn), cluster environments (torchrun,
SLURM, LSF, MPI), ranks, samplers and collectives are Lightning's; the DDP
wrapper is not used. Instead every optimizer step is a push to the master and
a pull of the reply (:class:`~lightning_dana.worker.StepProxy` inside the
precision plugin, so closures, ``on_before_optimizer_step``, gradient clipping
and LR schedulers keep working). The master is a thread of global rank 0
(:mod:`lightning_dana.master`), which is also worker 0.

What the checkpoint, validation and the module after ``fit`` see is the
master's model; each worker keeps its own optimizer state (``dana``), and
checkpoints hold them all.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import warnings
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

import pytorch_lightning as pl
from lightning_dana.callbacks import ensure_gap_monitor
from lightning_dana.flat import FlatModel, optimizer_values
from lightning_dana.master import Master
from lightning_dana.rules import ALGORITHMS, check_algorithm, make_rule
from lightning_dana.server import ParameterServer, PushRecord
from lightning_dana.transport import (
    TRANSPORTS,
    Msg,
    TrainingAborted,
    WorkerClient,
    make_transport,
    resolve_transport,
)
from lightning_dana.worker import StepProxy, WorkerPush, check_optimizer

log = logging.getLogger(__name__)

ERROR_CHECKPOINT = "dana-master-on-error.ckpt"


class WorkerLostError(RuntimeError):
    """A worker process died or failed: training stops on every rank, the master's model is saved."""


class MasterFailedError(RuntimeError):
    """The master's serving thread stopped with an error (see the message and rank 0's log)."""


class DANAStrategy(DDPStrategy):
    """Asynchronous data-parallel training with one worker per process and a master in rank 0.

    Args:
        algorithm: ``"dana"`` (default), ``"dana_zero"``, ``"multi_asgd"``, ``"nag_asgd"`` or ``"asgd"``.
        transport: how pushes travel: ``"gloo"`` (CPU tensors), ``"nccl"`` (CUDA tensors, headers on
            gloo), ``"mpi"`` (mpi4py, under ``mpiexec``) or ``"auto"`` (mpi under Lightning's
            MPIEnvironment on CPU, nccl on GPU, else gloo).
        timeout: seconds any one wait may take: a worker's push and reply, Lightning's collectives
            (the process-group timeout), the master's receive of a payload.
        idle_timeout: seconds the master waits for the next message from any worker before it
            gives up; it must exceed the longest pause of every worker at once (validation,
            checkpoint writing). Default: ``max(6 * timeout, 1800)``.
        gap_every: the master measures the gap G of one push in every ``gap_every`` (0: never).
        error_checkpoint: file name, in the Trainer's ``default_root_dir``, that rank 0 writes the
            master's model to when training stops on an exception (``None``: do not write it).
        start_method: ``"popen"`` (re-run the script, as ``strategy="ddp"``) or ``"spawn"``/``"fork"``.
    """

    strategy_name = "dana"

    def __init__(
        self,
        algorithm: str = "dana",
        transport: Literal["auto", "gloo", "nccl", "mpi"] = "auto",
        timeout: float = 300.0,
        idle_timeout: float | None = None,
        gap_every: int = 10,
        error_checkpoint: str | None = ERROR_CHECKPOINT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
    ) -> None:
        check_algorithm(algorithm)
        if transport not in TRANSPORTS:
            raise ValueError(f"DANAStrategy(transport={transport!r}) is not known; choose one of {', '.join(TRANSPORTS)}")
        if not timeout > 0:
            raise ValueError(f"DANAStrategy(timeout={timeout!r}) must be a number of seconds > 0")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"DANAStrategy(idle_timeout={idle_timeout!r}) must be a number of seconds > 0, or None")
        if gap_every < 0:
            raise ValueError(f"DANAStrategy(gap_every={gap_every}) must be >= 0 (0: never measure the gap)")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout),
            start_method=start_method,
        )
        self.algorithm = algorithm
        self.transport = transport
        self.timeout_s = float(timeout)
        self.idle_timeout_s = float(idle_timeout) if idle_timeout is not None else max(6 * float(timeout), 1800.0)
        self.gap_every = gap_every
        self.error_checkpoint = error_checkpoint
        self.refused_pushes = 0  # this worker's pushes the master refused (NaN/Inf)
        self.master_refused: list[int] = []  # rank 0, after fit: refused pushes per worker
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        # created in setup(), after the (spawn) launcher pickled the strategy: no threads or locks before
        self._flat: FlatModel | None = None
        self._worker: WorkerPush | None = None
        self._optimizer: Optimizer | None = None
        self._pulled: Tensor | None = None
        self._push_buf: Tensor | None = None
        self._eval_buf: Tensor | None = None
        self._master: Master | None = None
        self._client: WorkerClient | None = None
        self._transport_name: str | None = None
        self._fit_active = False
        self._no_collectives = False
        self._pending_save: dict[str, Any] | None = None
        self._lost: dict[int, str] = {}
        self._error_checkpoint_path: str | None = None

    # ------------------------------------------------------------------ public surface
    @property
    def num_workers(self) -> int:
        """N: one worker per process (``devices * num_nodes``)."""
        return self.world_size

    @property
    def master(self) -> Master | None:
        """Rank 0's parameter server during ``fit``; ``None`` on other ranks and outside ``fit``."""
        return self._master

    @property
    def server(self) -> ParameterServer | None:
        return self._master.server if self._master is not None else None

    def drain_push_records(self) -> list[PushRecord]:
        """Pushes the master applied since the last call (rank 0); ``[]`` on other ranks."""
        return self._master.drain_records() if self._master is not None else []

    # ------------------------------------------------------------ launch and environment
    def _configure_launcher(self) -> None:
        workers = self.num_nodes * self.num_processes
        if workers < 2:
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} trains with one worker per process and needs at least 2 "
                f"(devices * num_nodes), got devices={self.num_processes}, num_nodes={self.num_nodes}; "
                "set devices=N (N >= 2), or simulate N workers in one process with lightning_dana.SimulatedWorkers"
            )
        if self._start_method == "popen":
            assert self.cluster_environment is not None
            self._launcher = _WatchedSubprocessLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, self._on_child_exit, self.timeout_s
            )
        else:
            super()._configure_launcher()

    def setup_environment(self) -> None:
        module = self.lightning_module
        trainer = module.trainer if module is not None and module._trainer is not None else None
        if module is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            if not module.automatic_optimization:
                raise MisconfigurationException(
                    f"strategy={self.strategy_name!r} does not support manual optimization (automatic_optimization="
                    "False): each optimizer step is a push to the master; use automatic optimization, or "
                    "strategy='ddp' for manual optimization"
                )
        super().setup_environment()

    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are not averaged, each worker pushes to the master instead."""

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None:
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} cannot use sync_batchnorm=True: SyncBatchNorm synchronizes every "
                "forward pass across workers; set sync_batchnorm=False (BatchNorm statistics travel with the pushes)"
            )
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        _sync_module_states(self.model)  # DDP would have broadcast rank 0's initial weights
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} trains with exactly one optimizer (each optimizer step is one "
                f"push), configure_optimizers returned {len(self.optimizers)}; put all parameters in one optimizer "
                "(its param groups may differ)"
            )
        optimizer = self.optimizers[0]
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        try:
            momentum = check_optimizer(self.algorithm, optimizer)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        module = self.lightning_module
        flat = FlatModel(module, optimizer)
        self._flat, self._optimizer = flat, optimizer
        self._worker = WorkerPush(flat, optimizer, self.algorithm)
        self._pulled = flat.empty()
        flat.read_params(self._pulled[: flat.numel])
        flat.read_buffers(self._pulled[flat.numel :])
        self._push_buf = flat.empty()
        self._eval_buf = flat.empty()
        self._transport_name = resolve_transport(self.transport, self.root_device, self.cluster_environment)
        transport = make_transport(self.transport, self.root_device, self.timeout_s, self.cluster_environment)
        if self.global_rank == 0:
            rule = make_rule(self.algorithm, self._pulled[: flat.numel], self.world_size, momentum)
            server = ParameterServer(
                rule, flat.sizes, self._pulled[flat.numel :], gap_every=self.gap_every, counters=flat.counter_numel
            )
            self._master = Master(
                server, transport, self.world_size, flat.group_sizes, self.timeout_s, self.idle_timeout_s
            )
            for rank, reason in self._lost.items():  # a worker that died before the master existed
                self._master.mark_lost(rank, reason)
        else:
            self._client = WorkerClient(transport, self.global_rank, len(optimizer.param_groups), self.timeout_s)
        self._fit_active = True
        _unsync_sigterm_check(trainer)
        ensure_gap_monitor(trainer)
        rank_zero_info(
            f"DANAStrategy: {self.world_size} workers, algorithm={self.algorithm!r}, transport={self._transport_name!r}, "
            f"{flat.payload_numel} values per push"
        )

    # --------------------------------------------------------------- training steps
    def on_train_start(self) -> None:
        if not self._fit_active:
            return
        assert self._pulled is not None and self._worker is not None
        if self._master is not None:
            self._master.start()
            self._master.pull_local(0, self._pulled)
        else:
            assert self._client is not None
            self._client.exchange(Msg.PULL, None, [], self._pulled)
        self._worker.load(self._pulled)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if not self._fit_active:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        self._check_health()
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        model = model or self.lightning_module
        assert isinstance(model, pl.LightningModule)
        return self.precision_plugin.optimizer_step(StepProxy(inner, self._push_pull), model=model, closure=closure, **kwargs)

    def _push_pull(self) -> None:
        """WorkerPush.compute -> send -> reply -> WorkerPush.load."""
        assert self._worker is not None and self._pulled is not None and self._optimizer is not None
        push = self._worker.compute(self._pulled, self._push_buf)
        lrs = optimizer_values(self._optimizer, "lr")
        if self._master is not None:
            kind = self._master.serve_local(0, push, lrs, self._pulled)
        else:
            assert self._client is not None
            kind = self._client.exchange(Msg.PUSH, push, lrs, self._pulled)
        if kind == Msg.REFUSED:
            self._on_refused()
        self._worker.load(self._pulled)

    def _on_refused(self) -> None:
        self.refused_pushes += 1
        reset = False
        assert self._optimizer is not None
        for state in self._optimizer.state.values():
            if any(isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in state.values()):
                reset = True
        if reset:  # a NaN in the momentum would poison every later push of this worker
            self._optimizer.state = defaultdict(dict)
        warnings.warn(
            f"lightning-dana: worker rank {self.global_rank}'s push held NaN or Inf; the master refused it and sent "
            f"its current parameters ({self.refused_pushes} refused on this worker"
            + ("; this worker's optimizer state held NaN/Inf and was reset" if reset else "")
            + ")"
        )

    def _check_health(self) -> None:
        """Rank 0 stops (and so every rank, at its next push) when a worker is lost or the master failed."""
        if self._master is None:
            return
        if self._master.error is not None:
            self._master.abort()
            raise MasterFailedError(f"the master's serving thread stopped: {self._master.error}") from self._master.error
        if self._master.lost:
            rank, reason = next(iter(self._master.lost.items()))
            raise WorkerLostError(
                f"{reason}. Lightning's collectives (epoch end, checkpoints, sync_dist) need every rank, so training "
                "stops on all ranks; the master's model is saved by rank 0 "
                f"({self.error_checkpoint or 'no error checkpoint: error_checkpoint=None'}). Resume from it with "
                "trainer.fit(..., ckpt_path=...)"
            )

    def _on_child_exit(self, local_rank: int, returncode: int) -> None:
        """Called by the launcher's watcher thread (rank 0, local runs) when a worker process exits with an error."""
        rank = self.node_rank * self.num_processes + local_rank
        reason = f"worker rank {rank} (local rank {local_rank}) exited with code {returncode}"
        self._lost[rank] = reason
        if self._master is not None:
            self._master.mark_lost(rank, reason)

    # --------------------------------------------------- the master's model for evaluation
    def _load_master(self) -> None:
        """Every rank loads the master's parameters and buffers (a barrier, then a broadcast from rank 0)."""
        assert self._eval_buf is not None and self._worker is not None
        self.barrier("dana_load_master")  # every worker's pushes so far are in
        if self._master is not None:
            self._master.eval_payload(self._eval_buf)
        dist.broadcast(self._eval_buf, src=0)
        self._worker.load(self._eval_buf)

    def on_validation_start(self) -> None:
        if self._fit_active:
            self._load_master()

    def on_validation_end(self) -> None:
        if self._fit_active and self._worker is not None:
            self._worker.load(self._pulled)  # back to this worker's own parameters

    def on_train_end(self) -> None:
        """Stop the master with explicit stop messages, then leave the master's model in every rank's module."""
        if not self._fit_active:
            return
        if self._client is not None:
            self._client.send_done()
        if self._master is not None and not self._master.join(self.timeout_s):
            raise MasterFailedError(
                f"the master still waits for stop messages from workers {sorted(self._master._remote_active())} "
                f"after {self.timeout_s:.0f}s"
            )
        self._check_health()
        if self._master is not None:
            self.master_refused = list(self._master.refused)
        self._load_master()
        self._fit_active = False

    # ------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The master's model as the checkpoint's ``state_dict`` (so ``load_from_checkpoint`` gives it)."""
        state = super().lightning_module_state_dict()
        if not self._fit_active:
            return state
        if not self._no_collectives:
            self.barrier("dana_checkpoint")  # every worker's pushes are in; its optimizer state matches them
        if self._master is None:
            return state
        payload, server_state = self._master.snapshot()
        self._pending_save = {"server": server_state}
        assert self._flat is not None
        return self._flat.state_dict_of(payload, state)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """This worker's optimizer state; rank 0 also gathers every worker's, for the checkpoint."""
        local = super().optimizer_state(optimizer)
        if not self._fit_active:
            return local
        if self._no_collectives:
            gathered: list | None = [local] + [None] * (self.world_size - 1)
        else:
            gathered = [None] * self.world_size if self.global_rank == 0 else None
            dist.gather_object(local, gathered, dst=0)
        if self._pending_save is not None:
            self._pending_save["worker_optimizer_states"] = gathered
        return local

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.is_global_zero and self._pending_save is not None:
            checkpoint["dana"] = {
                "algorithm": self.algorithm,
                "num_workers": self.world_size,
                "worker_optimizer_states": None,
                **self._pending_save,
            }
        self._pending_save = None
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        saved = checkpoint.get("dana")
        if saved is None or not self._fit_active:
            return
        if saved["algorithm"] != self.algorithm:
            raise MisconfigurationException(
                f"the checkpoint was trained with algorithm={saved['algorithm']!r}, this run uses "
                f"{self.algorithm!r}; resume with the same algorithm"
            )
        states = saved.get("worker_optimizer_states") or []
        mine = states[self.global_rank] if self.global_rank < len(states) else None
        if mine is not None and self._optimizer is not None:
            self._optimizer.load_state_dict(mine)
        elif states:
            rank_zero_warn(
                f"the checkpoint holds optimizer states of {len(states)} workers, not of worker rank "
                f"{self.global_rank}; workers without one keep rank 0's"
            )
        if self._master is not None:
            self._load_server_state(saved)

    def _load_server_state(self, saved: dict[str, Any]) -> None:
        assert self._master is not None
        state = saved["server"]
        if saved["num_workers"] != self.world_size:
            if self._master.server.rule.name in ("multi_asgd", "dana_zero"):
                raise MisconfigurationException(
                    f"the checkpoint was made by {saved['num_workers']} workers and algorithm={self.algorithm!r} "
                    f"keeps state per worker; resume with devices * num_nodes = {saved['num_workers']}"
                )
            state = {**state, "pulled_version": [state["version"]] * self.world_size}
        self._master.load_state_dict(state)

    # ------------------------------------------------------------------ faults, teardown
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self._client is not None and not self._client.broken and not isinstance(exception, TrainingAborted):
            try:  # tell the master at once, so the other workers stop too
                self._client.send_done(failed=True, timeout=min(self.timeout_s, 10.0))
            except Exception as error:  # noqa: BLE001 - the original exception is what the user must see
                log.warning(f"could not tell the master that this worker failed: {error}")
        master = self._master
        if master is not None:
            if _is_connection_error(exception) and isinstance(self._launcher, _WatchedSubprocessLauncher):
                deadline = time.monotonic() + 2.0  # give the launcher's watcher a moment to name the dead worker
                while not self._lost and time.monotonic() < deadline:
                    time.sleep(0.1)
            master.abort()  # no-op when a lost worker already set the reason
            self._save_error_checkpoint()
        if _is_connection_error(exception):
            _add_note(exception, self._explain_lost_peer())

    def _explain_lost_peer(self) -> str:
        lost = dict(self._master.lost) if self._master is not None else dict(self._lost)
        who = "; ".join(lost.values()) if lost else "another process (a worker, or rank 0 with the master) is gone"
        if self._error_checkpoint_path:
            saved = f"rank 0 saved the master's model to {self._error_checkpoint_path}"
        elif self._master is not None:
            saved = "rank 0 could not save the master's model (see its log)"
        else:
            saved = (
                "if rank 0 is alive it saved the master's model to "
                f"{os.path.join(self.lightning_module.trainer.default_root_dir, self.error_checkpoint or '?')}"
            )
        return (
            f"lightning-dana (rank {self.global_rank}): lost a peer: {who}. Lightning's collectives need every rank, "
            f"so training stops on all ranks; {saved}; resume with trainer.fit(..., ckpt_path=...)"
        )

    def _save_error_checkpoint(self) -> None:
        """Rank 0 writes the master's model, without collectives (other ranks may be gone)."""
        if not self.error_checkpoint or self._master is None:
            return
        trainer = self.lightning_module.trainer
        path = os.path.join(trainer.default_root_dir, self.error_checkpoint)
        self._no_collectives = True
        try:
            # rank 0's own optimizer state only: the others cannot be gathered without a collective
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            self.save_checkpoint(checkpoint, path)
            self._error_checkpoint_path = path
            log.error(f"[dana] training stopped on an error; rank 0 saved the master's model to {path}")
            print(f"lightning-dana: saved the master's model to {path}", flush=True)
        except Exception as error:  # noqa: BLE001 - never hide the exception that stopped training
            log.error(f"[dana] could not save the master's model to {path}: {error}")
        finally:
            self._no_collectives = False

    @property
    def error_checkpoint_path(self) -> str | None:
        """Where rank 0 saved the master's model after an exception, if it did."""
        return self._error_checkpoint_path

    def teardown(self) -> None:
        master = self._master
        if master is not None and master.running:
            master.abort()
            if not master.join(min(self.timeout_s, 3.0)):
                log.warning(
                    "[dana] the master's serving thread is still blocked in a receive (workers "
                    f"{sorted(master._remote_active())} have not stopped); leaving it, a daemon thread, to exit with the process"
                )
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            module.trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
        path = self._error_checkpoint_path
        refused = self.refused_pushes
        self._reset_fit_state()
        self._error_checkpoint_path, self.refused_pushes = path, refused
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_strategies(strategy_registry)


def register_strategies(registry: Any) -> None:
    """Register ``"dana"``, ``"dana_zero"``, ``"asgd"``, ``"nag_asgd"``, ``"multi_asgd"`` with Lightning."""
    for name in ALGORITHMS:
        registry.register(
            name,
            DANAStrategy,
            description=f"asynchronous data-parallel training, algorithm {name!r}, one worker per process",
            override=True,
            algorithm=name,
        )


def _unsync_sigterm_check(trainer: pl.Trainer) -> None:
    """Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch: a per-step
    collective that lines every worker up with the slowest (measured: fast workers at the straggler's
    rate). Under DANA each rank checks its own flag instead; a rank stopping on SIGTERM tells the
    master (``on_exception``), which stops the others and saves its model."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(type(loop), "_broadcast_sigterm_tensor"):
        return

    def check_local_sigterm() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    loop._broadcast_sigterm_tensor = check_local_sigterm  # instance attribute; removed at teardown


def _is_connection_error(exception: BaseException) -> bool:
    text = str(exception)
    return isinstance(exception, RuntimeError) and any(
        key in text for key in ("Connection closed by peer", "Connection reset by peer", "Read error", "Broken pipe")
    )


def _add_note(exception: BaseException, note: str) -> None:
    """Append ``note`` to the message Lightning re-raises (the same object, as _augment_message does)."""
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0]}\n{note}", *exception.args[1:])
    else:
        exception.add_note(note)


# --------------------------------------------------------------------------------------
# local launches: the same subprocesses as strategy="ddp", a gentler watcher
# --------------------------------------------------------------------------------------
class _WatchedSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with a watcher that reports a dead worker instead of killing rank 0.

    Lightning's own watcher SIGKILLs every process, rank 0 included, five seconds after
    any child fails, and the master (in rank 0) would be lost with it. This one tells
    the strategy, which stops training on every rank and saves the master's model;
    only if rank 0 is still alive ``grace`` seconds later does it kill everything,
    as Lightning's would.
    """

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        on_child_exit: Callable[[int, int], None],
        timeout: float,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._on_child_exit = on_child_exit
        self._grace = timeout + 30.0

    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _ChildWatcher(self.procs, self._on_child_exit, self._grace).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class _ChildWatcher(threading.Thread):
    def __init__(self, procs: list[subprocess.Popen], on_exit: Callable[[int, int], None], grace: float) -> None:
        super().__init__(daemon=True, name="dana-child-watcher")
        self.procs = procs
        self.on_exit = on_exit
        self.grace = grace

    def run(self) -> None:
        reported: set[int] = set()
        first_failure: float | None = None
        while True:
            time.sleep(0.5)
            codes = [p.poll() for p in self.procs]
            if all(code == 0 for code in codes):
                return
            for i, code in enumerate(codes):
                if code and i not in reported:
                    reported.add(i)
                    first_failure = first_failure or time.monotonic()
                    try:
                        self.on_exit(i + 1, code)
                    except Exception as error:  # noqa: BLE001
                        log.error(f"[dana] could not report the exit of local rank {i + 1}: {error}")
            if first_failure is not None and time.monotonic() - first_failure > self.grace:
                log.error("[dana] rank 0 did not stop after a worker failed; terminating every process")
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                os.kill(os.getpid(), 9)
