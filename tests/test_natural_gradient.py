"""Natural gradient against dense references: Jacobians, explicit Fisher matrices, least squares."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import guided_descent as gd
from guided_descent.optimizers.natural_gradient import NaturalGradient
from guided_descent.preconditioners.natural_gradient import (
    LevenbergMarquardt,
    conjugate_gradient,
    gauss_newton_operator,
    model_loss_change,
    output_loss_change,
    reduction_ratio,
)

# torch's forward-mode AD scripts its decompositions on first use and warns that it does so.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.script_method` is deprecated"
)
# Tests of one step against a dense solve with a given damping, over several steps, turn off its
# Levenberg–Marquardt adaptation (tested on its own below).
FIXED_DAMPING = {"adaptive_damping": False}


def mlp(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_gauss_newton(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Jᵀ H J in float64 from the full Jacobian of the outputs (N, C) w.r.t. all parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        parts = theta.split(sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,))

    theta = flat_params(model).double()
    J = jacrev(outputs)(theta)  # (N, C, P)
    z = outputs(theta).detach()
    n, c = z.shape
    if loss == "mse":
        return 2.0 / (n * c) * torch.einsum("ncp,ncq->pq", J, J)
    p = torch.softmax(z, 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C) per example
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / n


def loss_of(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y) if name == "mse" else F.cross_entropy(out, y)


def data(loss: str, dtype=torch.float64, n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    if loss == "mse":
        return x, torch.randn(n, 4, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_gauss_newton_product_matches_the_dense_jacobian_fisher(loss):
    model = mlp()
    x, _ = data(loss)
    params = {n: p.detach() for n, p in model.named_parameters()}
    product = gauss_newton_operator(
        lambda ps: functional_call(model, ps, (x,)), params, loss, torch.float64
    )
    G = dense_gauss_newton(model, x, loss)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(G.shape[0], generator=g, dtype=torch.float64)
        parts = v.split([p.numel() for p in params.values()])
        tangent = {n: t.view(p.shape) for (n, p), t in zip(params.items(), parts, strict=True)}
        Gv = torch.cat([t.reshape(-1) for t in product(tangent).values()])
        torch.testing.assert_close(Gv, G @ v, rtol=1e-10, atol=1e-12)


def test_zero_damping_reaches_the_least_squares_minimum_in_one_step():
    torch.manual_seed(0)
    layer = nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    opt = gd.create(
        "natural_gradient", layer, lr=1.0, damping=0.0, loss="mse", cg_iterations=50,
        cg_tolerance=1e-14, **FIXED_DAMPING,
    )
    opt.zero_grad()
    F.mse_loss(layer(x), y).backward()
    opt.step()
    X = torch.cat([x, torch.ones(32, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(X, y).solution  # (5, 2): [Wᵀ; b]
    torch.testing.assert_close(layer.weight.detach(), solution[:4].T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.detach(), solution[4], rtol=1e-9, atol=1e-10)
    assert opt.last_solve is not None and opt.last_solve.converged
    assert opt.last_solve.iterations <= 10  # exact arithmetic would need <= 10 = #params


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_step_equals_the_dense_damped_solve(loss):
    model = mlp()
    x, y = data(loss)
    theta = flat_params(model)
    G = dense_gauss_newton(model, x, loss)
    opt = gd.create(
        "natural_gradient", model, lr=0.5, damping=0.1, loss=loss, cg_iterations=100,
        cg_tolerance=1e-13, **FIXED_DAMPING,
    )
    opt.zero_grad()
    loss_of(loss, model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    eye = torch.eye(len(theta), dtype=torch.float64)
    expected = theta - 0.5 * torch.linalg.solve(G + 0.1 * eye, grad)
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-11)


def test_momentum_and_decoupled_weight_decay_follow_the_update_rule():
    model = mlp()
    x, y = data("cross_entropy")
    lr, mu, wd, lam = 0.3, 0.5, 0.1, 0.05
    opt = gd.create(
        "natural_gradient", model, lr=lr, damping=lam, momentum=mu, weight_decay=wd,
        loss="cross_entropy", cg_iterations=100, cg_tolerance=1e-13, **FIXED_DAMPING,
    )
    theta = flat_params(model)
    buf = torch.zeros_like(theta)
    for _ in range(2):
        G = dense_gauss_newton(model, x, "cross_entropy")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        u = torch.linalg.solve(G + lam * torch.eye(len(theta), dtype=torch.float64), grad)
        buf = mu * buf + u
        theta = theta * (1 - lr * wd) - lr * buf
        opt.step()
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-9, atol=1e-11)
    assert set(opt.state[model[0].weight]) == {"natural_gradient.momentum_buffer"}


@pytest.mark.parametrize("dtype, min_cosine", [(torch.float32, 0.999999), (torch.bfloat16, 0.999)])
def test_low_precision_models_step_along_the_float64_direction(dtype, min_cosine):
    reference = mlp()
    x, y = data("cross_entropy", n=16)
    G = dense_gauss_newton(reference, x, "cross_entropy")
    reference.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    expected = -torch.linalg.solve(G + 0.1 * torch.eye(len(grad), dtype=torch.float64), grad)

    model = mlp().to(dtype)
    theta = flat_params(model).double()
    opt = gd.create(
        "natural_gradient", model, lr=1.0, damping=0.1, loss="cross_entropy", cg_iterations=60,
        **FIXED_DAMPING,
    )
    opt.zero_grad()
    F.cross_entropy(model(x.to(dtype)), y).backward()
    opt.step()
    assert all(p.dtype == dtype for p in model.parameters())
    move = flat_params(model).double() - theta
    cosine = float(move @ expected / (move.norm() * expected.norm()))
    assert cosine > min_cosine


def test_inputs_come_from_the_latest_training_mode_forward_pass():
    model = mlp()
    x, y = data("mse")
    opt = gd.create("natural_gradient", model, loss="mse")
    F.mse_loss(model(x), y).backward()
    opt.step()
    # The batch is used once: a second step without a forward pass is refused.
    with pytest.raises(RuntimeError, match="training mode"):
        opt.step()
    model.eval()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    model.train()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no_grad"):
        opt.step()


class Scaled(nn.Module):
    """A linear model whose forward takes a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.out(x) * scale


