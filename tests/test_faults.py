"""Fault handling: non-finite gradients, failing matrix functions, bad configuration.

Every registered optimizer is covered through ``gd.create``; model-aware ones through the
contract suite's small model.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_contract import create, loss_fn, make_batch, make_model
from torch import nn

import guided_descent as gd
from guided_descent.optimizers import natural_gradient as ng_shell
from guided_descent.optimizers.checkpoint import STATE_KEY
from guided_descent.preconditioners.natural_gradient import CGResult

NAMES = list(gd.optimizers())
NONFINITE = [float("nan"), float("inf"), -float("inf")]

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated",  # natural gradient's forward-mode AD
    "ignore:.*skipped a step with non-finite gradients:RuntimeWarning",
)


def batches(count: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, ...]]:
    """Different batches per step, so that a skipped step would show if it leaked into state."""
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 2, 4, 4, generator=g).to(dtype), torch.randn(8, 4, generator=g).to(dtype))
        for _ in range(count)
    ]


def backward(model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    opt.zero_grad()
    loss_fn(model, batch).backward()


def poison(model: nn.Module, which: int, value: float) -> None:
    """Write ``value`` into one entry of one gradient (the test may; the optimizer never does)."""
    p = [q for q in model.parameters() if q.grad is not None][which]
    p.grad.view(-1)[0] = value


def same(a, b, where: str = "") -> None:
    """Bit-identical nested state: tensors by torch.equal (and dtype), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def without_tag(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k != STATE_KEY}


# ------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bad=st.sets(st.integers(0, 4), min_size=1, max_size=2),
    which=st.integers(0, 7),
    value=st.sampled_from(NONFINITE),
)
def test_a_nonfinite_step_leaves_params_and_state_as_if_it_never_happened(name, bad, which, value):
    data = batches(5)
    seen, clean = make_model(), make_model()
    opt_seen, opt_clean = create(name, seen), create(name, clean)
    for k, batch in enumerate(data):
        backward(seen, opt_seen, batch)
        if k in bad:
            poison(seen, which, value)
        opt_seen.step()
        if k not in bad:  # the reference run never sees the bad batches at all
            backward(clean, opt_clean, batch)
            opt_clean.step()
    same(list(seen.parameters()), list(clean.parameters()), "params")
    same(without_tag(opt_seen.state_dict()), without_tag(opt_clean.state_dict()), "state")
    report = opt_seen.diagnostics()
    assert report["skipped_steps"] == len(bad)
    assert report["steps"] == 5 - len(bad)
    assert report["last_skip"]["params"][0]["shape"] == list(
        [p for p in seen.parameters() if p.grad is not None][which].shape
    )


