"""The sync-free step (see tests/test_sync_free.py) with Muon's variants and the cautious flags.

NorMuon's and AdaMuon's second moments are state like the momentum: created by ``_init_group``
before a sync-free step, committed only where the device flag allows, so a skipped step leaves
them bit-identical; the cautious masks keep their kept fraction on the device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_sync_free import (
    eager_and_compiled,
    flat,
    gradients,
    make_model,
    no_host_reads,
    same,
    without_calls,
)

import guided_descent as gd

CONFIGS = {
    "normuon": ("normuon", {}),
    "adamuon": ("adamuon", {}),
    "muon-cautious": ("muon", dict(cautious=True, cautious_weight_decay=True, weight_decay=0.1)),
    "normuon-cautious": ("normuon", dict(cautious=True, cautious_weight_decay=True,
                                         weight_decay=0.1)),
    "lion-cautious": ("lion", dict(cautious=True, cautious_weight_decay=True, weight_decay=0.1)),
}
SECOND_MOMENTS = {"normuon": "normuon.row_sq", "adamuon": "adamuon.exp_avg_sq"}


def build(config: str, model, sync_free: bool | None, **extra) -> torch.optim.Optimizer:
    name, hp = CONFIGS[config]
    opt = gd.create(name, model, **hp, **extra)
    opt.sync_free = sync_free
    return opt


@pytest.mark.parametrize("config", list(CONFIGS))
def test_deciding_on_the_device_gives_the_host_decided_result(config):
    results = []
    for sync_free in (False, True):
        model = make_model()
        opt = build(config, model, sync_free)
        for step in range(6):
            gradients(model, step)
            opt.step()
        results.append(flat(model))
    # As in tests/test_sync_free.py: the same float32 arithmetic, the AdamW groups through
    # torch's fused kernel on the device path (an ulp per step apart).
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_skip_decided_on_the_device_changes_nothing(config):
    model = make_model()
    opt = build(config, model, True)
    for step in range(3):
        gradients(model, step)
        opt.step()
    gradients(model, 3)
    next(model.parameters()).grad[0, 0] = float("nan")
    params, state = flat(model), copy.deepcopy(opt.state_dict())
    opt.step()
    assert torch.equal(flat(model), params)
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        after = opt.state_dict()
    assert same(without_calls(after), without_calls(state))  # second moments included
    key = SECOND_MOMENTS.get(CONFIGS[config][0])
    if key is not None:  # every Muon matrix has one, and it was compared above
        matrices = sum(len(g["params"]) for g in opt.param_groups if g["algorithm"] == "muon")
        assert matrices and sum(key in s for s in after["state"].values()) == matrices
    gradients(model, 4)
    opt.step()
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), params)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_sync_free_step_reads_nothing_on_the_host(config):
    model = make_model()
    opt = build(config, model, True)
    gradients(model, 0)
    opt.step()
    gradients(model, 1)
    next(model.parameters()).grad[0, 0] = float("inf")
    with no_host_reads():
        opt.step()  # a skip
        gradients(model, 2)
        opt.step()  # and a step
    with pytest.warns(RuntimeWarning, match="decided on the device"):
        assert opt.diagnostics()["skipped_steps"] == 1


@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_init_group_creates_the_second_moment_before_the_step(variant):
    # Under torch.compile the state must exist before the traced step (see
    # HybridOptimizer._init_group): the variant's moment is created with the momentum.
    model = make_model()
    opt = gd.create(variant, model)
    gradients(model, 0)
    for group in opt.param_groups:
        opt._init_group(group)
    matrices = [p for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]]
    for p in matrices:
        assert set(opt.state[p]) == {"momentum_buffer", SECOND_MOMENTS[variant]}
        assert not opt.state[p][SECOND_MOMENTS[variant]].any()


def mixed_muon(model, **extra) -> torch.optim.Optimizer:
    """One Muon whose three weight matrices take NorMuon with both cautious flags, AdaMuon, and
    plain Muon with cautious weight decay: every new path in one compiled graph."""
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
    return gd.optimizers()["muon"].factory([
        {"params": [weights[0]], "algorithm": "muon", "variant": "normuon", "cautious": True,
         "cautious_weight_decay": True, "weight_decay": 0.1},
        {"params": [weights[1]], "algorithm": "muon", "variant": "adamuon"},
        {"params": [weights[2]], "algorithm": "muon", "cautious_weight_decay": True,
         "weight_decay": 0.1},
        {"params": biases, "algorithm": "adamw"},
    ], **extra)


@pytest.mark.slow
@pytest.mark.parametrize("build_opt", [
    pytest.param(lambda model: mixed_muon(model, ns_dtype=torch.float64), id="muon-variants"),
    pytest.param(lambda model: build("lion-cautious", model, None), id="lion-cautious"),
])
def test_compiled_step_fullgraph_matches_the_eager_step(build_opt):
    # float64, as in tests/test_sync_free.py: the compiled graph fuses float operations
    # differently; in float64 both stay within 1e-9 of each other.
    results, counts = eager_and_compiled(build_opt, 4)
    assert counts == [(3, 1), (3, 1)]
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)
