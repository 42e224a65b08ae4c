"""``state_dtype=`` for Shampoo: its parameter-sized buffers stored in bfloat16.

The contract is Muon's, Lion's and SOAP's (tests/test_state_dtype.py, test_state_dtype_soap.py):
a step reads the stored buffers (``shampoo.exp_avg``, the graft's ``shampoo.graft_sq`` and the
optional ``shampoo.momentum_buffer``) widened to float32, computes exactly the float32-state step
from those values, and rounds each new buffer into its dtype once. The Kronecker factors and
their inverse roots stay float32; ``None`` is today's float32 state.

Each test runs two configurations, so that both graft accumulators (Adam's EMA, AdaGrad's sum)
and both momentum forms (heavy ball, Nesterov) pass through the bf16 path.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import state_dtype_checks as checks
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.shampoo import Shampoo

CONFIGS: dict[str, dict[str, Any]] = {
    "adam": {"grafting": "adam", "momentum": 0.5},
    "adagrad": {"grafting": "adagrad", "momentum": 0.5, "nesterov": True},
}
NAMES = tuple(CONFIGS)
BUFFERS = ("shampoo.exp_avg", "shampoo.graft_sq", "shampoo.momentum_buffer")
# The first Shampoo direction at step 2, then an inverse root due on most steps (staggered).
FREQUENCY = 2


def parameters(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """A matrix, a 4-D tensor (the mode-product path), a vector (the diagonal fallback) and a
    matrix cut into blocks (its group has max_preconditioner_dim=8: blocks 8, 8, 4 by 6)."""
    torch.manual_seed(0)
    shapes = [(12, 12), (4, 3, 2, 2), (12,), (20, 6)]
    return [nn.Parameter(torch.randn(s, dtype=dtype) * 0.5) for s in shapes]


def build(name: str, params: list[nn.Parameter], **hp: Any) -> Shampoo:
    groups = [
        {"params": params[:3], "algorithm": "shampoo"},
        {"params": params[3:], "algorithm": "shampoo", "max_preconditioner_dim": 8},
    ]
    return Shampoo(groups, precondition_frequency=FREQUENCY, **CONFIGS[name], **hp)


def gradients(params: list[nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def buffers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The buffers state_dtype governs, in parameter order (not the AdamW groups' own)."""
    matrix = [p for g in opt.param_groups if g["algorithm"] == "shampoo" for p in g["params"]]
    return [opt.state[p][k] for p in matrix if p in opt.state for k in BUFFERS
            if k in opt.state[p]]


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
        buffers,
    )


def copied_state(opt: Shampoo) -> dict[int, dict[str, Any]]:
    """Every parameter's state (by position), the governed buffers widened to float32 (exact)."""
    out = {}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        out[i] = {
            k: v.float() if k in BUFFERS else copy.deepcopy(v) for k, v in opt.state[p].items()
        }
    return out


# ------------------------------------------------------------------ (a) against the reference


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_step_is_the_float32_step_from_the_rounded_state(name, dtype):
    # Before each step a float32-state twin takes the bf16 run's parameters and state (buffers
    # widened: exact); both then take the same step, through refreshes of the inverse roots.
    params, opt = train(name, 0, dtype, state_dtype=torch.bfloat16)
    twin_params = parameters(dtype)
    twin = build(name, twin_params)
    for step in range(9):
        with torch.no_grad():
            for p, q in zip(params, twin_params, strict=True):
                q.copy_(p)
        saved = copied_state(opt)
        for i, q in enumerate(q for g in twin.param_groups for q in g["params"]):
            twin.state[q] = saved[i]
        gradients(params, step)
        gradients(twin_params, step)
        opt.step()
        twin.step()
        # The same float32 kernels on the same values: the same bits, on any CPU.
        assert torch.equal(flat(params), flat(twin_params)), step
        ours, theirs = buffers(opt), buffers(twin)
        assert len(ours) == 3 * len(params)  # every buffer, the momentum's too
        assert all(b.dtype == torch.bfloat16 for b in ours)
        assert all(b.dtype == torch.float32 for b in theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b.bfloat16()), step  # rounded once, from float32
    # The inverse roots were refreshed (not the identity they start as): the Shampoo direction,
    # not only the graft's diagonal step, was compared.
    root = opt.state[params[0]]["shampoo.L.inv_root"][0]
    assert root.dtype == torch.float32 and not torch.equal(root, torch.eye(12))


