"""``state_dtype=`` for SOAP and its KL variants: the Adam moments stored in bfloat16.

The contract is Muon's and Lion's (tests/test_state_dtype.py): a step reads the stored moments
widened to float32, computes exactly the float32-state step from those values, and rounds each
new moment into its buffer once. SOAP adds a basis refresh: the rotated first moment is carried to
the new basis in float32 from the widened stored buffer (one change of basis per rotated
dimension, each rounded once on store), and the second moment is permuted (exact in any dtype).
The factors, bases and KL eigenvalue estimates stay float32; ``None`` is today's float32 state.
"""

from __future__ import annotations

from typing import Any

import pytest
import state_dtype_checks as checks
import torch
from test_state_dtype import BF16_U, F32_U  # noqa: F401  (F32_U: the tolerances)
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.kl_shampoo import KLSOAP, KLShampoo
from guided_descent.optimizers.soap import SOAP

CLASSES = {"soap": SOAP, "kl_soap": KLSOAP, "kl_shampoo": KLShampoo}
NAMES = tuple(CLASSES)
# The moments state_dtype governs (KL-Shampoo keeps one, in the original space).
MOMENTS = {
    "soap": ("soap.exp_avg_rotated", "exp_avg_sq"),
    "kl_soap": ("kl_soap.exp_avg_rotated", "exp_avg_sq"),
    "kl_shampoo": ("exp_avg",),
}
# A refresh every other step (staggered: some parameter refreshes on most steps).
FREQUENCY = 2


