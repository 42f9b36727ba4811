"""What a GPU changes, checked on one CUDA device (the CI machine has none).

1. Every algorithm, simulated on CUDA, follows the CPU trajectory: ``SimulatedWorkers(4, a)`` trains
   the same tiny BatchNorm model from the same seed on ``cpu`` and on ``cuda``; the final parameters
   must agree to float32 rounding (relative difference printed, and a failure above 1e-3).
2. The real master's state on CUDA (where it lives under the NCCL transport): for every algorithm,
   NaN and overflowing pushes are refused and leave it unchanged.

NCCL between processes needs one GPU per rank (NCCL refuses two ranks on one device), so the
multi-process NCCL path needs a machine with two or more GPUs; it is not run here.

    python benchmarks/gpu_check.py            # exits 1 when a check fails
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from tiny import TinyClassifier, loader  # noqa: E402

from lightning_dana import ALGORITHMS, SimulatedWorkers  # noqa: E402


def final_params(algorithm: str, accelerator: str) -> torch.Tensor:
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, strategy=SimulatedWorkers(4, algorithm, seed=0),
                         max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True)
    trainer.fit(model, loader(shuffle=False))
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def check_simulated() -> bool:
    ok = True
    for algorithm in ALGORITHMS:
        cpu, gpu = final_params(algorithm, "cpu"), final_params(algorithm, "gpu")
        diff = float((cpu - gpu).abs().max() / cpu.abs().max().clamp_min(1e-12))
        good = bool(torch.isfinite(gpu).all()) and diff < 1e-3
        ok &= good
        print(f"simulated {algorithm:>10}: max relative difference cuda vs cpu {diff:.2e} {'ok' if good else 'FAILED'}")
    return ok


def check_refusals() -> bool:
    """The real master (NCCL transport) keeps its state on the GPU: its checks must hold there too."""
    from lightning_dana.rules import make_rule
    from lightning_dana.state import MasterState, RefusedPushError

    ok = True
    for algorithm in ALGORITHMS:
        state = MasterState(make_rule(algorithm, torch.zeros(6, device="cuda"), 2, 0.9), [6], torch.zeros(0, device="cuda"))
        state.push(0, torch.ones(6, device="cuda"), 0.1)
        before = state.eval_payload().clone()
        refused = 0
        for bad in (torch.full((6,), float("nan")), torch.full((6,), 3e38)):
            try:
                state.push(1, bad.cuda(), 0.1)
            except RefusedPushError:
                refused += 1
        good = refused == 2 and torch.equal(state.eval_payload(), before) and state.version == 1
        ok &= good
        print(f"master on cuda {algorithm:>10}: NaN and overflowing pushes refused, state unchanged {'ok' if good else 'FAILED'}")
    return ok


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_check.py needs a CUDA device (torch.cuda.is_available() is False)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, pytorch_lightning {pl.__version__}")
    ok = check_simulated()
    ok &= check_refusals()
    print("all GPU checks passed" if ok else "a GPU check FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
