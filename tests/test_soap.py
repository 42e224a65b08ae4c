"""SOAP against references: AdamW in an identity basis, dense rotations, basis refresh, failures."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.linalg import eigenbasis as eigenbasis_module
from guided_descent.linalg.matrix_functions import MatrixFunctionError
from guided_descent.optimizers import soap as soap_shell
from guided_descent.optimizers.soap import SOAP
from guided_descent.preconditioners import soap as soap_math

F64 = torch.float64


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


HP = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01)


def test_defaults_are_the_papers():
    group = SOAP([param((2, 2))]).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-3, (0.95, 0.95), 1e-8, 0.01)
    assert group["precondition_frequency"] == 10 and group["shampoo_beta"] is None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_without_rotated_dimensions_it_is_adamw_from_the_first_step(dtype):
    W, b = param((5, 3), dtype), param((4,), dtype, seed=2)
    W2, b2 = nn.Parameter(W.detach().clone()), nn.Parameter(b.detach().clone())
    opt = SOAP([W, b], max_precond_dim=0, **HP)
    adamw = torch.optim.AdamW([W2, b2], **HP)
    for gW, gb in zip(gradients((5, 3), 5), gradients((4,), 5, seed=3), strict=True):
        step(opt, [W, b], [gW, gb])
        step(adamw, [W2, b2], [gW, gb])
        torch.testing.assert_close(W, W2)
        torch.testing.assert_close(b, b2)


def test_identity_eigenbasis_equals_adamw_step_for_step():
    grads = gradients((4, 6), 6, seed=5)
    W = param((4, 6), torch.float32)
    opt = SOAP([W], precondition_frequency=10**9, **HP)
    before = W.detach().clone()
    step(opt, [W], [grads[0]])  # the first gradient only builds the basis
    assert torch.equal(W.detach(), before)
    state = opt.state[W]
    state["soap.L.basis"] = torch.eye(4)
    state["soap.R.basis"] = torch.eye(6)
    W2 = nn.Parameter(before.clone())
    adamw = torch.optim.AdamW([W2], **HP)
    for G in grads[1:]:
        step(opt, [W], [G])
        step(adamw, [W2], [G])
        torch.testing.assert_close(W, W2)


def test_first_basis_is_the_sorted_eigenbasis_of_the_first_factors():
    W = param((5, 3))
    G = gradients((5, 3), 1, seed=7)[0]
    opt = SOAP([W], **HP, tiebreak=0.0)  # the references' eigh, as it comes
    step(opt, [W], [G])
    state = opt.state[W]
    assert state["step"].item() == 0
    for key, F in (("soap.L", G @ G.T), ("soap.R", G.T @ G)):
        torch.testing.assert_close(state[key], 0.05 * F)  # (1 - shampoo_beta) G Gᵀ
        Q = state[f"{key}.basis"]
        rayleigh = torch.diagonal(Q.T @ F @ Q)
        torch.testing.assert_close(rayleigh, torch.linalg.eigvalsh(F).flip(0), atol=1e-10, rtol=0)
        torch.testing.assert_close(Q.T @ Q, torch.eye(len(Q), dtype=F64), atol=1e-12, rtol=0)


def test_rotated_step_matches_dense_rotation_reference():
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
    W = param((4, 5))
    opt = SOAP([W], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
               precondition_frequency=10**9)
    grads = gradients((4, 5), 5, seed=9)
    step(opt, [W], [grads[0]])
    QL, QR = opt.state[W]["soap.L.basis"], opt.state[W]["soap.R.basis"]
    ref = W.detach().clone()
    m = torch.zeros(4, 5, dtype=F64)
    v = torch.zeros(4, 5, dtype=F64)
    for t, G in enumerate(grads[1:], start=1):
        step(opt, [W], [G])
        m = beta1 * m + (1 - beta1) * G
        v = beta2 * v + (1 - beta2) * (QL.T @ G @ QR) ** 2
        rotated = (QL.T @ m @ QR) / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt() + eps)
        ref = ref * (1 - lr * wd) - lr * QL @ rotated @ QR.T
        torch.testing.assert_close(W.detach(), ref, atol=1e-12, rtol=1e-12)
    # First moment: kept in the rotated space (m' = Q_Lᵀ m Q_R), as the second moment.
    torch.testing.assert_close(opt.state[W]["soap.exp_avg_rotated"], QL.T @ m @ QR)
    torch.testing.assert_close(opt.state[W]["exp_avg_sq"], v)  # second moment: rotated space


def test_order_three_tensor_rotates_every_dimension():
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.9, 1e-8
    X = param((2, 3, 4))
    opt = SOAP([X], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0,
               precondition_frequency=10**9)
    grads = gradients((2, 3, 4), 3, seed=11)
    step(opt, [X], [grads[0]])
    Q = [opt.state[X][f"soap.dim{i}.basis"] for i in range(3)]
    ref = X.detach().clone()
    m, v = torch.zeros(2, 3, 4, dtype=F64), torch.zeros(2, 3, 4, dtype=F64)
    rotate = "ia,jb,kc,ijk->abc"  # x ×_i Q_iᵀ
    back = "ai,bj,ck,ijk->abc"  # x ×_i Q_i
    for t, G in enumerate(grads[1:], start=1):
        step(opt, [X], [G])
        m = beta1 * m + (1 - beta1) * G
        v = beta2 * v + (1 - beta2) * torch.einsum(rotate, *Q, G) ** 2
        N = torch.einsum(rotate, *Q, m) / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt() + eps)
        ref -= lr * torch.einsum(back, *Q, N)
        torch.testing.assert_close(X.detach(), ref, atol=1e-12, rtol=1e-12)


def test_dimensions_above_max_precond_dim_keep_the_identity():
    W = param((3, 50))
    opt = SOAP([W], max_precond_dim=10, **HP)
    step(opt, [W], gradients((3, 50), 1))
    assert "soap.L.basis" in opt.state[W] and "soap.R" not in opt.state[W]


def test_refresh_permutes_the_rotated_second_moment_with_the_basis(monkeypatch):
    beta2 = 0.95
    W = param((5, 4))
    opt = SOAP([W], precondition_frequency=2, **HP)
    grads = gradients((5, 4), 3, seed=13)
    step(opt, [W], [grads[0]])  # basis from eigh, largest eigenvalue first
    step(opt, [W], [grads[1]])  # Adam step 1
    state = opt.state[W]
    # Reverse the columns: the refresh must sort them back and carry v' along.
    for key in ("soap.L", "soap.R"):
        state[f"{key}.basis"] = state[f"{key}.basis"].flip(-1).contiguous()
    state["exp_avg_sq"] = state["exp_avg_sq"].flip(0, 1).contiguous()
    QL, QR, v = state["soap.L.basis"], state["soap.R.basis"], state["exp_avg_sq"].clone()
    orders = []
    real = soap_shell.refresh_bases

    def spy(factors, bases, shift=0.0):
        results = real(factors, bases, shift)
        orders.extend(r.order for r in results)
        return results

    monkeypatch.setattr(soap_shell, "refresh_bases", spy)
    G = grads[2]
    step(opt, [W], [G])  # Adam step 2: a refresh is due afterwards
    order_L, order_R = orders
    assert order_L.tolist() != list(range(5))  # the reversal was undone
    expected = beta2 * v + (1 - beta2) * (QL.T @ G @ QR) ** 2
    torch.testing.assert_close(state["exp_avg_sq"], expected[order_L][:, order_R])
    # The order sorts the old columns by their Rayleigh quotients on the updated factor.
    for key, Q_old, order in (("soap.L", QL, order_L), ("soap.R", QR, order_R)):
        rayleigh = torch.diagonal(Q_old.T @ state[key] @ Q_old)[order]
        assert torch.all(rayleigh[:-1] >= rayleigh[1:])


def test_failed_first_eigh_keeps_the_identity_and_behaves_like_adamw(monkeypatch):
    def broken(P):
        raise MatrixFunctionError("injected")

    monkeypatch.setattr(soap_math, "eigenbasis", broken)
    grads = gradients((4, 3), 4, seed=17)
    W = param((4, 3), torch.float32)
    W2 = nn.Parameter(W.detach().clone())
    opt = SOAP([W], precondition_frequency=10**9, **HP)
    with pytest.warns(RuntimeWarning, match=r"soap: the eigendecomposition of soap\.[LR]") as rec:
        step(opt, [W], [grads[0]])
    assert len(rec) == 1 and opt.state[W]["soap.failures"] == 2
    adamw = torch.optim.AdamW([W2], **HP)
    for G in grads[1:]:
        step(opt, [W], [G])
        step(adamw, [W2], [G])
    torch.testing.assert_close(W, W2)


def test_failed_refresh_keeps_the_previous_basis(monkeypatch):
    W = param((4, 3), torch.float32)
    opt = SOAP([W], precondition_frequency=1, **HP)
    grads = gradients((4, 3), 4, seed=19)
    step(opt, [W], [grads[0]])
    step(opt, [W], [grads[1]])
    kept = {k: opt.state[W][k].clone() for k in ("soap.L.basis", "soap.R.basis", "exp_avg_sq")}

    def broken_qr(A, mode="reduced"):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(eigenbasis_module.torch.linalg, "qr", broken_qr)
    with pytest.warns(RuntimeWarning, match="eigenbasis refresh") as rec:
        step(opt, [W], [grads[2]])
    assert len(rec) == 1
    for key in ("soap.L.basis", "soap.R.basis"):
        assert torch.equal(opt.state[W][key], kept[key])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(opt, [W], [grads[3]])
    assert torch.isfinite(W).all() and opt.state[W]["soap.failures"] == 4


def test_bfloat16_params_keep_float32_state_and_track_float32():
    W16 = param((6, 4), torch.bfloat16)
    W32 = nn.Parameter(W16.detach().float())
    opts = [SOAP([p], precondition_frequency=2, **HP) for p in (W16, W32)]
    for G in gradients((6, 4), 6, seed=23):
        G = G.to(torch.bfloat16)
        step(opts[0], [W16], [G])
        step(opts[1], [W32], [G])
    assert W16.dtype == torch.bfloat16
    torch.testing.assert_close(W16.float(), W32.detach(), atol=2e-2, rtol=0)
    state = opts[0].state[W16]
    for key in ("soap.exp_avg_rotated", "exp_avg_sq", "soap.L", "soap.L.basis", "soap.R.basis"):
        assert state[key].dtype == torch.float32, key


def test_routing_and_validation():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.Linear(8, 3))
    opt = gd.create("soap", model)
    assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(8, 4)]
    assert opt.param_groups[0]["algorithm"] == "soap"
    for kwargs, match in [
        (dict(shampoo_beta=1.0), "shampoo_beta.*1.0"),
        (dict(precondition_frequency=0), "precondition_frequency.*0"),
        (dict(max_precond_dim=-1), "max_precond_dim.*-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            gd.create("soap", model, **kwargs)


def test_the_first_basis_resolves_a_null_space_the_same_way_every_time():
    # A rank-1 factor (one gradient of rank 1): its 4-dimensional null space has no preferred
    # basis, and eigh returns whatever rounding makes it. tiebroken() picks the eigenvectors of
    # F + tiebreak ‖F‖ D instead: a perturbation of 1e-7 leaves them within rounding, and they
    # still contain the signal direction exactly.
    u = torch.tensor([3.0, 1.0, -2.0, 0.5, 1.0], dtype=F64)
    F = torch.outer(u, u)
    g = torch.Generator().manual_seed(0)
    noisy = F * (1 + 1e-7 * torch.randn(5, 5, generator=g, dtype=F64))
    noisy = 0.5 * (noisy + noisy.T)
    Q, Qn = soap_math.initial_bases([F, noisy], tiebreak=1e-2)
    torch.testing.assert_close(Qn.abs(), Q.abs(), atol=1e-5, rtol=0)  # columns up to sign
    top = Q[:, 0] * torch.sign(Q[:, 0] @ u)
    torch.testing.assert_close(top, u / u.norm(), atol=1e-2, rtol=0)  # O(tiebreak) rotation
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(7, 5), (16, 16), (64, 24)])
@pytest.mark.parametrize("sides", ["both", "left", "right", "none"])
def test_matrix_rotations_equal_the_general_mode_products(shape, sides):
    # project / project_back take plain matrix products for a 2-D tensor; mode_product (the
    # general path, kept for 3-D+ tensors) forms the same products through tensordot. In float32
    # each of Q_Lᵀ x Q_R's two products with inner dimension k errs elementwise by at most
    # γ(k) |A| |B| (Higham §3.5, γ(k) = k u / (1 - k u), u = 2^-24), so each result lies within
    # (γ(m) + γ(n) + γ(m) γ(n)) |Q_L|ᵀ |x| |Q_R| of the exact product, and the two within twice
    # that of each other, on any CPU and BLAS.
    from guided_descent.preconditioners.kronecker import mode_product

    m, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g)
    QL = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))[0].float()
    QR = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0].float()
    left = QL if sides in ("both", "left") else None
    right = QR if sides in ("both", "right") else None
    u = torch.finfo(torch.float32).eps / 2
    gamma = lambda k: k * u / (1 - k * u)  # noqa: E731
    eye_m, eye_n = torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)
    L = eye_m if left is None else left.double()
    R = eye_n if right is None else right.double()
    bound = 2 * (gamma(m) + gamma(n) + gamma(m) * gamma(n))
    for transpose, fast in ((True, soap_math.project), (False, soap_math.project_back)):
        Lt, Rt = (L.mT, R) if transpose else (L, R.mT)
        scale = Lt.abs() @ x.double().abs() @ Rt.abs()
        ours = fast(x, [left, right])
        general = mode_product(x, [left, right], transpose=transpose)
        assert ours.shape == general.shape == (m, n) and ours.dtype == torch.float32
        assert ((ours.double() - general.double()).abs() <= bound * scale).all()
        if left is None and right is None:
            assert ours is x  # the identity on every side returns x itself, as mode_product


@pytest.mark.parametrize("shape, view", [((6, 5), "flatten"), ((2, 4, 5), "batch")])
def test_rotated_first_moment_equals_the_original_space_formula(monkeypatch, shape, view):
    # SOAP keeps m' = Q_Lᵀ m Q_R and carries it to each refreshed basis; the paper keeps m in the
    # original space and rotates it every step. Here the library runs in float32 and the paper's
    # formula densely in float64, on the library's own bases (read from its state before each
    # step) and its refreshes' column orders, over five refreshes.
    lr, beta1, beta2, eps, wd, freq, steps = 1e-2, 0.9, 0.95, 1e-3, 0.01, 3, 16
    W = param(shape, torch.float32)
    opt = SOAP([W], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
               precondition_frequency=freq, matrix_view=view, stagger_refresh=False)
    orders = []
    real = soap_shell.refresh_bases

    def spy(factors, bases, shift=0.0):
        results = real(factors, bases, shift)
        orders.append([r.order for r in results])  # L of every matrix, then R
        return results

    monkeypatch.setattr(soap_shell, "refresh_bases", spy)
    grads = gradients(shape, steps + 1, seed=29)
    count, m_, n_ = (1, *shape) if view == "flatten" else shape
    step(opt, [W], [grads[0]])  # the first gradient builds the bases only
    state = opt.state[W]

    def bases() -> list[tuple[torch.Tensor, torch.Tensor]]:
        QL = state["soap.L.basis"].double().reshape(count, m_, m_)
        QR = state["soap.R.basis"].double().reshape(count, n_, n_)
        return list(zip(QL, QR, strict=True))

    # Error bounds from float32 rounding (u = 2^-24), all in Frobenius norms, per matrix: a
    # product with inner dimension k errs by at most γ(k) |A| |B| (Higham §3.5); the rotations'
    # |Q| and the Adam division's amplification 1 / min(D) are measured on the reference.
    u = torch.finfo(torch.float32).eps / 2
    gamma = lambda k: k * u / (1 - k * u)  # noqa: E731
    g2 = gamma(m_) + gamma(n_) + gamma(m_) * gamma(n_)  # a two-sided rotation
    fro = torch.linalg.matrix_norm
    spec = lambda A: torch.linalg.matrix_norm(A, 2).item()  # noqa: E731
    ref = W.detach().double().clone().reshape(count, m_, n_)
    m = torch.zeros(count, m_, n_, dtype=F64)
    v = torch.zeros(count, m_, n_, dtype=F64)
    err_m = [0.0] * count  # bound on ‖m'_float32 - Q_Lᵀ m Q_R‖
    err_v = [0.0] * count  # bound on ‖v'_float32 - v'‖
    err_w = 0.0  # bound on ‖W_float32 - W_ref‖
    start = ref.clone()
    reordered = False
    for t, G in enumerate(grads[1:], start=1):
        current = bases()  # those this step uses
        step(opt, [W], [G])
        G = G.reshape(count, m_, n_)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        update = torch.zeros_like(ref)
        for b, (QL, QR) in enumerate(current):
            m[b] = beta1 * m[b] + (1 - beta1) * G[b]  # the paper: original space
            Gr = QL.T @ G[b] @ QR
            v[b] = beta2 * v[b] + (1 - beta2) * Gr**2
            mr = QL.T @ m[b] @ QR
            D = (v[b] / bc2).sqrt() + eps
            Nr = mr / bc1 / D
            update[b] = QL @ Nr @ QR.T
            # m' and v' of the library: each gradient rotated (g2) and a lerp (3 roundings).
            e_G = g2 * fro(QL.abs().T @ G[b].abs() @ QR.abs()).item()
            err_m[b] = beta1 * err_m[b] + (1 - beta1) * e_G + 3 * u * (fro(mr) + fro(Gr)).item()
            err_v[b] = (beta2 * err_v[b] + (1 - beta2) * e_G * (2 * Gr.abs().max().item() + e_G)
                        + 3 * u * fro(v[b]).item())
            # |√a - √b| <= |a - b| / √a: D's error through the smallest v'.
            err_D = err_v[b] / (bc2 * (v[b] / bc2).min().item()) ** 0.5 + 2 * u * fro(D).item()
            err_Nr = ((err_m[b] / bc1 + u * fro(mr).item() / bc1) / D.min().item()
                      + Nr.abs().max().item() * err_D / D.min().item() + 3 * u * fro(Nr).item())
            err_N = (spec(QL) * spec(QR) * err_Nr
                     + g2 * fro(QL.abs() @ Nr.abs() @ QR.abs().T).item())
            err_w += lr * err_N  # the stack's error: at most the sum of its matrices'
        ref = ref * (1 - lr * wd) - lr * update
        err_w += 3 * u * fro(ref.reshape(-1, n_)).item()  # W's own update rounds
        if t % freq == 0:  # refreshed after this step: v' re-indexed, m' carried to new bases
            assert len(orders) == t // freq
            new = bases()
            for b, ((QL0, QR0), (QL1, QR1)) in enumerate(zip(current, new, strict=True)):
                oL, oR = orders[-1][b], orders[-1][count + b]
                reordered |= oL.tolist() != list(range(m_)) or oR.tolist() != list(range(n_))
                v[b] = v[b][oL][:, oR]
                # rebase(): two products per side, plus the old bases' departure from
                # orthogonality (Q_old Q_oldᵀ m ≠ m), measured.
                mr = QL0.T @ m[b] @ QR0
                for Q0, Q1, k in ((QL0, QL1, m_), (QR0, QR1, n_)):
                    C = Q1.T @ Q0
                    err_m[b] = (spec(C) * err_m[b]
                                + gamma(k) * 2 * spec(Q1.abs().T @ Q0.abs()) * fro(mr).item()
                                + spec(Q1) * spec(Q0 @ Q0.T - torch.eye(k, dtype=F64))
                                * fro(m[b]).item() * spec(Q0) ** 2)
    assert reordered, "no refresh re-ordered a basis: the test would not cover permutations"
    bound = err_w
    displacement = fro(W.detach().double().reshape(-1, n_) - ref.reshape(-1, n_)).item()
    moved = fro((ref - start).reshape(-1, n_)).item()
    assert bound < 1e-2 * moved  # the bound has teeth: far below the distance travelled
    assert displacement <= bound, (displacement, bound)
    print(f"error {displacement:.2e}, bound {bound:.2e}, distance travelled {moved:.2e}")
    # The state itself: m' in the final bases.
    final = bases()
    stored = state["soap.exp_avg_rotated"].double().reshape(count, m_, n_)
    for b, (QL, QR) in enumerate(final):
        assert fro(stored[b] - QL.T @ m[b] @ QR).item() <= err_m[b]


def _old_layout_run(dtype: torch.dtype):
    """A SOAP over a 2-D, a 3-D ``"batch"`` and a 1-D parameter, after 7 steps (2 refreshes at
    frequency 3), and its state dict as the code before the rotated first moment saved it:
    ``exp_avg`` in the original space, which that code formed as ``exp_avg.lerp_(G, 1 - beta1)``
    on every gradient after the first of a parameter with bases (on every one without)."""
    shapes = [(6, 5), (2, 4, 5), (5,)]
    params = [param(s, dtype, seed=i) for i, s in enumerate(shapes)]
    groups = [{"params": [params[0], params[2]], "algorithm": "soap"},
              {"params": [params[1]], "algorithm": "soap", "matrix_view": "batch"}]
    opt = SOAP(groups, precondition_frequency=3, **HP)
    grads = [gradients(s, 15, seed=40 + i) for i, s in enumerate(shapes)]
    exp_avg = [torch.zeros(s, dtype=dtype) for s in shapes]
    for k in range(7):
        step(opt, params, [g[k] for g in grads])
        for i, m in enumerate(exp_avg):
            if k > 0 or i == 2:  # the 1-D parameter has no bases: Adam from its first step
                m.lerp_(grads[i][k].to(dtype), 1 - HP["betas"][0])
    old = opt.state_dict()
    old["state"] = {k: dict(v) for k, v in old["state"].items()}
    order = [p for g in opt.param_groups for p in g["params"]]
    for index, p in enumerate(order):
        entry = old["state"][index]
        del entry["soap.exp_avg_rotated"]
        entry["exp_avg"] = exp_avg[[id(q) for q in params].index(id(p))].clone()
    return shapes, params, groups, opt, grads, old


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_state_dict_with_the_original_space_first_moment_resumes_the_same_run(dtype):
    shapes, params, groups, opt, grads, old = _old_layout_run(dtype)
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    resumed = SOAP([{**g, "params": [resumed_params[index[id(p)]] for p in g["params"]]}
                    for g in groups], precondition_frequency=3, **HP)
    resumed.load_state_dict(old)
    for p in resumed_params:
        assert "exp_avg" not in resumed.state[p] and "soap.exp_avg_rotated" in resumed.state[p]
    for k in range(7, 15):  # three more refreshes
        step(opt, params, [g[k] for g in grads])
        step(resumed, resumed_params, [g[k] for g in grads])
    # The resumed m' is Q_Lᵀ m Q_R formed once from the saved m, the uninterrupted one the sum of
    # the rotated gradients: the same up to the rounding of a few rotations (relative γ(k) ~ k u
    # per product), which Adam's division amplifies by at most ‖m'‖ / min(√v') -- about 1e2 for
    # these Gaussian gradients; then 8 steps of lr 3e-3 move W by ~2e-2. 1e2 · 10 u · 2e-2,
    # with u the dtype's unit roundoff, sits well inside rtol 1e3 u.
    u = torch.finfo(dtype).eps / 2
    for p, q in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e3 * u, atol=1e3 * u)


def test_an_old_state_dict_with_a_basis_of_the_wrong_shape_is_refused_by_name():
    _shapes, _params, groups, _opt, _grads, old = _old_layout_run(torch.float32)
    old["state"][0]["soap.L.basis"] = torch.eye(4)
    fresh = SOAP([{**g, "params": [nn.Parameter(p.detach().clone()) for p in g["params"]]}
                  for g in groups], precondition_frequency=3, **HP)
    with pytest.raises(gd.StateDictMismatchError, match=r"'soap\.L\.basis' has shape \(4, 4\)"):
        fresh.load_state_dict(old)


def test_rebase_carries_coordinates_along_one_dimension_of_any_order():
    # rebase(x, d, Q_old, Q_new) = x ×_d (Q_newᵀ Q_old); float64, so equal to 1e-12 (a few
    # products of O(1) entries, u = 1.1e-16).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=F64)
    for d, n in enumerate(x.shape):
        old, new = (torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0] for _ in "ab")
        expected = torch.movedim(torch.tensordot(new.T @ old, x, dims=([1], [d])), 0, d)
        torch.testing.assert_close(soap_math.rebase(x, d, old, new), expected, atol=1e-12, rtol=0)
