"""Benchmark: the cost of one ``optimizer.step()`` on GPT-2-small parameter shapes.

Protocol (``../shared/spec/BENCHMARKS.md``, "Measuring fairly"): every optimizer gets a fresh
model with the same fixed random gradients; a warm-up (at least one preconditioner refresh) is not
timed; each timed step is bracketed by device synchronisation; we report the median step (the
typical step), the mean step (amortized: it includes the periodic preconditioner refreshes, since
the timed window spans several refresh periods), the slowest step, and optimizer-state bytes.
Ratios are taken against ``torch.optim.AdamW(fused=True)`` measured in the same process, and for
Muon also against ``torch.optim.Muon`` on the same hidden matrices.

Optimizers that need a forward pass (``needs_model``: K-FAC, natural gradient) cannot be timed on
gradients alone and are refused with a clear message.

**Several processes** (``guided-descent bench step --nproc N``, launched through ``torchrun``):
every rank holds the same model and gradients, as data-parallel replicas do after their gradient
all-reduce, and the matrix optimizers split their Newton–Schulz / eigendecomposition work between
the ranks (:mod:`guided_descent.distributed`). Each rank reports its step time and the time it
spent on its own share of the matrix work (``precond_ms`` wall, ``precond_cpu_ms`` CPU time, per
optimizer step); rank 0 writes the run. ``param_checksum`` (the sum of squares of the parameters
after the timed steps) is the same for every N when the split changes nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

import guided_descent as gd
from guided_descent import distributed as gdd
from guided_descent.experiments.config import (
    ExperimentConfig,
    check_hyper,
    option,
    parse_overrides,
)
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import Claim, RunDir
from guided_descent.routing import FALLBACK, route
from guided_descent.tasks.gpt import GPT, GPT2_SMALL, GPTConfig

# `--nproc N` splits this benchmark's matrix work across N processes (see the docstring).
MULTI_PROCESS = True

# Baselines measured in every run; not registry names.
ADAMW_FUSED = "torch-adamw-fused"
TORCH_MUON = "torch-muon"

SIZES = {
    "gpt2-small": GPT2_SMALL,
    # A scaled-down layout for CPUs: the same kinds of matrices, 5.3M parameters.
    "small": GPTConfig(vocab_size=8192, context=256, n_layer=4, n_head=4, d_model=256),
    "tiny": GPTConfig(vocab_size=512, context=64, n_layer=2, n_head=2, d_model=64),
}

# H100 targets from the preconditioner issue (ms per step on GPT-2-small shapes).
H100_MUON_TARGET_MS = 4.0
LION_FLOOR_TARGET = 1.3
# Bytes each elementwise optimizer must move per fp32 parameter: the memory-bandwidth floor.
FLOOR_BYTES_PER_PARAM = {
    ADAMW_FUSED: 28.0,  # read p, g, m, v; write p, m, v
    "adamw": 28.0,
    "lion": 20.0,  # read p, g, m; write p, m
}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Time optimizer.step() on GPT-2-small shapes (a scaled-down layout on CPU)."""

    optimizers: tuple[str, ...] = option(
        ("adamw", "lion", "muon", "shampoo", "soap"), "registry names to time"
    )
    seeds: int = option(1, "repeats of the whole measurement (medians are pooled)")
    steps: int = option(30, "timed steps per optimizer")
    warmup: int = option(12, "untimed steps first (covers the first preconditioner refresh)")
    size: str = option("auto", "parameter shapes: auto (gpt2-small on CUDA, small on CPU), "
                       "gpt2-small, small or tiny")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    hyper: tuple[str, ...] = option(
        (), "override a hyper-parameter of one of the timed optimizers: NAME.KEY=VALUE, "
        "comma-separated (e.g. muon.state_dtype=bfloat16); VALUE is a number, true/false/none, "
        "a torch dtype name or a word"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size not in ("auto", *SIZES):
            raise ValueError(f"size must be auto or one of {', '.join(SIZES)}, got {self.size!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        specs = gd.optimizers()
        for name in self.optimizers:
            if name not in specs:
                from guided_descent.optimizers.registry import unknown_name

                raise unknown_name("optimizer", name, specs)
            if specs[name].needs_model:
                raise ValueError(
                    f"{name} needs forward passes through the model; bench step times "
                    "optimizer.step() on fixed gradients only (use bench train)"
                )
        for name, kwargs in self.overrides().items():  # parses, and names the bad entry
            if name not in self.optimizers:
                raise ValueError(f"hyper: {name} is not among the optimizers of this run")
            check_hyper(name, {"on_nonfinite": "off", **kwargs})

    def overrides(self) -> dict[str, dict[str, Any]]:
        """``--hyper`` as {optimizer: {key: value}}."""
        return parse_overrides(self.hyper)

    @classmethod
    def quick(cls) -> Config:
        return cls(size="tiny", steps=8, warmup=11)

    def layout(self) -> GPTConfig:
        if self.size == "auto":
            return GPT2_SMALL if torch.device(self.device).type == "cuda" else SIZES["small"]
        return SIZES[self.size]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes held in optimizer state tensors (each storage counted once), of ``params`` only
    when given."""
    seen: set[int] = set()
    total = 0

    def walk(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    wanted = None if params is None else {id(q) for q in params}
    for p, s in opt.state.items():
        if wanted is None or id(p) in wanted:
            walk(s)
    return total


def matrix_params(opt: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """The parameters of a hybrid optimizer's matrix groups (``None`` for one without AdamW
    groups alongside): its own state, apart from the AdamW state of the routed-out rest."""
    groups = opt.param_groups
    if not any(g.get("algorithm") == FALLBACK for g in groups):
        return None
    return [p for g in groups if g.get("algorithm") != FALLBACK for p in g["params"]]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (bytes moved per second, read + write), CUDA only.

    The floor of an elementwise optimizer is its bytes per parameter over this bandwidth.
    """
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


def _model(layout: GPTConfig, device: torch.device, seed: int) -> tuple[GPT, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = GPT(layout).to(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    grads = []
    for p in model.parameters():
        # Gradient-like scale: small, dense, fixed for every step and every optimizer.
        grads.append(torch.randn(p.shape, generator=g, device=device) * 1e-3)
    return model, grads


def _build(
    name: str,
    model: GPT,
    split: gdd.WorkSplit | None = None,
    hyper: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, int]:
    """The optimizer and how many parameters it updates; ``split`` for those that take one,
    ``hyper`` (``--hyper``'s values for ``name``) passed to the registry."""
    if name == ADAMW_FUSED:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3, fused=True), sum(p.numel() for p in params)
    if name == TORCH_MUON:
        table = route(model, "muon")
        named = dict(model.named_parameters())
        hidden = [named[r.name] for r in table.routes if r.algorithm == "muon"]
        return torch.optim.Muon(hidden, lr=0.02), sum(p.numel() for p in hidden)
    # The update rule alone, as fused AdamW has no finiteness check (the guard's cost: one
    # read of every gradient and one sync per step).
    takes_split = split is not None and "distributed" in gd.optimizers()[name].hyperparams
    extra = {"distributed": split} if takes_split else {}
    opt = gd.create(name, model, on_nonfinite="off", **extra, **(hyper or {}))
    return opt, sum(p.numel() for g in opt.param_groups for p in g["params"])


def time_steps(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
) -> list[float]:
    """Seconds per ``opt.step()`` for ``steps`` steps after ``warmup`` untimed ones."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure(
    name: str,
    layout: GPTConfig,
    device: torch.device,
    cfg: Config,
    seed: int,
    world_size: int = 1,
) -> dict:
    model, grads = _model(layout, device, seed)
    # The split's own clock: on a GPU it synchronizes around each rank's share, so it is on for
    # CPU runs and multi-process runs only (a single-GPU step time stays undisturbed).
    timing = device.type == "cpu" or world_size > 1
    split = gdd.WorkSplit(timing=True) if timing else None
    opt, n_params = _build(name, model, split, cfg.overrides().get(name))
    params = list(model.parameters())
    time_steps(opt, params, grads, cfg.warmup, 0, device)
    # Optimizers built with the split count their matrix work there.
    uses_split = split is not None and getattr(opt, "work_split", None) is split
    stats = split.stats if uses_split else None
    if stats is not None:
        stats.reset()  # count the timed steps only
    times = time_steps(opt, params, grads, 0, cfg.steps, device)
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    work = stats.as_dict() if stats is not None else {}
    result = {
        "optimizer": name,
        "seed": seed,
        "median_ms": 1e3 * statistics.median(times),
        "mean_ms": 1e3 * statistics.fmean(times),
        "max_ms": 1e3 * max(times),
        "state_bytes": state_bytes(opt),
        "params_updated": n_params,
        "finite": finite,
        "param_checksum": float(sum(p.detach().double().square().sum() for p in params)),
    }
    matrix = matrix_params(opt)
    if matrix:  # a hybrid's own state, without its AdamW groups' (e.g. Muon's state_dtype)
        result["matrix_state_bytes"] = state_bytes(opt, matrix)
        result["matrix_params"] = sum(p.numel() for p in matrix)
    if stats is not None and timing:
        # 0 when no refresh fell into the timed steps (Shampoo, SOAP: every 10 steps).
        seconds = sum(k["seconds"] for k in work.values() if k["seconds"] is not None)
        cpu = sum(k["cpu_seconds"] for k in work.values() if k["cpu_seconds"] is not None)
        result["precond_ms"] = 1e3 * seconds / cfg.steps
        result["precond_cpu_ms"] = 1e3 * cpu / cfg.steps
        result["precond_cost_share"] = {kind: k["cost_share"] for kind, k in work.items()}
    del model, opt, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(config: Config, run: RunDir, progress: Progress) -> None:
    with gdd.process_group_from_env(config.device) as proc:
        _run(config, run, progress, proc)


def _run(config: Config, run: RunDir, progress: Progress, proc: gdd.ProcessInfo) -> None:
    device = proc.device
    layout = config.layout()
    names = [ADAMW_FUSED, *config.optimizers]
    if "muon" in config.optimizers and hasattr(torch.optim, "Muon"):
        names.append(TORCH_MUON)
    rows: list[dict] = []
    with run.metrics() as metrics, progress.bar(
        len(names) * config.seeds, "bench step", unit="optimizer"
    ) as bar:
        for seed in range(config.seeds):
            for name in names:
                row = measure(name, layout, device, config, seed, proc.world_size)
                if proc.world_size > 1:
                    row = _with_ranks(row)
                metrics.write(**row)
                rows.append(row)
                bar.update()
    results = summarize(rows, layout, copy_bandwidth(device))
    results["world_size"] = proc.world_size
    run.write_summary(results, claims(results, device))


PER_RANK = ("median_ms", "precond_ms", "precond_cpu_ms", "precond_cost_share", "param_checksum")


def _with_ranks(row: dict) -> dict:
    """Rank 0's row plus every rank's step time, matrix-work time and checksum."""
    import torch.distributed as dist

    rows: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {k: row.get(k) for k in PER_RANK})
    return {**row, "per_rank": rows}


def summarize(rows: list[dict], layout: GPTConfig, bandwidth: float | None) -> dict:
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["optimizer"], []).append(r)
    with torch.device("meta"):  # count without allocating
        n_total = GPT(layout).num_parameters()
    base = by_name[ADAMW_FUSED]
    base_median = statistics.median(r["median_ms"] for r in base)
    base_mean = statistics.median(r["mean_ms"] for r in base)
    table = {}
    for name, rs in by_name.items():
        median = statistics.median(r["median_ms"] for r in rs)
        mean = statistics.median(r["mean_ms"] for r in rs)
        table[name] = {
            "median_ms": median,
            "mean_ms": mean,
            "max_ms": max(r["max_ms"] for r in rs),
            "ratio_median_vs_adamw_fused": median / base_median,
            "ratio_mean_vs_adamw_fused": mean / base_mean,
            "state_bytes": rs[0]["state_bytes"],
            "state_bytes_per_param": rs[0]["state_bytes"] / rs[0]["params_updated"],
            "params_updated": rs[0]["params_updated"],
            "finite": all(r["finite"] for r in rs),
            "param_checksum": rs[0].get("param_checksum"),
        }
        if "matrix_state_bytes" in rs[0]:
            table[name]["matrix_state_bytes_per_param"] = (
                rs[0]["matrix_state_bytes"] / rs[0]["matrix_params"]
            )
        for key in ("precond_ms", "precond_cpu_ms"):
            if key in rs[0]:
                table[name][key] = statistics.median(r[key] for r in rs)
        if "per_rank" in rs[0]:
            ranks = range(len(rs[0]["per_rank"]))
            for key in ("median_ms", "precond_ms", "precond_cpu_ms"):
                if rs[0]["per_rank"][0].get(key) is not None:
                    table[name][f"{key}_per_rank"] = [
                        statistics.median(r["per_rank"][k][key] for r in rs) for k in ranks
                    ]
    if TORCH_MUON in table and "muon" in table:
        table["muon"]["speedup_vs_torch_muon"] = (
            table[TORCH_MUON]["median_ms"] / table["muon"]["median_ms"]
        )
    for name, floor in FLOOR_BYTES_PER_PARAM.items():
        if name in table and bandwidth:
            floor_ms = 1e3 * floor * table[name]["params_updated"] / bandwidth
            table[name]["floor_ms"] = floor_ms
            table[name]["median_vs_floor"] = table[name]["median_ms"] / floor_ms
    return {
        "layout": dataclasses.asdict(layout),
        "parameters": n_total,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "optimizers": table,
    }


def claims(results: dict, device: torch.device) -> list[Claim]:
    """Targets stated for one H100; on other devices the numbers are reported, not judged."""
    table = results["optimizers"]
    out = [
        Claim(
            "all-finite",
            "every optimizer leaves the parameters finite after warm-up and timed steps",
            float(sum(not r["finite"] for r in table.values())),
            "==",
            0.0,
        )
    ]
    if device.type != "cuda":
        return out
    name = torch.cuda.get_device_name(device)
    if "H100" not in name and "H200" not in name:
        return out
    if "muon" in table:
        out.append(Claim("muon-step-ms", f"Muon step on GPT-2-small shapes <= "
                         f"{H100_MUON_TARGET_MS} ms ({name})", table["muon"]["median_ms"], "<=",
                         H100_MUON_TARGET_MS))
        if "speedup_vs_torch_muon" in table["muon"]:
            out.append(Claim("muon-vs-torch", "our Muon step >= 4x faster than torch.optim.Muon",
                             table["muon"]["speedup_vs_torch_muon"], ">=", 4.0))
    if "lion" in table and "median_vs_floor" in table["lion"]:
        out.append(Claim("lion-vs-floor", f"Lion step within {LION_FLOOR_TARGET}x of the "
                         "memory-bandwidth floor (20 B/param at the measured copy bandwidth)",
                         table["lion"]["median_vs_floor"], "<=", LION_FLOOR_TARGET))
    return out
