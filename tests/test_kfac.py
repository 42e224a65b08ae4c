"""K-FAC against references computed here: dense Kronecker solves, factors from explicit patches."""

from __future__ import annotations

import gc
import io
import itertools
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd
import guided_descent.preconditioners.kfac as kfac_math
from guided_descent.linalg.matrix_functions import MatrixFunctionError
from guided_descent.optimizers.kfac import KFAC, KFACSettings
from guided_descent.preconditioners.kfac import ConvGeometry, conv2d_input_rows, sampled_nll

EXACT = dict(lr=1.0, momentum=0.0, stat_decay=0.0, kl_clip=None, weight_decay=0.0)


def least_squares(dtype=torch.float64, n=64, d_in=5, d_out=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64).to(dtype)
    return layer, x, y


def mse_step(layer, opt, x, y):
    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    opt.step()


def reference_factors(layer, x, y, bias=True):
    """A, S and G of the squared loss ``mean((Wx + b - y)²)`` in float64, from the data alone."""
    W = layer.weight.detach().double()
    b = layer.bias.detach().double() if bias else torch.zeros(W.shape[0], dtype=torch.float64)
    x, y = x.double(), y.double()
    n, d_out = y.shape
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    go = 2.0 * (x @ W.T + b - y) / (n * d_out)  # ∂L/∂output, the mean loss's gradient
    delta = n * go  # per-example gradients
    return a.T @ a / n, delta.T @ delta / n, go.T @ a


def factored_solve(A, S, G, damping):
    """The dense ((A + π√λ I) ⊗ (S + √λ/π I))⁻¹ vec(G), written out with a Kronecker product."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (S.trace() / S.shape[0]))
    root = math.sqrt(damping)
    A_d = A + pi * root * torch.eye(A.shape[0], dtype=A.dtype)
    S_d = S + root / pi * torch.eye(S.shape[0], dtype=S.dtype)
    # Column-major vec: the Fisher block is A ⊗ S (the lecture's order) ...
    u_col = torch.linalg.solve(torch.kron(A_d, S_d), G.mT.reshape(-1)).reshape(G.shape[1], -1).mT
    # ... and with row-major flattening, S ⊗ A: both must say the same.
    u_row = torch.linalg.solve(torch.kron(S_d, A_d), G.reshape(-1)).reshape(G.shape)
    torch.testing.assert_close(u_col, u_row, rtol=1e-10, atol=1e-12)
    return u_row


def deltas(layer, before_w, before_b):
    dw = layer.weight.detach().double() - before_w.double()
    db = layer.bias.detach().double() - before_b.double()
    return torch.cat([dw, db[:, None]], 1)


@pytest.mark.parametrize("damping", [1e-1, 1e-3])
def test_linear_step_equals_dense_factored_damped_solve(damping):
    layer, x, y = least_squares()
    A, S, G = reference_factors(layer, x, y)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = gd.create("kfac", layer, damping=damping, **EXACT)
    mse_step(layer, opt, x, y)
    expected = -factored_solve(A, S, G, damping)
    torch.testing.assert_close(deltas(layer, w0, b0), expected, rtol=1e-9, atol=1e-12)
    state = opt.state[layer.weight]
    torch.testing.assert_close(state["kfac.A"], A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["kfac.S"], S, rtol=1e-12, atol=1e-14)


def test_vanishing_damping_approaches_the_undamped_kronecker_solve():
    layer, x, y = least_squares()
    A, S, G = reference_factors(layer, x, y)
    undamped = torch.linalg.solve(torch.kron(S, A), G.reshape(-1)).reshape(G.shape)
    errors = []
    for damping in (1e-2, 1e-4, 1e-6, 1e-8):
        model, _, _ = least_squares()
        w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
        opt = gd.create("kfac", model, damping=damping, **EXACT)
        mse_step(model, opt, x, y)
        step = -deltas(model, w0, b0)
        errors.append(float((step - undamped).norm() / undamped.norm()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3, errors


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_models_keep_float32_factors_and_match_the_reference(dtype, tol):
    layer, x, y = least_squares(dtype)
    # The reference sees the same (rounded) data and weights, in float64.
    A, S, G = reference_factors(layer, x, y)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = gd.create("kfac", layer, damping=1e-2, **EXACT)
    mse_step(layer, opt, x, y)
    state = opt.state[layer.weight]
    for key in ("kfac.A", "kfac.S", "kfac.A_inv", "kfac.S_inv"):
        assert state[key].dtype == torch.float32, key
    assert layer.weight.dtype == dtype
    expected = -factored_solve(A, S, G, 1e-2)
    error = (deltas(layer, w0, b0) - expected).norm() / expected.norm()
    assert error < tol


def test_bias_is_folded_in_as_a_constant_one_input():
    layer, x, y = least_squares()
    opt = gd.create("kfac", layer, damping=1e-2, **EXACT)
    mse_step(layer, opt, x, y)
    A = opt.state[layer.weight]["kfac.A"]
    assert A.shape == (6, 6)
    torch.testing.assert_close(A[:5, :5], x.T @ x / len(x))
    torch.testing.assert_close(A[:5, 5], x.mean(0))  # E[x · 1]
    assert A[5, 5].item() == 1.0  # E[1 · 1]

    no_bias, x, y = least_squares(bias=False)
    A, S, G = reference_factors(no_bias, x, y, bias=False)
    w0 = no_bias.weight.detach().clone()
    opt = gd.create("kfac", no_bias, damping=1e-2, **EXACT)
    mse_step(no_bias, opt, x, y)
    assert opt.state[no_bias.weight]["kfac.A"].shape == (5, 5)
    expected = -factored_solve(A, S, G, 1e-2)
    torch.testing.assert_close(no_bias.weight.detach() - w0, expected, rtol=1e-9, atol=1e-12)


def explicit_patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Patches by plain indexing over output positions (no unfold): (N, L, C·k·k + 1)."""
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = []
    for i in range(0, padded.shape[2] - kernel + 1, stride):
        for j in range(0, padded.shape[3] - kernel + 1, stride):
            patch = padded[:, :, i : i + kernel, j : j + kernel].reshape(n, -1)
            rows.append(torch.cat([patch, torch.ones(n, 1, dtype=x.dtype)], 1))
    return torch.stack(rows, 1)


