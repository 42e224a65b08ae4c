"""Cautious masking (arXiv 2411.16085) and cautious weight decay (arXiv 2510.12402).

References: the papers' rules written out densely here (float64), heavyball 3.2.1's ``caution``
and ``update_param_`` (the same rescaling as ours), and pytorch_optimizer 4.1.0's cautious ``Lion``
and ``Muon``, which rescale by ``numel / (nnz + 1)`` where we (and the authors' current code)
divide by the kept fraction ``nnz / numel``: the tests pin that ratio step by step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.linalg.newton_schulz import JORDAN
from guided_descent.optimizers.lion import Lion
from guided_descent.optimizers.muon import Muon
from guided_descent.transforms.cautious import (
    KEPT_FLOOR,
    cautious_mask,
    cautious_update,
    decayed,
    same_sign,
)

BF16_U = 2.0**-8


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- the transforms


def test_mask_keeps_agreeing_coordinates_rescaled_by_the_kept_fraction():
    u = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, 5.0])
    g = torch.tensor([2.0, 1.0, 0.5, -1.0, 1.0, 0.0])
    # agree: entries 0, 2, 3 (a zero on either side is not agreement): 3 of 6 kept, scale 2.
    torch.testing.assert_close(cautious_update(u, g), torch.tensor([2.0, 0, 6.0, -8.0, 0, 0]))
    # all agree: the update is unchanged, exactly
    assert torch.equal(cautious_update(u[:1], g[:1]), u[:1])
    # the kept fraction is floored at 1e-3: one of 10 000 kept is scaled by 1000, not 10 000
    u = torch.ones(10_000)
    g = -torch.ones(10_000)
    g[7] = 1.0
    out = cautious_update(u, g)
    assert out[7].item() == 1.0 / KEPT_FLOOR and out.count_nonzero().item() == 1
    assert cautious_mask(torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_signs_not_products_decide():
    # bfloat16 1e-30 · 1e-30 underflows to 0; the signs still agree.
    u = torch.tensor([1e-30, -1e-30], dtype=torch.bfloat16)
    g = torch.tensor([1e-30, -1e-30], dtype=torch.bfloat16)
    assert (u * g == 0).all()
    assert torch.equal(cautious_update(u, g), u)
    assert same_sign(u, g).all()


def test_cautious_decay_applies_only_where_the_step_shrinks_the_parameter():
    p = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    u = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5])  # the step is p -= lr·u
    out = decayed(p.clone(), u, 0.1, True, inplace=True)
    torch.testing.assert_close(out, torch.tensor([0.9, 1.0, -0.9, -1.0, 0.0]))
    # where everything agrees, bit for bit the plain decoupled decay, in place or not, float32
    # and bfloat16 (the factor is rounded once, in float32)
    for dtype in (torch.float32, torch.bfloat16):
        q = randn(50, seed=1).to(dtype)
        assert torch.equal(decayed(q.clone(), q, 1e-3, True, inplace=True), q.mul(1 - 1e-3))
        assert torch.equal(decayed(q, q, 1e-3, True, inplace=False), q.mul(1 - 1e-3))
    assert decayed(p, u, 0.0, True, inplace=False) is p


@pytest.fixture
def heavyball_eager(monkeypatch):
    hu = pytest.importorskip("heavyball.utils")
    monkeypatch.setattr(hu, "compile_mode", None)  # eager: no torch.compile in a unit test
    return hu


def test_mask_equals_heavyball_caution(heavyball_eager):
    for seed, shape in enumerate([(7,), (16, 9), (4, 3, 3, 3)]):
        u, g = randn(*shape, seed=2 * seed), randn(*shape, seed=2 * seed + 1)
        theirs = heavyball_eager.caution(g, u.clone())
        # heavyball: numel / max(nnz, 1), ours 1 / max(nnz/numel, 1e-3): the same here, each
        # scale rounded once to float32 (one ulp apart at most).
        torch.testing.assert_close(cautious_update(u, g), theirs, rtol=2 * 2.0**-23, atol=0)


@pytest.mark.parametrize("caution", [False, True])
def test_step_with_cautious_decay_equals_heavyball_update_param(heavyball_eager, caution):
    p, u, g = randn(16, 9, seed=3), randn(16, 9, seed=4), randn(16, 9, seed=5)
    lr, wd = 0.05, 0.3
    ours = p.clone()
    step = cautious_update(u, g) if caution else u
    decayed(ours, step, lr * wd, True, inplace=True)
    ours.add_(step, alpha=-lr)
    theirs = [p.clone()]
    heavyball_eager.update_param_(theirs, [u.clone()], lr, wd, caution=caution,
                                  cautious_decay=True, grad=[g])
    # The one deliberate difference: where the cautious mask zeroed the step, the paper's
    # 1[u·p >= 0] decays every such coordinate; heavyball compares sign bits, and a masked +0
    # step "agrees" only with p >= 0, so it leaves the negative ones undecayed.
    differs = (step == 0) & (p < 0)
    assert differs.any() == caution
    torch.testing.assert_close(ours[differs], p[differs] * (1 - lr * wd))
    torch.testing.assert_close(theirs[0][differs], p[differs])
    # Elsewhere, p·(1 - lr·wd) and the step rounded in another order: a few float32 ulps of
    # |p| <= 4.
    torch.testing.assert_close(ours[~differs], theirs[0][~differs], rtol=0,
                               atol=4 * 4 * 2.0**-23)
    assert not torch.allclose(ours, p * (1 - lr * wd) - lr * step, atol=1e-3)  # decay masked


# --------------------------------------------------------------------------- Lion


def reference_lion(params, grads, *, lr, betas, weight_decay, cautious, cautious_weight_decay):
    """C-Lion with cautious weight decay, float64, from the papers (Chen et al. 2023 Lion;
    arXiv 2411.16085 Algorithm 1 with the authors' current rescaling; arXiv 2510.12402
    Algorithm 1)."""
    beta1, beta2 = betas
    x = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in x]
    for step in grads:
        for i, g in enumerate(step):
            g = g.double()
            u = torch.sign(beta1 * m[i] + (1 - beta1) * g)
            if cautious:
                phi = (u * g > 0).double()
                u = u * phi / max(phi.mean().item(), 1e-3)
            keep = (u * x[i] >= 0).double() if cautious_weight_decay else 1.0
            x[i] = x[i] - lr * (u + weight_decay * keep * x[i])
            m[i] = beta2 * m[i] + (1 - beta2) * g
    return x


def lion_problem(steps=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (7,), (5, 3), (2, 3, 2, 2)]
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def step_all(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("cautious, cwd", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("foreach", [False, True])
def test_lion_equals_the_papers_rules_in_float64(cautious, cwd, foreach):
    params, grads = lion_problem()
    hp = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.5)
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = Lion(ps, cautious=cautious, cautious_weight_decay=cwd, foreach=foreach, **hp)
    for step in grads:
        step_all(opt, ps, step)
    ref = reference_lion(params, grads, cautious=cautious, cautious_weight_decay=cwd, **hp)
    for p, r in zip(ps, ref, strict=True):
        # The same float64 operations up to order (lerp vs the written-out interpolation): a
        # sign could only differ where c is within 1e-16 of 0, which random data never is.
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_cautious_lion_equals_pytorch_optimizer_up_to_its_rescaling():
    po = pytest.importorskip("pytorch_optimizer")
    params, grads = lion_problem(steps=5, seed=1)
    ours = [nn.Parameter(p.clone()) for p in params]
    theirs = [nn.Parameter(p.clone()) for p in params]
    opt = Lion(ours, lr=1e-2, betas=(0.9, 0.99), cautious=True)
    opt_po = po.Lion(theirs, lr=1e-2, betas=(0.9, 0.99), cautious=True)
    for step in grads:
        before = [p.detach().clone() for p in ours], [q.detach().clone() for q in theirs]
        step_all(opt, ours, step)
        step_all(opt_po, theirs, step)
        for p, q, p0, q0 in zip(ours, theirs, *before, strict=True):
            d, e = p0 - p.detach(), q0 - q.detach()  # this step's update (no decay), float64
            nnz, numel = d.count_nonzero().item(), d.numel()
            # Lion's direction does not depend on the parameters, so both see the same u and
            # mask; they differ in the rescaling only: ours numel/nnz, theirs numel/(nnz + 1).
            torch.testing.assert_close(d * nnz / (nnz + 1), e, rtol=1e-12, atol=1e-15)
            assert nnz == numel or not torch.allclose(d, e, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- Muon


def ns5(G: torch.Tensor) -> torch.Tensor:
    """Jordan et al.'s quintic Newton–Schulz, float64 (see tests/test_muon_variants.py)."""
    a, b, c = JORDAN
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = X / X.norm()
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def reference_cautious_muon(init, grads, *, lr, momentum, weight_decay, cautious, cwd):
    """Muon (Nesterov, Jordan's scale) with the cautious mask on the orthogonalized step against
    the raw gradient, and cautious weight decay, float64, from the papers' rules."""
    W = [p.clone() for p in init]
    M = [torch.zeros_like(p) for p in init]
    for step in grads:
        for i, g in enumerate(step):
            M[i] = momentum * M[i] + (1 - momentum) * g
            D = ((1 - momentum) * g + momentum * M[i]).reshape(g.shape[0], -1)
            m, n = D.shape
            u = ns5(D).reshape(g.shape) * max(1, m / n) ** 0.5
            if cautious:
                phi = (u * g > 0).double()
                u = u * phi / max(phi.mean().item(), 1e-3)
            keep = (u * W[i] >= 0).double() if cwd else 1.0
            W[i] = W[i] - lr * (u + weight_decay * keep * W[i])
    return W


