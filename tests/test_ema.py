"""Weight EMA: the closed-form average, swapping in and out, batch norm, state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from guided_descent import EMA
from guided_descent.ema import warmup_decay


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("warmup", [False, True])
def test_equals_the_closed_form_average(warmup):
    model = _model()
    gamma = 0.9
    ema = EMA(model, decay=gamma, warmup=warmup)
    gen = torch.Generator().manual_seed(1)
    thetas = [_weights(model)]  # θ_0
    for _ in range(12):
        _perturb(model, gen)
        thetas.append(_weights(model))
        ema.update()
    # Closed form: ema_T = Σ_k c_k θ_k with c_0 = Π_k d_k and c_k = (1 - d_k) Π_{j>k} d_j.
    decays = [warmup_decay(gamma, k - 1) if warmup else gamma for k in range(1, 13)]
    coeffs = []
    for k in range(13):
        tail = 1.0
        for d in decays[k:]:
            tail *= d
        coeffs.append(tail if k == 0 else (1.0 - decays[k - 1]) * tail)
    assert sum(coeffs) == pytest.approx(1.0)
    for i, p in enumerate(ema.module.parameters()):
        expected = sum(c * theta[i] for c, theta in zip(coeffs, thetas, strict=True))
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
    if not warmup:
        # Constant decay: γ^T θ_0 + (1 - γ) Σ γ^(T-k) θ_k.
        T = 12
        first = next(iter(ema.module.parameters()))
        direct = gamma**T * thetas[0][0] + sum(
            (1 - gamma) * gamma ** (T - k) * thetas[k][0] for k in range(1, T + 1)
        )
        torch.testing.assert_close(first, direct, rtol=1e-12, atol=1e-12)


def test_warmup_decay_values():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.5, 100) == 0.5
    ema = EMA(_model(), decay=0.99)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.99
    assert EMA(_model(), decay=0.99, warmup=False).decay_at(0) == 0.99


def test_swap_restores_the_exact_training_weights():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    ema = EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.randn(32, 4)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update()
    before = copy.deepcopy(model.state_dict())
    with ema.swapped() as m:
        assert m is model
        for p, q in zip(model.parameters(), ema.module.parameters(), strict=True):
            assert torch.equal(p, q)
        assert not torch.equal(model[0].weight, before["0.weight"])
        model.eval()
        model(x)
    model.train()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key  # bit for bit
    # The optimizer still holds the same parameter objects and can go on.
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_swap_restores_on_error_and_refuses_nesting():
    model = _model()
    ema = EMA(model, decay=0.5)
    _perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    before = _weights(model)
    with pytest.raises(KeyError):
        with ema.swapped():
            raise KeyError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with ema.swapped():
        with pytest.raises(RuntimeError, match="already"):
            with ema.swapped():
                pass
        with pytest.raises(RuntimeError, match="update"):
            ema.update()


def test_state_dict_round_trip_and_identical_continuation():
    gen_a = torch.Generator().manual_seed(3)
    model = _model()
    ema = EMA(model, decay=0.95)
    for _ in range(5):
        _perturb(model, gen_a)
        ema.update()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = _model()
    fresh.load_state_dict(saved["model"])
    other = EMA(fresh, decay=0.95)
    other.load_state_dict(saved["ema"])
    assert other.num_updates == ema.num_updates == 5
    gen_b = torch.Generator().manual_seed(9)
    gen_c = torch.Generator().manual_seed(9)
    for _ in range(4):  # the warm-up decay continues from update 5 in both
        _perturb(model, gen_b)
        ema.update()
        _perturb(fresh, gen_c)
        other.update()
    for p, q in zip(ema.module.parameters(), other.module.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(), decay=0.9).load_state_dict(saved["ema"])


def test_refresh_batchnorm_recomputes_statistics_for_the_averaged_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update()
    batches = [torch.randn(64, 3) for _ in range(4)]
    ema.refresh_batchnorm(batches)
    # update_bn: a cumulative average over the pass, of the averaged layer's batch means.
    with torch.no_grad():
        acts = torch.stack([ema.module[0](b) for b in batches])  # (4, 64, 4) float32
    # BatchNorm's batch means and ours sum 64 values in whatever order each kernel likes: each
    # errs by at most γ_64 max|x|; the running average over 4 batches adds ~4 roundings.
    u = torch.finfo(torch.float32).eps / 2
    tol = 2 * (64 + 4) * u * acts.abs().max().item()
    torch.testing.assert_close(ema.module[1].running_mean, acts.mean(1).mean(0), atol=tol, rtol=0)
    assert not torch.allclose(model[1].running_mean, ema.module[1].running_mean)


def test_copy_to_and_validation():
    model = _model()
    ema = EMA(model, decay=0.5)
    _perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    target = _model()
    ema.copy_to(target)
    for p, q in zip(target.parameters(), ema.module.parameters(), strict=True):
        assert torch.equal(p, q)
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="decay"):
            EMA(model, decay=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        EMA([torch.zeros(2)])  # type: ignore[arg-type]
    # The averaged copy never builds a graph.
    assert not any(p.requires_grad for p in ema.module.parameters())
