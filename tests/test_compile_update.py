"""The opt-in compiled update path (``compile_update=True``) of Lion, Muon, Shampoo and SOAP.

Only the free update function is compiled (``guided_descent.optimizers.compiled``); these tests
pin that it computes the eager path's steps, that a learning-rate schedule does not recompile it
every step, and that it composes with an outer ``torch.compile(opt.step)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import guided_descent as gd
from guided_descent.optimizers.compiled import check_compile_update

NAMES = ("lion", "muon", "shampoo", "soap")
# Small refresh intervals so that eight steps cross several refreshes; Muon in float64 like the
# model (its default computes Newton–Schulz in float32 or bfloat16).
HYPER = {
    "muon": {"ns_dtype": torch.float64},
    "shampoo": {"precondition_frequency": 3},
    "soap": {"precondition_frequency": 3},
}


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(torch.float64)


def train(name: str, compile_update: bool, steps: int, schedule: bool = False) -> torch.Tensor:
    net = model()
    opt = gd.create(name, net, compile_update=compile_update, **HYPER.get(name, {}))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule else None
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        if i == 4:  # one non-finite gradient: the guard's skip around the compiled kernel
            net[0].weight.grad[0, 0] = float("nan")
        opt.step()
        if sched is not None:
            sched.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_update_takes_the_eager_steps(name):
    # float64: inductor fuses and reorders the elementwise arithmetic, so the two paths differ by
    # rounding only; eight steps of these well-conditioned updates keep that below 1e-9
    # relative (float64 rounding is 1.1e-16 per operation).
    torch._dynamo.reset()
    eager = train(name, False, 8, schedule=True)
    counters.clear()
    compiled = train(name, True, 8, schedule=True)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)
    # A cosine schedule changes lr every step; after one recompilation dynamo treats the float
    # as symbolic, so the graphs do not grow with the number of steps (8 steps here).
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


@pytest.mark.slow
def test_compiled_update_inside_a_compiled_step():
    # Under an outer torch.compile(opt.step, fullgraph=True) the kernel is traced in place.
    torch._dynamo.reset()
    results = []
    for outer in (False, True):
        net = model()
        opt = gd.create("lion", net, compile_update=True)
        opt.sync_free = True
        step = torch.compile(opt.step, fullgraph=True) if outer else opt.step
        for i in range(3):
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            step()
        results.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_compile_update_must_be_a_bool(name):
    with pytest.raises(ValueError, match="compile_update must be True or False, got 'yes'"):
        gd.create(name, model(), compile_update="yes")


def test_check_accepts_bools_only():
    assert check_compile_update("x", True) is True
    with pytest.raises(ValueError, match="got 1"):
        check_compile_update("x", 1)
