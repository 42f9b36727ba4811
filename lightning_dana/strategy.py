"""Real asynchronous training: ``Trainer(strategy="dana", devices=N)``, one process per worker.

A thin adapter over Lightning's :class:`~pytorch_lightning.strategies.DDPStrategy`:
launchers, cluster environments (torchrun, SLURM, LSF, MPI) and ranks are
Lightning's; the DDP wrapper is not used. Global rank 0 hosts the master
(:mod:`lightning_dana.service`) and is also worker 0; every rank talks to the
master through one client interface (:mod:`lightning_dana.client`).

The whole of ``fit`` is asynchronous: the master deals the training batches
(:mod:`lightning_dana.data`), every optimizer step is a push and the reply its
next pull (:class:`~lightning_dana.worker.StepProxy` inside the precision
plugin), and Lightning's collectives (barriers, broadcasts, reductions,
``sync_dist``, torchmetrics syncs) act on the local rank alone. Validation,
checkpoints, loggers and stop decisions are rank 0's, on the master's model,
while the other workers keep training; a dead worker's batches are dealt again.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import BatchSampler, DataLoader
from typing_extensions import override

import pytorch_lightning as pl
from lightning_dana import compat, pacing
from lightning_dana.callbacks import MasterView, ensure_gap_monitor
from lightning_dana.client import LocalClient, MasterClient, RemoteClient, TrainingAborted
from lightning_dana.core import DanaCore
from lightning_dana.data import DealtBatchSampler, make_dealer
from lightning_dana.faults import FaultRecord, MasterFailedError
from lightning_dana.launcher import WatchedSubprocessLauncher
from lightning_dana.protocol import AbortCode, Msg
from lightning_dana.rules import ALGORITHMS, check_algorithm
from lightning_dana.service import MasterService
from lightning_dana.state import PushRecord
from lightning_dana.transport import TRANSPORTS, make_transport, resolve_transport
from lightning_dana.worker import StepProxy

log = logging.getLogger(__name__)

ERROR_CHECKPOINT = "dana-master-on-error.ckpt"
PERIODIC_CHECKPOINT = "dana-master-latest.ckpt"

__all__ = ["DANAStrategy", "MasterFailedError", "TrainingAborted", "register_strategies"]


class DANAStrategy(DDPStrategy):
    """Asynchronous data-parallel training with one worker per process and a master in rank 0.

    Args:
        algorithm: an update rule of :data:`lightning_dana.ALGORITHMS` (default ``"dana"``).
        transport: how pushes travel: ``"gloo"`` (CPU tensors), ``"nccl"`` (CUDA tensors, headers on
            gloo), ``"mpi"`` (mpi4py, under ``mpiexec``) or ``"auto"`` (mpi under Lightning's
            MPIEnvironment on CPU, nccl on GPU, else gloo).
        timeout: seconds one request and its reply may take (a push, a pull, a batch).
        idle_timeout: seconds a worker may stay silent before the master declares it lost, a finished
            worker waits for the others' last steps, and set-up waits for every process (the
            process-group timeout). Default: ``max(6 * timeout, 1800)``.
        gap_every: the master measures the gap G of one push in every ``gap_every`` (0: never).
        checkpoint_every: rank 0 writes the master's model to ``dana-master-latest.ckpt`` in the
            Trainer's ``default_root_dir`` each time this many more pushes were applied (0: never).
        error_checkpoint: file name, in ``default_root_dir``, that rank 0 writes the master's model to
            when training stops on an exception (``None``: do not); an existing file is never overwritten.
        max_refused_in_a_row: pushes refused in a row (NaN/Inf, overflow) that stop the run as diverged.
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
        checkpoint_every: int = 0,
        error_checkpoint: str | None = ERROR_CHECKPOINT,
        max_refused_in_a_row: int = 20,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
    ) -> None:
        try:
            check_algorithm(algorithm)
        except ValueError as error:
            raise MisconfigurationException(f"DANAStrategy({error}") from error
        for name, value, ok, need in (
            ("transport", transport, transport in TRANSPORTS, f"one of {', '.join(TRANSPORTS)}"),
            ("timeout", timeout, _positive(timeout), "a number of seconds > 0"),
            ("idle_timeout", idle_timeout, idle_timeout is None or _positive(idle_timeout), "seconds > 0, or None"),
            ("gap_every", gap_every, isinstance(gap_every, int) and gap_every >= 0, "an integer >= 0 (0: never)"),
            ("checkpoint_every", checkpoint_every, isinstance(checkpoint_every, int) and checkpoint_every >= 0, "an integer >= 0 (0: never)"),
            ("max_refused_in_a_row", max_refused_in_a_row, isinstance(max_refused_in_a_row, int) and max_refused_in_a_row >= 1, "an integer >= 1"),
        ):
            if not ok:
                raise MisconfigurationException(f"DANAStrategy({name}={value!r}) must be {need}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            # set-up waits for every process to start: give it the patience of idle_timeout, not of one request
            timeout=timedelta(seconds=float(idle_timeout) if idle_timeout is not None else max(6 * float(timeout), 1800.0)),
            start_method=start_method,
        )
        # evaluation outside fit sees each sample once (compat.unrepeated), so Lightning's warning that its
        # DistributedSampler repeats samples does not apply to this strategy
        warnings.filterwarnings("ignore", message="Using `DistributedSampler` with the dataloaders")
        self.algorithm = algorithm
        self.transport = transport
        self.timeout_s = float(timeout)
        self.idle_timeout_s = float(idle_timeout) if idle_timeout is not None else max(6 * float(timeout), 1800.0)
        self.gap_every = gap_every
        self.checkpoint_every = checkpoint_every
        self.error_checkpoint = error_checkpoint
        self.max_refused_in_a_row = max_refused_in_a_row
        self.refused_pushes = 0  # this worker's pushes the master refused
        self.master_refused: list[int] = []  # rank 0, after fit: refused pushes per worker
        self.lost_workers: dict[int, str] = {}  # rank 0, after fit: workers lost during the run, and why
        self._error_checkpoint_path: str | None = None
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        # created in setup(), after the (spawn) launcher pickled the strategy: no threads or locks before
        self._core: DanaCore | None = None
        self._service: MasterService | None = None
        self._client: MasterClient | None = None
        self._faults: FaultRecord | None = None
        self._pulled: Tensor | None = None
        self._push_buf: Tensor | None = None
        self._async = False  # collectives act on this rank alone
        self._training = False  # between on_train_start and the end of fit
        self._shows_master = False  # the module holds the master's model, not this worker's pull
        self._version_shown = -1  # the master's version at the last epoch-end view (rank 0: checkpoints)
        self._batches = 0  # batches started since this worker's last push
        self._limit_val_batches: Any = None
        self._limit_train_batches: Any = 1.0
        self._rank0_callbacks: list[Any] = []  # ranks 1..N-1: set aside during fit
        self._next_checkpoint = 0
        self._batches_per_epoch = 0  # of the master's epoch (the dealt training DataLoader)
        self._pending_save: dict[str, Any] | None = None
        self._exits: dict[int, int] = {}  # local rank -> exit code, reported by the launcher's watcher

    # ------------------------------------------------------------------ public surface
    @property
    def num_workers(self) -> int:
        """N: one worker per process (``devices * num_nodes``)."""
        return self.world_size

    @property
    def service(self) -> MasterService | None:
        """Rank 0's master during ``fit``; ``None`` on other ranks and outside ``fit``."""
        return self._service

    def drain_push_records(self) -> list[PushRecord]:
        """Pushes the master applied since the last call (rank 0); ``[]`` on other ranks."""
        return self._service.drain_records() if self._service is not None else []

    @property
    def error_checkpoint_path(self) -> str | None:
        """Where rank 0 saved the master's model after an exception, if it did."""
        return self._error_checkpoint_path

    # ------------------------------------------------------------ launch and set-up
    @override
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
            self._launcher = WatchedSubprocessLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, self._on_child_exit
            )
        else:
            super()._configure_launcher()

    @override
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

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are not averaged, each worker pushes to the master instead."""

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        with compat.one_optimizer(f"strategy={self.strategy_name!r}"):
            super().setup_optimizers(trainer)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync is not None:
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} cannot use sync_batchnorm=True: SyncBatchNorm synchronizes every "
                "forward pass across workers; set sync_batchnorm=False (BatchNorm statistics travel with the pushes)"
            )
        interval = trainer.val_check_interval
        if fitting and isinstance(interval, float) and interval < 1.0:
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} cannot use Trainer(val_check_interval={interval}): how many batches "
                "of an epoch rank 0 trains depends on the other workers' speed; use 1.0 (validate after each epoch) "
                "or an int (every so many of rank 0's batches)"
            )
        super().setup(trainer)
        if not fitting:
            return
        _sync_module_states(self.model)  # DDP would have broadcast rank 0's initial weights
        optimizer = _unwrap(self.optimizers[0])
        rank, master = self.global_rank, self.global_rank == 0
        core = DanaCore(self.lightning_module, optimizer, self.algorithm, self.world_size, master, self.gap_every)
        transport_name = resolve_transport(self.transport, self.root_device, self.cluster_environment)
        transport = make_transport(self.transport, self.root_device, self.idle_timeout_s, self.cluster_environment)
        self._core, self._pulled, self._push_buf = core, core.empty(), core.empty()
        groups = len(optimizer.param_groups)
        if master:
            assert core.state is not None
            self._faults = FaultRecord(self.world_size, self.max_refused_in_a_row)
            for local_rank, code in self._exits.items():  # a worker that died before the master existed
                self._on_child_exit(local_rank, code)
            self._service = MasterService(core.state, self._faults, transport, groups, self.timeout_s, self.idle_timeout_s)
            self._client = LocalClient(self._service)
            self._service.start()
        else:
            self._client = RemoteClient(transport, rank, groups, self.timeout_s, self.idle_timeout_s + self.timeout_s)
        self._go_async(trainer)
        compat.forget_train_data(trainer)  # built again, now dealt by the master
        ensure_gap_monitor(trainer)
        if torch.are_deterministic_algorithms_enabled() and master:  # Trainer(deterministic=True) set it
            warnings.warn(
                f"Trainer(deterministic=True) with strategy={self.strategy_name!r}: each worker computes "
                "deterministically, but pushes reach the master in the order the workers finish, which differs "
                "between runs, so two runs differ. For reproducible asynchronous runs simulate the workers with "
                "lightning_dana.SimulatedWorkers (a seeded push order)"
            )
        rank_zero_info(
            f"DANAStrategy: {self.world_size} workers, algorithm={self.algorithm!r}, transport={transport_name!r}, "
            f"{core.flat.payload_numel} values per push"
        )

    def _go_async(self, trainer: pl.Trainer) -> None:
        """From here to the end of fit no rank waits for another: see the module docstring."""
        self._async = True
        compat.local_sigterm_check(trainer)
        compat.set_metric_sync(self.lightning_module, False)
        if self.global_rank != 0:  # validation, checkpoints and stop decisions are rank 0's, on the master's model
            self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
            self._rank0_callbacks = [c for c in trainer.callbacks if isinstance(c, (Checkpoint, EarlyStopping))]
            trainer.callbacks[:] = [c for c in trainer.callbacks if c not in self._rank0_callbacks]
        # the master's dealer limits each epoch; Lightning must not end one by its own count
        self._limit_train_batches, trainer.limit_train_batches = trainer.limit_train_batches, 1.0
        trainer.callbacks.insert(0, MasterView())

    def _leave_async(self, trainer: pl.Trainer) -> None:
        self._async = False
        pacing.unpace(trainer.lr_scheduler_configs)
        compat.restore_sigterm_check(trainer)
        compat.set_metric_sync(self.lightning_module, True)
        if self._limit_val_batches is not None:
            trainer.limit_val_batches = self._limit_val_batches
        trainer.limit_train_batches = self._limit_train_batches
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, MasterView)] + self._rank0_callbacks
        self._rank0_callbacks = []

    # --------------------------------------------------------------- training data
    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """During fit nothing is sharded by rank: rank 0 validates the master's model on the whole
        validation set (the others do not validate), the master deals the training batches, and
        ``trainer.estimated_stepping_batches`` counts the steps of one worker (the master's pushes).
        Outside fit, evaluation is sharded by rank as under DDP."""
        module = self.lightning_module
        if module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING:
            return {"num_replicas": 1, "rank": 0}
        return super().distributed_sampler_kwargs

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """The training DataLoader takes its batches from the master (in place of a DistributedSampler);
        outside fit, evaluation sees every sample exactly once (no DistributedSampler padding)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and not trainer.state.fn == TrainerFn.FITTING and isinstance(dataloader, DataLoader):
            return compat.unrepeated(dataloader, self.world_size, self.global_rank)
        if not (self._async and trainer is not None and trainer.training and isinstance(dataloader, DataLoader)):
            return dataloader
        if type(dataloader.batch_sampler) is not BatchSampler:
            warnings.warn(
                f"strategy={self.strategy_name!r}: the training DataLoader has "
                + ("an iterable dataset" if dataloader.batch_sampler is None else f"a custom batch sampler ({type(dataloader.batch_sampler).__name__})")
                + ", so the master cannot deal its batches; every worker iterates it whole, as it is. Shard it by "
                "rank yourself (trainer.global_rank), or use a map-style dataset to have the master deal batches"
            )
            return dataloader
        assert self._client is not None
        self._batches_per_epoch = make_dealer(dataloader, 0, self._limit_train_batches, None).batches_per_epoch
        if self._service is not None:
            accumulate = trainer.accumulate_grad_batches
            max_batches = trainer.max_steps * accumulate if trainer.max_steps >= 0 else None
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
            self._service.set_dealer(make_dealer(dataloader, seed, self._limit_train_batches, max_batches, max_epochs))
        return compat.with_batch_sampler(dataloader, DealtBatchSampler(self._client, lambda: trainer.current_epoch))

    # --------------------------------------------------------------- training steps
    @override
    def on_train_start(self) -> None:
        if self._client is None:
            return
        assert self._core is not None and self._pulled is not None
        if self._service is not None:
            self._next_checkpoint = self._service.state.version + self.checkpoint_every
        self._training = True
        self._client.pull(self._pulled)
        self._core.load(self._pulled)
        self._pace_schedulers(self.lightning_module.trainer)

    def _pace_schedulers(self, trainer: pl.Trainer) -> None:
        """Per-step LR schedulers follow the master's pushes (pacing.py), as one worker's would."""
        client = self._client
        assert client is not None
        unpaced = pacing.pace(trainer.lr_scheduler_configs, lambda: client.version)
        if unpaced and self.global_rank == 0:
            names = ", ".join(sorted({type(s).__name__ for s in unpaced}))
            warnings.warn(
                f"strategy={self.strategy_name!r}: the per-step LR scheduler(s) {names} cannot follow the master's "
                "pushes (ReduceLROnPlateau, or no integer `last_epoch`), so each steps with its own worker's steps, "
                "about 1/N of one worker's: use a torch.optim.lr_scheduler.LRScheduler, or interval='epoch'"
            )

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._client is None:
            return
        if self._shows_master:  # an epoch-end view of the master: back to this worker's own parameters
            assert self._core is not None and self._pulled is not None
            self._core.load(self._pulled)
            self._shows_master = False
        self._batches += 1
        pacing.catch_up(self.lightning_module.trainer.lr_scheduler_configs)  # to the pull this step computes on

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self._client is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        model = model or self.lightning_module
        assert isinstance(model, pl.LightningModule)
        proxy = StepProxy(_unwrap(optimizer), self._push_pull)
        return self.precision_plugin.optimizer_step(proxy, model=model, closure=closure, **kwargs)

    def _push_pull(self) -> None:
        """Worker.compute -> push -> reply (the next pull) -> load it."""
        core, client, pulled, buf = self._core, self._client, self._pulled, self._push_buf
        assert core is not None and client is not None and pulled is not None and buf is not None
        trainer = self.lightning_module.trainer
        if self._service is not None and trainer.should_stop:
            self._service.request_stop()  # rank 0 decided (EarlyStopping, a callback): every worker stops
        lrs = core.worker.lrs()
        core.worker.compute(pulled, buf)
        kind = client.push(buf, lrs, self._batches, pulled)
        self._batches = 0
        if kind == Msg.REFUSED:
            self.refused_pushes += 1
            reset = core.after_refusal(core.optimizer.state)
            warnings.warn(
                f"lightning-dana: worker rank {self.global_rank}'s push was refused by the master, which sent its "
                f"current parameters ({self.refused_pushes} refused on this worker"
                + ("; this worker's optimizer state held NaN/Inf and was reset" if reset else "")
                + ")"
            )
        core.load(pulled)
        if client.stop:
            trainer.should_stop = True  # the run is over: Lightning ends the epoch after this step
        if self._service is not None and self.checkpoint_every and self._service.state.version >= self._next_checkpoint:
            self._save_master(PERIODIC_CHECKPOINT, overwrite=True)
            self._next_checkpoint = self._service.state.version + self.checkpoint_every

    def progress(self) -> tuple[int, float] | None:
        """(pushes the master has applied, batches per epoch): the step count one worker would have,
        for schedules that must not depend on N (GradualWarmup). ``None`` outside fit."""
        if self._client is None or not self._batches_per_epoch:
            return None
        return self._client.version, float(self._batches_per_epoch) / self.lightning_module.trainer.accumulate_grad_batches

    # ------------------------------------------------ the master's model outside steps
    def show_master(self) -> None:
        """At each epoch end, before the other callbacks: a worker told that the run is over stops (an epoch
        can end without a step that heard it), and the module holds the master's model (for SWA)."""
        if self._client is None or self._core is None or not self._training:
            return
        if self._client.stop:
            self.lightning_module.trainer.should_stop = True
        buf = self._core.empty()
        self._client.evaluate(buf)
        self._core.load(buf)
        self._shows_master = True
        if self._service is not None and self._client.version != self._version_shown:
            # the master moved (perhaps by the others' pushes alone): let ModelCheckpoint save it
            compat.let_checkpoints_save(self.lightning_module.trainer)
            self._version_shown = self._client.version

    def finish_fit(self) -> None:
        """Every rank, first thing at the end of fit: say this worker is done, wait for the run to be over
        (the other workers' steps in flight), and leave the master's final model in the module."""
        if self._client is None or not self._training:
            return
        assert self._core is not None and self._pulled is not None
        self._training = False
        if self._service is not None and self.lightning_module.trainer.should_stop:
            self._service.request_stop()  # rank 0 decided at an epoch end (EarlyStopping): the others stop too
        self._client.finish(self._batches, self._pulled)
        self._core.load(self._pulled)
        if self._service is not None:
            self.master_refused = list(self._service.faults.refused)
            self.lost_workers = self._service.faults.gone()
            self._service.join(self.timeout_s)

    @override
    def on_validation_start(self) -> None:
        if self._service is not None and self._core is not None and self._training:
            self._core.load(self._service.eval_payload(self._core.empty()))

    @override
    def on_validation_end(self) -> None:
        if self._service is not None and self._core is not None and self._pulled is not None and self._training:
            self._core.load(self._pulled)  # back to this worker's own parameters

    @override
    def on_train_end(self) -> None:
        self.finish_fit()  # done by MasterView already, unless a callback ended fit without it
        if self._async:
            self._leave_async(self.lightning_module.trainer)

    # ------------------------------------- collectives: this rank alone during fit
    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not self._async:
            super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self._async else super().broadcast(obj, src)

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """During fit, ``sync_dist=True`` means this rank's own value (rank 0's is what loggers write)."""
        return tensor if self._async else super().reduce(tensor, group, reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """During fit, a gather of this rank alone (a leading dimension of size 1)."""
        return tensor.unsqueeze(0) if self._async else super().all_gather(tensor, group, sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """During fit, rank 0 decides (to stop, to save) and tells the others through the master."""
        if not self._async:
            return super().reduce_boolean_decision(decision, all)
        return bool(decision) if self.global_rank == 0 else False

    # ------------------------------------------------------------------- checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The master's model as the checkpoint's ``state_dict`` (so ``load_from_checkpoint`` gives it)."""
        state = super().lightning_module_state_dict()
        if self._service is None or self._core is None:
            return state  # outside fit
        payload, master, dealer = self._service.snapshot()
        self._pending_save = self._core.checkpoint(master, dealer=dealer)  # resumable, after fit's end too
        if not self._training:  # after finish_fit (ModelCheckpoint's save at on_train_end): the module holds
            return state  # the master's final model, or SWA's average of it, as under DDP
        return self._core.module_state_dict(payload, state)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.is_global_zero and self._pending_save is not None:
            checkpoint["dana"] = self._pending_save
        self._pending_save = None
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        saved = checkpoint.get("dana")
        if saved is None or self._core is None:
            return
        if self.global_rank != 0:
            warnings.warn(
                f"lightning-dana: worker rank {self.global_rank} resumes with the optimizer state saved by rank 0 "
                "(a checkpoint holds rank 0's; every worker's own state is not gathered, so no worker waits for another)"
            )
        master = self._core.resumable_master(saved)
        if self._service is not None:
            self._service.load_state_dict(master, saved.get("dealer"))

    def _save_master(self, name: str, overwrite: bool) -> str | None:
        """Rank 0 writes the master's model to ``default_root_dir/name``, with no collective."""
        trainer = self.lightning_module.trainer
        path = os.path.join(trainer.default_root_dir, name)
        if not overwrite:
            path = _free_path(path)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        tmp = f"{path}.tmp"
        self.save_checkpoint(checkpoint, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
        return path

    # ------------------------------------------------------------------ faults, teardown
    def _on_child_exit(self, local_rank: int, returncode: int) -> None:
        """The launcher's watcher (rank 0, local runs): a worker process exited with an error."""
        self._exits[local_rank] = returncode
        if self._service is not None:
            rank = self.node_rank * self.num_processes + local_rank
            self._service.lose(rank, f"worker rank {rank} (local rank {local_rank}) exited with code {returncode}")

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self._client is None:
            return
        if self._service is None:
            if not isinstance(exception, (TrainingAborted, MasterFailedError)):
                try:  # tell the master at once, so it deals this worker's batches to the others
                    self._client.fail()
                except Exception as error:  # noqa: BLE001 - the original exception is what the user must see
                    log.warning(f"could not tell the master that this worker failed: {error}")
            return
        reason = f"rank 0 (the master's process) stopped on {type(exception).__name__}: {exception}"
        abort = self._service.faults.abort(AbortCode.MASTER_FAILED, reason)
        if self._training and self.error_checkpoint:
            try:
                self._error_checkpoint_path = self._save_master(self.error_checkpoint, overwrite=False)
                log.error(f"[dana] training stopped on an error; rank 0 saved the master's model to {self._error_checkpoint_path}")
                print(f"lightning-dana: saved the master's model to {self._error_checkpoint_path}", flush=True)
            except Exception as error:  # noqa: BLE001 - never hide the exception that stopped training
                log.error(f"[dana] could not save the master's model: {error}")
        _add_note(exception, f"lightning-dana: {abort.reason}; " + (
            f"the master's model is in {self._error_checkpoint_path} (resume with trainer.fit(..., ckpt_path=...))"
            if self._error_checkpoint_path else "no error checkpoint was written"
        ))
        self._training = False
        self._service.join(min(self.timeout_s, 30.0))  # each worker's next message gets ABORT with the reason

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if self._async and module is not None and module._trainer is not None:
            self._leave_async(module.trainer)
        if self._service is not None and not self._service.join(min(self.timeout_s, 3.0)):
            log.warning(f"[dana] serving threads still wait for workers {self._service.faults.active()}; they end with the process")
        if isinstance(self._launcher, WatchedSubprocessLauncher) and self._launcher.watcher is not None:
            self._launcher.watcher.stop()
        self._reset_fit_state()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_strategies(strategy_registry)


def register_strategies(registry: Any) -> None:
    """Register every name of :data:`lightning_dana.ALGORITHMS` as a Lightning strategy."""
    for name in ALGORITHMS:
        registry.register(
            name,
            DANAStrategy,
            description=f"asynchronous data-parallel training, algorithm {name!r}, one worker per process",
            override=True,
            algorithm=name,
        )


def _unwrap(optimizer: Any) -> Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _free_path(path: str) -> str:
    """``path``, or ``stem-1.ext``, ``stem-2.ext``, ... : the first that does not exist."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def _add_note(exception: BaseException, note: str) -> None:
    """Append ``note`` to the message Lightning re-raises (the same object, as _augment_message does)."""
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0]}\n{note}", *exception.args[1:])
    else:
        exception.add_note(note)
