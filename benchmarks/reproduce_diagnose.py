"""Why do dana, nag_asgd and asgd break at N = 8 and 16 on the MNIST-1D recipe? (issue 8, part 1)

    python benchmarks/reproduce_diagnose.py                 # 7 traced runs (~5 min on one core), then the figure
    python benchmarks/reproduce_diagnose.py --report-only   # the figure and table again from the JSON traces

Each run is one cell of the main sweep (lr 0.4 recipe, block-random, seed 0), traced step by step:
training loss, lr in force, lag and gap (GapMonitor), the master's step size and parameter norm,
the largest BatchNorm running variance the master holds, validation error of the master per epoch,
and every ``--sharpness-every`` steps the sharpness λ_max (largest Hessian eigenvalue of the training
loss at the master's parameters, power iteration on one fixed batch of 1 024 training samples, BatchNorm
in training mode as in a step). η·λ_max is compared with the stability edges of the three algorithms'
linear models (``lightning_dana.rules.stability_edge``): one worker is stable on a quadratic of
curvature h only for ηh below a₁, N workers taking turns only below a(N − 1).

Outputs under ``--out`` (default ``docs/results/diagnosis``): one ``<run>.json`` per run,
``diagnosis.png`` and ``diagnosis.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
import math
import sys
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce as rp  # noqa: E402

RUNS = [(1, "baseline"), (8, "asgd"), (8, "nag_asgd"), (8, "dana"), (16, "asgd"), (16, "nag_asgd"), (16, "dana")]


class Trace(pl.Callback):
    """Per step: loss, lr, master step and norm, BN variance; per epoch: master's validation error; sharpness."""

    def __init__(self, probe, sharpness_every: int) -> None:
        self.probe = probe  # (x, y) fixed batch for the sharpness
        self.every = sharpness_every
        self.rows: list[dict] = []
        self.epochs: list[dict] = []
        self.sharpness: list[dict] = []
        self._prev = None

    def master(self, trainer, module):
        import torch

        server = getattr(trainer.strategy, "server", None)  # ParameterServer (before the core redesign)
        if server is None:  # MasterState inside the shared core (after it)
            server = getattr(getattr(trainer.strategy, "_core", None), "state", None)
        if server is None:  # one worker, no strategy: the module is the master
            return torch.cat([p.detach().reshape(-1) for p in module.parameters()]), None
        return server.rule.eval_params(), server.buffers

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        import torch

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        theta, buffers = self.master(trainer, module)
        step = float((theta - self._prev).norm()) if self._prev is not None else math.nan
        self._prev = theta.clone()
        bn_var = max(float(m.running_var.max()) for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d))
        row = {
            "step": trainer.global_step, "loss": float(loss), "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "step_norm": step, "theta_norm": float(theta.norm()), "bn_var_max": bn_var,
        }  # fmt: skip
        self.rows.append(row)
        if trainer.global_step % self.every == 0:
            self.sharpness.append({"step": trainer.global_step, "lambda_max": self.lambda_max(module, theta)})

    def lambda_max(self, module, theta, iters: int = 20) -> float:
        import torch

        net = copy.deepcopy(module)
        net.train()
        params = list(net.parameters())
        torch.nn.utils.vector_to_parameters(theta.detach().clone(), params)
        x, y = self.probe
        loss = torch.nn.functional.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        v = torch.randn_like(flat, generator=torch.Generator().manual_seed(0))
        v /= v.norm()
        eig = 0.0
        for _ in range(iters):
            hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params, retain_graph=True)])
            eig = float(v @ hv)
            v = hv / (hv.norm() + 1e-30)
        return eig

    def on_validation_epoch_end(self, trainer, module) -> None:
        acc = trainer.callback_metrics.get("val_acc")
        if acc is not None and not trainer.sanity_checking:
            self.epochs.append({"epoch": trainer.current_epoch, "val_error": 100.0 * (1.0 - float(acc))})


def trace_one(workers: int, algorithm: str, recipe: rp.Recipe, data_dir: str, out: Path, sharpness_every: int) -> None:
    import torch

    rp.quiet_worker()
    import lightning_dana as ld
    from examples.mnist1d.data import MNIST1DDataModule
    from examples.mnist1d.model import MNIST1DClassifier

    spec = rp.RunSpec(workers, algorithm, "block_random" if workers > 1 else rp.SHARED, 0)
    pl.seed_everything(spec.seed, verbose=False)
    data = MNIST1DDataModule(num_samples=recipe.num_samples, batch_size=recipe.batch_size, seed=recipe.data_seed, data_dir=data_dir)
    data.setup()
    x, y = data.datasets["train"].tensors
    probe = (x[:1024].clone(), y[:1024].clone())
    model = MNIST1DClassifier(
        channels=recipe.channels, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
    )
    monitor = ld.GapMonitor(logging_interval=5, prog_bar=False)
    trace = Trace(probe, sharpness_every)
    kwargs = rp.build_trainer_kwargs(spec, recipe, monitor)
    kwargs["callbacks"] += [trace] + ([monitor] if monitor not in kwargs["callbacks"] else [])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip
    torch.manual_seed(spec.seed)
    trainer.fit(model, datamodule=data)
    test_error = rp.evaluate_error(model, data.datasets["test"])
    history = [h for h in monitor.history if h.get("dana/pushes")]
    result = {
        "workers": workers, "algorithm": algorithm, "lr": recipe.lr, "test_error": test_error,
        "steps": trace.rows, "epochs": trace.epochs, "sharpness": trace.sharpness,
        "gap": [{"step": h["step"], "gap": h.get("dana/gap_mean", math.nan), "lag": h["dana/lag_mean"]} for h in history],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"N{workers}_{algorithm}.json").write_text(json.dumps(result))
    print(f"N={workers} {algorithm}: test error {test_error:.2f}%", flush=True)


