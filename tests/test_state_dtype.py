"""``state_dtype=``: optimizer buffers stored in bfloat16 (or float32) whatever the model's dtype.

The contract (guided_descent.transforms.state_dtype): a step reads the stored buffer widened to
float32, computes exactly what the float32-state path computes from that value, and rounds the
new buffer into its dtype once. So one step from a bf16 state equals the float32-state step from
the same (bf16-representable) values, bit for bit, and the stored buffer is that step's float32
buffer rounded to bf16. ``None`` is the parameter's dtype and today's arithmetic.
"""

from __future__ import annotations

import copy
import io

import pytest
import state_dtype_checks as checks
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.lion import Lion
from guided_descent.optimizers.muon import Muon

# bfloat16 keeps 8 significant bits: round-to-nearest errs by at most u·|x|, u = 2**-8.
BF16_U = 2.0**-8
# float32's unit roundoff.
F32_U = 2.0**-24

# The matrix methods and the key of every buffer that state_dtype governs.
BUFFERS = {
    "muon": ("momentum_buffer",),
    "adamuon": ("momentum_buffer", "adamuon.exp_avg_sq"),
    "normuon": ("momentum_buffer",),  # normuon.row_sq stays float32 (one entry per row)
    "lion": ("exp_avg",),
}
NAMES = tuple(BUFFERS)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(dtype)


