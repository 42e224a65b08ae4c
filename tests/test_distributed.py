"""Two ranks on CPU (gloo): DDP and FSDP2 parity, split work, DCP checkpoints from N to M ranks.

One process group serves the whole module: a module-scoped fixture spawns two ranks once; they
run every scenario below in the same order (collectives must match) and rank 0 writes what it
measured to a JSON file that the tests read. A scenario that fails on a rank stops the ones after
it (a rank left inside a collective would otherwise wait for the other).

**The single-process reference.** Rank ``r`` trains on rows ``r*B/2 : (r+1)*B/2`` of every global
batch of ``B`` sequences; the reference trains one model in one process on the same global batch
as two micro-batches of ``B/2`` (gradient accumulation of the halved losses). Its gradients are
then the same numbers as DDP's averaged ones (a sum of two floats does not depend on the order, and
halving is exact), so any difference comes from the optimizers. With a full-batch backward instead,
reduction-order noise of ~1e-7 in near-zero gradient entries is blown up by every Adam-like rule
(``|g| / (sqrt(v) + eps)``) to differences of 1e-4 to 1e-1 after 20 steps, for torch's own AdamW
as much as for ours, which would test nothing about the distributed code.

Tolerances: parameters equal to the reference within 1e-5 relative (of the parameter's largest
entry), float32; measured: bitwise equal for every optimizer. Replicas: bitwise identical.
"""

from __future__ import annotations

import faulthandler
import hashlib
import importlib
import json
import os
import socket
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import guided_descent as gd
from guided_descent import distributed as gdd
from guided_descent.distributed.dtensor import local
from guided_descent.tasks.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow

WORLD = 2
CFG = GPTConfig(vocab_size=32, context=8, n_layer=1, n_head=2, d_model=16)
BATCH = 8  # global batch (sequences); each rank takes BATCH // WORLD
STEPS = 20
TOLERANCE = 1e-5  # relative, float32
MATRIX = ("muon", "shampoo", "soap", "kl_shampoo", "kl_soap", "psgd_kron")
# Refresh often enough that 20 steps see several refreshes.
HYPER: dict[str, dict[str, Any]] = {
    "shampoo": {"precondition_frequency": 3},
    "soap": {"precondition_frequency": 3},
    "kl_shampoo": {"precondition_frequency": 3},
    "kl_soap": {"precondition_frequency": 3},
    "kfac": {"inverse_frequency": 3},
    # Required; the GPT's (B, T, V) logits are not its (N, C, *) layout, moot as it fails anyway.
    "natural_gradient": {"loss": "cross_entropy"},
}
# natural_gradient re-runs the model inside step() with torch.func; through a DDP module that
# fails, and on the bare module every rank would solve with its own half-batch curvature.
NOT_DATA_PARALLEL = {"natural_gradient"}
CKPT_STEPS = 4  # steps before and after a checkpoint


# ------------------------------------------------------------------------------ training


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.context), generator=g)
    return x, torch.roll(x, -1, dims=1)


def new_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def make_optimizer(name: str, target: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    return gd.create(name, target, **{**HYPER.get(name, {}), **extra})


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    *,
    rank: int = 0,
    world: int = 1,
    micro: int = 1,
) -> None:
    """Steps over ``batch(step)``: this rank's share of it, as ``micro`` accumulated parts."""
    for step in steps:
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            # The loss, not the gradient, is divided: K-FAC's output-gradient statistics are
            # read during backward and assume this usual accumulation (and micro = 1, 2 makes
            # the division exact, so the gradients are the same numbers either way).
            (F.cross_entropy(model(xm).flatten(0, 1), ym.flatten()) / micro).backward()
        opt.step()