# ------------------------------------------------------------- (b) dtypes and memory halve


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("asked", [torch.bfloat16, "bfloat16"])
def test_buffers_are_bf16_the_rest_float32_and_half_the_bytes(name, asked):
    _, wide = train(name, 3)
    _, narrow = train(name, 3, state_dtype=asked)

    def nbytes(opt):
        return sum(b.untyped_storage().nbytes() for b in buffers(opt))

    assert all(b.dtype == torch.float32 for b in buffers(wide))
    assert all(b.dtype == torch.bfloat16 for b in buffers(narrow))
    assert 2 * nbytes(narrow) == nbytes(wide)
    for state in narrow.state.values():  # factors, inverse roots, counters: as before
        for key, value in state.items():
            if key in BUFFERS:
                continue
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, torch.Tensor):
                    assert v.dtype in (torch.float32, torch.int64), key
    assert all(g["state_dtype"] is torch.bfloat16 for g in narrow.param_groups)


def test_a_routed_model_keeps_adamw_state_in_the_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    opt = gd.create("shampoo", model, state_dtype=torch.bfloat16, momentum=0.5)
    model(torch.randn(16, 6)).pow(2).mean().backward()
    opt.step()
    opt.step()
    adamw = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    matrix = [g for g in opt.param_groups if g["algorithm"] == "shampoo"]
    assert adamw and matrix and all("state_dtype" not in g for g in adamw)
    for p in adamw[0]["params"]:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert buffers(opt) and all(b.dtype == torch.bfloat16 for b in buffers(opt))


# ------------------------------------------------------------------- (c) None: as it was


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_and_float32_are_todays_float32_state(name, dtype):
    # Shampoo's buffers were float32 for any model (float32 state of a bf16 model); None keeps
    # that, and float32, asked for, is the same path: the same bits.
    runs = [train(name, 6, dtype)]
    runs += [train(name, 6, dtype, state_dtype=v) for v in (None, torch.float32, "float32")]
    reference = flat(runs[0][0])
    for params, opt in runs[1:]:
        assert torch.equal(flat(params), reference)
        assert all(b.dtype == torch.float32 for b in buffers(opt))


# --------------------------------------------------------------------- (d) training tracks


@pytest.mark.parametrize("name", NAMES)
def test_fifty_steps_with_bf16_buffers_track_the_float32_run(name):
    # Rates at which both configurations train in 50 steps and the float32 run is not
    # itself erratic. Adam with momentum 0.5 steps 1 / (1 - 0.5) times further: at lr 1e-2
    # its float32 run's final loss moves by 4 % when its parameters are scaled by
    # 1 + 2**-9, which would test the run, not bf16; 5e-3 keeps SOAP's 1e-2 step. AdaGrad's
    # steps shrink as its sum grows: 1e-2.
    lr = {"adam": 5e-3, "adagrad": 1e-2}[name]
    hp = {**CONFIGS[name], "lr": lr, "precondition_frequency": 5}  # 10 refreshes
    checks.fifty_steps_track_the_float32_state_run(
        lambda model, state_dtype: gd.create("shampoo", model, state_dtype=state_dtype, **hp)
    )


# -------------------------------------------------------------------------- (e) bad values


@pytest.mark.parametrize("bad", [torch.float16, torch.int8, "half", 16, "bf16"])
def test_a_bad_state_dtype_names_the_value(bad):
    with pytest.raises(ValueError, match=r"state_dtype must be None .* got") as err:
        gd.create("shampoo", nn.Linear(4, 4), state_dtype=bad)
    assert repr(bad) in str(err.value)