def gradients(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def build(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    # Muon's Newton–Schulz in float32 whatever the CPU (its default picks bf16 on AMX for large
    # matrices only, but pinning it keeps every comparison here about the state alone).
    extra = {"ns_dtype": torch.float32} if name != "lion" else {"lr": 1e-3}
    return gd.create(name, model, **extra, **hp)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def governed(opt: torch.optim.Optimizer, name: str) -> list[torch.Tensor]:
    """The buffers state_dtype governs, in parameter order."""
    return [s[k] for s in opt.state.values() for k in BUFFERS[name] if k in s]


def train(name: str, steps: int, model_dtype=torch.float32, **hp):
    model = make_model(model_dtype)
    opt = build(name, model, **hp)
    for i in range(steps):
        gradients(model, i)
        opt.step()
    return model, opt


# ------------------------------------------------------------------ (a) against the reference


@pytest.mark.parametrize("name", NAMES)
def test_one_step_is_the_float32_step_from_the_rounded_state(name):
    # Two steps put non-zero bf16 buffers in place; then a float32-state twin starts from the
    # same parameters and the same buffer values (bf16 -> float32 is exact).
    model, opt = train(name, 2, state_dtype=torch.bfloat16)
    twin_model = copy.deepcopy(model)
    twin = build(name, twin_model)
    gradients(twin_model, 0)
    twin.step()  # creates the twin's state; overwritten next
    twin_model.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        for key, value in opt.state[p].items():
            twin.state[q][key] = value.to(torch.float32) if key in BUFFERS[name] else value.clone()
    gradients(model, 5)
    gradients(twin_model, 5)
    opt.step()
    twin.step()
    # The same float32 kernels on the same values: the same bits, on any CPU.
    assert torch.equal(flat(model), flat(twin_model))
    for ours, theirs in zip(governed(opt, name), governed(twin, name), strict=True):
        assert ours.dtype == torch.bfloat16 and theirs.dtype == torch.float32
        assert torch.equal(ours, theirs.to(torch.bfloat16))  # rounded once, from float32


@pytest.mark.parametrize("name", ["muon", "lion"])
def test_stored_momentum_is_the_written_out_ema_rounded_to_bf16(name):
    model, opt = train(name, 2, state_dtype=torch.bfloat16)
    key = BUFFERS[name][0]
    before = {p: opt.state[p][key].to(torch.float32) for p in opt.state if key in opt.state[p]}
    gradients(model, 7)
    grads = {p: p.grad.clone() for p in before}
    opt.step()
    beta = 0.95 if name == "muon" else 0.99  # Muon's momentum, Lion's beta2
    for p, b in before.items():
        g = grads[p]
        expected = beta * b + (1 - beta) * g  # float32, written out
        # The kernel's float32 lerp and this formula each round a few times (<= 3 roundings of
        # terms no larger than |beta·b| + |(1-beta)·g|); the stored value is one of them rounded
        # to bf16, off by at most u_bf16 times its size.
        slack = 3 * F32_U * (beta * b.abs() + (1 - beta) * g.abs())
        bound = BF16_U * (expected.abs() + slack) + slack
        stored = opt.state[p][key]
        assert stored.dtype == torch.bfloat16
        assert ((stored.to(torch.float32) - expected).abs() <= bound).all()


# ------------------------------------------------------------- (b) dtypes and memory halve


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("asked", [torch.bfloat16, "bfloat16"])
def test_buffers_are_stored_in_the_dtype_asked_and_take_half_the_memory(name, asked):
    _, wide = train(name, 1)
    _, narrow = train(name, 1, state_dtype=asked)
    assert all(b.dtype == torch.float32 for b in governed(wide, name))
    assert all(b.dtype == torch.bfloat16 for b in governed(narrow, name))

    def nbytes(opt):
        return sum(b.untyped_storage().nbytes() for b in governed(opt, name))

    assert 2 * nbytes(narrow) == nbytes(wide)
    for group in narrow.param_groups:  # saved as a dtype, whatever was passed
        if group.get("algorithm") != "adamw":
            assert group["state_dtype"] is torch.bfloat16
    if name == "normuon":
        rows = [s["normuon.row_sq"] for s in narrow.state.values() if "normuon.row_sq" in s]
        assert rows and all(r.dtype == torch.float32 for r in rows)


def test_adamw_groups_keep_torch_state_in_the_parameter_dtype():
    _, opt = train("muon", 1, state_dtype=torch.bfloat16)
    adamw = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    assert adamw and "state_dtype" not in adamw[0]
    for p in adamw[0]["params"]:
        assert opt.state[p]["exp_avg"].dtype == p.dtype


def test_float32_state_of_a_bf16_model():
    model, opt = train("muon", 3, model_dtype=torch.bfloat16, state_dtype=torch.float32)
    assert all(b.dtype == torch.float32 for b in governed(opt, "muon"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(flat(model).float()).all()
    model, opt = train("lion", 3, model_dtype=torch.bfloat16, state_dtype=torch.float32)
    assert all(b.dtype == torch.float32 for b in governed(opt, "lion"))


# ------------------------------------------------------------------- (c) None: as it was


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_none_and_the_parameter_dtype_are_the_unchanged_path(name, model_dtype):
    # state_dtype equal to the parameter's dtype takes the same in-place path as None.
    same = torch.float32 if model_dtype == torch.float32 else torch.bfloat16
    runs = [train(name, 4, model_dtype)]
    runs += [train(name, 4, model_dtype, state_dtype=v) for v in (None, same)]
    reference = flat(runs[0][0])
    for model, opt in runs[1:]:
        assert torch.equal(flat(model), reference)
        assert all(b.dtype == model_dtype for b in governed(opt, name))


# --------------------------------------------------------------------- (d) training tracks


@pytest.mark.parametrize("name", ["muon", "adamuon", "lion"])
def test_fifty_steps_with_bf16_state_track_the_float32_state_run(name):
    hp = {"lr": 3e-3} if name == "lion" else {"ns_dtype": torch.float32}
    checks.fifty_steps_track_the_float32_state_run(
        lambda model, state_dtype: gd.create(name, model, state_dtype=state_dtype, **hp)
    )


# -------------------------------------------------------------------------- (e) bad values


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [torch.float16, torch.int8, "half", 16, "bf16"])
def test_a_bad_state_dtype_names_the_value(name, bad):
    with pytest.raises(ValueError, match=r"state_dtype must be None .* got") as err:
        gd.create(name, make_model(), state_dtype=bad)
    assert repr(bad) in str(err.value)


def test_classes_and_param_groups_refuse_a_bad_state_dtype():
    model = make_model()
    with pytest.raises(ValueError, match="lion: state_dtype"):
        Lion(model.parameters(), state_dtype=torch.float64)
    with pytest.raises(ValueError, match="muon: state_dtype"):
        Muon([p for p in model.parameters() if p.ndim == 2], state_dtype="float16")
    opt = Muon([model[0].weight])
    with pytest.raises(ValueError, match=r"param group 1.*state_dtype.*torch.float16"):
        opt.add_param_group({"params": [model[2].weight], "state_dtype": torch.float16})


def test_a_param_group_can_choose_its_own_state_dtype():
    model = make_model()
    opt = Muon([model[0].weight], ns_dtype=torch.float32)
    opt.add_param_group({"params": [model[2].weight], "state_dtype": "bfloat16"})
    gradients(model, 0)
    opt.step()
    assert opt.state[model[0].weight]["momentum_buffer"].dtype == torch.float32
    assert opt.state[model[2].weight]["momentum_buffer"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- (f) skip step


@pytest.mark.parametrize("name", NAMES)
def test_a_sync_free_skip_leaves_bf16_buffers_identical(name):
    model, opt = train(name, 3, state_dtype=torch.bfloat16)
    opt.sync_free = True  # decided on the device: the masked commit_ path
    gradients(model, 3)
    next(model.parameters()).grad[0, 0] = float("nan")
    params = flat(model)
    buffers = [b.clone() for b in governed(opt, name)]
    opt.step()
    assert torch.equal(flat(model), params)
    after = governed(opt, name)
    assert all(a.dtype == torch.bfloat16 for a in after)
    assert all(torch.equal(a, b) for a, b in zip(after, buffers, strict=True))
    gradients(model, 4)
    opt.step()  # and a kept step moves them
    assert not all(torch.equal(a, b) for a, b in zip(governed(opt, name), buffers, strict=True))


@pytest.mark.parametrize("name", ["muon", "lion"])
def test_sync_free_steps_equal_host_decided_steps_with_bf16_state(name):
    runs = []
    for sync_free in (False, True):
        model = make_model()
        opt = build(name, model, state_dtype=torch.bfloat16)
        opt.sync_free = sync_free
        for i in range(4):
            gradients(model, i)
            opt.step()
        runs.append((flat(model), governed(opt, name)))
    # The same widened kernels on both paths (commit_ keeps the new value where ok): same bits,
    # except the AdamW groups, which use torch's fused kernel on the device path (an ulp or so
    # of parameters of size ~0.5 per step).
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)
    if name == "lion":
        assert torch.equal(runs[1][0], runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[0][1], strict=True))


# ------------------------------------------------------------------- (g) state_dict round trip


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    model, opt = train(name, 3, state_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for i in range(3, 6):
        gradients(model, i)
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    # Built without the option: the saved groups carry state_dtype, and the buffers come back in
    # bf16 (torch's load would have cast them to the parameters' float32).
    again = build(name, resumed)
    again.load_state_dict(saved["opt"])
    assert all(b.dtype == torch.bfloat16 for b in governed(again, name))
    for i in range(3, 6):
        gradients(resumed, i)
        again.step()
    assert torch.equal(flat(resumed), flat(model))
    ours, theirs = governed(again, name), governed(opt, name)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_state_dict_saved_before_the_option_loads_as_the_parameter_dtype():
    for name in ("muon", "lion"):
        model, opt = train(name, 2)
        saved = opt.state_dict()
        for group in saved["param_groups"]:
            group.pop("state_dtype", None)
        again = build(name, make_model())
        again.load_state_dict(saved)
        assert all(g.get("state_dtype", None) is None for g in again.param_groups)
        assert all(b.dtype == torch.float32 for b in governed(again, name))


# ------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "lion"])
def test_compiled_step_with_bf16_state_matches_the_eager_step(name):
    from test_sync_free import eager_and_compiled

    def build_(model: nn.Module) -> torch.optim.Optimizer:
        hp = {"ns_dtype": torch.float64} if name == "muon" else {}
        return gd.create(name, model, state_dtype=torch.bfloat16, **hp)

    # float64 parameters: the widened arithmetic is float64 and the stored buffers bf16; the
    # compiled graph may fuse differently, which in float64 stays far below a bf16 rounding
    # boundary's width in all but freak cases, so the runs agree to float64 rounding.
    results, counts = eager_and_compiled(build_, 5)
    assert counts == [(4, 1), (4, 1)]
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)
