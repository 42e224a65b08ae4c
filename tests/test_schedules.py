"""Learning-rate schedules: closed-form values, joins, validation, LambdaLR on every optimizer."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.schedules import (
    WSD,
    Constant,
    Cosine,
    Join,
    LinearDecay,
    LinearWarmup,
    SqrtDecay,
    join,
    one_cycle,
    scheduler,
)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Constant(value=0.5), {0: 0.5, 7: 0.5, 10**6: 0.5}),
        (LinearWarmup(10), {0: 0.0, 1: 0.1, 5: 0.5, 10: 1.0, 50: 1.0}),
        (LinearWarmup(4, start=0.2), {0: 0.2, 2: 0.6, 4: 1.0}),
        (Cosine(100), {0: 1.0, 50: 0.5, 100: 0.0, 200: 0.0}),
        (Cosine(100, floor=0.1), {0: 1.0, 50: 0.55, 100: 0.1, 150: 0.1}),
        (LinearDecay(8, floor=0.2), {0: 1.0, 4: 0.6, 8: 0.2, 9: 0.2}),
        (SqrtDecay(100), {0: 1.0, 25: 0.5, 64: 0.2, 100: 0.0}),
        (SqrtDecay(100, floor=0.5), {25: 0.75, 100: 0.5}),
    ],
)
def test_values_at_known_steps(schedule, expected):
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, abs=1e-12), step


def test_cosine_quarter_points():
    s = Cosine(100)
    assert s(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(75) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))


def test_wsd_phases_and_both_cooldowns():
    lin = WSD(100, warmup=10, cooldown=20)
    assert [lin(t) for t in (0, 5, 10, 50, 80)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert lin(90) == pytest.approx(0.5) and lin(100) == 0.0 and lin(120) == 0.0
    sq = WSD(100, warmup=10, cooldown=20, shape="1-sqrt", floor=0.1)
    assert sq(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert sq(100) == pytest.approx(0.1)
    assert WSD(50)(49) == 1.0  # no warm-up, no cool-down: constant


@pytest.mark.parametrize(("shape", "decay"), [("linear", LinearDecay), ("1-sqrt", SqrtDecay)])
def test_wsd_equals_its_join(shape, decay):
    w = WSD(300, warmup=30, cooldown=70, shape=shape, floor=0.05)
    j = join(LinearWarmup(30), Constant(200), decay(70, floor=0.05))
    assert j.steps == w.steps == 300
    for t in range(400):
        assert w(t) == pytest.approx(j(t), abs=1e-12), t


def test_join_boundaries():
    s = join(LinearWarmup(100), Cosine(900, floor=0.1))
    assert s.steps == 1000
    assert s(99) == pytest.approx(0.99)
    assert s(100) == 1.0  # the cosine's own step 0
    assert s(101) == pytest.approx(Cosine(900, floor=0.1)(1))
    assert s(550) == pytest.approx(0.55)  # half-way down the cosine
    assert s(1000) == pytest.approx(0.1) and s(5000) == pytest.approx(0.1)
    # A zero-length piece is skipped.
    assert join(Constant(value=0.3), LinearWarmup(4))(0) == 0.0
    assert Join([Constant(3, value=0.3), LinearWarmup(4)])(2) == 0.3


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LinearWarmup(0), "steps"),
        (lambda: LinearWarmup(10, start=1.5), "start"),
        (lambda: Cosine(10, floor=-0.1), "floor"),
        (lambda: Cosine(2.5), "steps"),
        (lambda: LinearDecay(True), "steps"),
        (lambda: Constant(value=-1.0), "value"),
        (lambda: Constant(value=math.inf), "value"),
        (lambda: WSD(10, warmup=6, cooldown=6), "exceeds"),
        (lambda: WSD(10, cooldown=2, shape="cosine"), "shape"),
        (lambda: WSD(10, warmup=-1), "warmup"),
        (lambda: join(), "at least one"),
        (lambda: join(LinearWarmup(3), lambda t: 1.0), "piece 1"),
    ],
)
def test_invalid_schedules_raise_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step"):
        Cosine(10)(-1)


def test_schedules_are_frozen_values():
    s = Cosine(10, floor=0.1)
    with pytest.raises(AttributeError):
        s.floor = 0.2  # type: ignore[misc]
    assert s == Cosine(10, floor=0.1) and hash(s) == hash(Cosine(10, floor=0.1))


def _two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_lambdalr_drives_a_routed_hybrid_at_its_group_ratios():
    model = _two_layer()
    opt = gd.create("muon", model, lr=0.02, adamw_lr=3e-4)
    algos = [g["algorithm"] for g in opt.param_groups]
    assert "muon" in algos and "adamw" in algos
    initial = [g["lr"] for g in opt.param_groups]
    schedule = join(LinearWarmup(5), Cosine(20, floor=0.1))
    sched = scheduler(opt, schedule)
    x = torch.randn(16, 4)
    for step in range(30):
        for g, lr0 in zip(opt.param_groups, initial, strict=True):
            assert g["lr"] == pytest.approx(lr0 * schedule(step), rel=1e-12, abs=1e-15)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
    # The Muon/AdamW ratio never changed.
    by_algo = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert by_algo["muon"] / by_algo["adamw"] == pytest.approx(0.02 / 3e-4)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion", "shampoo", "soap"])
def test_lambdalr_works_on_other_optimizers(name):
    model = _two_layer()
    opt = gd.create(name, model)
    sched = scheduler(opt, LinearDecay(4))
    lrs0 = [g["lr"] for g in opt.param_groups]
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * lr for lr in lrs0])


def test_scheduler_state_dict_holds_no_schedule_object():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    sched = scheduler(opt, join(LinearWarmup(4), Cosine(4)))
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data only
    opt2 = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    sched2 = scheduler(opt2, join(LinearWarmup(4), Cosine(4)))
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_scheduler_rejects_a_plain_function():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(TypeError, match="Schedule"):
        scheduler(opt, lambda t: 1.0)  # type: ignore[arg-type]


def _muon_hybrid() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _two_layer()
    return model, gd.create("muon", model, lr=0.02, adamw_lr=3e-4)


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int) -> list[list[float]]:
    """Run ``steps`` steps; the lrs of every group at each step (what that step ran with)."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
    return seen


