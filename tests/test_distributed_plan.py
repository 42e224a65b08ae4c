"""The distributed layer's pure parts, in one process: costs, assignment, layouts, one-rank splits.

The multi-process behaviour (DDP, FSDP2, checkpoints across world sizes) is in
``test_distributed.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.distributed import WorkSplit, assign, resolve
from guided_descent.distributed.dtensor import ShardLayout, is_dtensor, local
from guided_descent.distributed.plan import (
    eigh_flops,
    inverse_root_flops,
    newton_schulz_flops,
    qr_refresh_flops,
)
from guided_descent.distributed.split import TensorSpec, local_state_bytes

# ------------------------------------------------------------------------------ costs


def test_newton_schulz_cost_matches_the_benchmark_spec():
    # BENCHMARKS.md: five iterations cost 20 m²n + 10 m³ for an m x n matrix with m <= n.
    m, n = 768, 3072
    assert newton_schulz_flops(m, n, 5) == 20 * m * m * n + 10 * m**3
    assert newton_schulz_flops(n, m, 5) == newton_schulz_flops(m, n, 5)  # transposed alike


def test_cubic_costs_scale_as_n_cubed():
    for f in (eigh_flops, inverse_root_flops, qr_refresh_flops):
        assert f(64) == pytest.approx(8 * f(32))
    assert inverse_root_flops(10) > eigh_flops(10) > qr_refresh_flops(10)


# ------------------------------------------------------------------------------ assignment


def _optimal_makespan(costs: list[float], world: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(world), repeat=len(costs)):
        loads = [0.0] * world
        for c, o in zip(costs, owners, strict=True):
            loads[o] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_assignment_covers_every_item_once_and_is_within_lpt_bound(world):
    g = torch.Generator().manual_seed(world)
    for _ in range(20):
        costs = (torch.rand(7, generator=g) * 100).tolist()
        plan = assign(costs, world)
        assert len(plan.owners) == len(costs)
        owned = [i for r in range(world) for i in plan.owned(r)]
        assert sorted(owned) == list(range(len(costs)))  # each item exactly once
        assert sum(plan.loads) == pytest.approx(sum(costs))
        # Graham's bound for LPT: makespan <= (4/3 - 1/(3N)) * optimum.
        bound = (4 / 3 - 1 / (3 * world)) * _optimal_makespan(costs, world)
        assert max(plan.loads) <= bound + 1e-9


def test_assignment_is_deterministic_and_balances_equal_matrices_evenly():
    costs = [newton_schulz_flops(768, 768, 5)] * 48 + [newton_schulz_flops(768, 3072, 5)] * 24
    a, b = assign(costs, 4), assign(list(costs), 4)
    assert a == b
    assert a.imbalance == pytest.approx(1.0)
    assert [len(a.owned(r)) for r in range(4)] == [18] * 4


def test_assignment_puts_the_largest_items_on_different_ranks():
    plan = assign([1.0, 100.0, 2.0, 90.0, 3.0], 2)
    assert plan.owners[1] != plan.owners[3]


@pytest.mark.parametrize(
    "costs, world, match",
    [
        ([1.0], 0, "world_size"),
        ([1.0], 1.5, "world_size"),
        ([-1.0], 2, "costs\\[0\\]"),
        ([float("nan")], 2, "costs\\[0\\]"),
        (["x"], 2, "costs\\[0\\]"),
    ],
)
def test_assignment_rejects_bad_input_naming_it(costs, world, match):
    with pytest.raises(ValueError, match=match):
        assign(costs, world)


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("n, world", [(5, 2), (5, 4), (3, 4), (8, 2), (1, 3), (0, 2)])
def test_shard_layout_follows_torch_chunk(n, world):
    layout = ShardLayout((n, 3), 0, world)
    full = torch.arange(n * 3).reshape(n, 3)
    chunks = list(full.chunk(world)) if n else []
    chunks += [full[:0]] * (world - len(chunks))  # DTensor pads missing chunks with empty ones
    for r in range(world):
        assert layout.local_shape(r) == tuple(chunks[r].shape)
        assert torch.equal(layout.chunk(full, r), chunks[r])
    assert sum(layout.numel(r) for r in range(world)) == n * 3


def test_shard_layout_on_another_dimension():
    layout = ShardLayout((4, 7), 1, 3)
    full = torch.randn(4, 7)
    assert torch.equal(torch.cat([layout.chunk(full, r) for r in range(3)], dim=1), full)


def test_plain_tensors_are_not_dtensors():
    t = torch.randn(3)
    assert not is_dtensor(t)
    assert local(t) is t


# ------------------------------------------------------------------------------ one-rank split


def test_a_split_without_a_process_group_has_one_rank_and_computes_everything():
    split = WorkSplit(timing=True)
    assert (split.rank, split.world_size) == (0, 1)
    mats = [torch.randn(3, 3), torch.randn(4, 4)]
    seen = []

    def compute(indices):
        seen.extend(indices)
        return [[mats[i] * 2] for i in indices]

    out = split.map("double", [1.0, 2.0], [[TensorSpec.of(m)] for m in mats], compute)
    assert seen == [0, 1]
    assert all(torch.equal(o[0], m * 2) for o, m in zip(out, mats, strict=True))
    stats = split.stats.as_dict()["double"]
    assert stats["items_here"] == 2 and stats["cost_share"] == 1.0
    assert stats["seconds"] is not None and stats["collectives_per_call"] == 0


def test_a_split_checks_what_compute_returns():
    split = WorkSplit()
    spec = [[TensorSpec((2, 2), torch.float32, torch.device("cpu"))]]
    with pytest.raises(RuntimeError, match="shape"):
        split.map("bad", [1.0], spec, lambda idx: [[torch.zeros(3, 3)] for _ in idx])


def test_sharded_map_on_one_rank_is_compute_on_the_whole_tensor():
    split = WorkSplit()
    x = torch.randn(5, 4)
    layout = ShardLayout((5, 4), 0, 1)

    def compute(indices, full):
        return [(f * 3, [f.sum().reshape(())]) for f in full]

    shards, extras = split.map_sharded(
        "triple",
        [0],
        [1.0],
        [x],
        [layout],
        compute,
        out_dtypes=[torch.float32],
        extra_specs=[[TensorSpec((), torch.float32, x.device)]],
    )
    assert torch.equal(shards[0], x * 3)
    assert torch.equal(extras[0][0], x.sum())


# ------------------------------------------------------------------------------ the option


def test_resolve_choices():
    assert resolve(None) is None
    assert resolve(False) is None
    assert resolve(None, nn.Linear(2, 2)) is None  # not a DDP module: nothing automatic
    split = resolve(True)
    assert isinstance(split, WorkSplit) and split.world_size == 1
    mine = WorkSplit()
    assert resolve(mine) is mine
    with pytest.raises(TypeError, match="distributed must be"):
        resolve("yes")


@pytest.mark.parametrize("name", ["muon", "shampoo", "soap", "kfac"])
def test_distributed_true_on_one_process_is_single_process_training(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    hp = {"precondition_frequency": 2} if name in ("shampoo", "soap") else {}
    a = gd.create(name, model, distributed=True, **hp)
    b = gd.create(name, twin, **hp)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(5):
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    report = a.diagnostics()["distributed"]
    assert report["world_size"] == 1 and report["state_bytes"] > 0
    assert report["work"], "the split counted its work"
    assert "distributed" not in b.diagnostics()  # nothing added without a split


def test_local_state_bytes_counts_each_storage_once():
    t = torch.zeros(10)
    assert local_state_bytes({0: {"a": t, "b": t[:5], "c": [torch.zeros(2, 2), None]}}) == 40 + 16
