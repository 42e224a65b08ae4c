"""Steps that decide on the device: no host sync, exact skips, and torch.compile(fullgraph=True).

The host-decided guard reads one flag per step (``.item()``), which stalls an accelerator and
breaks ``torch.compile(opt.step, fullgraph=True)``. Lion, Muon, Shampoo and SOAP can take the
decision on the device instead (see ``guided_descent.optimizers.guard``); these tests pin that
path on the CPU by forcing it (``opt.sync_free = True``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import guided_descent as gd

NAMES = (
    "lion", "muon", "shampoo", "soap", "kl_shampoo", "kl_soap", "psgd_kron", "ademamix", "mars",
    "adopt",
)
# Small refresh intervals so that a few steps cross preconditioner refreshes.
HYPER = {
    name: {"precondition_frequency": 2} for name in ("shampoo", "soap", "kl_shampoo", "kl_soap")
}
# Muon orthogonalizes in float32 by default whatever the parameters' dtype.
COMPILE_HYPER = {"muon": {"ns_dtype": torch.float64}}


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def build(name: str, model: nn.Module, sync_free: bool | None) -> torch.optim.Optimizer:
    opt = gd.create(name, model, **HYPER.get(name, {}))
    opt.sync_free = sync_free
    return opt


def gradients(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def without_calls(state_dict: dict) -> dict:
    # "calls" counts attempts on the host; it is the one entry a skipped step advances.
    states = state_dict["state"].items()
    return {k: {key: v for key, v in s.items() if key != "calls"} for k, s in states}


@pytest.mark.parametrize("name", NAMES)
def test_deciding_on_the_device_gives_the_host_decided_result(name):
    results = []
    for sync_free in (False, True):
        model = make_model()
        opt = build(name, model, sync_free)
        for step in range(6):
            gradients(model, step)
            opt.step()
        results.append(flat(model))
        assert opt.diagnostics()["steps"] == 6
    # The same float32 arithmetic on both paths, but not always the same kernels: the AdamW
    # groups use torch's fused kernel on the device path, and SOAP's bases are kept contiguous
    # there (a transposed eigenbasis takes another BLAS path). Each step's rounding differs by an
    # ulp or so, of parameters of size ~0.3, and six steps (two basis refreshes) amplify it a
    # little: well inside 1e-6.
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_skip_decided_on_the_device_changes_nothing(name):
    model = make_model()
    opt = build(name, model, True)
    for step in range(3):
        gradients(model, step)
        opt.step()
    gradients(model, 3)
    next(model.parameters()).grad[0, 0] = float("nan")
    params, state = flat(model), copy.deepcopy(opt.state_dict())
    opt.step()  # decided on the device: nothing is read on the host
    assert torch.equal(flat(model), params)
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        after = opt.state_dict()
    assert same(without_calls(after), without_calls(state))
    diagnostics = opt.diagnostics()
    assert (diagnostics["steps"], diagnostics["skipped_steps"]) == (3, 1)
    gradients(model, 4)
    opt.step()
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), params)


@contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value by the host (each one is a device sync)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def forbidden(*args, **kwargs):
        raise AssertionError("a host read of a tensor value during a sync-free step")

    for n in names:
        setattr(torch.Tensor, n, forbidden)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", NAMES)
def test_a_sync_free_step_reads_nothing_on_the_host(name):
    model = make_model()
    opt = gd.create(name, model, precondition_frequency=1000) if name in HYPER else build(
        name, model, True
    )
    opt.sync_free = True
    for step in range(2):  # SOAP's first gradient builds its bases: a refresh, allowed to sync
        gradients(model, step)
        opt.step()
    gradients(model, 2)
    next(model.parameters()).grad[0, 0] = float("inf")
    with no_host_reads():
        opt.step()  # a skip
        gradients(model, 3)
        opt.step()  # and a step
    with pytest.warns(RuntimeWarning, match="decided on the device"):
        assert opt.diagnostics()["skipped_steps"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_fullgraph_matches_the_eager_step(name):
    # float64: the compiled graph fuses float operations differently, and Shampoo/SOAP amplify
    # rounding (see their sensitivity tests); in float64 both stay within 1e-9 of each other.
    def build(model: nn.Module) -> torch.optim.Optimizer:
        return gd.create(name, model, **HYPER.get(name, {}), **COMPILE_HYPER.get(name, {}))

    # Five steps cross two refreshes (frequency 2) and one skip.
    results, counts = eager_and_compiled(build, 5)
    assert counts == [(4, 1), (4, 1)]
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


def eager_and_compiled(build, steps: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """``steps`` sync-free steps of ``build(model)`` on a float64 model (the third gradient NaN,
    a skip), eagerly then under ``torch.compile(opt.step, fullgraph=True)``: the final weights
    and ``(steps, skipped_steps)`` of each run."""
    results, counts = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model(torch.float64)
        opt = build(model)
        opt.sync_free = True
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for i in range(steps):
            gradients(model, i)
            if i == 2:
                next(model.parameters()).grad[0, 0] = float("nan")
            step()
        results.append(flat(model))
        with pytest.warns(RuntimeWarning, match="skipped 1 step"):
            diagnostics = opt.diagnostics()
        counts.append((diagnostics["steps"], diagnostics["skipped_steps"]))
    return results, counts