def test_conv2d_factors_match_a_direct_patch_computation():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    opt = gd.create("kfac", conv, damping=1e-2, **EXACT)
    opt.zero_grad()
    out = conv(x)
    out.retain_grad()
    out.pow(2).mean().backward()
    go = out.grad.detach()  # (N, 3, 4, 4)
    opt.step()

    patches = explicit_patches(x, kernel=3, stride=2, padding=1)  # (N, L, 19)
    n, positions = patches.shape[:2]
    assert positions == 16
    # KFC: A averages over examples and positions; S sums over positions, averages examples.
    A = torch.einsum("nli,nlj->ij", patches, patches) / (n * positions)
    delta = n * go.flatten(2)  # per-example gradients, (N, 3, L)
    S = torch.einsum("nil,njl->ij", delta, delta) / n
    state = opt.state[conv.weight]
    torch.testing.assert_close(state["kfac.A"], A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["kfac.S"], S, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), padding="same"),
        dict(kernel_size=3, padding=(1, 2), dilation=2, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular"),
        dict(kernel_size=2, padding="valid", stride=(1, 2)),
    ],
)
def test_conv2d_patch_rows_reproduce_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **kwargs).double()
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    rows = conv2d_input_rows(x, ConvGeometry.of(conv), fold_bias=True)
    weights = torch.cat([conv.weight.reshape(3, -1), conv.bias[:, None]], 1)
    out = conv(x)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(rows @ weights.T.detach(), expected.detach())


