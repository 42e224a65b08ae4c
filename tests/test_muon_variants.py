"""NorMuon and AdaMuon (Muon's ``variant=``) against their algorithms and against pytorch_optimizer.

Two kinds of reference:

* the authors' algorithms written out densely here, in float64, one line per line of their code
  (``zichongli5/NorMuon`` ``normuon_update``; ``Chongjie-Si/AdaMuon`` ``adamuon.py`` and
  Megatron's ``ada_muon``), with their own Newton–Schulz, fed the same gradients for several
  steps;
* pytorch_optimizer 4.1.0's ``NorMuon`` and ``AdaMuon`` (an independent library, bfloat16
  Newton–Schulz), where its rule is ours: NorMuon always; AdaMuon -- which implements the paper's
  first version, without the sign -- on gradients with entries ±1 and momentum 0, where the sign
  is the identity (the difference is pinned by a second test).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from float_rounding import newton_schulz_rounding_bound
from torch import nn

import guided_descent as gd
from guided_descent.linalg.newton_schulz import JORDAN
from guided_descent.optimizers.muon import ADAMUON_DEFAULTS, NORMUON_DEFAULTS, Muon
from guided_descent.preconditioners.orthogonalize import second_moment_shape, shape_scale

BF16_U = 2.0**-8
# Two tall, a wide, a square and a convolution kernel (flattened to (8, 27)); two (32, 16) to
# exercise same-shape batching.
SHAPES = [(32, 16), (16, 48), (24, 24), (32, 16), (8, 3, 3, 3)]


def random_steps(shapes, steps: int, seed: int = 0, dtype=torch.float64, signs: bool = False):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]

    def grad(s):
        if signs:  # entries ±1
            return torch.randint(0, 2, s, generator=g).to(dtype) * 2 - 1
        return torch.randn(s, generator=g, dtype=dtype)

    grads = [[grad(s) for s in shapes] for _ in range(steps)]
    return init, grads


def run(make, init, grads):
    params = [nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return params, opt


# ----------------------------------------------------------------------- dense references


def ns5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan et al.'s ``zeropower_via_newtonschulz5`` (the authors' copy of it), float64.

    Without its ``+ 1e-7`` in the normalization: every matrix here has norm ~10, where that term
    would move the result by ~1e-8 relative; ours clamps the norm at 1e-7 instead (the same for
    a non-zero matrix), and the comparison is at float64 precision."""
    a, b, c = JORDAN
    X = G.clone()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def reference_normuon(init, grads, *, lr, momentum, beta2, eps, weight_decay):
    """NorMuon, ``normuon_update`` of the authors' code plus their step, float64; a convolution
    kernel's rows are those of its flattened ``(out, in·k·k)`` matrix (see the module docstring of
    ``orthogonalize``)."""
    W = [p.clone() for p in init]
    M = [torch.zeros_like(p) for p in init]
    V = [torch.zeros(p.shape[0], 1, dtype=p.dtype) for p in init]
    for step in grads:
        for i, g in enumerate(step):
            M[i] = momentum * M[i] + (1 - momentum) * g  # momentum.lerp_(grad, 1 - beta)
            D = (1 - momentum) * g + momentum * M[i]  # grad.lerp_(momentum, beta)
            D = D.reshape(D.shape[0], -1)
            m, n = D.shape
            O = ns5(D)
            V[i] = beta2 * V[i] + (1 - beta2) * (O * O).mean(dim=-1, keepdim=True)
            Oh = O / (V[i].sqrt() + eps)
            Oh = Oh * (O.norm() / (Oh.norm() + eps))
            Oh = Oh * max(1, m / n) ** 0.5
            W[i] = W[i] * (1 - lr * weight_decay) - lr * Oh.reshape(W[i].shape)
    return W, V


def reference_adamuon(init, grads, *, lr, momentum, beta2, eps, weight_decay):
    """AdaMuon, the authors' August 2025 code (sign-stabilized; Megatron's ``ada_muon`` with
    ``0.2·sqrt(max(m, n))`` applied to the learning rate), float64."""
    W = [p.clone() for p in init]
    M = [torch.zeros_like(p) for p in init]
    V = [torch.zeros_like(p) for p in init]
    for step in grads:
        for i, g in enumerate(step):
            M[i] = momentum * M[i] + (1 - momentum) * g
            D = (1 - momentum) * g + momentum * M[i]
            D = D.reshape(D.shape[0], -1)
            m, n = D.shape
            O = ns5(torch.sign(D)).reshape(W[i].shape)
            V[i] = beta2 * V[i] + (1 - beta2) * O * O
            Oh = O / (V[i].sqrt() + eps)
            Oh = Oh * (math.sqrt(min(m, n)) / (Oh.norm() + eps))
            W[i] = W[i] * (1 - lr * weight_decay) - lr * 0.2 * math.sqrt(max(m, n)) * Oh
    return W, V


