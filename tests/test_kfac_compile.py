"""K-FAC on a ``torch.compile``'d model (CPU inductor): the same statistics as eager training.

The layer hooks run eagerly (dynamo breaks the graph around them), so a compiled model records
the factors of the eager one. Compilation itself is the slow part (seconds per graph on a small
CPU); one module-scoped run of each variant serves every assertion.

Tolerances. The models run in float64: inductor's fused kernels round differently from eager
ones, by a few ulps per operation; through factors whose entries are sums of ``n <= 64`` products
and a backward pass of depth 3 over widths <= 16 that is a relative ``(n + 3·16) u64 ~ 1e-14`` per
entry, and after three steps through damped inverses (condition number at most
``1 + max eigenvalue / damping``, below 1e5 here) a relative 1e-9 on the parameters is still
three orders of magnitude above it, while a missing or misscaled statistic moves them by 1e-2
or more.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd

pytestmark = pytest.mark.slow  # each variant compiles forward and backward graphs (~10 s)

STEPS = 3
FACTOR_RTOL = 1e-12
PARAM_RTOL = 1e-9
HYPER = dict(inverse_frequency=1)


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,),
                                                                                generator=g)


def train(how: str, micro: int = 1) -> dict:
    """Three steps; ``how``: eager, "before" (optimizer on the model, then compiled), "after"
    (optimizer built from the compiled ``OptimizedModule``) or "rebuilt" (a second optimizer
    after a first one has run the compiled model: compiled code keeps the hooks it was traced
    with, so the second must be reached through the same ones)."""
    model = new_model()
    if how == "eager":
        forward, opt = model, gd.create("kfac", model, **HYPER)
    elif how == "before":
        opt = gd.create("kfac", model, **HYPER)
        forward = torch.compile(model)
    elif how == "after":
        forward = torch.compile(model)
        opt = gd.create("kfac", forward, **HYPER)
    else:  # "rebuilt": a first optimizer runs the compiled model, then a second one takes over
        forward = torch.compile(model)
        first = gd.create("kfac", forward, **HYPER)
        x, y = batch(-1)
        F.cross_entropy(forward(x), y).backward()
        first.remove_hooks()
        del first
        model.load_state_dict(new_model().state_dict())  # back to the start, no step taken
        opt = gd.create("kfac", forward, **HYPER)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "no curvature estimate"
        for step in range(STEPS):
            x, y = batch(step)
            opt.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (F.cross_entropy(forward(xm), ym) / micro).backward()
            opt.step()
            if first is None:
                first = {
                    name: (opt.state[w]["kfac.A"].clone(), opt.state[w]["kfac.S"].clone())
                    for name, w in (("0", model[0].weight), ("2", model[2].weight),
                                    ("4", model[4].weight))
                }
    return {"factors": first, "params": [p.detach().clone() for p in model.parameters()],
            "names": [layer.name for layer in opt._layers]}


@pytest.fixture(scope="module")
def runs() -> dict:
    torch._dynamo.reset()
    out = {"eager": train("eager"), "before": train("before"), "after": train("after"),
           "accumulated": train("after", micro=2), "rebuilt": train("rebuilt")}
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("how", ["before", "after", "accumulated", "rebuilt"])
def test_compiled_training_records_the_eager_factors_and_takes_the_eager_steps(runs, how):
    eager, compiled = runs["eager"], runs[how]
    for name, (A, S) in eager["factors"].items():
        got_A, got_S = compiled["factors"][name]
        torch.testing.assert_close(got_A, A, rtol=FACTOR_RTOL, atol=FACTOR_RTOL * A.abs().max())
        torch.testing.assert_close(got_S, S, rtol=FACTOR_RTOL, atol=FACTOR_RTOL * S.abs().max())
    for p, q in zip(compiled["params"], eager["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=PARAM_RTOL, atol=PARAM_RTOL * q.abs().max())


def test_layers_of_a_compiled_module_are_its_original_modules(runs):
    # Built from the OptimizedModule, the hooks sit on the modules under _orig_mod.
    assert runs["after"]["names"] == ["_orig_mod.0", "_orig_mod.2", "_orig_mod.4"]


def test_a_model_compiled_and_run_before_the_optimizer_existed_is_named_in_the_warning():
    torch._dynamo.reset()
    model = new_model()
    forward = torch.compile(model)
    x, y = batch(0)
    F.cross_entropy(forward(x), y).backward()  # traced without any K-FAC hook
    opt = gd.create("kfac", forward)
    opt.zero_grad()
    F.cross_entropy(forward(x), y).backward()
    with pytest.warns(RuntimeWarning, match="torch.compile.*build the optimizer before"):
        opt.step()
    torch._dynamo.reset()