def reference(name: str, steps: int = STEPS) -> list[torch.Tensor]:
    """Single-process training on the same global batches (see the module docstring)."""
    model = new_model()
    train(model, make_optimizer(name, model), range(steps), micro=WORLD)
    return [p.detach().clone() for p in model.parameters()]


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a plain full tensor (an FSDP2 shard is gathered: a collective)."""
    out = []
    for p in model.parameters():
        p = p.detach()
        out.append(p.full_tensor() if hasattr(p, "full_tensor") else p.clone())
    return out


def relative_deviation(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for a, b in zip(params, ref, strict=True)
    )


def replicas_identical(params: list[torch.Tensor]) -> bool:
    flat = torch.cat([p.reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def fsdp2(model: GPT) -> GPT:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# ------------------------------------------------------------------------------ scenarios
# Each runs on every rank (same order, same collectives) and returns what rank 0 reports.


def scenario_ddp_parity(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in gd.optimizers():
        variants = {name: {}}
        if name in MATRIX:
            variants[f"{name}/distributed=False"] = {"distributed": False}
        for label, extra in variants.items():
            model = new_model()
            ddp = nn.parallel.DistributedDataParallel(model)
            try:
                opt = make_optimizer(name, ddp, **extra)
                train(ddp, opt, range(STEPS), rank=rank, world=world)
            except Exception as err:  # noqa: BLE001 -- recorded for the test to judge
                out[label] = {"error": f"{type(err).__name__}: {err}"}
                dist.barrier()
                continue
            params = full_params(model)
            entry: dict[str, Any] = {
                "identical": replicas_identical(params),
                "split": getattr(opt, "work_split", None) is not None,
            }
            if rank == 0:
                entry["deviation"] = relative_deviation(params, reference(name))
            out[label] = entry
    return out


def scenario_fsdp2_parity(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in (*MATRIX, "adamw", "lion"):
        model = fsdp2(new_model())
        opt = make_optimizer(name, model)
        train(model, opt, range(STEPS), rank=rank, world=world)
        params = full_params(model)  # collective
        entry: dict[str, Any] = {}
        if name in MATRIX:
            # The whole state of a sharded matrix lives on one owner for Shampoo and SOAP; Muon's
            # momentum stays sharded. What each rank holds, and what it exchanged.
            report = opt.diagnostics()["distributed"]  # collective (DTensor statistics)
            entry["state_bytes"] = [None] * world
            dist.all_gather_object(entry["state_bytes"], report["state_bytes"])
            entry["work"] = report["work"]
            matrices = [p for g in opt.param_groups if g["algorithm"] == name for p in g["params"]]
            owned = [bool(opt.state.get(p)) for p in matrices]
            entry["owned"] = [None] * world
            dist.all_gather_object(entry["owned"], owned)
        if rank == 0:
            entry["deviation"] = relative_deviation(params, reference(name))
        out[name] = entry
    try:
        gd.create("kfac", fsdp2(new_model()))
    except ValueError as err:
        out["kfac"] = {"refused": str(err)}
    return out


@contextmanager
def recording(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, list]]:
    """Replace ``module.attr`` by a wrapper that records a fingerprint of every matrix given."""
    seen: dict[str, list] = {kind: [] for kind in targets}
    originals = {kind: getattr(mod, attr) for kind, (mod, attr) in targets.items()}

    def fingerprints(x: torch.Tensor) -> list[tuple]:
        # The exact bytes: the split and the single-process runs see bitwise equal matrices.
        mats = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, -1)
        return [
            (tuple(m.shape), hashlib.sha1(m.contiguous().numpy().tobytes()).hexdigest())
            for m in mats.detach()
        ]

    def wrap(kind: str, fn: Callable) -> Callable:
        def recorded(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen[kind].extend(fingerprints(first))
            return fn(first, *args, **kwargs)

        return recorded

    for kind, (mod, attr) in targets.items():
        setattr(mod, attr, wrap(kind, originals[kind]))
    try:
        yield seen
    finally:
        for kind, (mod, attr) in targets.items():
            setattr(mod, attr, originals[kind])


def scenario_split_counts(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Count the matrices each rank decomposes: each only its share, all of them once."""
    # (`guided_descent.optimizers` is also the name of the registry function: import by path.)
    kfac_module = importlib.import_module("guided_descent.optimizers.kfac")
    orth = importlib.import_module("guided_descent.preconditioners.orthogonalize")
    shampoo_pre = importlib.import_module("guided_descent.preconditioners.shampoo")
    soap_pre = importlib.import_module("guided_descent.preconditioners.soap")

    targets = {
        "muon": {"newton_schulz": (orth, "newton_schulz")},
        "shampoo": {"inverse_root": (shampoo_pre, "inverse_root")},
        "soap": {"eigh": (soap_pre, "eigenbasis"), "qr_refresh": (soap_pre, "refresh_eigenbasis")},
        "kfac": {"inverse": (kfac_module, "damped_inverses")},
    }
    out: dict[str, Any] = {}
    for name, kinds in targets.items():
        steps = range(4)  # step 0/1 decompose everything, step 3 refreshes (frequency 3)
        model = new_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_optimizer(name, ddp)
        with recording(kinds) as seen:
            train(ddp, opt, steps, rank=rank, world=world)
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, seen)
        stats = opt.diagnostics()["distributed"]["work"]
        entry: dict[str, Any] = {"stats": stats}
        if rank == 0:
            alone = new_model()
            single = make_optimizer(name, alone, distributed=False)
            with recording(kinds) as everything:
                train(alone, single, steps, micro=world)
            entry["per_rank"] = {kind: [sorted(r[kind]) for r in per_rank] for kind in kinds}
            entry["single"] = {kind: sorted(everything[kind]) for kind in kinds}
        out[name] = entry
    return out