def reference_adamuon_plain(init, grads, **hp):
    """:func:`reference_adamuon` without Nesterov: the authors' ``g = buf`` branch."""
    W = [p.clone() for p in init]
    M = [torch.zeros_like(p) for p in init]
    V = [torch.zeros_like(p) for p in init]
    lr, momentum, beta2, eps, wd = (hp[k] for k in ("lr", "momentum", "beta2", "eps",
                                                    "weight_decay"))
    for step in grads:
        for i, g in enumerate(step):
            M[i] = momentum * M[i] + (1 - momentum) * g
            D = M[i].reshape(M[i].shape[0], -1)
            m, n = D.shape
            O = ns5(torch.sign(D)).reshape(W[i].shape)
            V[i] = beta2 * V[i] + (1 - beta2) * O * O
            Oh = O / (V[i].sqrt() + eps)
            Oh = Oh * (math.sqrt(min(m, n)) / (Oh.norm() + eps))
            W[i] = W[i] * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(m, n)) * Oh
    return W, V


def float64_tolerance(steps: int, lr: float, scale: float) -> float:
    """How far two float64 computations of one rule may drift apart on a parameter.

    Newton–Schulz in float64 errs by at most ``newton_schulz_rounding_bound`` (2e-10 in Frobenius
    norm for these shapes, on any CPU); the variants' normalization divides rows or entries by
    the root of a moment, which magnifies an entry's error by at most the spread of those roots
    (below 100 for Gaussian gradients of these sizes); everything else is a few float64 roundings.
    So 1e-7 per step of size ``lr·scale`` is far above reordering and far below any difference in
    the rule (a wrong axis, decay, eps or rescale shows at 1e-3 or more).
    """
    bound = newton_schulz_rounding_bound(32, 48, (JORDAN,) * 5, torch.float64)
    assert bound < 1e-9
    return steps * lr * scale * 1e-7


# --------------------------------------------------------------------------- NorMuon


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_normuon_equals_the_authors_algorithm_in_float64(weight_decay):
    init, grads = random_steps(SHAPES, steps=5)
    hp = dict(lr=0.02, momentum=0.95, beta2=0.95, eps=1e-10, weight_decay=weight_decay)
    ours, opt = run(
        lambda ps: Muon(ps, variant="normuon", ns_dtype=torch.float64, **hp), init, grads
    )
    ref, V = reference_normuon(init, grads, **hp)
    for p, r, v in zip(ours, ref, V, strict=True):
        m, n = p.shape[0], p[0].numel()
        tol = float64_tolerance(5, 0.02, shape_scale(m, n, "original"))
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=tol)
        # One second moment per neuron: the rows of the flattened matrix, (out, 1) -- for the
        # convolution (8, 1), not the authors' (8, 3, 3, 1) over the kernel's last axis.
        row_sq = opt.state[p]["normuon.row_sq"]
        assert row_sq.shape == (m, 1) and row_sq.dtype == torch.float64
        torch.testing.assert_close(row_sq, v, rtol=1e-9, atol=0)


def test_normuon_keeps_muons_step_size_and_evens_out_the_rows():
    # One step, momentum 0: the step is NS(g) with rows of equal RMS (V is then (1-b2)·r, so
    # every row of O/sqrt(V) has RMS 1/sqrt(1-b2)) and Muon's Frobenius norm.
    init, grads = random_steps([(24, 40)], steps=1, seed=3)
    hp = dict(lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float64)
    (plain,), _ = run(lambda ps: Muon(ps, **hp), init, grads)
    (normed,), _ = run(lambda ps: Muon(ps, variant="normuon", eps=0.0, **hp), init, grads)
    muon_step, step = init[0] - plain.detach(), init[0] - normed.detach()
    torch.testing.assert_close(step.norm(), muon_step.norm(), rtol=1e-12, atol=0)
    rms = step.square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, rms.mean().expand_as(rms), rtol=1e-12, atol=0)
    assert muon_step.square().mean(dim=1).sqrt().std() > 1e-3  # Muon's rows are not even


