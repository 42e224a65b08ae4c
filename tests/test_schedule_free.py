"""Schedule-free SGD / AdamW and the schedule_free() wrapper against their references.

* the ``schedulefree`` package (v1.4.1) fed identical gradients: bit for bit, since our kernels
  perform its operations in its order;
* the paper's algorithms (arXiv 2405.15682: three explicit sequences x, y, z) written out below
  in float64, with a flag for where the package -- and so we -- depart from Algorithm 1;
* the wrapper around SGD against schedule-free SGD, and around AdamW, Lion, Muon, SOAP and
  Prodigy against the three-sequence algorithm run on a twin of the base optimizer;
* the train/eval switch, checkpoints saved in either mode, and gd.EMA.

Tolerances are derived from rounding (see each comment), never read off a run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.muon import Muon
from guided_descent.optimizers.schedule_free import (
    AdamWScheduleFree,
    ScheduleFree,
    SGDScheduleFree,
    schedule_free,
)
from guided_descent.schedules import LinearWarmup, scheduler

F32_U = torch.finfo(torch.float32).eps / 2  # unit roundoff
F64_U = torch.finfo(torch.float64).eps / 2
SHAPES = [(), (7,), (5, 3), (2, 3, 2, 2)]
Z = ScheduleFree.Z_KEY


def random_problem(dtype, steps=8, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [
        [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
        for _ in range(steps)
    ]
    return params, grads


def run(opt_class, params, grads_per_step, *, train_first=False, sched=None, **hp):
    """Step a fresh optimizer over the gradient sequence; return (params, optimizer, fed)."""
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = opt_class(ps, **hp)
    if train_first:  # the package's optimizers start in eval mode
        opt.train()
    lr_sched = None if sched is None else sched(opt)
    fed = []
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        fed.append([p.grad for p in ps])
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
    return ps, opt, fed


def assert_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.detach(), y.detach()), (x - y).abs().max()


# ------------------------------------------------------------------ the package, bit for bit


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgd_matches_the_package_bit_for_bit(foreach, weight_decay, dtype):
    sf = pytest.importorskip("schedulefree")
    params, grads = random_problem(dtype)
    hp = dict(lr=0.3, momentum=0.9, weight_decay=weight_decay, foreach=foreach)
    ours, opt, fed = run(SGDScheduleFree, params, grads, **hp)
    ref, ref_opt, _ = run(sf.SGDScheduleFree, params, grads, train_first=True, **hp)
    assert_equal(ours, ref)
    assert_equal([opt.state[p]["z"] for p in ours], [ref_opt.state[p]["z"] for p in ref])
    opt.eval()
    ref_opt.eval()
    assert_equal(ours, ref)
    # p.grad is never modified (the package adds the weight decay into it).
    assert_equal(fed[-1], grads[-1])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_the_package_bit_for_bit(foreach, weight_decay, dtype):
    sf = pytest.importorskip("schedulefree")
    params, grads = random_problem(dtype)
    hp = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=foreach)
    ours, opt, fed = run(AdamWScheduleFree, params, grads, **hp)
    ref, ref_opt, ref_fed = run(sf.AdamWScheduleFree, params, grads, train_first=True, **hp)
    assert_equal(ours, ref)
    for key in ("z", "exp_avg_sq"):
        assert_equal([opt.state[p][key] for p in ours], [ref_opt.state[p][key] for p in ref])
    opt.eval()
    ref_opt.eval()
    assert_equal(ours, ref)
    assert_equal(fed[-1], grads[-1])  # ours leaves p.grad alone ...
    assert not torch.equal(ref_fed[-1][1], grads[-1][1])  # ... the package normalizes it


def test_a_scheduler_warmup_is_the_packages_warmup_steps():
    sf = pytest.importorskip("schedulefree")
    params, grads = random_problem(torch.float32, steps=10)
    W = 4
    ours, _, _ = run(
        AdamWScheduleFree, params, grads, lr=0.02,
        sched=lambda o: scheduler(o, LinearWarmup(W - 1, start=1 / W)),
    )
    ref, _, _ = run(sf.AdamWScheduleFree, params, grads, train_first=True, lr=0.02,
                    warmup_steps=W)
    # The learning rates agree to float64 rounding (lr·(t+1)/W against lr·(1/W + (1-1/W)·t/(W-1))),
    # so a float32 kernel sees the same coefficient or one a rounding away: at most one float32
    # rounding more per operation, ~8 operations per step, errors not amplified (|c|, β <= 1).
    scale = max(p.abs().max().item() for p in ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=10 * 8 * F32_U * scale)


# ------------------------------------------------------------------ the paper, densely


def dense_schedule_free(params, grads_per_step, *, lr, beta, weight_decay=0.0, warmup=0,
                        adam=None, paper=True, r=0.0, power=2.0):
    """The three sequences of arXiv 2405.15682 in float64, one line per line of the paper.

    ``adam=(beta2, eps)`` gives Algorithm 1 (Schedule-Free AdamW), else schedule-free SGD.
    ``paper=False`` is the package's AdamW: Adam's bias correction inside the root instead of
    in γ_t (and so not in the averaging weights). Returns x, z, y after the last step.
    """
    x = [p.double().clone() for p in params]
    z = [p.double().clone() for p in params]
    v = [torch.zeros_like(t) for t in x]
    lr_max, weight_sum = 0.0, 0.0
    for t, grads in enumerate(grads_per_step, start=1):
        y = [(1 - beta) * zi + beta * xi for zi, xi in zip(z, x, strict=True)]
        gamma = lr * (min(1.0, t / warmup) if warmup else 1.0)
        if adam is not None:
            beta2, eps = adam
            correction = 1 - beta2**t
            if paper:
                gamma *= math.sqrt(correction)
        for i, g in enumerate(grads):
            g = g.double()
            if adam is not None:
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                root = v[i].sqrt() if paper else (v[i] / correction).sqrt()
                g = g / (root + eps)
            z[i] = z[i] - gamma * (g + weight_decay * y[i])
        lr_max = max(lr_max, gamma)
        weight = t**r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z, strict=True)]
    y = [(1 - beta) * zi + beta * xi for zi, xi in zip(z, x, strict=True)]
    return x, z, y


# In float64 the two computations differ by a few roundings per step at 1.1e-16 each, relative
# to the iterates' size (the errors are not amplified: every coefficient is in [-0.12, 1]); eight
# steps, some 20 operations each: below 2e-13 of the largest entry.
F64_ATOL = 8 * 20 * 8 * F64_U


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_is_the_papers_algorithm(weight_decay):
    params, grads = random_problem(torch.float64)
    ours, opt, _ = run(SGDScheduleFree, params, grads, lr=0.3, momentum=0.8,
                       weight_decay=weight_decay)
    x, z, y = dense_schedule_free(params, grads, lr=0.3, beta=0.8, weight_decay=weight_decay)
    for a, b in zip(ours, y, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=F64_ATOL * 10)
    opt.eval()
    for a, b in zip(ours, x, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=F64_ATOL * 10)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_is_algorithm_1_with_the_packages_bias_correction(weight_decay):
    params, grads = random_problem(torch.float64)
    hp = dict(lr=0.02, weight_decay=weight_decay)
    ours, opt, _ = run(
        AdamWScheduleFree, params, grads, betas=(0.9, 0.999), eps=1e-8,
        sched=lambda o: scheduler(o, LinearWarmup(2, start=1 / 3)), **hp,
    )
    x, _, y = dense_schedule_free(params, grads, beta=0.9, adam=(0.999, 1e-8), warmup=3,
                                  paper=False, **hp)
    for a, b in zip(ours, y, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=F64_ATOL)
    opt.eval()
    for a, b in zip(ours, x, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=F64_ATOL)
    # Algorithm 1 as printed (bias correction in γ_t and so in the weights) is a different
    # trajectory: the difference is pinned, not rounding.
    x_paper, _, _ = dense_schedule_free(params, grads, beta=0.9, adam=(0.999, 1e-8), warmup=3,
                                        paper=True, **hp)
    gap = max((a.detach() - b).abs().max().item() for a, b in zip(ours, x_paper, strict=True))
    assert gap > 1e-4


def test_the_dense_algorithm_1_is_the_packages_paper_version():
    # Checks our transcription of Algorithm 1 against the package's own "paper" optimizer.
    sf = pytest.importorskip("schedulefree")
    params, grads = random_problem(torch.float64)
    ref, _, _ = run(sf.AdamWScheduleFreePaper, params, grads, train_first=True, lr=0.02,
                    betas=(0.9, 0.999), weight_decay=0.1, warmup_steps=3)
    _, _, y = dense_schedule_free(params, grads, lr=0.02, beta=0.9, adam=(0.999, 1e-8),
                                  weight_decay=0.1, warmup=3, paper=True)
    for a, b in zip(ref, y, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=F64_ATOL)


# ------------------------------------------------------------------ the wrapper


def wrapped_sgd(params, **hp):
    return schedule_free("sgd", params, **hp)


def test_wrapper_around_sgd_matches_the_packages_wrapper_bit_for_bit():
    sf = pytest.importorskip("schedulefree")
    # No 0-d parameter: the package's byte swap cannot view one as bytes (ours flattens first).
    params, grads = random_problem(torch.float32, shapes=SHAPES[1:])
    hp = dict(beta=0.9, weight_decay_at_y=0.05)
    ours, _, _ = run(wrapped_sgd, params, grads, lr=0.3, **hp)

    def theirs(ps, lr):
        return sf.ScheduleFreeWrapper(torch.optim.SGD(ps, lr=lr), momentum=0.9,
                                      weight_decay_at_y=0.05)

    ref, _, _ = run(theirs, params, grads, train_first=True, lr=0.3)
    assert_equal(ours, ref)


def test_the_packages_wrapper_breaks_bases_that_initialise_empty_state():
    # Why ours creates z only after the base's first step: the package's wrapper puts z into the
    # base's state first, and torch's Adam (like our Lion, Muon, SOAP) then skips its own setup.
    sf = pytest.importorskip("schedulefree")
    p = nn.Parameter(torch.ones(3))
    theirs = sf.ScheduleFreeWrapper(torch.optim.Adam([p], lr=0.1))
    theirs.train()
    p.grad = torch.ones(3)
    with pytest.raises(KeyError):
        theirs.step()
    q = nn.Parameter(torch.ones(3))
    ours = schedule_free("adam", [q], lr=0.1)
    q.grad = torch.ones(3)
    ours.step()
    assert {"exp_avg", "exp_avg_sq", Z} <= set(ours.state[q])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_wrapper_around_sgd_is_schedule_free_sgd(weight_decay):
    params, grads = random_problem(torch.float32, steps=12)
    ours, wrapped, _ = run(wrapped_sgd, params, grads, lr=0.3, beta=0.9,
                           weight_decay_at_y=weight_decay)
    ref, direct, _ = run(SGDScheduleFree, params, grads, lr=0.3, momentum=0.9,
                         weight_decay=weight_decay)
    z_ours = [wrapped.state[p][Z] for p in ours]
    z_ref = [direct.state[p]["z"] for p in ref]
    if weight_decay == 0.0:  # z -= lr·g in both, from the same start: the same z exactly
        assert_equal(z_ours, z_ref)
    # The two compute y by different operations (x formed and swapped vs y updated in place).
    # Per step each does at most three lerps, each rounding at most 3 times on terms bounded by
    # (1 + 2/β)·M (M: the largest entry of x, y, z); errors in y are carried with factor
    # (1 - c) <= 1, never amplified: |Δ| <= steps · 3 · 3 · (1 + 2/β) · u · M per computation.
    scale = max(t.abs().max().item() for t in [*ref, *z_ref])
    atol = 2 * 12 * 9 * (1 + 2 / 0.9) * F32_U * scale
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)
    for a, b in zip(z_ours, z_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


WRAPPED_BASES = {
    "adamw": dict(lr=0.01, weight_decay=0.1),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "muon": dict(lr=0.02, weight_decay=0.1),
    "soap": dict(lr=3e-3, precondition_frequency=2),
    "prodigy": dict(),
}


@pytest.mark.parametrize("base", list(WRAPPED_BASES))
def test_wrapper_is_the_three_sequence_algorithm_around_a_twin_base(base):
    """The base's iterate z is the twin's parameter exactly; x and y follow the paper in float64
    from the twin's z and learning rate (times Prodigy's d)."""
    torch.manual_seed(0)
    model = TwoLayer()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, generator=g) for _ in range(10)]
    hp = dict(WRAPPED_BASES[base])
    if gd.optimizers()[base].routes:
        hp["example_inputs"] = data[0]
    beta = 0.85
    ours = schedule_free(base, model, beta=beta, **hp)
    ref = gd.create(base, twin, **hp)
    x = [p.detach().double().clone() for p in model.parameters()]
    lr_max = [0.0] * len(ref.param_groups)
    weight_sum = [0.0] * len(ref.param_groups)
    group_of = {id(p): i for i, grp in enumerate(ref.param_groups) for p in grp["params"]}
    largest = 0.0
    for t, inputs in enumerate(data):
        ours.zero_grad()
        model(inputs).pow(2).mean().backward()  # the gradient at y
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        weights = []
        for i, grp in enumerate(ref.param_groups):
            lr_max[i] = max(lr_max[i], grp["lr"] * grp.get("d", 1.0))
            weight_sum[i] += lr_max[i] ** 2
            weights.append(lr_max[i] ** 2 / weight_sum[i])
        zs = [q.detach().double() for q in twin.parameters()]
        x = [(1 - weights[group_of[id(q)]]) * xi + weights[group_of[id(q)]] * zi
             for xi, zi, q in zip(x, zs, twin.parameters(), strict=True)]
        y = [(1 - beta) * zi + beta * xi for zi, xi in zip(zs, x, strict=True)]
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(ours.state[p][Z], q.detach()), (base, t)
        largest = max(largest, *(t_.abs().max().item() for t_ in [*x, *zs]))
        # Fresh rounding per step as in test_wrapper_around_sgd_is_schedule_free_sgd (three
        # lerps, three roundings each, terms below (1 + 2/β)·M), carried with factor <= 1.
        atol = (t + 1) * 9 * (1 + 2 / beta) * F32_U * largest
        for p, yi in zip(model.parameters(), y, strict=True):
            torch.testing.assert_close(p.detach().double(), yi, rtol=0, atol=atol)
    with ours.averaged():
        for p, xi in zip(model.parameters(), x, strict=True):
            torch.testing.assert_close(p.detach().double(), xi, rtol=0, atol=atol)


def test_wrapped_optimizer_keeps_its_class_routing_and_groups():
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(4, 6)
    opt = schedule_free("muon", model, example_inputs=x, lr=0.02)
    assert isinstance(opt, Muon) and type(opt).__name__ == "ScheduleFreeMuon"
    assert opt.STATE_NAME == "ScheduleFree(Muon)"
    assert str(opt.routing) == str(gd.create("muon", TwoLayer(), example_inputs=x).routing)
    assert {g["algorithm"] for g in opt.param_groups} == {"muon", "adamw"}
    for group in opt.param_groups:
        assert group["schedule_free.beta"] == 0.9 and group["schedule_free.train_mode"]
    # A group added later (an AdamW group drops keys it does not know) gets the settings too.
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "param_names": ["extra"], "algorithm": "adamw"})
    assert opt.param_groups[-1]["schedule_free.beta"] == 0.9


# ------------------------------------------------------------------ train / eval


def build(name, model, **hp):
    if name.startswith("wrapped:"):
        return schedule_free(name.removeprefix("wrapped:"), model, **hp)
    return gd.create(name, model, **hp)


MODE_NAMES = ["schedulefree_sgd", "schedulefree_adamw", "wrapped:adamw", "wrapped:muon"]


def train_steps(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        model(inputs).pow(2).mean().backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", MODE_NAMES)
def test_eval_puts_the_average_in_and_train_takes_it_out(name):
    torch.manual_seed(0)
    model = TwoLayer()
    opt = build(name, model)
    assert opt.training
    train_steps(model, opt, 5)
    y = flat(model)
    opt.eval()
    assert not opt.training
    x = flat(model)
    assert not torch.equal(x, y)
    opt.eval()  # idempotent
    assert torch.equal(flat(model), x)
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    assert torch.equal(flat(model), x)  # the refused step changed nothing
    opt.train()
    # y -> x -> y: two lerps, each rounding once on terms below (1 + 2/β)·M.
    atol = 4 * (1 + 2 / 0.9) * F32_U * max(x.abs().max().item(), y.abs().max().item())
    torch.testing.assert_close(flat(model), y, rtol=0, atol=atol)


@pytest.mark.parametrize("name", MODE_NAMES)
def test_averaged_restores_training_exactly(name):
    def run_(evaluate: bool):
        torch.manual_seed(0)
        model = TwoLayer()
        opt = build(name, model)
        g = torch.Generator().manual_seed(3)
        seen = []
        for _ in range(6):
            train_steps(model, opt, 1, seed=int(torch.randint(0, 100, (1,), generator=g)))
            if evaluate:
                with opt.averaged():
                    assert not opt.training
                    seen.append(flat(model))
                assert opt.training
        return flat(model), seen

    (plain, _), (evaluated, xs) = run_(False), run_(True)
    assert torch.equal(plain, evaluated)  # evaluating never perturbs training
    assert not torch.equal(xs[-1], plain)


def test_a_group_added_in_eval_mode_joins_in_eval_mode():
    model = TwoLayer()
    opt = gd.create("schedulefree_adamw", [model.inp.weight])
    opt.eval()
    opt.add_param_group({"params": [model.out.weight]})
    assert not opt.training
    opt.train()
    assert all(g["train_mode"] for g in opt.param_groups)


# ------------------------------------------------------------------ checkpoints and EMA


@pytest.mark.parametrize("name", MODE_NAMES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_in_either_mode_resumes_exactly(tmp_path, name, mode):
    torch.manual_seed(0)
    model = TwoLayer()
    opt = build(name, model)
    train_steps(model, opt, 4)
    if mode == "eval":
        opt.eval()
    path = gd.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt)

    def finish(model_, opt_):
        opt_.train()
        train_steps(model_, opt_, 3, seed=7)
        opt_.eval()
        return flat(model_), opt_.state_dict()

    expected, expected_state = finish(model, opt)
    torch.manual_seed(1)  # other weights, overwritten by the checkpoint
    resumed = TwoLayer()
    opt2 = build(name, resumed)
    gd.load_checkpoint(path, model=resumed, optimizer=opt2)
    assert opt2.training == (mode == "train")
    got, got_state = finish(resumed, opt2)
    assert torch.equal(got, expected)
    for key, entry in expected_state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got_state["state"][key][k], v), (key, k)


def test_state_dicts_of_other_optimizers_are_refused():
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(4, 6)
    wrapped = schedule_free("muon", model, example_inputs=x)
    plain = gd.create("muon", TwoLayer(), example_inputs=x)
    with pytest.raises(gd.StateDictMismatchError, match="ScheduleFree"):
        wrapped.load_state_dict(plain.state_dict())
    with pytest.raises(gd.StateDictMismatchError, match="ScheduleFree"):
        plain.load_state_dict(wrapped.state_dict())
    untagged = dict(gd.create("adamw", TwoLayer()).state_dict())
    del untagged["guided_descent"]
    sf_adamw = gd.create("schedulefree_adamw", TwoLayer())
    with pytest.raises(gd.StateDictMismatchError, match="train_mode"):
        sf_adamw.load_state_dict(untagged)


@pytest.mark.parametrize("name", ["schedulefree_adamw", "wrapped:muon"])
def test_ema_of_the_average(name):
    """``with opt.averaged(): ema.update()`` keeps an EMA of x; training is unperturbed."""
    torch.manual_seed(0)
    model = TwoLayer()
    opt = build(name, model)
    ema = gd.EMA(model, decay=0.5, warmup=False)
    expected = flat(model).double()  # ema_0 = x_0 = the initial weights
    for step in range(5):
        train_steps(model, opt, 1, seed=step)
        with opt.averaged():
            x = flat(model).double()
            ema.update()
        expected = 0.5 * expected + 0.5 * x
    averaged = torch.cat([p.detach().flatten() for p in ema.module.parameters()]).double()
    # lerp in float32 per update: one rounding of terms below M, five updates, plus the inputs'
    # own float32 rounding (x is float32 already).
    torch.testing.assert_close(averaged, expected, rtol=0,
                               atol=5 * 3 * F32_U * expected.abs().max().item())
    y = flat(model)
    with ema.swapped():  # the EMA's weights in the live model, then y again, bit for bit
        assert torch.equal(flat(model).double(), averaged)
    assert torch.equal(flat(model), y)
    train_steps(model, opt, 1)  # and training goes on from y


# ------------------------------------------------------------------ mistakes


def test_bad_settings_name_the_value():
    model = TwoLayer()
    with pytest.raises(ValueError, match=r"beta.*\(0, 1\).*1\.0"):
        schedule_free("adamw", model, beta=1.0)
    with pytest.raises(ValueError, match=r"weight_decay_at_y.*-0\.1"):
        schedule_free("adamw", model, weight_decay_at_y=-0.1)
    with pytest.raises(ValueError, match=r"momentum.*\(0, 1\).*got 0"):
        gd.create("schedulefree_sgd", model, momentum=0.0)
    with pytest.raises(ValueError, match=r"betas\[0\].*\(0, 1\)"):
        gd.create("schedulefree_adamw", model, betas=(0.0, 0.999))
    with pytest.raises(ValueError, match=r"weight_lr_power.*-1"):
        gd.create("schedulefree_adamw", model, weight_lr_power=-1.0)
    with pytest.raises(gd.UnknownNameError, match="Did you mean 'muon'"):
        schedule_free("muonn", model)


def test_what_cannot_be_wrapped_is_refused_clearly():
    model = TwoLayer()
    with pytest.raises(ValueError, match="schedule-free already"):
        schedule_free("schedulefree_sgd", model)
    wrapped = schedule_free("sgd", model)
    with pytest.raises(ValueError, match="schedule-free already"):
        schedule_free(wrapped)
    with pytest.raises(TypeError, match="guided_descent.create"):
        schedule_free(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="neither a model nor hyper-parameters"):
        schedule_free(gd.create("sgd", model), model)
    with pytest.raises(TypeError, match="registry name"):
        schedule_free(42)