def scenario_guard_agrees_under_fsdp2(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """A NaN in one rank's gradient shard makes every rank skip the step."""
    out = {}
    # The matrix methods and two elementwise ones (torch-native AdamW, our Lion) on shards.
    for name in (*MATRIX, "adamw", "lion"):
        model = fsdp2(new_model())
        opt = make_optimizer(name, model)
        train(model, opt, range(2), rank=rank, world=world)
        before = full_params(model)
        x, y = batch(2)
        opt.zero_grad()
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        if rank == 1:
            local(model.blocks[0].mlp.fc.weight.grad)[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned = any("non-finite" in str(w.message) for w in caught)
        after = full_params(model)
        skipped: list[Any] = [None] * world
        dist.all_gather_object(skipped, (opt.diagnostics()["skipped_steps"], warned))
        out[name] = {
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "skipped": [s for s, _ in skipped],
            "warned": [w for _, w in skipped],
        }
    return out


def _resume(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    directory: Path,
    rank: int,
    world: int,
    micro: int,
) -> dict[str, Any]:
    gdd.load_checkpoint(directory, model=model, optimizer=opt)
    steps_loaded = opt.diagnostics()["steps"]
    train(model, opt, range(CKPT_STEPS, 2 * CKPT_STEPS), rank=rank, world=world, micro=micro)
    return {"steps_loaded": steps_loaded, "params": full_params(model)}


CKPT_CASES = [
    ("ddp", "shampoo"),
    ("ddp", "soap"),
    ("ddp", "kfac"),
    ("ddp", "muon"),
    ("fsdp2", "muon"),
    ("fsdp2", "shampoo"),
    ("fsdp2", "soap"),
    ("ddp", "psgd_kron"),
    ("fsdp2", "psgd_kron"),
]


def _wrapped(kind: str, model: GPT) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model) if kind == "ddp" else fsdp2(model)


def scenario_checkpoint_save_on_two(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    for kind, name in CKPT_CASES:
        model = new_model()
        wrapped = _wrapped(kind, model)
        target = wrapped if kind == "ddp" else model
        opt = make_optimizer(name, target)
        train(target, opt, range(CKPT_STEPS), rank=rank, world=world)
        gdd.save_checkpoint(tmp / f"two-{kind}-{name}", model=target, optimizer=opt)
    return {}


def scenario_checkpoint_load_on_two(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    out = {}
    for kind, name in CKPT_CASES:
        model = new_model()
        wrapped = _wrapped(kind, model)
        target = wrapped if kind == "ddp" else model
        opt = make_optimizer(name, target)
        resumed = _resume(name, target, opt, tmp / f"one-{name}", rank, world, micro=1)
        entry = {"steps_loaded": resumed["steps_loaded"]}
        if rank == 0:
            entry["deviation"] = relative_deviation(
                resumed["params"], reference(name, 2 * CKPT_STEPS)
            )
        out[f"{kind}-{name}"] = entry
    return out


SCENARIOS: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "ddp_parity": scenario_ddp_parity,
    "fsdp2_parity": scenario_fsdp2_parity,
    "split_counts": scenario_split_counts,
    "guard": scenario_guard_agrees_under_fsdp2,
    "checkpoint_save_on_two": scenario_checkpoint_save_on_two,
    "checkpoint_load_on_two": scenario_checkpoint_load_on_two,
}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails loudly, not forever
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    results: dict[str, Any] = {}
    failed = False
    for name, scenario in SCENARIOS.items():
        if failed:
            results[name] = {"error": "not run: an earlier scenario failed"}
            continue
        try:
            results[name] = scenario(rank, world, Path(tmp))
            ok = True
        except BaseException:  # noqa: BLE001 -- reported to the tests (pytest.fail included)
            results[name] = {"error": traceback.format_exc()}
            ok = False
        statuses: list[Any] = [None] * world
        dist.all_gather_object(statuses, ok)
        failed = not all(statuses)
        if failed and ok:
            results[name] = {"error": "failed on another rank"}
    if rank == 0:
        Path(tmp, "results.json").write_text(json.dumps(results, default=_jsonable))
    dist.barrier()
    dist.destroy_process_group()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(type(value))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_on_one(tmp: Path) -> None:
    for name in sorted({name for _, name in CKPT_CASES}):
        model = new_model()
        opt = make_optimizer(name, model)
        train(model, opt, range(CKPT_STEPS), micro=WORLD)
        gdd.save_checkpoint(tmp / f"one-{name}", model=model, optimizer=opt)


def _load_on_one(tmp: Path) -> dict[str, Any]:
    out = {}
    for kind, name in CKPT_CASES:
        model = new_model()
        opt = make_optimizer(name, model)
        resumed = _resume(name, model, opt, tmp / f"two-{kind}-{name}", 0, 1, micro=WORLD)
        out[f"{kind}-{name}"] = {
            "steps_loaded": resumed["steps_loaded"],
            "deviation": relative_deviation(resumed["params"], reference(name, 2 * CKPT_STEPS)),
        }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)  # the single-process parts compare bitwise with one-thread ranks
    try:
        _save_on_one(tmp)
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
        try:
            mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp)), nprocs=WORLD, join=True)
        finally:
            if omp is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = omp
        out = json.loads((tmp / "results.json").read_text())
        try:
            out["checkpoint_load_on_one"] = _load_on_one(tmp)
        except Exception:  # noqa: BLE001 -- reported by the tests that need it
            out["checkpoint_load_on_one"] = {"error": traceback.format_exc()}
    finally:
        torch.set_num_threads(threads)
    return out