def break_step(steps: list[dict]) -> int | None:
    """First step whose loss, smoothed over 10 steps, is above twice the lowest smoothed loss so far and above 1."""
    losses = [r["loss"] for r in steps]
    best = math.inf
    for i in range(10, len(losses)):
        smooth = sum(losses[i - 10 : i]) / 10
        if not math.isfinite(smooth) or (smooth > 2 * best and smooth > 1.0):
            return steps[i]["step"]
        best = min(best, smooth)
    return None


def report(out: Path, momentum: float = 0.9) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_dana.rules import stability_edge

    runs = {}
    for f in sorted(out.glob("N*_*.json")):
        r = json.loads(f.read_text())
        runs[(r["workers"], r["algorithm"])] = r
    if not runs:
        return
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    (a, b, e), (c, d, f) = axes
    colors = defaultdict(lambda: "tab:purple", {"baseline": "k", "asgd": "tab:blue", "nag_asgd": "tab:red", "dana": "tab:green"})
    for (n, alg), r in runs.items():
        ls = "-" if n <= 8 else "--"
        steps = r["steps"]
        a.plot([s["step"] for s in steps], [s["loss"] for s in steps], ls, lw=0.6, color=colors[alg], label=f"{alg} N={n}")
        if r["gap"]:
            c.plot([g["step"] for g in r["gap"]], [g["gap"] for g in r["gap"]], ls, lw=0.8, color=colors[alg], label=f"{alg} N={n}")
        if r["sharpness"]:
            lrs = {s["step"]: s["lr"] for s in steps}
            pts = [(s["step"], lrs.get(s["step"], r["lr"]) * s["lambda_max"]) for s in r["sharpness"]]
            b.plot(*zip(*pts), ls, marker="o", ms=3, color=colors[alg], label=f"{alg} N={n}")
        d.plot([x["epoch"] + 1 for x in r["epochs"]], [x["val_error"] for x in r["epochs"]], ls, marker="o", ms=3,
               color=colors[alg], label=f"{alg} N={n}")  # fmt: skip
        e.plot([s["step"] for s in steps], [s["theta_norm"] for s in steps], ls, lw=0.8, color=colors[alg])
        f.plot([s["step"] for s in steps], [s["bn_var_max"] for s in steps], ls, lw=0.8, color=colors[alg])
    for alg, key in (("asgd", "asgd"), ("nag_asgd", "nag_asgd"), ("dana", "dana")):
        for n, ls in ((1, ":"), (8, "-."), (16, (0, (1, 3)))):
            if n == 1 and alg == "asgd":
                continue
            b.axhline(stability_edge(key, n - 1, momentum), color=colors[alg] if n > 1 else "k", ls=ls, lw=0.8)
    b.text(0.01, stability_edge("dana", 0, momentum) * 1.05, "edge, 1 worker (Nesterov)", fontsize=7)
    for ax in (a, c, b):
        ax.set_yscale("log")
    a.set(xlabel="step (push)", ylabel="training loss", title="(a) training loss per step")
    b.set(xlabel="step", ylabel="η·λ_max at the master", title="(b) η·λ_max; lines: edges a(N−1), N=8 -., N=16 ..")
    c.set(xlabel="step", ylabel="gap", title="(c) gap during training")
    d.set(xlabel="epoch", ylabel="validation error of the master (%)", title="(d) master's validation error per epoch", yscale="log")
    e.set(xlabel="step", ylabel="‖θ‖ of the master", title="(e) parameter norm")
    f.set(xlabel="step", ylabel="largest BatchNorm running variance", title="(f) BatchNorm statistics", yscale="log")
    for ax in (a, b, c, d, e, f):
        ax.grid(alpha=0.3, which="both")
    d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnosis.png", dpi=90)
    plt.close(fig)
    lines = [
        "| N | algorithm | test error (%) | break step (epoch) | loss min before | η·λ_max max (this run, master) | stability edge a(N−1) |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for (n, alg), r in sorted(runs.items()):
        steps = r["steps"]
        br = break_step(steps)
        per_epoch = len(steps) / 8
        brs = "none" if br is None else f"{br} ({br / per_epoch:.2f})"
        lrs = {s["step"]: s["lr"] for s in steps}
        sharp = max((lrs.get(s["step"], r["lr"]) * s["lambda_max"] for s in r["sharpness"]), default=math.nan)
        key = alg if alg in ("asgd", "nag_asgd") else "dana"
        edge = stability_edge(key, n - 1, 0.0 if alg == "asgd" else momentum)
        lmin = min(s["loss"] for s in steps[: (br or len(steps))])
        lines.append(f"| {n} | {alg} | {r['test_error']:.2f} | {brs} | {lmin:.3f} | {sharp:.3f} | {edge:.4f} |")
    (out / "diagnosis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/diagnosis")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sharpness-every", type=int, default=47)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--runs", nargs="+", default=None, help="N:algorithm pairs, e.g. 8:dana")
    args = parser.parse_args()
    if args.data_dir is None:
        from examples.mnist1d.data import DEFAULT_DATA_DIR

        args.data_dir = DEFAULT_DATA_DIR
    runs = [(int(s.split(":")[0]), s.split(":")[1]) for s in args.runs] if args.runs else RUNS
    if not args.report_only:
        recipe = rp.Recipe()
        for n, alg in runs:
            if not (args.out / f"N{n}_{alg}.json").exists():
                trace_one(n, alg, recipe, args.data_dir, args.out, args.sharpness_every)
    report(args.out)


if __name__ == "__main__":
    main()