@pytest.mark.parametrize("name", NAMES)
def test_raise_policy_names_the_parameters_and_changes_nothing(name):
    model = make_model()
    opt = create(name, model, on_nonfinite="raise")
    batch = make_batch()
    backward(model, opt, batch)
    opt.step()
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = without_tag(opt.state_dict())
    backward(model, opt, batch)
    poison(model, 3, float("nan"))
    poison(model, 5, float("inf"))
    with pytest.raises(gd.NonFiniteGradientError) as err:
        opt.step()
    assert isinstance(err.value, FloatingPointError)
    message = str(err.value)
    assert "2 of 8 parameter(s)" in message
    # Indices in the optimizer's (state_dict) order, which routing may differ from the model's.
    order = [p for g in opt.param_groups for p in g["params"]]
    poisoned = [p for p in model.parameters()]
    for k in (3, 5):
        index = next(i for i, q in enumerate(order) if q is poisoned[k])
        assert f"#{index} " in message and str(tuple(poisoned[k].shape)) in message
    same([p.detach() for p in model.parameters()], before_params, "params")
    same(without_tag(opt.state_dict()), before_state, "state")
    assert opt.diagnostics()["skipped_steps"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_closure_loss_is_returned_when_the_step_is_skipped(name):
    model = make_model()
    opt = create(name, model)
    batch = make_batch()

    def closure():
        backward(model, opt, batch)
        poison(model, 0, float("nan"))
        return torch.tensor(1.5)

    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(closure).item() == 1.5
    same([p.detach() for p in model.parameters()], before)


def test_off_policy_does_not_check():
    model = make_model()
    opt = gd.create("sgd", model, on_nonfinite="off")
    backward(model, opt, make_batch())
    poison(model, 0, float("nan"))
    opt.step()
    assert torch.isnan(next(model.parameters())).any()
    assert opt.diagnostics()["skipped_steps"] == 0


def test_skip_warns_once_then_counts():
    model = make_model()
    opt = gd.create("adam", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            backward(model, opt, make_batch())
            poison(model, 1, float("inf"))
            opt.step()
    skips = [w for w in caught if "non-finite" in str(w.message)]
    assert len(skips) == 1 and issubclass(skips[0].category, RuntimeWarning)
    assert opt.diagnostics()["skipped_steps"] == 3


def test_huge_finite_gradients_are_not_mistaken_for_nonfinite():
    # The fast check's 2-norm overflows here (1e30² > float32 max); the exact check decides.
    p = nn.Parameter(torch.zeros(4, 4))
    opt = gd.create("sgd", [p], lr=1e-30)
    p.grad = torch.full((4, 4), 1e30)
    opt.step()
    assert opt.diagnostics()["skipped_steps"] == 0
    assert torch.allclose(p.detach(), torch.full((4, 4), -1.0))


def test_torch_native_names_keep_torch_step_hooks_running_once():
    model = make_model()
    opt = gd.create("adam", model)
    torch.optim.Adam(nn.Linear(2, 2).parameters())  # patches torch.optim.Adam.step's hooks
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    backward(model, opt, make_batch())
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("name", NAMES)
def test_skip_counter_round_trips_and_old_state_dicts_load(name):
    model = make_model()
    opt = create(name, model)
    for bad in (True, False, True, False):
        backward(model, opt, make_batch())
        if bad:
            poison(model, 0, float("nan"))
        opt.step()
    saved = opt.state_dict()
    assert saved[STATE_KEY]["skipped_steps"] == 2 and saved[STATE_KEY]["steps"] == 2

    twin = make_model()
    twin.load_state_dict(model.state_dict())
    resumed = create(name, twin)
    resumed.load_state_dict(saved)
    assert resumed.diagnostics()["skipped_steps"] == 2
    assert resumed.diagnostics()["steps"] == 2

    untagged = make_model()
    untagged.load_state_dict(model.state_dict())
    older = create(name, untagged)
    older.load_state_dict(without_tag(saved))  # as saved before the tag existed
    assert older.diagnostics()["skipped_steps"] == 0


# ------------------------------------------------------------------ failing matrix functions


def broken_eigh(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected: eigh did not converge")


def matrix_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def train_step(model, opt, seed: int) -> None:
    x, y = matrix_batch(seed)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


def hidden_entry(opt, shape) -> dict:
    return next(e for e in opt.diagnostics()["params"] if tuple(e["shape"]) == shape)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize(
    "name, hp, keys",
    [
        ("shampoo", dict(precondition_frequency=1), ("shampoo.L.inv_root", "shampoo.R.inv_root")),
        ("kfac", dict(inverse_frequency=1), ("kfac.A_inv", "kfac.S_inv")),
    ],
)
def test_eigh_failure_keeps_the_previous_preconditioner_and_is_reported(
    monkeypatch, name, hp, keys
):
    model = net()
    opt = create(name, model, **hp)
    for seed in range(2):
        train_step(model, opt, seed)
    hidden = model[2].weight
    kept = {k: copy.deepcopy(opt.state[hidden][k]) for k in keys}
    assert hidden_entry(opt, (5, 5))["preconditioner_age"] == 0
    assert hidden_entry(opt, (5, 5))["failures"] == 0

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    with pytest.warns(RuntimeWarning, match="keep|keeping"):
        train_step(model, opt, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per parameter / layer
        train_step(model, opt, 3)
    for k in keys:
        same(opt.state[hidden][k], kept[k], k)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    entry = hidden_entry(opt, (5, 5))
    assert entry["failures"] >= 2 and entry["preconditioner_age"] == 2
    assert entry["condition_number"] is not None  # from the last successful refresh


def test_soap_eigh_failure_keeps_identity_and_qr_failure_keeps_the_basis(monkeypatch):
    model = net()
    opt = gd.create("soap", model, precondition_frequency=1)
    hidden = model[2].weight
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "eigh", broken_eigh)
        with pytest.warns(RuntimeWarning, match="eigendecomposition"):
            train_step(model, opt, 0)
    assert torch.equal(opt.state[hidden]["soap.L.basis"], torch.eye(5))
    entry = hidden_entry(opt, (5, 5))
    assert entry["failures"] == 2 and entry["preconditioner_age"] is None  # never refreshed
    train_step(model, opt, 1)  # the QR refresh works again
    assert hidden_entry(opt, (5, 5))["preconditioner_age"] == 0

    kept = opt.state[hidden]["soap.L.basis"].clone()

    def broken_qr(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "qr", broken_qr)
    for seed in (2, 3):
        train_step(model, opt, seed)
    assert torch.equal(opt.state[hidden]["soap.L.basis"], kept)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    entry = hidden_entry(opt, (5, 5))
    assert entry["failures"] == 6 and entry["preconditioner_age"] == 2


def test_kfac_does_not_fold_nonfinite_statistics_into_its_factors():
    model = net()
    opt = gd.create("kfac", model, on_nonfinite="off")
    train_step(model, opt, 0)
    A = opt.state[model[0].weight]["kfac.A"].clone()
    x, y = matrix_batch(1)
    x[0, 0] = float("inf")
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="NaN/Inf activation"):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert torch.equal(opt.state[model[0].weight]["kfac.A"], A)
    assert opt.state[model[0].weight]["kfac.rejected_statistics"] == 1


def test_kfac_overflowing_preconditioned_gradient_falls_back_to_the_gradient(monkeypatch):
    from guided_descent.optimizers import kfac as kfac_shell

    model = nn.Linear(6, 3).double()
    opt = gd.create("kfac", model, lr=0.1, momentum=0.0, kl_clip=None)
    x, y = (t.double() for t in matrix_batch(0))
    monkeypatch.setattr(
        kfac_shell, "precondition", lambda G, A_inv, S_inv: torch.full_like(G, float("inf"))
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with pytest.warns(RuntimeWarning, match="non-finite preconditioned gradient"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)
    assert opt.diagnostics()["params"][0]["failures"] == 1


class FreeParameter(nn.Module):
    """A parameter the outputs do not depend on: the Gauss–Newton matrix is zero along it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1).double()
        self.free = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_natural_gradient_falls_back_to_the_gradient_when_cg_breaks_down():
    torch.manual_seed(0)
    model = FreeParameter()
    opt = gd.create("natural_gradient", model, loss="mse", damping=0.0, lr=0.25)
    x = torch.randn(4, 2, dtype=torch.float64)
    opt.zero_grad()
    # Only `free` gets a gradient, and G·g = 0: CG breaks down on its first product.
    (0.0 * model(x).sum() + model.free.pow(2).sum()).backward()
    with pytest.warns(RuntimeWarning, match="broke down.*plain gradient"):
        opt.step()
    assert opt.last_solve.breakdown
    torch.testing.assert_close(model.free.detach(), torch.tensor([1.0, -0.5], dtype=torch.float64))
    report = opt.diagnostics()
    assert all(e["failures"] == 1 for e in report["params"])
    assert report["last_solve"]["breakdown"] is True
    assert opt.state_dict()[STATE_KEY]["solve_failures"] == 1


def test_natural_gradient_replaces_a_nonfinite_solve_by_the_gradient(monkeypatch):
    def nan_solve(matvec, b, **kwargs):
        return torch.full_like(b, float("nan")), CGResult(1, math.nan, False, True)

    monkeypatch.setattr(ng_shell, "conjugate_gradient", nan_solve)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = gd.create("natural_gradient", model, loss="mse", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(5, 3, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)


# --------------------------------------------------------------------------- bad configuration


BAD_CONFIG = [
    ("kfac", "damping", -1.0, ">= 0"),
    ("kfac", "stat_decay", 1.0, "[0, 1)"),
    ("kfac", "factor_frequency", 0, "integer >= 1"),
    ("kfac", "inverse_frequency", 2.5, "integer >= 1"),
    ("kfac", "kl_clip", 0.0, "> 0"),
    ("natural_gradient", "damping", float("nan"), ">= 0"),
    ("natural_gradient", "cg_iterations", 0, "integer >= 1"),
    ("natural_gradient", "loss", "hinge", "'mse'"),
    ("shampoo", "epsilon", 0.0, "> 0"),
    ("shampoo", "precondition_frequency", True, "integer >= 1"),
    ("shampoo", "max_factor_dim", 0, "integer >= 1"),
    ("shampoo", "grafting", "sgd", "'adam'"),
    ("soap", "max_precond_dim", -1, "integer >= 0"),
    ("soap", "shampoo_beta", 1.5, "[0, 1)"),
    ("muon", "ns_steps", 0, "integer >= 1"),
    ("muon", "nesterov", "yes", "bool"),
    ("nesterov", "momentum", 1.0, "[0, 1)"),
]


@pytest.mark.parametrize("name, key, bad, accepted", BAD_CONFIG)
def test_create_names_the_bad_value_and_the_accepted_range(name, key, bad, accepted):
    model = make_model()
    with pytest.raises(ValueError) as err:
        create(name, model, **{key: bad})
    message = str(err.value)
    assert key in message and repr(bad) in message and accepted in message, message
    # Checked before anything was built: no layer hooks were left on the model.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_takes_the_policy_and_rejects_unknown_ones(name):
    assert "on_nonfinite" in gd.optimizers()[name].hyperparams
    assert create(name, make_model(), on_nonfinite="raise").on_nonfinite == "raise"
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('skip', 'raise', 'off'\)"):
        create(name, make_model(), on_nonfinite="sometimes")


def test_classes_built_directly_validate_too():
    from guided_descent.optimizers.shampoo import Shampoo

    with pytest.raises(ValueError, match=r"param group 1.*epsilon.*> 0, got -1"):
        Shampoo([{"params": [nn.Parameter(torch.ones(2, 2))]},
                 {"params": [nn.Parameter(torch.ones(3, 3))], "epsilon": -1}])
    with pytest.raises(ValueError, match="on_nonfinite"):
        gd.Lion([nn.Parameter(torch.ones(2))], on_nonfinite="never")