def test_scalar_max_lr_one_cycle_flattens_the_groups_of_a_hybrid():
    # The pitfall one_cycle exists for: torch's OneCycleLR gives every group the same peak.
    model, opt = _muon_hybrid()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=20)
    for lrs in _train(model, opt, sched, 20):
        assert lrs[0] == lrs[1]  # Muon's 0.02 and AdamW's 3e-4 are gone


@pytest.mark.parametrize("peak", [None, 0.05])
def test_one_cycle_keeps_every_groups_ratio_through_the_cycle(peak):
    model, opt = _muon_hybrid()
    initial = [g["lr"] for g in opt.param_groups]
    ref = initial[0]  # the Muon group
    sched = one_cycle(opt, 40, peak=peak)
    seen = _train(model, opt, sched, 40)
    for lrs in seen:
        for lr, lr0 in zip(lrs, initial, strict=True):
            assert lr / lrs[0] == pytest.approx(lr0 / ref, rel=1e-12)
    # The reference group runs exactly torch's scalar one-cycle at the requested peak.
    top = ref if peak is None else peak
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plain = torch.optim.lr_scheduler.OneCycleLR(
        probe, max_lr=top, total_steps=40, cycle_momentum=False
    )
    expected = []
    for _ in range(40):
        expected.append(probe.param_groups[0]["lr"])
        probe.step()
        plain.step()
    assert [lrs[0] for lrs in seen] == pytest.approx(expected, rel=1e-12)
    assert max(lrs[0] for lrs in seen) == pytest.approx(top, rel=1e-12)
    assert max(lrs[1] for lrs in seen) == pytest.approx(top * initial[1] / ref, rel=1e-12)
    assert seen[0][0] == pytest.approx(top / 25)


def test_one_cycle_on_mup_groups_keeps_the_per_layer_multipliers():
    from guided_descent import mup

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = nn.Sequential(
        nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    plan = mup.parametrize(model, base, "adam")
    opt = torch.optim.AdamW(plan.param_groups(lr=1e-2))
    initial = [g["lr"] for g in opt.param_groups]
    assert len(set(initial)) > 1
    reference = initial.index(max(initial))
    sched = one_cycle(opt, 12, peak=3e-2, reference=reference, anneal="linear", pct_start=0.25)
    for lrs in _train(model, opt, sched, 12):
        assert lrs[reference] <= 3e-2 * (1 + 1e-12)
        for lr, lr0 in zip(lrs, initial, strict=True):
            assert lr / lrs[reference] == pytest.approx(lr0 / initial[reference], rel=1e-12)


def test_one_cycle_leaves_momentum_and_betas_alone():
    model, opt = _muon_hybrid()
    before = [(g.get("momentum"), g.get("betas")) for g in opt.param_groups]
    _train(model, opt, one_cycle(opt, 10), 10)
    assert [(g.get("momentum"), g.get("betas")) for g in opt.param_groups] == before


def test_one_cycle_state_dict_is_plain_data_and_resumes():
    model, opt = _muon_hybrid()
    sched = one_cycle(opt, 20, peak=0.04)
    _train(model, opt, sched, 7)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2, opt2 = _muon_hybrid()
    sched2 = one_cycle(opt2, 20, peak=0.04)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    assert _train(model2, opt2, sched2, 5) == _train(model, opt, sched, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
        ({"total_steps": 10.0}, "total_steps must be an integer >= 1, got 10.0"),
        ({"total_steps": 10, "peak": -1.0}, "peak must be a finite number > 0, got -1.0"),
        ({"total_steps": 10, "peak": math.nan}, "peak must be a finite number > 0, got nan"),
        ({"total_steps": 10, "reference": 2}, "reference must be a param group index in"),
        ({"total_steps": 10, "pct_start": 1.5}, "pct_start must be a number in"),
        ({"total_steps": 10, "anneal": "exp"}, "anneal must be one of"),
        ({"total_steps": 10, "div_factor": 0}, "div_factor must be a finite number > 0"),
    ],
)
def test_one_cycle_rejects_bad_arguments_naming_them(kwargs, match):
    _, opt = _muon_hybrid()
    with pytest.raises(ValueError, match=match):
        one_cycle(opt, **kwargs)


def test_one_cycle_needs_a_reference_group_with_a_learning_rate():
    opt = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.0},
         {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}],
        lr=0.1,
    )
    with pytest.raises(ValueError, match=r"param group 0 has lr 0.0"):
        one_cycle(opt, 10, peak=0.5)
    one_cycle(opt, 10)  # without peak there is no ratio to take: the frozen group stays at 0
    assert opt.param_groups[0]["lr"] == 0.0
