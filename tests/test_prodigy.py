"""Prodigy against prodigyopt (bit for bit) and against the paper's Algorithm 3 written out in
float64 (arXiv 2306.06101, "Prodigy (Adam version)")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers import prodigy as prodigy_module
from guided_descent.optimizers.prodigy import Prodigy

SHAPES = [(), (7,), (5, 3), (2, 3, 2, 2), (4,)]
F64_U = torch.finfo(torch.float64).eps / 2


def random_problem(dtype, steps=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    params[-1].zero_()  # an all-zero parameter: prodigyopt keeps a 0-d x0 for it
    grads = [
        [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
        for _ in range(steps)
    ]
    return params, grads


def run(opt_class, params, grads_per_step, **hp):
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = opt_class(ps, **hp)
    fed = []
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        fed.append([p.grad for p in ps])
        opt.step()
    return ps, opt, fed


SETTINGS = [
    {},
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decouple=False),
    dict(betas=(0.0, 0.99), slice_p=3),
    dict(use_bias_correction=True, safeguard_warmup=True, growth_rate=1.05, d_coef=2.0),
    dict(beta3=0.9, d0=1e-4, eps=1e-6),
]


@pytest.mark.parametrize("hp", SETTINGS, ids=lambda hp: ",".join(hp) or "defaults")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_prodigyopt_bit_for_bit(hp, dtype, capsys):
    prodigyopt = pytest.importorskip("prodigyopt")
    params, grads = random_problem(dtype)
    ours, opt, fed = run(Prodigy, params, grads, **hp)
    ref, ref_opt, ref_fed = run(prodigyopt.Prodigy, params, grads, **hp)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    for a, b in zip(ours, ref, strict=True):
        for key, value in ref_opt.state[b].items():
            mine = opt.state[a][key]
            assert mine == value if key == "step" else torch.equal(mine, value), key
    for key in ("d", "d_max", "d_hat", "d_numerator", "d_denom", "k"):
        assert opt.param_groups[0][key] == ref_opt.param_groups[0][key], key
    for got, given in zip(fed[-1], grads[-1], strict=True):
        assert torch.equal(got, given)  # p.grad is never modified
    if hp.get("decouple") is False:  # prodigyopt adds the L2 term into p.grad
        assert not torch.equal(ref_fed[-1][1], grads[-1][1])
    if hp.get("weight_decay") and hp.get("decouple", True):
        assert "decoupled" in capsys.readouterr().out  # prodigyopt prints; we do not
        Prodigy([nn.Parameter(torch.ones(2))], **hp)
        assert capsys.readouterr().out == ""


def quadratic(seed=0):
    """A convex quadratic ½ Σ a (x - x*)² over tensors of SHAPES: its gradient at the current x,
    so that the inner products <g, x0 - x> of Prodigy's estimate are of one sign (a test of the
    estimate on random gradients would measure mostly their cancellation)."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    curvature = [0.5 + 1.5 * torch.rand(s, generator=g, dtype=torch.float64) for s in SHAPES]

    def grad(xs):
        return [a * (x.detach() - t) for x, t, a in zip(xs, targets, curvature, strict=True)]

    return grad


def dense_prodigy(params, grad, steps, *, lr, betas, eps, d0, eps_with_new_d=True):
    """Algorithm 3 of arXiv 2306.06101 in float64, one line per line of the paper (no weight
    decay, no bias correction, growth unlimited). ``eps_with_new_d``: the step's ``d · eps``
    uses the estimate just updated (the package's order, and ours) instead of ``d_k``.
    Returns x, d, and the largest ratio Σ|terms| / |r| met (the cancellation in r)."""
    beta1, beta2 = betas
    beta3 = math.sqrt(beta2)
    x0 = [p.double().clone() for p in params]
    x = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    s = [torch.zeros_like(t) for t in x]
    r, r_size, d, cancellation = 0.0, 0.0, d0, 1.0
    for _ in range(steps):
        g = grad(x)
        terms = [torch.dot(gi.flatten(), (a - b).flatten()).item()
                 for gi, a, b in zip(g, x0, x, strict=True)]
        m = [beta1 * mi + (1 - beta1) * d * gi for mi, gi in zip(m, g, strict=True)]
        v = [beta2 * vi + (1 - beta2) * d * d * gi * gi for vi, gi in zip(v, g, strict=True)]
        r = beta3 * r + (1 - beta3) * lr * d * d * sum(terms)
        r_size = beta3 * r_size + (1 - beta3) * lr * d * d * sum(abs(t) for t in terms)
        if r != 0.0:
            cancellation = max(cancellation, r_size / abs(r))
        s = [beta3 * si + (1 - beta3) * lr * d * d * gi for si, gi in zip(s, g, strict=True)]
        d_hat = r / sum(si.abs().sum().item() for si in s)
        d_next = max(d, d_hat)
        d_eps = d_next if eps_with_new_d else d
        x = [xi - lr * d * mi / (vi.sqrt() + d_eps * eps)
             for xi, mi, vi in zip(x, m, v, strict=True)]
        d = d_next
    return x, d, cancellation


