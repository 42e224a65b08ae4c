"""Property-based: parameters stay finite whatever shapes, dtypes and gradients they see.

Gradient sequences are drawn ill-conditioned (singular values spread over 8 decades), rank-
deficient (down to rank 0), tiny or large (scales 1e-12 .. 1e12) and sign-flipping; shapes run
from 0-d to very thin and very wide matrices and a 3-D tensor; float32 and bfloat16. Model-aware
optimizers (K-FAC, natural gradient) get such inputs through a one-layer model of a thin or wide
shape. Examples are few and small so that the file stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import guided_descent as gd
from guided_descent.linalg.newton_schulz import newton_schulz

PARAM_NAMES = [n for n, s in gd.optimizers().items() if not s.needs_model]
MODEL_NAMES = [n for n, s in gd.optimizers().items() if s.needs_model]
SHAPES = [(), (1,), (7,), (1, 9), (9, 1), (2, 40), (40, 2), (6, 5), (3, 4, 5)]
DTYPES = [torch.float32, torch.bfloat16]

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated",
    # Warnings are part of the behaviour under test elsewhere (test_faults.py).
    "ignore::RuntimeWarning",
    "ignore::UserWarning",
)


@st.composite
def gradient_sequences(draw, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """1-6 gradients of ``shape``, float64, each ill-conditioned / rank-deficient / scaled."""
    steps = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        scale = 10.0 ** draw(st.integers(-12, 12))
        if len(shape) < 2:
            grads.append(scale * torch.randn(shape, generator=g, dtype=torch.float64))
            continue
        m, n = shape[0], math.prod(shape[1:])
        k = min(m, n)
        rank = draw(st.integers(0, k))
        decades = draw(st.floats(0.0, 8.0))
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        sigma = torch.logspace(0.0, -decades, k, dtype=torch.float64)
        sigma[rank:] = 0.0
        grads.append((scale * (U * sigma) @ V.T).reshape(shape))
    return grads


def finite_state(opt: torch.optim.Optimizer) -> bool:
    def walk(v) -> bool:
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(walk(x) for x in v)
        return True

    return walk(opt.state_dict()["state"])


@pytest.mark.parametrize("name", PARAM_NAMES)
@SETTINGS
@given(data=st.data(), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES))
def test_parameters_stay_finite_for_any_gradient_sequence(name, data, shape, dtype):
    p = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    opt = gd.create(name, [p])
    for grad in data.draw(gradient_sequences(shape)):
        p.grad = grad.to(dtype)
        opt.step()
        assert torch.isfinite(p).all(), (name, shape, dtype)
    assert finite_state(opt)
    assert opt.diagnostics()["skipped_steps"] == 0


@st.composite
def input_batches(draw, d_in: int) -> list[torch.Tensor]:
    """1-5 batches of 4 examples whose columns span decades, with zero and repeated columns."""
    steps = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    batches = []
    for _ in range(steps):
        x = torch.randn(4, d_in, generator=g, dtype=torch.float64)
        x = x * torch.logspace(0.0, -draw(st.floats(0.0, 6.0)), d_in, dtype=torch.float64)
        if d_in > 1 and draw(st.booleans()):
            x[:, -1] = x[:, 0]  # a repeated feature: a singular activation factor
        if draw(st.booleans()):
            x[:, draw(st.integers(0, d_in - 1))] = 0.0
        batches.append(x * 10.0 ** draw(st.integers(-4, 3)))
    return batches


@pytest.mark.parametrize("name", MODEL_NAMES)
@SETTINGS
@given(
    data=st.data(),
    dims=st.sampled_from([(1, 1), (1, 9), (9, 1), (2, 30), (30, 2)]),
    dtype=st.sampled_from(DTYPES),
)
def test_model_aware_optimizers_stay_finite_on_degenerate_inputs(name, data, dims, dtype):
    d_in, d_out = dims
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out).to(dtype)
    opt = gd.create(name, model, **({"loss": "mse"} if name == "natural_gradient" else {}))
    target = torch.randn(4, d_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    for x in data.draw(input_batches(d_in)):
        opt.zero_grad()
        ((model(x.to(dtype)) - target) ** 2).mean().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), (name, dims, dtype)
    assert finite_state(opt)


@SETTINGS
@given(
    shape=st.sampled_from([(1, 1), (1, 30), (30, 1), (5, 7), (3, 4, 6)]),
    log_scale=st.integers(-30, 30),
    rank=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_newton_schulz_of_a_finite_matrix_is_finite(shape, log_scale, rank, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape[-2:]
    low = torch.randn(*shape[:-2], m, rank, generator=g) @ torch.randn(
        *shape[:-2], rank, n, generator=g
    )
    G = low * 10.0**log_scale
    assert torch.isfinite(G).all()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.isfinite(newton_schulz(G, dtype=dtype)).all()