def test_keyword_inputs_are_replayed():
    torch.manual_seed(0)
    model = Scaled().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    opt = gd.create(
        "natural_gradient", model, lr=1.0, damping=0.0, loss="mse", cg_iterations=50,
        cg_tolerance=1e-14, **FIXED_DAMPING,
    )
    opt.zero_grad()
    F.mse_loss(model(x, scale=3.0), y).backward()
    opt.step()
    # Curvature taken with scale=3 (not the default 1): the Newton step lands on the minimum.
    X = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(3.0 * X, y).solution
    torch.testing.assert_close(model.out.weight.detach(), solution[:3].T, rtol=1e-9, atol=1e-10)


def test_batchnorm_is_replayed_with_batch_statistics_and_running_ones_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    # The same training-mode function, without running statistics, for the dense reference.
    twin = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                         nn.Linear(4, 2)).double()
    twin.load_state_dict(model.state_dict(), strict=False)
    G = dense_gauss_newton(twin, x, "mse")
    theta = flat_params(model)
    opt = gd.create(
        "natural_gradient", model, lr=1.0, damping=0.1, loss="mse", cg_iterations=100,
        cg_tolerance=1e-13, **FIXED_DAMPING,
    )
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    running = [b.clone() for b in model[1].buffers()]
    opt.step()
    for b, r in zip(model[1].buffers(), running, strict=True):
        assert torch.equal(b, r)
    assert model[1].track_running_stats
    expected = theta - torch.linalg.solve(G + 0.1 * torch.eye(len(G), dtype=torch.float64), grad)
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-11)


def test_conjugate_gradient_solves_spd_systems_and_stops_early():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_iterations=100, tolerance=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert info.converged and info.iterations <= 14 and info.relative_residual <= 1e-12
    zero, info = conjugate_gradient(lambda v: A @ v, torch.zeros(12), max_iterations=5,
                                    tolerance=1e-6)
    assert torch.equal(zero, torch.zeros(12)) and info.iterations == 0
    _, info = conjugate_gradient(lambda v: A @ v, b, max_iterations=3, tolerance=1e-12)
    assert info.iterations == 3 and not info.converged
    _, info = conjugate_gradient(lambda v: -v, b, max_iterations=5, tolerance=1e-12)
    assert not info.converged  # negative curvature: stops instead of diverging


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="hinge"), "loss.*'hinge'"),
        (dict(cg_iterations=0), "cg_iterations.*0"),
        (dict(cg_tolerance=-1.0), "cg_tolerance.*-1.0"),
        (dict(damping=-0.5), "damping.*-0.5"),
    ],
)
def test_invalid_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gd.create("natural_gradient", mlp(), **{"loss": "mse", **kwargs})