def test_is_the_papers_algorithm_in_float64():
    params, _ = random_problem(torch.float64)
    grad = quadratic()
    hp = dict(lr=1.0, betas=(0.9, 0.999), eps=1e-8, d0=1e-3)
    steps = 10
    ours = [nn.Parameter(p.clone()) for p in params]
    opt = Prodigy(ours, **hp)
    for _ in range(steps):
        for p, g in zip(ours, grad(ours), strict=True):
            p.grad = g
        opt.step()
    x, d, cancellation = dense_prodigy(params, grad, steps, **hp)
    # Both in float64. An inner product or 1-norm of n <= 30 terms errs by <= n·u times the
    # sum of the terms' sizes (Higham, §3.1): relative n·u·κ in r (κ, the cancellation, measured
    # by the reference) and n·u in ‖s‖₁; d and each step are products and quotients of a few
    # dozen such factors, and errors of one step carry into the next without growing past the
    # step count: tolerance steps · 50 · 30 · κ · u (< 1e-11 here).
    tol = steps * 50 * 30 * cancellation * F64_U
    assert cancellation < 10
    assert opt.param_groups[0]["d"] == pytest.approx(d, rel=tol)
    assert d > 10 * hp["d0"]  # the estimate has grown: the test exercises it
    for a, b in zip(ours, x, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=tol, atol=tol * b.abs().max().item())
    # The paper scales eps by d_k; the package and we by the estimate just updated. Pinned.
    x_paper, _, _ = dense_prodigy(params, grad, steps, eps_with_new_d=False, **hp)
    gap = max((a.detach() - b).abs().max().item() for a, b in zip(ours, x_paper, strict=True))
    assert gap > 1e3 * tol


def test_a_group_with_lr_zero_is_frozen_even_with_weight_decay():
    prodigyopt = pytest.importorskip("prodigyopt")
    params, grads = random_problem(torch.float32, steps=4)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.0}]

    ours, _, _ = run(lambda ps, **hp: Prodigy(groups(ps), **hp), params, grads,
                     weight_decay=0.5)
    ref, _, _ = run(lambda ps, **hp: prodigyopt.Prodigy(groups(ps), **hp), params, grads,
                    weight_decay=0.5)
    assert torch.equal(ours[3].detach(), params[3])  # ours: frozen
    assert not torch.equal(ref[3].detach(), params[3])  # prodigyopt decays it anyway
    for a, b in zip(ours[:3], ref[:3], strict=True):
        assert torch.equal(a, b)


def test_groups_must_share_their_lr():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"lr must be the same.*\[1\.0, 0\.5\]"):
        gd.create("prodigy", [{"params": model[0].parameters()},
                              {"params": model[1].parameters(), "lr": 0.5}])
    opt = gd.create("prodigy", [{"params": model[0].parameters()},
                                {"params": model[1].parameters()}])
    opt.param_groups[1]["lr"] = 0.3  # as a per-group scheduler might
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="lr must be the same"):
        opt.step()


def test_sharded_parameters_are_refused(monkeypatch):
    monkeypatch.setattr(prodigy_module, "is_dtensor", lambda p: True)
    with pytest.raises(ValueError, match="FSDP2"):
        Prodigy([nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize(
    "key, bad",
    [("lr", 0.0), ("d0", 0.0), ("d_coef", -1.0), ("growth_rate", 0.0), ("slice_p", 0),
     ("beta3", 1.0), ("decouple", "yes")],
)
def test_bad_settings_name_the_value(key, bad):
    with pytest.raises(ValueError, match=rf"{key}.*{bad!r}"):
        gd.create("prodigy", nn.Linear(2, 2), **{key: bad})


def test_one_host_read_per_step(monkeypatch):
    """The statistics of every parameter are read together (prodigyopt: two .item() each)."""
    reads = []
    original = torch.Tensor.tolist

    def counting(self):
        reads.append(self.numel())
        return original(self)

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = gd.create("prodigy", model, on_nonfinite="off")
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # the first step also checks each parameter for zeros (x0's layout)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a per-tensor read"))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert reads == [8] * 3  # 4 parameters x (inner product, ‖s‖₁), once per step