def test_normuon_batch_view_is_each_matrix_alone():
    # A (3, 8, 6) stack with matrix_view="batch" steps as three separate (8, 6) parameters:
    # each matrix has its own rows' moments and its own norm.
    init, grads = random_steps([(3, 8, 6)], steps=3, seed=4)
    hp = dict(variant="normuon", ns_dtype=torch.float64, eps=1e-10)
    (stack,), opt = run(lambda ps: Muon(ps, matrix_view="batch", **hp), init, grads)
    alone, opt_alone = run(
        lambda ps: Muon(ps, **hp), list(init[0].unbind(0)), [list(g[0].unbind(0)) for g in grads]
    )
    torch.testing.assert_close(stack.detach(), torch.stack([q.detach() for q in alone]),
                               rtol=0, atol=float64_tolerance(3, 0.02, math.sqrt(8 / 6)))
    assert second_moment_shape((3, 8, 6), "batch", "normuon") == (24, 1)
    torch.testing.assert_close(
        opt.state[stack]["normuon.row_sq"],
        torch.cat([opt_alone.state[q]["normuon.row_sq"] for q in alone]),
        rtol=1e-9, atol=0,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_normuon_equals_pytorch_optimizer(weight_decay):
    po = pytest.importorskip("pytorch_optimizer")
    init, grads = random_steps(SHAPES, steps=5, seed=1, dtype=torch.float32)
    hp = dict(lr=0.02, momentum=0.95, beta2=0.95, weight_decay=weight_decay, eps=1e-10)
    ours, opt = run(
        lambda ps: Muon(ps, variant="normuon", ns_dtype=torch.bfloat16, **hp), init, grads
    )
    theirs, opt_po = run(
        lambda ps: po.NorMuon([{"params": ps, "use_muon": True}], nesterov=True,
                              update_scale="preserve_norm", use_adjusted_lr=False,
                              foreach=False, **hp),
        init, grads,
    )
    for p, q, p0 in zip(ours, theirs, init, strict=True):
        # The same rule, both with bfloat16 Newton–Schulz (theirs one matrix at a time, ours
        # batched by shape: another CPU's bf16 kernels may round differently; equal bit for bit
        # on the machine this was written on): the gap relative to the whole displacement stays
        # within the bf16 allowance of tests/test_muon.py's float32-vs-torch comparison (8 units
        # of 2^-8; the row normalization rescales whole rows, leaving relative errors as they
        # are). The momentum involves no bf16: equal.
        gap = (p.detach() - q.detach()).norm() / (q.detach() - p0).norm()
        assert gap <= 8 * BF16_U, gap.item()
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   opt_po.state[q]["momentum_buffer"], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["normuon.row_sq"],
                                   opt_po.state[q]["second_momentum_buffer"],
                                   rtol=8 * BF16_U, atol=0)


# --------------------------------------------------------------------------- AdaMuon


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("nesterov", [True, False])
def test_adamuon_equals_the_authors_algorithm_in_float64(weight_decay, nesterov):
    init, grads = random_steps(SHAPES, steps=5, seed=2)
    hp = dict(lr=0.02, momentum=0.95, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
    ours, opt = run(
        lambda ps: Muon(ps, variant="adamuon", adjust_lr="match_rms_adamw", nesterov=nesterov,
                        ns_dtype=torch.float64, **hp),
        init, grads,
    )
    if nesterov:
        ref, V = reference_adamuon(init, grads, **hp)
    else:  # the reference with the buffer itself as the direction: momentum 1 in the lerp
        ref, V = reference_adamuon_plain(init, grads, **hp)
    for p, r, v in zip(ours, ref, V, strict=True):
        m, n = p.shape[0], p[0].numel()
        tol = float64_tolerance(5, 0.02, shape_scale(m, n, "match_rms_adamw"))
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=tol)
        sq = opt.state[p]["adamuon.exp_avg_sq"]
        assert sq.shape == p.shape and sq.dtype == p.dtype
        torch.testing.assert_close(sq, v, rtol=1e-9, atol=1e-15)


def test_adamuon_step_has_rms_0_2_lr():
    # The paper's RMS alignment: with adjust_lr="match_rms_adamw" every step's RMS is 0.2·lr,
    # whatever the shape (up to eps).
    init, grads = random_steps([(32, 16), (16, 48), (8, 3, 3, 3)], steps=3, seed=5)
    params, opt = run(lambda ps: gd.create("adamuon", ps, weight_decay=0.0), init, grads)
    assert opt.param_groups[0]["adjust_lr"] == "match_rms_adamw"
    for value in (e["update_rms"] for e in opt.diagnostics()["params"]):
        assert value == pytest.approx(0.2 * 0.02, rel=1e-6)


