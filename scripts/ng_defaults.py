"""Natural gradient at given hyper-parameters on the bench-train workloads and two toy MLPs.

Plain loop (constant lr, no schedule, no EMA: stricter than ``bench train``), the workload's own
batches and loss, several seeds. Prints per run: the first minibatch loss, the largest minibatch
loss seen relative to it, the mean of the last 5 minibatch losses relative to it, and the
workload's own final metric. A run "diverged" when a loss turned non-finite or exceeded 10x start.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/ng_defaults.py [--full] [--steps N] \
        [--seeds K] [--hyper lr=1.0,damping=1e-3] [--hyper ...]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd
from guided_descent.experiments.bench_train import WORKLOADS, Problem

WORKLOAD_NAMES = ("digits-mlp", "digits-autoencoder", "mnist1d-mlp", "kron-quadratic")


def toy(kind: str, seed: int, steps: int, batch: int = 64) -> tuple[Problem, str]:
    """A classification MLP (Gaussian clusters, 20-d, 5 classes) or a regression MLP (teacher)."""
    g = torch.Generator().manual_seed(1000 + seed)
    n, d, c = 2048, 20, 5
    x = torch.randn(n, d, generator=g)
    if kind == "class-mlp":
        centers = 1.5 * torch.randn(c, d, generator=g)
        y = torch.randint(0, c, (n,), generator=g)
        x = x + centers[y]
        loss = F.cross_entropy
        out = c
    else:
        teacher = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 3))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            y = teacher(x) + 0.1 * torch.randn(n, 3, generator=g)
        loss = F.mse_loss
        out = 3
    order = torch.randint(0, n, (steps, batch), generator=g)

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, out))

    def batch_loss(model: nn.Module, step: int):
        idx = order[step - 1]
        return loss(model(x[idx]), y[idx])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"train_loss": float(loss(model(x), y))}

    ng_loss = "cross_entropy" if kind == "class-mlp" else "mse"
    return Problem(make, batch_loss, evaluate, batch), ng_loss


def run(name: str, seed: int, steps: int, full: bool, hyper: dict[str, float]) -> dict:
    if name in WORKLOADS:
        w = WORKLOADS[name]
        ci = not full
        batch = w.ci.get("batch_size", w.batch_size) if ci else w.batch_size
        problem = w.build(seed, steps, batch, ci, torch.device("cpu"))
        ng_loss = w.ng_loss
    else:
        problem, ng_loss = toy(name, seed, steps)
    model = problem.model()
    opt = gd.create("natural_gradient", model, loss=ng_loss, **hyper)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = problem.batch_loss(model, step)
        value = float(loss)
        losses.append(value)
        if not math.isfinite(value) or value > 10 * losses[0]:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    scale = opt.diagnostics().get("damping_scale")
    diverged = len(losses) < steps or not all(map(math.isfinite, losses))
    metric = {} if diverged else problem.evaluate(model)
    start = losses[0]
    return {
        "start": start,
        "max_ratio": max(losses) / start,
        "rejected": opt.diagnostics().get("rejected_steps"),
        "end_ratio": sum(losses[-5:]) / len(losses[-5:]) / start,
        "diverged": diverged,
        "steps_run": len(losses),
        "metric": metric,
        "s_per_step": seconds / len(losses),
        "scale": scale,
    }


def parse(text: str) -> dict[str, float | bool]:
    out: dict[str, float | bool] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key] = value.lower() == "true" if value.lower() in ("true", "false") else float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size workloads (default: CI size)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--hyper", action="append", default=[],
                    help="comma-separated key=value; repeat for several settings ('' = defaults)")
    ap.add_argument("--only", default="", help="comma-separated workload names")
    args = ap.parse_args()
    names = [*WORKLOAD_NAMES, "class-mlp", "reg-mlp"]
    if args.only:
        names = args.only.split(",")
    warnings.simplefilter("ignore")
    for text in args.hyper or [""]:
        hyper = parse(text)
        print(f"== natural_gradient {hyper or 'defaults'}  ({'full' if args.full else 'CI'} "
              f"size, {args.steps} steps)")
        for name in names:
            rows = [run(name, s, args.steps, args.full, hyper) for s in range(args.seeds)]
            worst = max(r["max_ratio"] for r in rows)
            end = max(r["end_ratio"] for r in rows)
            div = sum(r["diverged"] for r in rows)
            metrics = "; ".join(
                " ".join(f"{k}={v:.4g}" for k, v in r["metric"].items()) or "-" for r in rows
            )
            scales = "/".join(f"{r['scale']:.2g}" for r in rows if r["scale"] is not None)
            rejected = "/".join(str(r["rejected"]) for r in rows if r["rejected"] is not None)
            print(f"  {name:<19} diverged {div}/{len(rows)}  max/start {worst:9.3g}  "
                  f"end/start {end:7.3g}  {rows[0]['s_per_step'] * 1e3:6.1f} ms/step  "
                  f"scale {scales or '-'} rejected {rejected or '-'}  {metrics}", flush=True)


if __name__ == "__main__":
    main()
