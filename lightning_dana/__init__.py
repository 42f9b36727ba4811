"""Asynchronous data-parallel training with DANA for PyTorch Lightning."""

from lightning_dana.callbacks import GapMonitor, GradualWarmup, MomentumCorrection
from lightning_dana.rules import ALGORITHMS, UpdateRule, make_rule
from lightning_dana.schedules import SCHEDULES, make_schedule
from lightning_dana.simulation import SimulatedWorkers

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "SCHEDULES",
    "GapMonitor",
    "GradualWarmup",
    "MomentumCorrection",
    "SimulatedWorkers",
    "UpdateRule",
    "make_rule",
    "make_schedule",
]

import pytorch_lightning.strategies as _pl_strategies

from lightning_dana.client import MasterRefusedError, TrainingAborted
from lightning_dana.faults import MasterFailedError
from lightning_dana.strategy import DANAStrategy, register_strategies

register_strategies(_pl_strategies.StrategyRegistry)
__all__ += ["DANAStrategy", "MasterFailedError", "MasterRefusedError", "TrainingAborted", "register_strategies"]