def scenario(results: dict[str, Any], name: str) -> Any:
    value = results[name]
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        pytest.fail(f"scenario {name} failed:\n{value['error']}")
    return value


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.xfail(
                strict=True, reason="natural_gradient's curvature is per-rank; see module top"
            ),
        )
        if n in NOT_DATA_PARALLEL
        else n
        for n in gd.optimizers()
    ],
)
def test_every_optimizer_under_ddp_matches_single_process_training(results, name):
    ddp = scenario(results, "ddp_parity")
    for label in [k for k in ddp if k == name or k.startswith(f"{name}/")]:
        entry = ddp[label]
        assert "error" not in entry, f"{label}: {entry.get('error')}"
        assert entry["identical"], f"{label}: the replicas differ"
        assert entry["deviation"] <= TOLERANCE, f"{label}: {entry['deviation']:.2e}"


def test_matrix_optimizers_split_automatically_under_ddp(results):
    ddp = scenario(results, "ddp_parity")
    for name in (*MATRIX, "kfac"):
        assert ddp[name]["split"], name
    for name in MATRIX:
        assert not ddp[f"{name}/distributed=False"]["split"], name


@pytest.mark.parametrize("name", [*MATRIX, "adamw", "lion"])
def test_fsdp2_matches_single_process_training(results, name):
    entry = scenario(results, "fsdp2_parity")[name]
    assert entry["deviation"] <= TOLERANCE, f"{name}: {entry['deviation']:.2e}"


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_fsdp2_matrix_state_is_held_by_one_owner_each(results, name):
    entry = scenario(results, "fsdp2_parity")[name]
    owned = entry["owned"]  # per rank, per matrix: does this rank hold its state?
    for holders in zip(*owned, strict=True):
        assert sum(holders) == 1, owned
    assert all(any(r) for r in owned), "every rank owns some matrices"
    work = entry["work"][name]
    # Every step: one all_to_all to gather gradient shards, one to scatter update shards.
    assert work["collectives_per_call"] == 2
    assert work["bytes_received_per_call"]["gather"] > 0
    assert work["bytes_sent_per_call"]["scatter"] > 0