MUON_SHAPES = [(16, 8), (8, 24), (12, 12), (4, 3, 3, 3)]


@pytest.mark.parametrize("cautious, cwd", [(True, False), (False, True), (True, True)])
def test_cautious_muon_equals_the_papers_rules_in_float64(cautious, cwd):
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in MUON_SHAPES]
             for _ in range(4)]
    hp = dict(lr=0.02, momentum=0.95, weight_decay=0.5)
    ps = [nn.Parameter(p.clone()) for p in init]
    opt = Muon(ps, cautious=cautious, cautious_weight_decay=cwd, ns_dtype=torch.float64, **hp)
    for step in grads:
        step_all(opt, ps, step)
    ref = reference_cautious_muon(init, grads, cautious=cautious, cwd=cwd, **hp)
    for p, r in zip(ps, ref, strict=True):
        # float64 Newton–Schulz in another order (tests/test_muon_variants.py's bound): 1e-7 of
        # a step of size lr·scale·(numel/nnz <= 4 here), per step.
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=4 * 0.02 * 2 * 4 * 1e-7)


def test_cautious_muon_equals_pytorch_optimizer_up_to_its_rescaling():
    po = pytest.importorskip("pytorch_optimizer")
    # Small matrices, so that its numel/(nnz + 1) and our numel/nnz are far apart (~15 %), well
    # beyond the bf16 allowance that separates the two Newton–Schulz computations.
    shapes = [(4, 3), (3, 4), (3, 3)]
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    ours = [nn.Parameter(p.clone()) for p in init]
    theirs = [nn.Parameter(p.clone()) for p in init]
    # Without Nesterov: pytorch_optimizer's Nesterov step overwrites the gradient with the
    # look-ahead before comparing signs with it; we compare with the gradient itself.
    opt = Muon(ours, lr=0.02, nesterov=False, cautious=True, ns_dtype=torch.bfloat16)
    opt_po = po.Muon([{"params": theirs, "use_muon": True}], lr=0.02, nesterov=False,
                     use_adjusted_lr=False, foreach=False, cautious=True)
    for step in grads:
        before = [p.detach().clone() for p in ours], [q.detach().clone() for q in theirs]
        step_all(opt, ours, step)
        step_all(opt_po, theirs, step)
        for p, q, p0, q0 in zip(ours, theirs, *before, strict=True):
            d, e = p0 - p.detach(), q0 - q.detach()
            nnz = d.count_nonzero().item()
            # Muon's step does not depend on the parameters: both mask the same bf16
            # Newton–Schulz output (bit for bit here), rescaled by numel/nnz (ours) and
            # numel/(nnz + 1) (theirs, in bfloat16: the scale and the product each rounded,
            # measured 0.5-1 unit of 2^-8); 8 bf16 units allow for another CPU's bf16 kernels,
            # as in tests/test_muon.py.
            assert (d * nnz / (nnz + 1) - e).norm() <= 8 * BF16_U * e.norm()
            assert (d - e).norm() > 8 * BF16_U * e.norm()


