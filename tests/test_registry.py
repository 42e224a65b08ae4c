"""The registry's content and create()'s handling of what users pass it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.registry import FAMILIES, OptimizerSpec, register

FIRST_ORDER = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam",
               "adafactor"]


def test_registry_lists_the_promised_names_with_their_facts():
    specs = gd.optimizers()
    for name in [*FIRST_ORDER, "lion"]:
        assert name in specs
    for spec in specs.values():
        assert spec.family in FAMILIES
        assert spec.rule and spec.state and spec.reference
        assert spec.state_buffers >= 0
        assert isinstance(spec.needs_model, bool)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        gd.optimizers()["mine"] = None  # type: ignore[index]


@pytest.mark.parametrize(
    "name, cls, expected",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0, nesterov=False)),
        ("momentum", torch.optim.SGD, dict(momentum=0.9, nesterov=False)),
        ("nesterov", torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
        ("adam", torch.optim.Adam, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)),
        ("adagrad", torch.optim.Adagrad, {}),
        ("rmsprop", torch.optim.RMSprop, {}),
        ("nadam", torch.optim.NAdam, {}),
        ("adafactor", torch.optim.Adafactor, {}),
    ],
)
def test_first_order_names_are_real_torch_optimizers(name, cls, expected):
    opt = gd.create(name, nn.Linear(3, 2))
    assert isinstance(opt, cls) and type(opt).__name__ == cls.__name__
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value


def test_first_order_step_equals_torch_step():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = gd.create("nesterov", a, lr=0.05)
    theirs = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_create_accepts_module_params_and_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert len(gd.create("adam", model).param_groups) == 1
    assert len(gd.create("adam", model.parameters()).param_groups) == 1
    groups = [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[1].parameters()}]
    opt = gd.create("adam", groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]


def test_create_skips_frozen_parameters_of_a_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = gd.create("sgd", model)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in ids and id(model[0].bias) in ids


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(gd.UnknownNameError) as err:
        gd.create("adamww", nn.Linear(2, 2))
    msg = str(err.value)
    assert "'adamw'" in msg and "lion" in msg and "sgd" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "target, exc, match",
    [
        (torch.zeros(3, requires_grad=True), TypeError, "single Tensor"),
        ([], ValueError, "empty"),
        (42, TypeError, "int"),
        ({"params": []}, TypeError, "dict"),
    ],
)
def test_create_rejects_bad_targets_clearly(target, exc, match):
    with pytest.raises(exc, match=match):
        gd.create("adam", target)


def test_module_without_trainable_parameters_is_rejected():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gd.create("adam", model)


def test_group_overrides_are_validated_with_the_group_index():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"param group 0.*lr.*-0.5"):
        gd.create("adam", [{"params": model.parameters(), "lr": -0.5}])


def test_registering_a_name_twice_is_refused():
    spec = gd.optimizers()["sgd"]
    with pytest.raises(ValueError, match="already registered"):
        register(spec)


def test_spec_rejects_unknown_family():
    with pytest.raises(ValueError, match="family"):
        OptimizerSpec(
            name="x", family="magic", rule="r", state="s", state_buffers=0, reference="r",
            factory=torch.optim.SGD,
        )
