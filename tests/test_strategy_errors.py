"""What DANAStrategy refuses, and how: before any process starts where possible, else at setup."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import lightning_dana
from lightning_dana import DANAStrategy

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_runner import PYTHON, SCRIPTS, run  # noqa: E402


@pytest.mark.parametrize("name", ["dana", "dana_zero", "asgd", "nag_asgd", "multi_asgd"])
def test_names_are_registered(name: str) -> None:
    assert name in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
    assert isinstance(trainer.strategy, DANAStrategy)
    assert trainer.strategy.algorithm == name
    assert trainer.strategy.num_workers == 2


def test_register_strategies_is_idempotent() -> None:
    lightning_dana.register_strategies(StrategyRegistry)
    assert StrategyRegistry["dana"]["strategy"] is DANAStrategy


def test_unknown_algorithm_names_the_choices() -> None:
    with pytest.raises(MisconfigurationException, match=r"algorithm='adamw' is not known; choose one of asgd, nag_asgd"):
        DANAStrategy(algorithm="adamw")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transport": "tcp"}, r"transport='tcp'.*one of auto, gloo, nccl, mpi"),
        ({"timeout": 0}, r"timeout=0.*seconds > 0"),
        ({"gap_every": -1}, r"gap_every=-1"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        DANAStrategy(**kwargs)


def test_one_device_is_refused_before_any_process_starts() -> None:
    with pytest.raises(MisconfigurationException, match=r"at least 2.*devices=1.*SimulatedWorkers"):
        pl.Trainer(accelerator="cpu", devices=1, strategy="dana")


def test_refusals_at_setup_name_the_way_out(tmp_path: Path) -> None:
    out = tmp_path / "errors"
    rc, output, _ = run([PYTHON, str(SCRIPTS / "dana_bad_input.py"), str(out)], timeout=180)
    assert rc == 0, output[-4000:]
    for rank in (0, 1):
        errors = json.loads(Path(f"{out}.{rank}").read_text())
        assert "manual optimization" in errors["manual"] and "strategy='ddp'" in errors["manual"]
        # Lightning itself refuses several optimizers under automatic optimization, before the strategy sees them
        assert "multiple optimizers" in errors["two_optimizers"] or "exactly one optimizer" in errors["two_optimizers"]
        assert "torch.optim.SGD" in errors["adam_asgd"] and "algorithm='dana'" in errors["adam_asgd"]
        assert errors["adam_dana"] is None  # dana carries any optimizer's step


def test_lightning_cli_yaml_class_path(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 2
  max_epochs: 1
  limit_train_batches: 8
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  strategy:
    class_path: lightning_dana.DANAStrategy
    init_args:
      algorithm: dana_zero
      timeout: 60
"""
    )
    rc, output, _ = run([PYTHON, str(SCRIPTS / "dana_cli.py"), "fit", "--config", str(config)], timeout=180)
    assert rc == 0, output[-4000:]
    # the 8 batches of the epoch are dealt to both workers: rank 0 takes some of them
    steps = re.search(r"CLI-RESULT DANAStrategy dana_zero (\d+)", output)
    assert steps is not None and 1 <= int(steps.group(1)) <= 8, output[-2000:]
