"""Local launches (``devices=N`` without an external launcher): Lightning's subprocesses, a gentler watcher.

Lightning's own watcher SIGKILLs every process, rank 0 and its master included,
a few seconds after any child fails. Under DANA a dead worker is an event the
master handles (its batches are dealt again, the others go on), so this watcher
only reports the exit to the strategy and kills nobody.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from lightning_fabric.plugins import ClusterEnvironment
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from typing_extensions import override

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class WatchedSubprocessLauncher(_SubprocessScriptLauncher):
    """Re-runs the script for local ranks 1..N-1, as ``strategy="ddp"`` does; reports, never kills."""

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        on_child_exit: Callable[[int, int], None],
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._on_child_exit = on_child_exit
        self.watcher: ChildWatcher | None = None

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.watcher = ChildWatcher(self.procs, self._on_child_exit)
            self.watcher.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class ChildWatcher(threading.Thread):
    """Polls the child processes; calls ``on_exit(local_rank, returncode)`` once for each that fails."""

    def __init__(self, procs: list[subprocess.Popen], on_exit: Callable[[int, int], None], interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="dana-child-watcher")
        self.procs = procs
        self.on_exit = on_exit
        self.interval = interval
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @override
    def run(self) -> None:
        reported: set[int] = set()
        while not self._stop.wait(self.interval):
            codes = [p.poll() for p in self.procs]
            for i, code in enumerate(codes):
                if code and i not in reported:
                    reported.add(i)
                    try:
                        self.on_exit(i + 1, code)
                    except Exception as error:  # noqa: BLE001 - a report must never kill the watcher
                        log.error(f"[dana] could not report the exit of local rank {i + 1}: {error}")
            if all(code is not None for code in codes):
                return