def test_needs_the_model_and_only_its_parameters():
    with pytest.raises(TypeError, match="needs the model"):
        gd.create("natural_gradient", list(mlp().parameters()), loss="mse")
    opt = gd.create("natural_gradient", mlp(), loss="mse")
    assert isinstance(opt, NaturalGradient)
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})


# ------------------------------------------------------------------------------ torch.compile


def compiled_step(how: str, backend: str = "inductor"):
    """One step on a compiled float64 MLP; returns (optimizer, stepped params, reference params).

    The reference is the same step on an eager twin: the compiled forward differs from the eager
    one only by the rounding of a re-ordered float64 computation (~1e-16 relative), so the two
    steps agree to ~1e-12 after a well-conditioned damped solve.
    """
    torch._dynamo.reset()
    model, twin = mlp(), mlp()
    x, y = data("cross_entropy", n=8)
    hp = dict(lr=0.5, damping=0.1, loss="cross_entropy", cg_iterations=100, cg_tolerance=1e-13)
    if how == "compile after create":
        opt = gd.create("natural_gradient", model, **hp)
        forward = torch.compile(model, backend=backend)
    elif how == "create from compiled":
        forward = torch.compile(model, backend=backend)
        opt = gd.create("natural_gradient", forward, **hp)
    else:  # nn.Module.compile(): compiles in place, the module object stays the same
        model.compile(backend=backend)
        forward = model
        opt = gd.create("natural_gradient", model, **hp)
    opt.zero_grad()
    F.cross_entropy(forward(x), y).backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    opt.step()
    # The curvature re-runs use the eager module: stepping compiles nothing.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    reference = gd.create("natural_gradient", twin, **hp)
    reference.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    reference.step()
    # The loss's gradient w.r.t. the outputs was recorded through the compiled forward too.
    assert opt.last_ratio == pytest.approx(reference.last_ratio, rel=1e-9)
    return opt, flat_params(model), flat_params(twin)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["compile after create", "create from compiled"])
def test_a_model_compiled_with_inductor_steps_as_the_eager_one(how):
    opt, stepped, expected = compiled_step(how, "inductor")
    torch.testing.assert_close(stepped, expected, rtol=1e-10, atol=1e-12)
    # Names as the user's module spells them (an OptimizedModule prefixes `_orig_mod.`).
    names = [e["name"] for e in opt.diagnostics()["params"]]
    prefix = "_orig_mod." if how == "create from compiled" else ""
    assert names[:2] == [f"{prefix}0.weight", f"{prefix}0.bias"]


