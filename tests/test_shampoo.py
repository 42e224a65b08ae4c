"""Shampoo against independent float64 references: dense roots, Adam grafting, blocks, fallbacks."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.linalg.matrix_functions import MatrixFunctionError
from guided_descent.optimizers.shampoo import Shampoo, shampoo
from guided_descent.preconditioners import shampoo as shampoo_math
from guided_descent.preconditioners.shampoo import shampoo_layout

F64 = torch.float64

# The references' setting (Gupta et al.; Anil et al.): preconditioning from the first step and an
# absolute epsilon only. The formula tests below compare against the dense math of that update;
# the defaults start at the first refresh with a relative damping (see Shampoo's docstring).
REFERENCE = {"start_preconditioning_step": 1, "relative_epsilon": 0.0}


def inv_root(A: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """(A + eps I)^(-1/p) in float64 straight from torch.linalg.eigh: the test's own reference."""
    vals, vecs = torch.linalg.eigh(A.to(F64))
    return (vecs * (vals.clamp_min(0.0) + eps).pow(-1.0 / p)) @ vecs.T


def gradients(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def param(shape: tuple[int, ...], dtype: torch.dtype = F64, seed: int = 1) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=g, dtype=F64).to(dtype))


def step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype).clone()
    opt.step()


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 2e-4)])
def test_step_is_the_dense_two_sided_inverse_fourth_root(dtype, tol):
    lr, beta2, eps = 0.1, 0.9, 1e-3
    W = param((5, 3), dtype)
    ref = W.detach().to(F64).clone()
    # beta1 = 0 and no grafting: the update is L^-1/4 G R^-1/4 itself.
    opt = Shampoo([W], **REFERENCE, lr=lr, betas=(0.0, beta2), epsilon=eps, grafting="none",
                  precondition_frequency=1)
    L, R = torch.zeros(5, 5, dtype=F64), torch.zeros(3, 3, dtype=F64)
    for t, G in enumerate(gradients((5, 3), 4), start=1):
        step(opt, [W], [G])
        L = beta2 * L + (1 - beta2) * G @ G.T
        R = beta2 * R + (1 - beta2) * G.T @ G
        bc = 1 - beta2**t
        ref -= lr * inv_root(L / bc, 4, eps) @ G @ inv_root(R / bc, 4, eps)
        torch.testing.assert_close(W.detach().to(F64), ref, atol=tol, rtol=tol)
    state = opt.state[W]
    assert state["shampoo.L"][0].dtype == state["shampoo.R"][0].dtype == (
        F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(state["shampoo.L"][0].to(F64), L, atol=tol, rtol=tol)


def test_adam_grafting_keeps_shampoo_direction_with_adams_norm():
    lr, beta1, beta2, eps = 0.05, 0.9, 0.99, 1e-3
    W = param((4, 6))
    ref = W.detach().clone()
    opt = Shampoo([W], **REFERENCE, lr=lr, betas=(beta1, beta2), eps=1e-8, epsilon=eps,
                  precondition_frequency=1)
    # The graft's step, measured on torch.optim.Adam itself (lr=1: the delta is the step).
    probe = nn.Parameter(torch.zeros(4, 6, dtype=F64))
    adam = torch.optim.Adam([probe], lr=1.0, betas=(beta1, beta2), eps=1e-8)
    m = torch.zeros(4, 6, dtype=F64)
    L, R = torch.zeros(4, 4, dtype=F64), torch.zeros(6, 6, dtype=F64)
    for t, G in enumerate(gradients((4, 6), 4, seed=3), start=1):
        step(opt, [W], [G])
        before = probe.detach().clone()
        step(adam, [probe], [G])
        adam_step = before - probe.detach()
        m = beta1 * m + (1 - beta1) * G
        L = beta2 * L + (1 - beta2) * G @ G.T
        R = beta2 * R + (1 - beta2) * G.T @ G
        bc = 1 - beta2**t
        D = inv_root(L / bc, 4, eps) @ (m / (1 - beta1**t)) @ inv_root(R / bc, 4, eps)
        ref -= lr * D * adam_step.norm() / D.norm()
        torch.testing.assert_close(W.detach(), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_before_preconditioning_starts_it_is_adam(weight_decay):
    W, b = param((5, 3), torch.float32), param((4,), torch.float32, seed=2)
    W2, b2 = nn.Parameter(W.detach().clone()), nn.Parameter(b.detach().clone())
    opt = Shampoo([W, b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                  start_preconditioning_step=100)
    adamw = torch.optim.AdamW([W2, b2], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=weight_decay)
    for gW, gb in zip(gradients((5, 3), 6), gradients((4,), 6, seed=5), strict=True):
        step(opt, [W, b], [gW, gb])
        step(adamw, [W2, b2], [gW, gb])
        torch.testing.assert_close(W, W2)
        torch.testing.assert_close(b, b2)
    assert opt.state[W]["shampoo.L"][0].abs().sum() > 0  # statistics gather meanwhile


def test_order_three_tensor_uses_sixth_roots():
    lr, beta2, eps, shape = 0.1, 0.8, 1e-2, (3, 4, 5)
    X = param(shape)
    ref = X.detach().clone()
    opt = Shampoo([X], **REFERENCE, lr=lr, betas=(0.0, beta2), epsilon=eps, grafting="none",
                  precondition_frequency=1)
    assert shampoo_layout(shape, 1024, 4096).blocks[0].root == 6
    F = [torch.zeros(n, n, dtype=F64) for n in shape]
    for t, G in enumerate(gradients(shape, 3, seed=7), start=1):
        step(opt, [X], [G])
        new = [torch.einsum("ijk,ljk->il", G, G), torch.einsum("ijk,ilk->jl", G, G),
               torch.einsum("ijk,ijl->kl", G, G)]
        F = [beta2 * f + (1 - beta2) * n for f, n in zip(F, new, strict=True)]
        P = [inv_root(f / (1 - beta2**t), 6, eps) for f in F]
        ref -= lr * torch.einsum("ai,bj,ck,ijk->abc", P[0], P[1], P[2], G)
        torch.testing.assert_close(X.detach(), ref, atol=1e-10, rtol=1e-10)
    assert [opt.state[X][f"shampoo.dim{i}"][0].shape for i in range(3)] == [(3, 3), (4, 4), (5, 5)]


def test_length_one_dimensions_are_dropped():
    a, b = param((5, 1, 3)), param((5, 3))
    b.data.copy_(a.detach().reshape(5, 3))
    opts = [Shampoo([p], **REFERENCE, lr=0.1, precondition_frequency=1) for p in (a, b)]
    for G in gradients((5, 3), 3, seed=11):
        step(opts[0], [a], [G.reshape(5, 1, 3)])
        step(opts[1], [b], [G])
    torch.testing.assert_close(a.detach().reshape(5, 3), b.detach(), atol=1e-12, rtol=0)


def test_blocks_are_preconditioned_as_separate_parameters():
    W = param((6, 9))
    layout = shampoo_layout((6, 9), 4, 4096)
    assert [blk.shape for blk in layout.blocks] == [(4, 4), (4, 4), (4, 1), (2, 4), (2, 4), (2, 1)]
    parts = [nn.Parameter(W.detach()[blk.index].clone()) for blk in layout.blocks]
    hp = dict(lr=0.05, betas=(0.9, 0.95), epsilon=1e-4, precondition_frequency=2)
    whole = Shampoo([W], max_preconditioner_dim=4, **hp)
    separate = Shampoo(parts, **hp)  # Adam grafting is per block, so per parameter here
    for G in gradients((6, 9), 5, seed=13):
        step(whole, [W], [G])
        step(separate, parts, [G[blk.index] for blk in layout.blocks])
    for blk, part in zip(layout.blocks, parts, strict=True):
        torch.testing.assert_close(W.detach()[blk.index], part.detach(), atol=1e-12, rtol=0)
    # Width-1 blocks are vectors: no factors, the diagonal fallback.
    assert [F is None for F in whole.state[W]["shampoo.L"]] == [False, False, True] * 2


def test_same_size_blocks_share_one_batched_inverse_root(monkeypatch):
    calls = []
    real = shampoo_math.inverse_root

    def spy(A, p, eps=1e-12, **kw):
        calls.append(tuple(A.shape))
        return real(A, p, eps, **kw)

    monkeypatch.setattr(shampoo_math, "inverse_root", spy)
    W, V = param((8, 8)), param((4, 4), seed=3)
    opt = Shampoo([W, V], **REFERENCE, max_preconditioner_dim=4, precondition_frequency=1)
    step(opt, [W, V], [torch.randn(8, 8, dtype=F64), torch.randn(4, 4, dtype=F64)])
    # 4 blocks x (L, R) of W and V's (L, R): ten 4x4 factors, one call.
    assert calls == [(10, 4, 4)]


@pytest.mark.parametrize("shape", [(7,), (1, 5), ()])
def test_vectors_and_scalars_take_the_adam_fallback(shape):
    p = param(shape, torch.float32)
    q = nn.Parameter(p.detach().clone())
    opt = Shampoo([p], **REFERENCE, lr=1e-2, precondition_frequency=1)
    adam = torch.optim.Adam([q], lr=1e-2)
    for G in gradients(shape, 5, seed=17):
        step(opt, [p], [G])
        step(adam, [q], [G])
        torch.testing.assert_close(p, q)
    assert not any(key.startswith("shampoo.L") for key in opt.state[p])


def test_dimension_above_max_factor_dim_gets_a_diagonal_factor():
    lr, beta2, eps = 0.1, 0.9, 1e-3
    W = param((3, 12))
    ref = W.detach().clone()
    opt = Shampoo([W], **REFERENCE, lr=lr, betas=(0.0, beta2), epsilon=eps, grafting="none",
                  precondition_frequency=1, max_factor_dim=8)
    L, d = torch.zeros(3, 3, dtype=F64), torch.zeros(12, dtype=F64)
    for t, G in enumerate(gradients((3, 12), 3, seed=19), start=1):
        step(opt, [W], [G])
        L = beta2 * L + (1 - beta2) * G @ G.T
        d = beta2 * d + (1 - beta2) * (G * G).sum(0)
        bc = 1 - beta2**t
        ref -= lr * inv_root(L / bc, 4, eps) @ G * (d / bc + eps).pow(-0.25)
        torch.testing.assert_close(W.detach(), ref, atol=1e-10, rtol=1e-10)
    assert opt.state[W]["shampoo.R"][0].shape == (12,)


def test_momentum_nesterov_and_weight_decay_act_on_the_grafted_update():
    lr, mu, wd = 0.05, 0.8, 0.1
    grads = gradients((4, 3), 4, seed=23)
    plain, heavy, nest, decayed = (param((4, 3)) for _ in range(4))
    opts = [Shampoo([plain], lr=lr, precondition_frequency=1),
            Shampoo([heavy], lr=lr, momentum=mu, precondition_frequency=1),
            Shampoo([nest], lr=lr, momentum=mu, nesterov=True, precondition_frequency=1),
            Shampoo([decayed], lr=lr, weight_decay=wd, precondition_frequency=1)]
    ps = [plain, heavy, nest, decayed]
    buf = torch.zeros(4, 3, dtype=F64)
    for G in grads:
        before = [p.detach().clone() for p in ps]
        for opt, p in zip(opts, ps, strict=True):
            step(opt, [p], [G])
        U = (before[0] - plain.detach()) / lr  # the grafted update; it does not depend on W
        buf = mu * buf + U
        torch.testing.assert_close(heavy.detach(), before[1] - lr * buf, atol=1e-12, rtol=0)
        torch.testing.assert_close(nest.detach(), before[2] - lr * (U + mu * buf), atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(decayed.detach(), before[3] * (1 - lr * wd) - lr * U,
                                   atol=1e-12, rtol=0)


def test_failed_inverse_root_keeps_the_previous_preconditioner(monkeypatch):
    grads = gradients((5, 4), 3, seed=29)
    W, W_ref = param((5, 4), torch.float32), param((5, 4), torch.float32)
    # Reference: roots from step 1 are reused at step 2 because none are due.
    ref = Shampoo([W_ref], **REFERENCE, lr=0.1, precondition_frequency=2)
    opt = Shampoo([W], **REFERENCE, lr=0.1, precondition_frequency=1)
    step(ref, [W_ref], [grads[0]])
    step(opt, [W], [grads[0]])

    def broken(*args, **kwargs):
        raise MatrixFunctionError("injected")

    monkeypatch.setattr(shampoo_math, "inverse_root", broken)
    step(ref, [W_ref], [grads[1]])
    with pytest.warns(RuntimeWarning, match=r"shampoo: the inverse root of shampoo\.[LR]") as rec:
        step(opt, [W], [grads[1]])
    assert len(rec) == 1
    torch.testing.assert_close(W, W_ref, atol=0, rtol=0)
    assert opt.state[W]["shampoo.failures"] == 2  # L and R
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per parameter: no second warning
        step(opt, [W], [grads[2]])
    assert torch.isfinite(W).all() and opt.state[W]["shampoo.failures"] == 4


def test_failure_before_any_root_uses_the_identity(monkeypatch):
    def broken(*args, **kwargs):
        raise MatrixFunctionError("injected")

    monkeypatch.setattr(shampoo_math, "inverse_root", broken)
    W = param((3, 3), torch.float32)
    before = W.detach().clone()
    opt = Shampoo([W], **REFERENCE, lr=0.1, betas=(0.0, 0.9))
    G = gradients((3, 3), 1)[0]
    with pytest.warns(RuntimeWarning):
        step(opt, [W], [G])
    # Identity roots: the direction is G itself, at Adam's norm (sign(G) at step 1: sqrt(9) = 3).
    expected = before - 0.1 * G.float() * 3.0 / G.float().norm()
    torch.testing.assert_close(W.detach(), expected, atol=1e-6, rtol=1e-5)


def test_bfloat16_params_keep_float32_statistics_and_track_float32():
    W16 = param((6, 4), torch.bfloat16)
    W32 = nn.Parameter(W16.detach().float())
    opts = [Shampoo([p], lr=1e-2, precondition_frequency=2) for p in (W16, W32)]
    for G in gradients((6, 4), 5, seed=31):
        G = G.to(torch.bfloat16)
        step(opts[0], [W16], [G])
        step(opts[1], [W32], [G])
    assert W16.dtype == torch.bfloat16
    torch.testing.assert_close(W16.float(), W32.detach(), atol=2e-2, rtol=0)
    state = opts[0].state[W16]
    for key in ("shampoo.exp_avg", "shampoo.graft_sq"):
        assert state[key].dtype == torch.float32
    assert state["shampoo.L"][0].dtype == state["shampoo.L.inv_root"][0].dtype == torch.float32
    # Loading a checkpoint keeps them float32 (torch would cast state to the param's dtype).
    buf = io.BytesIO()
    torch.save(opts[0].state_dict(), buf)
    buf.seek(0)
    fresh = Shampoo([W16], lr=1e-2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.state[W16]["shampoo.R"][0].dtype == torch.float32
    torch.testing.assert_close(fresh.state[W16]["shampoo.R"][0], state["shampoo.R"][0])


def test_routing_keeps_the_head_and_sends_embeddings_norms_and_biases_to_adamw():
    # Shampoo's routing ablation (docs/benchmarks.md) put the output head with Shampoo: it was
    # better on all five multi-matrix workloads. Embeddings and vectors stay with AdamW.
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    opt = gd.create("shampoo", model)
    by_algorithm = {g["algorithm"]: g["params"] for g in opt.param_groups}
    assert [tuple(p.shape) for p in by_algorithm["shampoo"]] == [(8, 4), (3, 8)]
    assert len(by_algorithm["adamw"]) == 5
    # A bare list cannot show the head or the embedding: split by shape like every matrix
    # method (>= 2-D to Shampoo, vectors to AdamW), with a warning that says so.
    with pytest.warns(UserWarning, match="given parameters, not the model"):
        listed = shampoo(list(model.parameters()))
    assert [(g["algorithm"], len(g["params"])) for g in listed.param_groups] == [
        ("shampoo", 3), ("adamw", 4)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=0.0), "epsilon.*0.0"),
        (dict(grafting="sgd"), "grafting.*'sgd'"),
        (dict(precondition_frequency=0), "precondition_frequency.*0"),
        (dict(max_preconditioner_dim=2.5), "max_preconditioner_dim.*2.5"),
        (dict(start_preconditioning_step=-1), "start_preconditioning_step.*-1"),
        (dict(nesterov=True), "nesterov.*momentum"),
    ],
)
def test_invalid_options_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gd.create("shampoo", [param((3, 3))], **kwargs)


def test_param_group_overrides_are_checked():
    with pytest.raises(ValueError, match=r"param group 1.*max_factor_dim.*0"):
        Shampoo([{"params": [param((2, 2))]}, {"params": [param((3, 3))], "max_factor_dim": 0}])
