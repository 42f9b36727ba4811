"""The examples users copy: recipes run on fake data, configs parse, MNIST-1D learns offline.

Everything here runs on CPU in well under a minute: FakeData with few, small
images, a few steps per recipe, and MNIST-1D at a few thousand samples.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is a folder at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from examples.cifar.data import CIFARDataModule  # noqa: E402
from examples.cifar.models import resnet20, wrn16_4  # noqa: E402
from examples.cifar.module import CIFARClassifier  # noqa: E402
from examples.imagenet.data import ImageNetDataModule  # noqa: E402
from examples.imagenet.module import ImageNetClassifier  # noqa: E402
from examples.mnist1d.data import MNIST1DDataModule, generate_raw  # noqa: E402
from examples.mnist1d.model import MNIST1DClassifier  # noqa: E402

try:
    from lightning_dana import GradualWarmup, MomentumCorrection, SimulatedWorkers
except ImportError:  # the strategy is built concurrently with these examples
    SimulatedWorkers = None

needs_simulated = pytest.mark.skipif(SimulatedWorkers is None, reason="lightning_dana.SimulatedWorkers missing")
EXAMPLES = ROOT / "examples"




@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mnist1d"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the examples must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


# MNIST-1D -------------------------------------------------------------------------------


def test_mnist1d_generation_reproduces_make_dataset(no_network):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = 300, 5, 1.0
    reference = make_dataset(args)
    x, y = generate_raw(300, 5)
    torch.testing.assert_close(torch.from_numpy((x - x.mean()) / x.std()), torch.from_numpy(reference["x"]))
    assert (y == reference["y"]).all()


def test_mnist1d_datamodule_splits_and_caches(tmp_path, no_network, monkeypatch):
    dm = MNIST1DDataModule(num_samples=1000, num_test_samples=400, val_fraction=0.1, data_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path.exists()
    sizes = {split: len(ds) for split, ds in dm.datasets.items()}
    assert sizes == {"train": 900, "val": 100, "test": 400}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(dm.datasets["train"].tensors[0].mean())) < 1e-3  # standardised with train stats

    # A second module with the same arguments reads the cache and generates nothing.
    import examples.mnist1d.data as data

    monkeypatch.setattr(data, "build_arrays", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    again = MNIST1DDataModule(num_samples=1000, num_test_samples=400, val_fraction=0.1, data_dir=str(tmp_path))
    again.setup("test")
    assert torch.equal(again.datasets["test"].tensors[1], dm.datasets["test"].tensors[1])


def test_mnist1d_test_set_does_not_depend_on_training_arguments(tmp_path):
    a = MNIST1DDataModule(num_samples=500, seed=0, num_test_samples=200, data_dir=str(tmp_path))
    b = MNIST1DDataModule(num_samples=700, seed=1, num_test_samples=200, data_dir=str(tmp_path))
    a.setup(), b.setup()
    assert a.cache_path != b.cache_path
    assert torch.equal(a.datasets["test"].tensors[1], b.datasets["test"].tensors[1])


def test_mnist1d_single_worker_learns(mnist1d_dir):
    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(num_samples=2000, num_test_samples=1000, batch_size=64, data_dir=mnist1d_dir)
    model = MNIST1DClassifier()
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(model, datamodule=data)
    assert model.resolved_milestones() == [4, 6]
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert metrics["test_acc"] > 0.8, metrics


@needs_simulated
def test_mnist1d_learns_under_simulated_dana_workers(mnist1d_dir):
    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(num_samples=3000, num_test_samples=1000, batch_size=64, data_dir=mnist1d_dir)
    model = MNIST1DClassifier()
    trainer = quiet_trainer(
        max_epochs=8,
        strategy=SimulatedWorkers(num_workers=4, algorithm="dana", schedule="block_random", seed=0),
        callbacks=[GradualWarmup(epochs=1), MomentumCorrection()],
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert metrics["test_acc"] > 0.8, metrics


@needs_simulated
def test_mnist1d_demo_runs_simulated(tmp_path, capsys):
    from examples.mnist1d.demo import main

    results = main(["--mode", "simulated", "--workers", "2", "--epochs", "1", "--num-samples", "600",
                    "--data-dir", str(tmp_path)])
    assert [r.workers for r in results] == [1, 2]
    assert all(0.0 <= r.test_acc <= 1.0 for r in results)
    assert "vs. baseline" in capsys.readouterr().out


def test_mnist1d_demo_runs_real_worker_processes(tmp_path):
    """The README's main job, default mode: baseline, then N worker processes under dana and under DDP,
    the last one slowed down; plain per-epoch lines (stdout is not a terminal), one table from rank 0."""
    import subprocess

    from pytorch_lightning.strategies import StrategyRegistry

    import lightning_dana  # noqa: F401

    if "dana" not in StrategyRegistry:
        pytest.skip('Trainer(strategy="dana") is not registered yet')
    cmd = [sys.executable, "-m", "examples.mnist1d.demo", "--mode", "real", "--workers", "2", "--epochs", "1",
           "--num-samples", "600", "--data-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "dana, 2 worker processes (rank 1 2x slower)" in out, out[-3000:]
    assert "ddp, 2 worker processes (rank 1 2x slower)" in out
    assert "vs. baseline" in out and "less time than ddp" in out
    assert out.count("test acc  train time") == 1  # only rank 0 prints the table
    assert "[dana] epoch 1/1" in out and "[ddp] epoch 1/1" in out and "[baseline] epoch 1/1" in out
    assert "\r" not in out and "it/s" not in done.stderr  # no progress-bar redraws when not on a terminal
    assert "each of the 4000 test samples counted once" in out


# Paper recipes on FakeData ------------------------------------------------------------


def test_resnet20_has_the_papers_size():
    assert sum(p.numel() for p in resnet20().parameters()) == 269_722  # "0.27M", He et al. Table 6
    assert sum(p.numel() for p in wrn16_4().parameters()) == pytest.approx(2.75e6, rel=0.01)  # "2.7M"


@pytest.mark.parametrize(
    ("arch", "dataset", "image_size"), [("resnet20", "cifar10", 32), ("wrn16_4", "cifar100", 16)]
)
def test_cifar_recipe_trains_on_fake_data(arch, dataset, image_size):
    data = CIFARDataModule(dataset=dataset, batch_size=8, num_workers=0, fake_data=True,
                           fake_train_size=32, fake_test_size=16, image_size=image_size)
    model = CIFARClassifier(arch=arch, num_classes=data.num_classes, milestones=[1])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert set(metrics) >= {"test_acc", "test_loss"}
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, image_size, image_size)
    assert model(x).shape == (8, 100 if dataset == "cifar100" else 10)


def test_imagenet_recipe_trains_on_fake_data():
    data = ImageNetDataModule(batch_size=2, num_workers=0, fake_data=True, fake_train_size=4, fake_val_size=2,
                              image_size=32)
    model = ImageNetClassifier(num_classes=data.num_classes)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert "test_acc" in metrics
    assert model.network.fc.out_features == 1000


def test_missing_data_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="fake_data"):
        CIFARDataModule(data_dir=str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="fake_data"):
        ImageNetDataModule(data_dir=str(tmp_path), num_workers=0).setup("fit")


@needs_simulated
def test_cifar_recipe_runs_under_simulated_workers():
    data = CIFARDataModule(batch_size=8, num_workers=0, fake_data=True, fake_train_size=48, fake_test_size=8)
    model = CIFARClassifier(arch="resnet20", milestones=[80, 120])
    trainer = quiet_trainer(
        max_epochs=1,
        limit_val_batches=1,
        strategy=SimulatedWorkers(num_workers=3, algorithm="dana", schedule="block_random", seed=0),
        callbacks=[GradualWarmup(), MomentumCorrection()],
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 6
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert torch.isfinite(torch.tensor(metrics["test_loss"]))


# LightningCLI configs ------------------------------------------------------------------

RECIPES = {  # config -> (train module, expected model hyperparameters, max_epochs, num_classes)
    "cifar/resnet20_cifar10.yaml": ("cifar", dict(arch="resnet20", lr=0.1, weight_decay=1e-4, milestones=[80, 120], gamma=0.1), 160, 10),
    "cifar/wrn16_4_cifar10.yaml": ("cifar", dict(arch="wrn16_4", lr=0.1, weight_decay=5e-4, milestones=[60, 120, 160], gamma=0.2), 200, 10),
    "cifar/wrn16_4_cifar100.yaml": ("cifar", dict(arch="wrn16_4", lr=0.1, weight_decay=5e-4, milestones=[60, 120, 160], gamma=0.2), 200, 100),
    "imagenet/resnet50.yaml": ("imagenet", dict(lr=0.1, weight_decay=1e-4, milestones=[30, 60], gamma=0.1), 90, 1000),
    "mnist1d/config.yaml": ("mnist1d", dict(lr=0.1, weight_decay=5e-4, milestones=[10, 15], gamma=0.1), 20, 10),
}


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    """LightningCLI warns when it gets ``args`` while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["train"])