def test_factor_and_inverse_frequencies_are_honoured(monkeypatch):
    calls = []
    real_eigh = kfac_math.eigh

    def counting_eigh(A, **kw):
        calls.append(A.shape)
        return real_eigh(A, **kw)

    monkeypatch.setattr(kfac_math, "eigh", counting_eigh)
    layer, _, _ = least_squares()
    opt = gd.create(
        "kfac", layer, factor_frequency=2, inverse_frequency=3, stat_decay=0.0, kl_clip=None
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 5, generator=g, dtype=torch.float64) for _ in range(7)]
    expected_due = [k % 2 == 0 for k in range(7)]
    last_refresh = None
    for k, x in enumerate(batches):
        assert opt.factors_due == expected_due[k]
        mse_step(layer, opt, x, torch.zeros(32, 3, dtype=torch.float64))
        if expected_due[k]:
            last_refresh = x
        a = torch.cat([last_refresh, torch.ones(32, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(opt.state[layer.weight]["kfac.A"], a.T @ a / 32)
    # Inverses at k = 0, 3, 6: two eigendecompositions (A and S) each.
    assert len(calls) == 6
    assert opt.state[layer.weight]["kfac.step"] == 7


def classifier(seed=0, n=3000):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight.mul_(4.0)  # confident predictions, which the random labels contradict
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=g)
    return layer, x, labels


def test_empirical_fisher_uses_the_labels_and_sampled_fisher_the_model():
    layer, x, labels = classifier()
    with torch.no_grad():
        p = torch.softmax(layer(x), 1)
    true_S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)

    opt = gd.create("kfac", layer, **EXACT)
    opt.zero_grad()
    F.cross_entropy(layer(x), labels).backward()
    opt.step()
    r = p - F.one_hot(labels, 3).double()
    empirical_S = r.T @ r / len(x)
    torch.testing.assert_close(opt.state[layer.weight]["kfac.S"], empirical_S)

    layer, x, labels = classifier()
    opt = gd.create("kfac", layer, fisher="sampled", **EXACT)
    opt.zero_grad()
    logits = layer(x)
    opt.sample_fisher(logits, "categorical", generator=torch.Generator().manual_seed(7))
    assert layer.weight.grad is None and layer.bias.grad is None  # p.grad untouched
    F.cross_entropy(logits, labels).backward()  # the training loss: not recorded in S
    grad_before = layer.weight.grad.clone()
    opt.step()
    assert torch.equal(layer.weight.grad, grad_before)
    # The same draw, made here: S is exactly its second moment ...
    sampled = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    r = p - F.one_hot(sampled, 3).double()
    sampled_S = opt.state[layer.weight]["kfac.S"]
    torch.testing.assert_close(sampled_S, r.T @ r / len(x))
    # ... an unbiased estimate of the true Fisher's output factor, unlike the empirical one.
    assert (sampled_S - true_S).abs().max() < 0.02
    assert (empirical_S - true_S).abs().max() > 0.1


def test_gaussian_sampling_and_misuse_of_the_sampled_fisher():
    layer, x, y = least_squares()
    opt = gd.create("kfac", layer, fisher="true", **EXACT)
    assert opt.settings.fisher == "sampled"
    opt.zero_grad()
    out = layer(x)
    opt.sample_fisher(out, "gaussian", generator=torch.Generator().manual_seed(0))
    ((out - y) ** 2).mean().backward()
    opt.step()
    # Unit-variance Gaussian: δ = ε ~ N(0, I), so S ≈ I.
    S = opt.state[layer.weight]["kfac.S"]
    assert (S - torch.eye(3, dtype=S.dtype)).abs().max() < 0.5

    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        opt.step()  # factors due, but no sampled gradients were recorded
    empirical = gd.create("kfac", layer)
    with pytest.raises(RuntimeError, match="fisher='sampled'"):
        empirical.sample_fisher(layer(x), "gaussian")
    with pytest.raises(ValueError, match="likelihood"):
        sampled_nll(layer(x), "poisson")  # type: ignore[arg-type]


def test_kl_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    lr = 0.3

    def step(kl_clip):
        """(grads, parameter moves) of one step from the same start."""
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        net.load_state_dict(model.state_dict())
        opt = gd.create("kfac", net, lr=lr, momentum=0.0, damping=1e-2, kl_clip=kl_clip)
        before = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        moves = [p.detach() - b for p, b in zip(net.parameters(), before, strict=True)]
        return [p.grad for p in net.parameters()], moves

    def inner(a, b):
        return sum(float((u * v).sum()) for u, v in zip(a, b, strict=True))

    grads, free = step(None)
    # Unclipped Δθ = -lr U, so lr² Σ⟨G, U⟩ = -lr Σ⟨G, Δθ⟩.
    predicted = -lr * inner(grads, free)
    assert predicted > 1e-3
    _, clipped = step(1e-3)
    nu = inner(grads, clipped) / inner(grads, free)
    for c, f in zip(clipped, free, strict=True):
        torch.testing.assert_close(c, nu * f, rtol=1e-10, atol=1e-14)  # only rescaled
    # The clipped step's Δθᵀ F̂ Δθ = lr² ν² Σ⟨G, U⟩ sits on the bound.
    assert nu**2 * predicted == pytest.approx(1e-3, rel=1e-9)
    _, loose = step(10 * predicted)  # an inactive bound changes nothing
    for c, f in zip(loose, free, strict=True):
        assert torch.equal(c, f)


def test_failed_inversion_keeps_the_last_inverse_warns_once_and_counts(monkeypatch):
    real_eigh = kfac_math.eigh
    calls = []

    def failing_after_first_inverse(A, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise MatrixFunctionError("injected")
        return real_eigh(A, **kw)

    monkeypatch.setattr(kfac_math, "eigh", failing_after_first_inverse)
    layer, x, y = least_squares()
    opt = gd.create("kfac", layer, inverse_frequency=1, stat_decay=0.5)
    mse_step(layer, opt, x, y)
    state = opt.state[layer.weight]
    A_inv, S_inv = state["kfac.A_inv"].clone(), state["kfac.S_inv"].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            mse_step(layer, opt, x * 1.5, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "injected" in messages[0] and "last good" in messages[0]
    assert state["kfac.inverse_failures"] == 3
    assert torch.equal(state["kfac.A_inv"], A_inv) and torch.equal(state["kfac.S_inv"], S_inv)
    assert all(torch.isfinite(p).all() for p in layer.parameters())


class Mixed(nn.Module):
    """A Linear and a Conv2d next to parameters K-FAC leaves to the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.grouped = nn.Conv2d(2, 2, 1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(torch.relu(self.conv(x))).mean(dim=(2, 3))  # (N, 2)
        h = self.norm(h.repeat(1, 4))
        return self.gain * self.out(h)


def test_fallback_parameters_are_param_groups_of_the_same_optimizer():
    torch.manual_seed(0)
    model = Mixed()
    sgd = {"lr": 0.05, "momentum": 0.9}
    opt = gd.create("kfac", model, fallback="sgd", fallback_hyperparams=sgd)
    assert [g["algorithm"] for g in opt.param_groups] == ["kfac", "sgd"]
    assert isinstance(opt._fallback, torch.optim.SGD)
    text = repr(opt)
    assert "grouped Conv2d (groups=2)" in text and "gain" in text and "norm.weight" in text
    kfac_ids = {id(p) for p in opt.param_groups[0]["params"]}
    assert kfac_ids == {id(model.conv.weight), id(model.conv.bias), id(model.out.weight),
                        id(model.out.bias)}

    # A scheduler drives both kinds: with lr 0 everywhere nothing moves.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    assert opt._fallback.param_groups[0]["lr"] == 0.0
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    scheduler.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))

    # Save, continue, restore into a fresh optimizer: identical continuation, float32 factors.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = Mixed()
    resumed.load_state_dict(saved["model"])
    opt2 = gd.create("kfac", resumed, fallback="sgd", fallback_hyperparams=sgd)
    opt2.load_state_dict(saved["opt"])
    assert opt2._fallback.state is opt2.state
    assert opt2._fallback.param_groups[0] is opt2.param_groups[1]
    for _ in range(2):
        opt2.zero_grad()
        F.mse_loss(resumed(x), y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_added_param_groups_go_to_the_fallback():
    layer, _, _ = least_squares()
    opt = gd.create("kfac", layer)
    assert opt._fallback is None
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[-1]["algorithm"] == "adamw" and opt.param_groups[-1]["lr"] == 0.5
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [layer.weight]})
    with pytest.raises(ValueError, match="fixed"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "algorithm": "kfac"})


def test_a_model_without_layers_works_through_the_fallback_and_says_so():
    model = nn.Sequential(nn.LayerNorm(3))
    with pytest.warns(UserWarning, match="no nn.Linear / nn.Conv2d"):
        opt = gd.create("kfac", model, weight_decay=0.0)
    assert "preconditions nothing" in repr(opt)
    x = torch.randn(5, 3)
    opt.zero_grad()
    model(x).pow(3).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_hooks_record_only_training_mode_with_grad_and_can_be_removed():
    layer, x, y = least_squares()
    opt = gd.create("kfac", layer, **EXACT)
    layer.eval()
    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    with pytest.warns(RuntimeWarning, match="no curvature estimate"):
        opt.step()
    assert "kfac.A" not in opt.state[layer.weight]

    layer.train()
    with torch.no_grad():
        layer(x)  # not recorded
    mse_step(layer, opt, x, y)
    A = opt.state[layer.weight]["kfac.A"].clone()
    opt.remove_hooks()
    mse_step(layer, opt, 3.0 * x, y)  # no statistics any more: the factors stay
    assert torch.equal(opt.state[layer.weight]["kfac.A"], A)

    # The hooks hold the optimizer weakly: a discarded optimizer is collected.
    fresh = gd.create("kfac", layer)
    ref = weakref.ref(fresh)
    del fresh
    gc.collect()
    assert ref() is None
    mse_step(layer, gd.create("sgd", layer), x, y)  # the dead hooks do nothing


def test_state_dict_restores_float32_statistics_of_a_bf16_model():
    layer, x, y = least_squares(torch.bfloat16)
    opt = gd.create("kfac", layer)
    mse_step(layer, opt, x, y)
    opt2 = gd.create("kfac", layer)
    opt2.load_state_dict(opt.state_dict())
    for key in ("kfac.A", "kfac.S", "kfac.A_inv", "kfac.S_inv", "kfac.momentum_buffer"):
        assert opt2.state[layer.weight][key].dtype == torch.float32, key
        assert torch.equal(opt2.state[layer.weight][key], opt.state[layer.weight][key])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fisher="exact"), "fisher.*'exact'"),
        (dict(factor_frequency=0), "factor_frequency.*0"),
        (dict(inverse_frequency=2.5), "inverse_frequency.*2.5"),
        (dict(kl_clip=-1.0), "kl_clip.*-1.0"),
        (dict(stat_decay=1.0), "stat_decay.*1.0"),
        (dict(damping=-0.1), "damping.*-0.1"),
        (dict(fallback="kfac"), "needs the model"),
        (dict(fallback="adamww"), "Did you mean 'adamw'"),
    ],
)
def test_invalid_settings_name_the_value(kwargs, match):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match):
        gd.create("kfac", Mixed(), **kwargs)


def test_settings_are_a_validated_frozen_value():
    settings = KFACSettings(fisher="true")
    assert settings.fisher == "sampled"
    with pytest.raises(AttributeError):
        settings.kl_clip = 1.0  # type: ignore[misc]
    assert isinstance(gd.create("kfac", nn.Linear(2, 2)), KFAC)
    with pytest.raises(TypeError, match="needs the model"):
        gd.create("kfac", list(nn.Linear(2, 2).parameters()))