def test_adamuon_equals_pytorch_optimizer_where_the_sign_is_the_identity():
    po = pytest.importorskip("pytorch_optimizer")
    # Entries ±1 and momentum 0: sign(D) = D, so the sign-stabilized rule and the paper's first
    # version (pytorch_optimizer's) orthogonalize the same matrix. Their bias correction of V
    # scales V by a constant that the RMS rescaling removes (up to eps = 1e-10 against
    # sqrt(V) ~ 0.1: 1e-9 relative).
    init, grads = random_steps(SHAPES, steps=4, seed=6, dtype=torch.float32, signs=True)
    hp = dict(lr=0.02, weight_decay=0.01, eps=1e-10)
    ours, opt = run(
        lambda ps: Muon(ps, variant="adamuon", adjust_lr="match_rms_adamw", momentum=0.0,
                        beta2=0.95, ns_dtype=torch.bfloat16, **hp),
        init, grads,
    )
    theirs, opt_po = run(
        lambda ps: po.AdaMuon([{"params": ps, "use_muon": True}], betas=(0.0, 0.95),
                              use_adjusted_lr=True, foreach=False, **hp),
        init, grads,
    )
    for p, q, p0 in zip(ours, theirs, init, strict=True):
        # Both bfloat16 Newton–Schulz (see the NorMuon comparison), and pytorch_optimizer also
        # divides and rescales in bfloat16 (its Newton–Schulz output's dtype; we in float32):
        # two more roundings of relative 2^-9 per step. Measured 0.6-1 unit of 2^-8.
        gap = (p.detach() - q.detach()).norm() / (q.detach() - p0).norm()
        assert gap <= 8 * BF16_U, gap.item()
        v_po = opt_po.state[q]["v"].reshape(p.shape)
        torch.testing.assert_close(opt.state[p]["adamuon.exp_avg_sq"], v_po,
                                   rtol=8 * BF16_U, atol=1e-12)


def test_adamuon_differs_from_pytorch_optimizer_on_gaussian_gradients():
    # Pins the deliberate difference: pytorch_optimizer orthogonalizes the momentum itself, we
    # (the authors' current code) its sign. On Gaussian gradients the steps part by far more
    # than rounding.
    po = pytest.importorskip("pytorch_optimizer")
    init, grads = random_steps([(32, 16)], steps=2, seed=7, dtype=torch.float32)
    hp = dict(lr=0.02, weight_decay=0.0, eps=1e-10)
    (p,), _ = run(lambda ps: Muon(ps, variant="adamuon", adjust_lr="match_rms_adamw",
                                  momentum=0.0, ns_dtype=torch.bfloat16, **hp), init, grads)
    (q,), _ = run(lambda ps: po.AdaMuon([{"params": ps, "use_muon": True}], betas=(0.0, 0.95),
                                        use_adjusted_lr=True, foreach=False, **hp), init, grads)
    gap = (p.detach() - q.detach()).norm() / (q.detach() - init[0]).norm()
    assert gap > 0.1, gap.item()


# --------------------------------------------------------------------------- the optimizer


@pytest.mark.parametrize("name, defaults", [("normuon", NORMUON_DEFAULTS),
                                            ("adamuon", ADAMUON_DEFAULTS)])
def test_registry_entries_build_muon_with_the_variant_and_its_defaults(name, defaults):
    spec = gd.optimizers()[name]
    assert spec.family == "layer-wise" and spec.routes and "arXiv" in spec.reference
    assert "variant" not in spec.hyperparams  # fixed by the name
    for key in ("beta2", "eps", "cautious", "cautious_weight_decay", "routing", "lr"):
        assert key in spec.hyperparams, key
    opt = gd.create(name, [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, Muon)
    group = opt.param_groups[0]
    assert group["variant"] == name and group["algorithm"] == "muon"
    for key, value in defaults.items():
        if not key.startswith("adamw_"):
            assert group[key] == value, key
    assert opt.param_groups[1]["lr"] == defaults["adamw_lr"]
    # Overrides reach the class; the factory also works called directly.
    assert gd.create(name, [nn.Parameter(torch.zeros(4, 3))], beta2=0.9).param_groups[0][
        "beta2"] == 0.9
    assert spec.factory([nn.Parameter(torch.zeros(4, 3))]).param_groups[0]["eps"] == defaults[
        "eps"]


def state_bytes_per_param(name: str) -> float:
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 64, bias=False),
                          nn.Tanh(), nn.Linear(64, 64, bias=False))
    opt = gd.create(name, model, routing={"*": "muon"})
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    total = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return total / sum(p.numel() for p in model.parameters())


def test_state_memory_is_what_the_registry_says():
    # float32 matrices of 64 x 64: Muon 4 bytes per parameter (the momentum), NorMuon 4 + 4/64
    # (one float32 per row), AdaMuon 8 (momentum and element-wise moment).
    assert state_bytes_per_param("muon") == 4.0
    assert state_bytes_per_param("normuon") == 4.0 + 4.0 / 64
    assert state_bytes_per_param("adamuon") == 8.0
    assert gd.optimizers()["adamuon"].state_buffers == 2.0