def test_kfac_refuses_fsdp2_sharded_parameters(results):
    assert "does not support FSDP2" in scenario(results, "fsdp2_parity")["kfac"]["refused"]


def test_fsdp2_muon_keeps_momentum_sharded(results):
    entry = scenario(results, "fsdp2_parity")["muon"]
    for holders in zip(*entry["owned"], strict=True):
        assert all(holders)  # every rank holds its shard of every momentum buffer
    assert entry["work"]["newton_schulz"]["items_here"] < entry["work"]["newton_schulz"]["items"]


@pytest.mark.parametrize("name", ["muon", "shampoo", "soap", "kfac"])
def test_each_rank_computes_only_its_share_and_together_all_once(results, name):
    entry = scenario(results, "split_counts")[name]
    for kind, per_rank in entry["per_rank"].items():
        prints = [[tuple(map(str, fp)) for fp in rank_list] for rank_list in per_rank]
        union = sorted(fp for rank_list in prints for fp in rank_list)
        single = sorted(tuple(map(str, fp)) for fp in entry["single"][kind])
        # Every matrix exactly once: the multiset over ranks is the single process's.
        assert union == single, f"{kind}: the ranks together differ from one process"
        assert all(prints), f"{kind}: a rank computed nothing: {[len(r) for r in prints]}"
        counts = entry["stats"][kind]
        assert counts["items_here"] < counts["items"], f"{kind}: this rank did everything"


def test_a_nonfinite_shard_on_one_rank_skips_the_step_on_every_rank(results):
    for name, entry in scenario(results, "guard").items():
        assert entry["unchanged"], name
        assert entry["skipped"] == [1] * WORLD, name
        assert entry["warned"] == [True] * WORLD, name


@pytest.mark.parametrize("case", [f"{k}-{n}" for k, n in CKPT_CASES])
def test_checkpoint_saved_on_two_ranks_continues_on_one(results, case):
    scenario(results, "checkpoint_save_on_two")
    entry = scenario(results, "checkpoint_load_on_one")[case]
    assert entry["steps_loaded"] == CKPT_STEPS  # the guided_descent tag came back
    assert entry["deviation"] <= TOLERANCE, f"{case}: {entry['deviation']:.2e}"


@pytest.mark.parametrize("case", [f"{k}-{n}" for k, n in CKPT_CASES])
def test_checkpoint_saved_on_one_rank_continues_on_two(results, case):
    entry = scenario(results, "checkpoint_load_on_two")[case]
    assert entry["steps_loaded"] == CKPT_STEPS
    assert entry["deviation"] <= TOLERANCE, f"{case}: {entry['deviation']:.2e}"


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    model = new_model()
    opt = make_optimizer("shampoo", model)
    train(model, opt, range(1))
    gdd.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt)
    fresh = new_model()
    other = make_optimizer("soap", fresh)
    with pytest.raises(gd.StateDictMismatchError, match="saved by optimizer 'Shampoo'"):
        gdd.load_checkpoint(tmp_path / "ckpt", model=fresh, optimizer=other)


def test_refuses_flattened_optimizer_state():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        gdd.OptimizerState(
            new_model(),
            torch.optim.SGD(new_model().parameters()),
            StateDictOptions(flatten_optimizer_state_dict=True),
        )