def test_the_class_and_param_groups_refuse_a_bad_state_dtype():
    params = parameters()
    with pytest.raises(ValueError, match="shampoo: state_dtype"):
        Shampoo(params[:1], state_dtype=torch.float64)
    opt = Shampoo(params[:1])
    with pytest.raises(ValueError, match=r"param group 1.*state_dtype.*torch.float16"):
        opt.add_param_group({"params": params[1:2], "state_dtype": torch.float16})


def test_a_param_group_can_choose_its_own_state_dtype():
    params = parameters()
    opt = Shampoo(params[:1], momentum=0.5)
    opt.add_param_group({"params": params[1:2], "state_dtype": "bfloat16"})
    assert opt.param_groups[0]["state_dtype"] is None
    assert opt.param_groups[1]["state_dtype"] is torch.bfloat16
    for i in range(2):
        gradients(params[:2], i)
        opt.step()
    for key in BUFFERS:
        assert opt.state[params[0]][key].dtype == torch.float32
        assert opt.state[params[1]][key].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- (f) skip step


@pytest.mark.parametrize("name", NAMES)
def test_a_sync_free_skip_leaves_bf16_buffers_identical(name):
    # A root is due on every step from the second (FREQUENCY 2, staggered): the skipped step
    # also exercises the flagged refresh's masked commits.
    params, opt = train(name, 4, state_dtype=torch.bfloat16)
    opt.sync_free = True  # decided on the device: the masked commit_ path
    gradients(params, 4)
    params[0].grad[0, 0] = float("nan")
    before = flat(params)
    saved = {id(p): copy.deepcopy(s) for p, s in opt.state.items()}
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
        opt.diagnostics()
    assert torch.equal(flat(params), before)
    for p, state in opt.state.items():
        for key, value in saved[id(p)].items():
            if key == "calls":  # the host's count of attempted steps (the refresh schedule)
                continue
            values = value if isinstance(value, list) else [value]
            now = state[key] if isinstance(state[key], list) else [state[key]]
            for a, b in zip(now, values, strict=True):
                if isinstance(b, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), key
    for step in (5, 6):
        gradients(params, step)
        opt.step()  # and kept steps move them
    for p, state in opt.state.items():
        for key in BUFFERS:
            assert state[key].dtype == torch.bfloat16
            assert not torch.equal(state[key], saved[id(p)][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_sync_free_steps_equal_host_decided_steps_with_bf16_state(name):
    checks.sync_free_steps_equal_host_decided_steps(method(name))


# ------------------------------------------------------------------- (g) state_dict round trip


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    checks.state_dict_round_trip_resumes_exactly(method(name))


def test_a_state_dict_saved_before_the_option_loads_as_float32():
    _, opt = train("adam", 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("state_dtype", None)
    again = build("adam", parameters())
    again.load_state_dict(saved)
    assert all(g["state_dtype"] is None for g in again.param_groups)
    assert all(b.dtype == torch.float32 for b in buffers(again))


# ------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_direction_with_bf16_buffers_matches_the_eager_step():
    # compile_update=True compiles block_direction only; it receives the widened float32 (here,
    # with float64 parameters, float64) first moment and graft step, never a stored buffer.
    # The moments do not depend on the direction (random gradients): the same bits. Without
    # momentum no buffer does; the parameters agree to float64 rounding (fusion may reorder).
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        params = parameters(torch.float64)
        opt = Shampoo(params, precondition_frequency=FREQUENCY, state_dtype=torch.bfloat16,
                      compile_update=compiled)
        for i in range(6):
            gradients(params, i)
            opt.step()
        results.append((flat(params), buffers(opt)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-12)
    assert all(b.dtype == torch.bfloat16 for b in results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[1][1], results[0][1], strict=True))