def cli_main(example: str):
    import importlib

    return importlib.import_module(f"examples.{example}.train").main


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_recipe_config_holds_the_papers_hyperparameters(config, tmp_path):
    from examples.cli import run_cli

    example, expected, max_epochs, num_classes = RECIPES[config]
    module = __import__(f"examples.{example}.train", fromlist=["main"])
    classes = [v for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, (pl.LightningModule, pl.LightningDataModule))]
    model_class = next(c for c in classes if issubclass(c, pl.LightningModule))
    data_class = next(c for c in classes if issubclass(c, pl.LightningDataModule))
    fake = ["--data.fake_data=true"] if example != "mnist1d" else ["--data.data_dir", str(tmp_path)]
    cli = run_cli(model_class, data_class, args=["--config", str(EXAMPLES / config), *fake], run=False)
    hp = cli.model.hparams
    assert {k: hp[k] for k in expected} == expected
    assert hp.momentum == 0.9 and hp.nesterov is True
    assert hp.num_classes == num_classes  # linked from the data
    assert cli.trainer.max_epochs == max_epochs
    assert cli.datamodule.hparams.batch_size == (256 if example == "imagenet" else 128)


@needs_simulated
@pytest.mark.parametrize(
    ("example", "configs", "extra"),
    [
        ("mnist1d", ["mnist1d/config_simulated.yaml"], ["--data.num_samples=600", "--data.num_test_samples=200"]),
        ("cifar", ["cifar/resnet20_cifar10.yaml", "strategies/simulated_dana.yaml"],
         ["--data.fake_data=true", "--data.fake_train_size=16", "--data.fake_test_size=8", "--data.batch_size=4",
          "--data.num_workers=0", "--trainer.strategy.init_args.num_workers=2"]),
    ],
)
def test_cli_fit_then_test_under_simulated_workers(example, configs, extra, tmp_path):
    args = ["fit"]
    for config in configs:
        args += ["--config", str(EXAMPLES / config)]
    if example == "mnist1d":
        args += ["--data.data_dir", str(tmp_path)]
    args += [*extra, "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(example)(args)
    assert isinstance(cli.trainer.strategy, SimulatedWorkers)
    assert cli.trainer.global_step == 2
    assert "test_acc" in cli.trainer.callback_metrics  # fit was followed by test
    assert {type(c).__name__ for c in cli.trainer.callbacks} >= {"GradualWarmup", "MomentumCorrection"}


def test_real_strategy_overlay_parses(tmp_path):
    from pytorch_lightning.strategies import StrategyRegistry

    if "dana" not in StrategyRegistry:
        pytest.skip('Trainer(strategy="dana") is not registered yet')
    from examples.cli import run_cli

    cli = run_cli(CIFARClassifier, CIFARDataModule, run=False, args=[
        "--config", str(EXAMPLES / "cifar/resnet20_cifar10.yaml"), "--config", str(EXAMPLES / "strategies/dana.yaml"),
        "--data.fake_data=true", "--trainer.devices=2", "--trainer.accelerator=cpu"])
    assert type(cli.trainer.strategy).__name__ == "DANAStrategy"
    assert cli.trainer.num_devices == 2