@pytest.mark.parametrize("how", ["compile after create", "create from compiled", "in place"])
def test_every_way_of_compiling_steps_as_the_eager_model(how):
    # aot_eager runs dynamo's capture and AOTAutograd without inductor's code generation: the
    # hooks and re-runs see what they see under inductor, in a fraction of the time.
    _, stepped, expected = compiled_step(how, "aot_eager")
    torch.testing.assert_close(stepped, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- attention and recurrent models

EPS32 = torch.finfo(torch.float32).eps
# A float32 Gauss–Newton product passes through the model forward and back about twice, each
# op's result rounded once (relative error ~ eps32 per op, ~ eps32 * n for a sum of n terms).
# The tiny models below have < 30 ops on any path and sums of < 200 terms: 256 * eps32 bounds
# the normwise relative error of a product with room to spare, on any CPU's kernels.
PRODUCT_RTOL = 256 * EPS32


class TinyTransformer(nn.Module):
    """A one-layer transformer encoder classifier: (N, T, 4) -> (N, 3) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class TinyAttention(nn.Module):
    """Self-attention without returned weights (torch then takes its fused attention kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(x, x, x, need_weights=False)
        return self.head(out.mean(1))


class TinyRecurrent(nn.Module):
    """A GRU or LSTM over the sequence, classified from its last hidden state."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


SEQUENCE_MODELS = {
    "transformer": TinyTransformer,
    "attention": TinyAttention,
    "gru": lambda: TinyRecurrent(nn.GRU),
    "lstm": lambda: TinyRecurrent(nn.LSTM),
}


def sequence_problem(kind: str):
    """A float32 sequence classifier, a batch (N=4, T=3, 4) and its labels."""
    torch.manual_seed(0)
    model = SEQUENCE_MODELS[kind]()
    g = torch.Generator().manual_seed(5)
    return model, torch.randn(4, 3, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def dense_gauss_newton_reverse(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy Jᵀ H J in float64, J from torch.autograd.functional.jacobian (reverse mode
    only, so it holds for every op with a backward), on a float64 copy of ``model``."""
    import copy

    twin = copy.deepcopy(model).double()
    names = [n for n, _ in twin.named_parameters()]
    shapes = [p.shape for p in twin.parameters()]
    sizes = [p.numel() for p in twin.parameters()]

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        parts = theta.split(sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(twin, params, (x.double(),))

    theta = flat_params(twin)
    J = torch.autograd.functional.jacobian(outputs, theta)  # (N, C, P)
    z = outputs(theta).detach()
    p = torch.softmax(z, 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / z.shape[0]


@pytest.mark.parametrize("kind", SEQUENCE_MODELS)
def test_attention_and_recurrent_models_step_along_the_dense_damped_solve(kind):
    model, x, y = sequence_problem(kind)
    G = dense_gauss_newton_reverse(model, x)
    lam = 0.1
    A = G + lam * torch.eye(len(G), dtype=torch.float64)
    opt = gd.create(
        "natural_gradient", model, lr=1.0, damping=lam, loss="cross_entropy",
        cg_iterations=len(G), cg_tolerance=1e-6, **FIXED_DAMPING,
    )
    theta = flat_params(model).double()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    opt.step()
    expected = torch.linalg.solve(A, grad)
    move = theta - flat_params(model).double()
    # Perturbation bound for A u = g: relative error <= cond(A) (rel. error of A and of g, each
    # PRODUCT_RTOL, + CG's relative residual), plus the float32 rounding of θ - u.
    cond = float(torch.linalg.cond(A))
    bound = cond * (2 * PRODUCT_RTOL + 1e-6) + EPS32 * float(theta.norm() / expected.norm())
    assert float((move - expected).norm() / expected.norm()) <= bound
    mode = opt.diagnostics()["jacobian_products"]
    assert mode["mode"] in ("forward", "double_vjp")


@pytest.mark.parametrize("kind", SEQUENCE_MODELS)
def test_double_vjp_products_of_attention_and_recurrent_models_match_the_dense_jacobian(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, _ = sequence_problem(kind)
    G = dense_gauss_newton_reverse(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with sdpa_kernel([SDPBackend.MATH]):
        product = gauss_newton_operator(
            lambda ps: functional_call(model, ps, (x,)), params, "cross_entropy",
            jacobian="double_vjp",
        )
        g = torch.Generator().manual_seed(2)
        for _ in range(2):
            v = torch.randn(len(G), generator=g, dtype=torch.float64)
            parts = v.float().split([p.numel() for p in params.values()])
            tangent = {n: t.view(p.shape) for (n, p), t in zip(params.items(), parts, strict=True)}
            Gv = torch.cat([t.reshape(-1) for t in product(tangent).values()]).double()
            error = float((Gv - G @ v).norm())
            assert error <= PRODUCT_RTOL * float(torch.linalg.matrix_norm(G, 2)) * float(v.norm())


@pytest.mark.parametrize("kind", SEQUENCE_MODELS)
def test_attention_and_recurrent_models_train_at_the_defaults(kind):
    model, x, y = sequence_problem(kind)
    opt = gd.create("natural_gradient", model, loss="cross_entropy")
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max(losses) <= losses[0] and losses[-1] < 0.9 * losses[0]


class TanhWithoutJvp(torch.autograd.Function):
    """tanh with a (differentiable) backward but no forward-mode rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class TanhOnceDifferentiable(TanhWithoutJvp):
    """The same, its backward not differentiable again: no Jacobian product can go through it."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class CustomActivation(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x)


def test_missing_forward_mode_rules_fall_back_to_two_reverse_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), CustomActivation(TanhWithoutJvp), nn.Linear(5, 4))
    model = model.double()
    twin = mlp()  # the same weights with torch's tanh, whose forward-mode rule exists
    twin.load_state_dict(model.state_dict())
    x, y = data("cross_entropy")
    hp = dict(lr=0.5, damping=0.1, loss="cross_entropy", cg_iterations=100, cg_tolerance=1e-13,
              **FIXED_DAMPING)
    opt, reference = gd.create("natural_gradient", model, **hp), gd.create(
        "natural_gradient", twin, **hp
    )
    for _ in range(2):  # detected on the first step, remembered for the second
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)
    mode = opt.diagnostics()["jacobian_products"]
    assert mode["mode"] == "double_vjp"
    assert "CustomActivation" in mode["reason"]
    assert reference.diagnostics()["jacobian_products"] == {"mode": "forward", "reason": None}


def test_a_model_without_any_jacobian_product_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(3, 5), CustomActivation(TanhOnceDifferentiable),
                          nn.Linear(5, 4)).double()
    x, y = data("cross_entropy")
    opt = gd.create("natural_gradient", model, loss="cross_entropy")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="CustomActivation") as info:
        opt.step()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ the defaults


def test_the_loss_must_be_named_and_the_error_lists_the_choices():
    with pytest.raises(TypeError, match="loss=.*'mse'.*'cross_entropy'"):
        gd.create("natural_gradient", mlp())


def small_task(task: str):
    """A float32 MLP 10-32-32-k and 512 examples: 5 Gaussian classes, or a tanh teacher's
    3 outputs plus noise. Returns (model, x, y, loss function, loss name)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 10, generator=g)
    if task == "classification":
        centers = 2.0 * torch.randn(5, 10, generator=g)
        y = torch.randint(0, 5, (512,), generator=g)
        x = x + centers[y]
        loss, name, width = F.cross_entropy, "cross_entropy", 5
    else:
        w1, w2 = torch.randn(10, 8, generator=g), torch.randn(8, 3, generator=g)
        y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(512, 3, generator=g)
        loss, name, width = F.mse_loss, "mse", 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, width))
    return model, x, y, loss, name


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_training_at_the_defaults_goes_down_and_never_above_the_start(task):
    model, x, y, loss_fn, loss = small_task(task)
    opt = gd.create("natural_gradient", model, loss=loss)
    order = torch.randint(0, 512, (30, 64), generator=torch.Generator().manual_seed(8))

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    losses = [full_loss()]
    for idx in order:
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        losses.append(full_loss())
    assert max(losses) <= losses[0]
    assert losses[-1] < 0.25 * losses[0]


# --------------------------------------------------------------- Levenberg–Marquardt damping


@pytest.mark.parametrize("loss", ["mse", "half_squared_error", "cross_entropy", "soft_labels"])
def test_the_loss_change_follows_from_the_output_gradient_alone(loss):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(6, 4, generator=g, dtype=torch.float64)
        L = lambda out: F.mse_loss(out, y)  # noqa: E731
    elif loss == "half_squared_error":
        y = torch.randn(6, 4, generator=g, dtype=torch.float64)
        L = lambda out: 0.5 * (out - y).square().sum() / out.shape[0]  # noqa: E731
    elif loss == "cross_entropy":
        y = torch.randint(0, 4, (6,), generator=g)
        L = lambda out: F.cross_entropy(out, y)  # noqa: E731
    else:
        y = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
        L = lambda out: F.cross_entropy(out, y)  # noqa: E731
        loss = "cross_entropy"
    zr = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(L(zr), zr)
    expected = float(L(z + delta) - L(z))
    assert output_loss_change(loss, z, grad, delta) == pytest.approx(expected, rel=1e-12)
    # And the quadratic model of it is the loss's second-order Taylor expansion in the outputs.
    H = torch.autograd.functional.hessian(L, z).reshape(24, 24)
    quadratic = float(grad.reshape(-1) @ delta.reshape(-1))
    quadratic += 0.5 * float(delta.reshape(-1) @ H @ delta.reshape(-1))
    assert model_loss_change(loss, z, grad, delta) == pytest.approx(quadratic, rel=1e-12)


def test_the_reduction_ratio_is_that_of_the_dense_gauss_newton_model():
    model = mlp()
    x, y = data("cross_entropy")
    G = dense_gauss_newton(model, x, "cross_entropy")
    theta = flat_params(model)
    opt = gd.create("natural_gradient", model, lr=0.5, damping=0.1, loss="cross_entropy",
                    cg_iterations=100, cg_tolerance=1e-13)
    opt.zero_grad()
    before = F.cross_entropy(model(x), y)
    before.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    delta = flat_params(model) - theta
    with torch.no_grad():
        actual = float(F.cross_entropy(model(x), y) - before)
    predicted = float(grad @ delta + 0.5 * delta @ G @ delta)
    assert opt.last_ratio == pytest.approx(actual / predicted, rel=1e-9)
    assert opt.diagnostics()["damping_scale"] == LevenbergMarquardt().update(1.0, opt.last_ratio)


def test_a_step_that_raises_the_batch_loss_is_not_taken():
    model = mlp()
    x, y = data("cross_entropy")
    opt = gd.create("natural_gradient", model, lr=0.1, damping=0.1, momentum=0.5,
                    loss="cross_entropy")

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # small and good: taken, and it leaves a momentum buffer
    assert opt.diagnostics()["rejected_steps"] == 0
    params = flat_params(model)
    buffers = {p: opt.state[p]["natural_gradient.momentum_buffer"].clone()
               for p in model.parameters()}
    scale = opt.diagnostics()["damping_scale"]
    opt.param_groups[0]["lr"] = 1e4  # far past where the Gauss–Newton model holds
    step()
    assert opt.last_ratio is not None and opt.last_ratio < 0
    assert torch.equal(flat_params(model), params)
    for p, buf in buffers.items():
        assert torch.equal(opt.state[p]["natural_gradient.momentum_buffer"], buf)
    report = opt.diagnostics()
    assert report["rejected_steps"] == 1 and report["damping_scale"] == 1.5 * scale
    assert {e["update_rms"] for e in report["params"]} == {0.0}  # nothing moved
    assert opt.state_dict()["guided_descent"]["damping_scale"] == 1.5 * scale


def test_without_the_output_gradient_the_damping_stays():
    model = mlp()
    x, y = data("mse")
    opt = gd.create("natural_gradient", model, lr=0.5, loss="mse")
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    model(x)  # the step's batch now comes from this forward, whose outputs the loss never saw
    loss.backward()
    before = flat_params(model)
    opt.step()
    assert opt.last_ratio is None and opt.diagnostics()["damping_scale"] == 1.0
    assert not torch.equal(flat_params(model), before)  # the step is taken


def test_levenberg_marquardt_rule():
    rule = LevenbergMarquardt()
    assert rule.update(1.0, 0.1) == 1.5 and rule.update(1.0, 0.9) == pytest.approx(2 / 3)
    assert rule.update(1.0, 0.5) == 1.0 and rule.update(1.0, None) == 1.0
    assert rule.update(1.0, float("nan")) == 1.5
    assert rule.update(1e4, 0.0) == 1e4 and rule.update(1e-4, 1.0) == 1e-4
    assert rule.accepts(0.0) and rule.accepts(None) and not rule.accepts(-0.1)
    assert LevenbergMarquardt(reject_below=None).accepts(-5.0)
    with pytest.raises(ValueError, match="increase.*0.5"):
        LevenbergMarquardt(increase=0.5)
    with pytest.raises(ValueError, match="adaptive_damping.*'yes'"):
        gd.create("natural_gradient", mlp(), loss="mse", adaptive_damping="yes")


def test_the_reduction_ratio_needs_a_measurable_prediction():
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.2, -1.0) == -0.2
    assert reduction_ratio(0.1, 0.3) == -math.inf  # the model saw no decrease; the loss rose
    assert reduction_ratio(-0.1, 0.3) is None
    assert reduction_ratio(float("nan"), -1.0) == -math.inf
    # Within the rounding noise of the measured change there is no evidence either way.
    assert reduction_ratio(1e-9, -2e-9, noise=1e-9) is None
    assert reduction_ratio(5e-9, -2e-9, noise=1e-9) == -math.inf
    assert reduction_ratio(1e-9, -1e-7, noise=1e-9) == pytest.approx(-0.01)


def test_class_dim_last_equals_flattened_logits():
    """A language model's (B, T, V) logits with class_dim=-1 take the step of the same model
    whose logits are flattened to (B*T, V) with the default class_dim=1."""

    class LM(nn.Module):
        def __init__(self, flat: bool) -> None:
            super().__init__()
            self.flat = flat
            self.embed = nn.Embedding(7, 5)
            self.out = nn.Linear(5, 7)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = self.out(torch.tanh(self.embed(idx)))  # (B, T, V)
            return logits.reshape(-1, 7) if self.flat else logits

    idx = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(1))
    steps = []
    for flat, class_dim in ((True, 1), (False, -1)):
        torch.manual_seed(0)
        model = LM(flat)
        opt = gd.create("natural_gradient", model, loss="cross_entropy", class_dim=class_dim)
        before = [p.detach().clone() for p in model.parameters()]
        logits = model(idx)
        F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1)).backward()
        opt.step()
        moved = zip(model.parameters(), before, strict=True)
        steps.append(torch.cat([(p - b).flatten() for p, b in moved]))
    # The same float32 products in another memory order: rounding apart, on steps of ~1e-2.
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="class_dim must be an int"):
        gd.create("natural_gradient", LM(True), loss="cross_entropy", class_dim="last")