@pytest.mark.parametrize("name", ["lion", "muon", "normuon", "adamuon"])
def test_every_coordinate_of_a_cautious_step_goes_downhill(name):
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    torch.manual_seed(0)
    opt = gd.create(name, model, cautious=True, weight_decay=0.0)
    matrices = {id(p) for g in opt.param_groups if g.get("algorithm", "muon") == "muon"
                or name == "lion" for p in g["params"]}
    for step in range(4):
        x = randn(16, 6, seed=step)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = {id(p): p.detach().clone() for p in model.parameters()}
        opt.step()
        for p in model.parameters():
            if id(p) in matrices:  # Muon's AdamW groups are not cautious (documented)
                moved = p.detach() - before[id(p)]
                assert (moved * p.grad <= 0).all(), name


def test_the_flags_reach_every_group_and_survive_a_state_dict():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    for name in ("lion", "muon"):
        opt = gd.create(name, model, cautious=True, cautious_weight_decay=True)
        groups = [g for g in opt.param_groups if g.get("algorithm", name) == name]
        assert groups and all(g["cautious"] and g["cautious_weight_decay"] for g in groups)
        saved = copy.deepcopy(opt.state_dict())
        fresh = gd.create(name, model)
        fresh.load_state_dict(saved)
        assert all(g["cautious"] for g in fresh.param_groups if g.get("algorithm", name) == name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lion", "muon", "adamuon"])
def test_cautious_steps_resume_exactly_and_stay_finite(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 2)).to(dtype)
    hp = dict(cautious=True, cautious_weight_decay=True, weight_decay=0.1)
    x = randn(16, 4).to(dtype)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    opt = gd.create(name, model, **hp)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved_model)
    opt2 = gd.create(name, twin, **hp)
    opt2.load_state_dict(saved_opt)
    train(twin, opt2, 3)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q) and torch.isfinite(p).all() and p.dtype == dtype


def test_invalid_flags_raise_naming_the_value():
    for name in ("lion", "muon", "normuon"):
        with pytest.raises(ValueError, match="cautious.*'on'"):
            gd.create(name, [nn.Parameter(torch.zeros(3, 3))], cautious="on")
    with pytest.raises(ValueError, match="cautious_weight_decay.*None"):
        Lion([nn.Parameter(torch.zeros(3))], cautious_weight_decay=None)


def test_lion_state_dict_from_before_the_flags_loads():
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = Lion([p])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["cautious"], group["cautious_weight_decay"]
    opt2 = Lion([nn.Parameter(p.detach().clone())], cautious=True)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["cautious"] is False
    assert math.isfinite(opt2.param_groups[0]["lr"])
