"""Checkpoint files and optimizer state dicts that do not fit: the promised messages."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
import torch
from test_contract import closure_for, make_batch, make_model, params_of
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.checkpoint import STATE_KEY

Mismatch = gd.StateDictMismatchError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def trained(name: str = "adam", steps: int = 3):
    model = make_model()
    opt = gd.create(name, model)
    batch = make_batch()
    for _ in range(steps):
        opt.step(closure_for(model, opt, batch))
    return model, opt


# ------------------------------------------------------------------------------ state dicts


def test_state_of_another_optimizer_names_both():
    _, adam = trained("adam")
    muon = gd.create("muon", make_model())
    with pytest.raises(Mismatch, match="saved by optimizer 'Adam', expected 'Muon'"):
        muon.load_state_dict(adam.state_dict())


def test_untagged_torch_state_of_another_optimizer_is_caught_by_its_groups():
    model = make_model()
    muon = gd.create("muon", model)
    groups = [{"params": g["params"]} for g in muon.param_groups]
    plain = torch.optim.Adam(groups)  # torch's own: no tag, same grouping
    expected = "param group 0 is a 'muon' group, the state dict's is None"
    with pytest.raises(Mismatch, match=expected):
        muon.load_state_dict(plain.state_dict())
    fewer = torch.optim.Adam(model.parameters())
    with pytest.raises(Mismatch, match=r"has 2 param group\(s\), the state dict 1"):
        muon.load_state_dict(fewer.state_dict())


def test_other_shapes_name_the_parameter_and_both_shapes():
    _, adam = trained("adam")
    model = make_model()
    model.hidden = nn.Linear(12, 7)  # (7, 12) where the state has (6, 12)
    model.head = nn.Linear(7, 4)
    other = gd.create("adam", model)
    order = [p for g in other.param_groups for p in g["params"]]
    index = next(i for i, p in enumerate(order) if p is model.hidden.weight)
    with pytest.raises(gd.StateDictMismatchError) as err:
        other.load_state_dict(adam.state_dict())
    assert str(err.value) == (
        f"Adam: parameter {index} (param group 0, shape (7, 12)): state 'exp_avg' has shape "
        "(6, 12) in the state dict, expected (7, 12)"
    )


def test_other_number_of_parameters_names_the_group():
    _, adam = trained("adam")
    model = make_model()
    model.extra = nn.Parameter(torch.zeros(2))
    expected = r"param group 0 has 9 parameter\(s\), the state dict's has 8"
    with pytest.raises(Mismatch, match=expected):
        gd.create("adam", model).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", ["muon", "shampoo", "soap", "kfac", "psgd_kron"])
def test_matrix_methods_check_their_factor_shapes(name):
    _, opt = trained(name, steps=2)
    model = make_model()
    model.hidden = nn.Linear(12, 5)
    model.head = nn.Linear(5, 4)
    with pytest.raises(Mismatch, match=r"shape \(5, 12\).*expected"):
        gd.create(name, model).load_state_dict(opt.state_dict())


def test_newer_state_format_and_missing_keys_are_named():
    _, muon = trained("muon")
    state_dict = muon.state_dict()
    state_dict[STATE_KEY] = {**state_dict[STATE_KEY], "format": 99}
    expected = "state format 99; this version reads formats 1 to 1"
    with pytest.raises(Mismatch, match=expected):
        gd.create("muon", make_model()).load_state_dict(state_dict)

    _, soap = trained("soap")
    state_dict = soap.state_dict()
    del state_dict["state"][0]["exp_avg_sq"]
    with pytest.raises(Mismatch, match=r"parameter 0 .* lacks \['exp_avg_sq'\]"):
        gd.create("soap", make_model()).load_state_dict(state_dict)

    state_dict = muon.state_dict()
    del state_dict["param_groups"][0]["ns_steps"]
    expected = r"param group 0 of the state dict lacks \['ns_steps'\]"
    with pytest.raises(Mismatch, match=expected):
        gd.create("muon", make_model()).load_state_dict(state_dict)


def test_not_a_state_dict():
    with pytest.raises(Mismatch, match="not an optimizer state dict.*found \\['model'\\]"):
        gd.create("lion", make_model()).load_state_dict({"model": {}})


def test_tagged_state_still_loads_into_plain_torch():
    _, adam = trained("adam")
    plain = torch.optim.Adam(make_model().parameters())
    plain.load_state_dict(adam.state_dict())  # torch reads 'state' and 'param_groups' only
    assert plain.state_dict()["state"][0]["step"] == 3


# --------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("name", ["adamw", "shampoo", "kfac"])
def test_checkpoint_round_trip_continues_identically(tmp_path, name):
    model, opt = trained(name)
    path = gd.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=3, note="x")
    batch = make_batch()
    for _ in range(3):
        opt.step(closure_for(model, opt, batch))

    resumed = make_model()
    resumed_opt = gd.create(name, resumed)
    extra = gd.load_checkpoint(path, model=resumed, optimizer=resumed_opt)
    assert extra == {"step": 3, "note": "x"}
    for _ in range(3):
        resumed_opt.step(closure_for(resumed, resumed_opt, batch))
    for a, b in zip(params_of(resumed), params_of(model), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def checkpoint_file(tmp_path):
    model, opt = trained("adam")
    return gd.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_bytes(os.urandom(3000))


def empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, flip_bytes, garbage, empty])
def test_damaged_files_give_one_clear_line(tmp_path, damage):
    path = checkpoint_file(tmp_path)
    damage(path)
    with pytest.raises(gd.CheckpointError) as err:
        gd.load_checkpoint(path, model=make_model(), optimizer=gd.create("adam", make_model()))
    message = str(err.value)
    assert message.startswith(f"{path} is truncated or corrupted (") or message.startswith(
        f"{path} is not a guided-descent checkpoint"
    ), message
    assert "\n" not in message
    # No chained torch traceback under the message.
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(gd.CheckpointError, match="no such checkpoint file"):
        gd.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(gd.CheckpointError, match=r"not a guided-descent checkpoint.*\['weights'\]"):
        gd.load_checkpoint(tmp_path / "other.pt")


@dataclasses.dataclass
class Config:
    lr: float = 0.1


def test_objects_weights_only_refuses_are_named(tmp_path):
    path = gd.save_checkpoint(tmp_path / "ckpt.pt", model=make_model(), config=Config())
    expected = "holds a test_checkpoint.Config object, which weights_only loading refuses"
    with pytest.raises(gd.CheckpointError, match=expected):
        gd.load_checkpoint(path, model=make_model())


def test_mismatches_through_load_checkpoint(tmp_path):
    path = checkpoint_file(tmp_path)
    with pytest.raises(gd.CheckpointError, match="optimizer state does not fit: Adam: parameter"):
        small = make_model()
        small.hidden = nn.Linear(12, 5)
        small.head = nn.Linear(5, 4)
        gd.load_checkpoint(path, optimizer=gd.create("adam", small))
    with pytest.raises(gd.CheckpointError, match="model state does not fit: .*size mismatch"):
        other = make_model()
        other.hidden = nn.Linear(12, 5)
        gd.load_checkpoint(path, model=other)
    only_model = gd.save_checkpoint(tmp_path / "model.pt", model=make_model())
    with pytest.raises(gd.CheckpointError, match="holds no optimizer state"):
        gd.load_checkpoint(only_model, optimizer=gd.create("adam", make_model()))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = checkpoint_file(tmp_path)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        gd.save_checkpoint(path, model=make_model())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_save_checkpoint_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gd.save_checkpoint(tmp_path / "a.pt", model=make_model().state_dict())
    with pytest.raises(gd.CheckpointError, match="does not exist"):
        gd.save_checkpoint(tmp_path / "missing" / "a.pt", model=make_model())


def test_checkpoint_files_get_the_usual_mode(tmp_path):
    # mkstemp's 0600 used to survive the rename: a checkpoint readable by its owner alone.
    old = os.umask(0o022)
    try:
        path = gd.save_checkpoint(tmp_path / "ckpt.pt", model=nn.Linear(2, 2))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