@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_second_moment_round_trips_and_bf16_params_keep_their_dtypes(variant):
    p = nn.Parameter(torch.randn(12, 6, dtype=torch.bfloat16))
    opt = Muon([p], variant=variant)
    for step in range(2):
        p.grad = torch.randn(12, 6, generator=torch.Generator().manual_seed(step)).bfloat16()
        opt.step()
    key = {"normuon": "normuon.row_sq", "adamuon": "adamuon.exp_avg_sq"}[variant]
    # NorMuon's per-row moment is tiny and kept in float32; AdaMuon's in the parameter's dtype.
    expected = torch.float32 if variant == "normuon" else torch.bfloat16
    assert opt.state[p][key].dtype == expected and torch.isfinite(opt.state[p][key]).all()
    saved = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    opt2 = Muon([q], variant=variant)
    opt2.load_state_dict(saved)
    assert opt2.state[q][key].dtype == expected
    assert torch.equal(opt2.state[q][key], opt.state[p][key])


def test_variants_can_differ_per_param_group():
    a, b, c = (nn.Parameter(torch.randn(8, 6)) for _ in range(3))
    opt = Muon([{"params": [a]}, {"params": [b], "variant": "normuon"},
                {"params": [c], "variant": "adamuon", "beta2": 0.9}])
    for q in (a, b, c):
        q.grad = torch.randn_like(q)
    opt.step()
    assert set(opt.state[a]) == {"momentum_buffer"}
    assert set(opt.state[b]) == {"momentum_buffer", "normuon.row_sq"}
    assert set(opt.state[c]) == {"momentum_buffer", "adamuon.exp_avg_sq"}


def test_loading_a_state_dict_of_another_variant_names_the_missing_state():
    p = nn.Parameter(torch.randn(8, 6))
    p.grad = torch.randn_like(p)
    plain = Muon([p])
    plain.step()
    with pytest.raises(gd.StateDictMismatchError, match="normuon.row_sq"):
        Muon([nn.Parameter(p.detach().clone())], variant="normuon").load_state_dict(
            plain.state_dict())


def test_a_muon_state_dict_from_before_the_variants_loads_and_continues_identically():
    init, grads = random_steps([(16, 8), (8,)], steps=4, seed=8, dtype=torch.float32)

    def fresh():
        return [nn.Parameter(p.clone()) for p in init]

    params = fresh()
    opt = Muon(params, weight_decay=0.01)
    for i in range(2):
        for p, g in zip(params, grads[i], strict=True):
            p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=True)
    new_keys = ("variant", "beta2", "eps", "cautious", "cautious_weight_decay")
    for group in old["param_groups"]:  # as saved by the version before these keys
        if group["algorithm"] == "muon":
            for key in new_keys:
                del group[key]
    resumed = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Muon(resumed, weight_decay=0.01)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["variant"] == "muon" and not opt2.param_groups[0]["cautious"]
    for i in range(2, 4):
        for ps in (params, resumed):
            for p, g in zip(ps, grads[i], strict=True):
                p.grad = g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "hp, match",
    [
        (dict(variant="adamw"), "variant.*'adamw'"),
        (dict(variant="normuon", beta2=1.0), "beta2.*1.0"),
        (dict(variant="adamuon", eps=-1e-8), "eps.*-1e-08"),
        (dict(cautious="yes"), "cautious.*'yes'"),
        (dict(cautious_weight_decay=1), "cautious_weight_decay.*1"),
    ],
)
def test_invalid_options_raise_naming_the_value(hp, match):
    with pytest.raises(ValueError, match=match):
        gd.create("muon", [nn.Parameter(torch.zeros(4, 4))], **hp)
    with pytest.raises(ValueError, match=match):
        Muon([{"params": [nn.Parameter(torch.zeros(4, 4))], **hp}])


@pytest.mark.parametrize("hp, named", [(dict(variant="normuon"), "variant='normuon'"),
                                       (dict(cautious=True), "cautious")])
def test_fsdp2_sharded_matrices_refuse_the_variants_with_a_clear_error(tmp_path, hp, named):
    # One rank is enough to make FSDP2 parameters DTensors; the error names what was chosen.
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                              nn.Linear(8, 2))
        fsdp.fully_shard(model)
        opt = gd.create("muon", model, **hp)
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(NotImplementedError, match=f"{named}.*FSDP2-sharded"):
            opt.step()
    finally:
        dist.destroy_process_group()