def parameters(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """A matrix, a 4-D tensor (the mode-product path), a vector (identity bases) and a matrix
    seen as a stack of two (``split:2``: per-matrix bases)."""
    torch.manual_seed(0)
    shapes = [(12, 12), (4, 3, 2, 2), (12,), (12, 6)]
    return [nn.Parameter(torch.randn(s, dtype=dtype) * 0.5) for s in shapes]


def build(name: str, params: list[nn.Parameter], **hp: Any) -> SOAP:
    groups = [
        {"params": params[:3], "algorithm": name},
        {"params": params[3:], "algorithm": name, "matrix_view": "split:2"},
    ]
    return CLASSES[name](groups, precondition_frequency=FREQUENCY, **hp)


def gradients(params: list[nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def moments(opt: SOAP, name: str) -> list[torch.Tensor]:
    """The moments state_dtype governs, in parameter order (not the AdamW groups' own)."""
    matrix = [p for g in opt.param_groups if g["algorithm"] == name for p in g["params"]]
    return [opt.state[p][k] for p in matrix if p in opt.state for k in MOMENTS[name]]


def train(name: str, steps: int, dtype: torch.dtype = torch.float32, **hp: Any):
    params = parameters(dtype)
    opt = build(name, params, **hp)
    for i in range(steps):
        gradients(params, i)
        opt.step()
    return params, opt


def method(name: str) -> checks.Method:
    """This module's configuration ``name`` for the shared checks (tests/state_dtype_checks.py)."""
    return checks.Method(
        parameters, lambda params, **hp: build(name, params, **hp), gradients, flat,
        lambda opt: moments(opt, name),
    )


def copied_state(opt: SOAP, name: str) -> dict[int, dict[str, Any]]:
    """Every parameter's state (by position), the moments widened to float32 (exact)."""
    out = {}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        state = opt.state[p]
        out[i] = {
            k: (v.float() if k in MOMENTS[name] else v.clone()) if isinstance(v, torch.Tensor)
            else v
            for k, v in state.items()
        }
    return out


# ------------------------------------------------------------------ (a) against the reference


@pytest.mark.parametrize("name", NAMES)
def test_every_step_is_the_float32_step_from_the_rounded_state(name, monkeypatch):
    # Before each step a float32-state twin takes the bf16 run's parameters and state (moments
    # widened: exact); both then take the same step. The twin carries its first moment to a new
    # basis from the value the bf16 buffer holds (rounded to bf16 before each change of basis),
    # which is what the bf16 run reads back from its buffer.
    params, opt = train(name, 0, state_dtype=torch.bfloat16)
    twin_params = parameters()
    twin = build(name, twin_params)
    rebase = twin._rebase_exp_avg

    def rebase_from_stored(state, *args):
        state[twin.EXP_AVG].copy_(state[twin.EXP_AVG].bfloat16())
        rebase(state, *args)

    monkeypatch.setattr(twin, "_rebase_exp_avg", rebase_from_stored)
    reordered = []
    reorder = SOAP._reorder

    def spy(self, state, d, key, b, order, take):
        if self is opt:
            reordered.append(not torch.equal(order, torch.arange(order.numel())))
        reorder(self, state, d, key, b, order, take)

    monkeypatch.setattr(SOAP, "_reorder", spy)
    refreshes = []
    refresh = SOAP._refresh_bases

    def count(self, jobs, split, group):
        if self is opt:
            refreshes.extend(jobs)
        refresh(self, jobs, split, group)

    monkeypatch.setattr(SOAP, "_refresh_bases", count)
    for step in range(9):
        with torch.no_grad():
            for p, q in zip(params, twin_params, strict=True):
                q.copy_(p)
        saved = copied_state(opt, name)
        for i, q in enumerate(q for g in twin.param_groups for q in g["params"]):
            if i in saved:
                twin.state[q] = saved[i]
        gradients(params, step)
        gradients(twin_params, step)
        opt.step()
        twin.step()
        # The same float32 kernels on the same values: the same bits, on any CPU.
        assert torch.equal(flat(params), flat(twin_params)), step
        ours, theirs = moments(opt, name), moments(twin, name)
        assert all(m.dtype == torch.bfloat16 for m in ours)
        assert all(m.dtype == torch.float32 for m in theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b.bfloat16()), step  # rounded once, from float32
    assert len(refreshes) >= 8  # many basis refreshes were crossed, not only the first bases
    if name == "soap":  # the sorted refresh re-ordered a basis at least once
        assert any(reordered)


def test_a_refresh_carries_the_first_moment_in_float32_and_rounds_it_once():
    # One refresh of a bf16 moment equals the float32 change of basis of its widened value,
    # rounded to bf16 (soap.py's rebase, applied to what the buffer held).
    from guided_descent.preconditioners.soap import rebase

    torch.manual_seed(3)
    m = torch.randn(12, 6).bfloat16()
    old = torch.linalg.qr(torch.randn(12, 12))[0]
    new = torch.linalg.qr(torch.randn(12, 12))[0]
    moved = rebase(m, 0, old, new)
    assert moved.dtype == torch.float32
    assert torch.equal(moved, rebase(m.float(), 0, old, new))


# ------------------------------------------------------------- (b) dtypes and memory halve


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("asked", [torch.bfloat16, "bfloat16"])
def test_moments_are_bf16_the_rest_float32_and_half_the_bytes(name, asked):
    _, wide = train(name, 3)
    _, narrow = train(name, 3, state_dtype=asked)

    def nbytes(opt):
        return sum(b.untyped_storage().nbytes() for b in moments(opt, name))

    assert all(b.dtype == torch.float32 for b in moments(wide, name))
    assert all(b.dtype == torch.bfloat16 for b in moments(narrow, name))
    assert 2 * nbytes(narrow) == nbytes(wide)
    for state in narrow.state.values():  # factors, bases, estimates, counters: as before
        for key, value in state.items():
            if key not in MOMENTS[name] and isinstance(value, torch.Tensor):
                assert value.dtype in (torch.float32, torch.int64), key
    assert all(g["state_dtype"] is torch.bfloat16 for g in narrow.param_groups)


@pytest.mark.parametrize("name", NAMES)
def test_a_routed_model_keeps_adamw_state_in_the_parameter_dtype(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    opt = gd.create(name, model, state_dtype=torch.bfloat16)
    model(torch.randn(16, 6)).pow(2).mean().backward()
    opt.step()
    opt.step()
    adamw = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    matrix = [g for g in opt.param_groups if g["algorithm"] == name]
    assert adamw and matrix and all("state_dtype" not in g for g in adamw)
    for p in adamw[0]["params"]:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert all(m.dtype == torch.bfloat16 for m in moments(opt, name))


# ------------------------------------------------------------------- (c) None: as it was


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_and_float32_are_todays_float32_state(name, dtype):
    # SOAP's moments were float32 for any model (float32 state of a bf16 model); None keeps that,
    # and float32, asked for, is the same path: the same bits.
    runs = [train(name, 6, dtype)]
    runs += [train(name, 6, dtype, state_dtype=v) for v in (None, torch.float32, "float32")]
    reference = flat(runs[0][0])
    for params, opt in runs[1:]:
        assert torch.equal(flat(params), reference)
        assert all(m.dtype == torch.float32 for m in moments(opt, name))


# --------------------------------------------------------------------- (d) training tracks


@pytest.mark.parametrize("name", NAMES)
def test_fifty_steps_with_bf16_moments_track_the_float32_run(name):
    hp = {"lr": 1e-2, "precondition_frequency": 5}  # trains in 50 steps; 10 refreshes
    checks.fifty_steps_track_the_float32_state_run(
        lambda model, state_dtype: gd.create(name, model, state_dtype=state_dtype, **hp)
    )


# -------------------------------------------------------------------------- (e) bad values


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [torch.float16, torch.int8, "half", 16, "bf16"])
def test_a_bad_state_dtype_names_the_value(name, bad):
    with pytest.raises(ValueError, match=r"state_dtype must be None .* got") as err:
        gd.create(name, nn.Linear(4, 4), state_dtype=bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_classes_and_param_groups_refuse_a_bad_state_dtype(name):
    params = parameters()
    with pytest.raises(ValueError, match=f"{name}: state_dtype"):
        CLASSES[name](params[:1], state_dtype=torch.float64)
    opt = CLASSES[name](params[:1])
    with pytest.raises(ValueError, match=r"param group 1.*state_dtype.*torch.float16"):
        opt.add_param_group({"params": params[1:2], "state_dtype": torch.float16})


def test_a_param_group_can_choose_its_own_state_dtype():
    params = parameters()
    opt = SOAP(params[:1])
    opt.add_param_group({"params": params[1:2], "state_dtype": "bfloat16"})
    assert opt.param_groups[1]["state_dtype"] is torch.bfloat16
    for i in range(2):
        gradients(params[:2], i)
        opt.step()
    assert opt.state[params[0]]["exp_avg_sq"].dtype == torch.float32
    assert opt.state[params[1]]["exp_avg_sq"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- (f) skip step


@pytest.mark.parametrize("name", NAMES)
def test_a_sync_free_skip_leaves_bf16_buffers_identical(name):
    # Every step from the second has a refresh due (FREQUENCY 2, staggered): the skipped one
    # exercises the flagged refresh's masked commits of the rebased and permuted moments.
    params, opt = train(name, 4, state_dtype=torch.bfloat16)
    opt.sync_free = True  # decided on the device: the masked commit_ path
    gradients(params, 4)
    params[0].grad[0, 0] = float("nan")
    before = flat(params)
    buffers = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
               for p, s in opt.state.items()}
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
        opt.diagnostics()
    assert torch.equal(flat(params), before)
    for p, state in opt.state.items():
        for key, value in buffers[id(p)].items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    for step in (5, 6):
        gradients(params, step)
        opt.step()  # and kept steps move them, through a refresh
    for p, state in opt.state.items():
        for key in MOMENTS[name]:
            assert state[key].dtype == torch.bfloat16
            assert not torch.equal(state[key], buffers[id(p)][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_sync_free_steps_equal_host_decided_steps_with_bf16_state(name):
    checks.sync_free_steps_equal_host_decided_steps(method(name))


# ------------------------------------------------------------------- (g) state_dict round trip


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    checks.state_dict_round_trip_resumes_exactly(method(name))


@pytest.mark.parametrize("name", NAMES)
def test_a_state_dict_saved_before_the_option_loads_as_float32(name):
    _, opt = train(name, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("state_dtype", None)
    again = build(name, parameters())
    again.load_state_dict(saved)
    assert all(g["state_dtype"] is None for g in again.param_groups)
    assert all(m.dtype == torch.float32 for m in moments(again, name))


def test_an_old_layout_first_moment_converts_into_the_saved_dtype():
    # A state dict with the first moment in the original space ("exp_avg", before SOAP kept it
    # rotated), here with bf16 moments: rotated into the saved bases in float32, kept in bf16.
    from guided_descent.preconditioners.soap import project_back

    params, opt = train("soap", 3, state_dtype=torch.bfloat16)
    saved = opt.state_dict()
    p = params[0]  # (12, 12): bases soap.L, soap.R
    index = 0
    entry = dict(saved["state"][index])
    bases = [entry["soap.L.basis"], entry["soap.R.basis"]]
    rotated = entry.pop("soap.exp_avg_rotated")
    entry["exp_avg"] = project_back(rotated.float(), bases).bfloat16()
    saved["state"][index] = entry
    again = build("soap", parameters())
    again.load_state_dict(saved)
    m = again.state[again.param_groups[0]["params"][0]]["soap.exp_avg_rotated"]
    assert m.dtype == torch.bfloat16 and m.shape == p.shape
    # Two roundings to bf16 and an orthogonal round trip: within a few bf16 units of the norm.
    error = (m.float() - rotated.float()).norm()
    assert error <= 4 * BF16_U * rotated.float().norm()


# ------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_update_with_bf16_moments_matches_the_eager_update():
    # compile_update=True runs soap_update through torch.compile; float64 parameters make the
    # widened arithmetic float64 and the stored moments bf16. Fusion may reorder float64
    # arithmetic (1e-16 relative), which moves a bf16 rounding only where a value sits within
    # that of a rounding boundary; eight steps agree to float64 rounding in all but freak cases.
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        params = parameters(torch.float64)
        opt = build("soap", params, state_dtype=torch.bfloat16, compile_update=compiled)
        for i in range(8):
            gradients(params, i)
            opt.step()
        results.append((flat(params).double(), moments(opt, "soap")))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-12)
    assert all(m.dtype == torch.bfloat16 for m in results[1][1])
