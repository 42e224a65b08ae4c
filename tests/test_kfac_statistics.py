"""K-FAC's factors do not depend on how a batch is split or how its loss is reduced.

The invariance under test (see :mod:`guided_descent.optimizers.kfac`): the factors of one step
are those of the whole batch behind it, whether that batch arrives in one backward pass or in
``k`` micro-batches with ``(loss / k).backward()``, and whether the loss is a mean (with
``loss_reduction="mean"``) or a sum (with ``"sum"``) over the rows (tokens) of a Linear layer or
the examples of a Conv2d layer.

Tolerances. A factor entry ``F_ij = Σ_r a_ri a_rj / n`` is a sum of ``n`` float32 products; each
split of the batch computes it (and the rows ``a_r`` themselves, through the backward pass) with
its own rounding. The rounding of such a sum in any order is at most ``γ_n Σ_r |a_ri a_rj| / n``
with ``γ_n ≈ n u`` (``u = 2⁻²⁴``), and ``Σ_r |a_ri a_rj| / n <= sqrt(F_ii F_jj)`` (Cauchy-Schwarz),
so two computations differ by at most ``2 γ_n sqrt(F_ii F_jj)`` plus what the rows' own rounding
adds: they come out of a backward pass of depth ``L`` over widths ``<= w``, a relative error of
about ``L w u`` each (no cancellation beyond that of the products). :func:`assert_same_factor`
uses ``4 (n + L w) u`` per entry, relative to ``sqrt(F_ii F_jj)``. The defect this file guards
against is a factor ``k²`` too small (a relative error of 0.75 or more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.kfac import KFAC

U32 = 2.0**-24  # unit roundoff of float32
EXACT = dict(lr=1.0, momentum=0.0, stat_decay=0.0, kl_clip=None, weight_decay=0.0)
KS = (1, 2, 4)


def assert_same_factor(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """``actual`` equals ``expected`` up to float32 rounding of ``terms``-long Gram sums."""
    assert actual.shape == expected.shape
    scale = expected.diagonal().clamp_min(0).sqrt()
    bound = 4 * terms * U32 * torch.outer(scale, scale) + 1e-30
    excess = ((actual - expected).abs() / bound).max().item()
    assert excess <= 1.0, f"factors differ by {excess:.3g}x the float32 bound"


def factors(opt: KFAC) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        layer.name: (opt.state[layer.weight]["kfac.A"], opt.state[layer.weight]["kfac.S"])
        for layer in opt._layers
    }


def one_step(make, data, loss_of, k: int, reduction: str, **kw) -> tuple[dict, list]:
    """Factors and gradients of one step over ``data`` split into ``k`` micro-batches."""
    model = make()
    opt = gd.create("kfac", model, loss_reduction=reduction, **{**EXACT, **kw})
    opt.zero_grad()
    for part in zip(*(t.chunk(k) for t in data), strict=True):
        loss = loss_of(model, *part, reduction)
        # A mean loss is divided by k (the usual accumulation); a sum needs nothing.
        (loss / k if reduction == "mean" else loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return factors(opt), grads


def check_invariance(make, data, loss_of, terms: int, **kw) -> None:
    reference, ref_grads = one_step(make, data, loss_of, 1, "mean", **kw)
    for k in KS:
        for reduction in ("mean", "sum"):
            if (k, reduction) == (1, "mean"):
                continue
            got, grads = one_step(make, data, loss_of, k, reduction, **kw)
            if reduction == "mean":
                # Sanity: the gradients are those of the whole batch (so only K-FAC can differ).
                for g, r in zip(grads, ref_grads, strict=True):
                    torch.testing.assert_close(g, r, rtol=terms * U32 * 8, atol=1e-7)
            for name, (A, S) in reference.items():
                assert_same_factor(got[name][0], A, terms)
                assert_same_factor(got[name][1], S, terms)


# ------------------------------------------------------------------------------ models


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def classify(model, x, y, reduction):
    return F.cross_entropy(model(x), y, reduction=reduction)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )


class TokenModel(nn.Module):
    """Embedding -> Linear on (B, T, d) -> Linear to logits (B, T, V): a token is a row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(x))))


def next_token(model, x, y, reduction):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction=reduction)


def data(*shapes_and_classes, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in shapes_and_classes:
        if isinstance(spec, int):  # class labels in range(spec)
            out.append(torch.randint(0, spec, (n,), generator=g))
        else:
            out.append(torch.randn(n, *spec, generator=g))
    return out


# ------------------------------------------------------------------------------ tests


def test_linear_factors_do_not_depend_on_accumulation_or_reduction():
    check_invariance(mlp, data((6,), 4), classify, terms=32 + 3 * 16)


def test_conv2d_factors_do_not_depend_on_accumulation_or_reduction():
    # S sums over output positions (up to 36 of them) and averages over the 32 examples.
    check_invariance(cnn, data((2, 6, 6), 3), classify, terms=32 * 36 + 3 * 36)


def test_sequence_factors_do_not_depend_on_accumulation_or_reduction():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (16, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]  # 16 sequences of 8 tokens: 128 rows per layer
    check_invariance(TokenModel, (x, y), next_token, terms=128 + 2 * 16)


def test_sequence_factor_is_the_per_token_second_moment():
    """The reference: S of the head is the mean over tokens of δ δᵀ, δ = ∂ℓ_token/∂logits."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (16, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = TokenModel().double()
    with torch.no_grad():
        p = torch.softmax(model(x), -1).flatten(0, 1)  # (128, 11), before the step
    opt = gd.create("kfac", model, **EXACT)
    opt.zero_grad()
    for xm, ym in zip(x.chunk(4), y.chunk(4), strict=True):
        (next_token(model, xm, ym, "mean") / 4).backward()
    opt.step()
    delta = p - F.one_hot(y.flatten(), 11).double()  # per-token gradient of the token's loss
    S = opt.state[model.head.weight]["kfac.S"]
    # float64 throughout: 128-term sums, 1e-12 is far above their rounding (~128 · 1e-16).
    torch.testing.assert_close(S, delta.T @ delta / 128, rtol=1e-12, atol=1e-14)


def test_sampled_fisher_is_invariant_to_accumulation():
    """Each sample_fisher / fisher_backward call is its own loss: no division by k is needed."""
    x, y = data((6,), 4)

    def run(k: int, reduction: str) -> dict:
        model = mlp()
        opt = gd.create("kfac", model, fisher="sampled", loss_reduction=reduction, **EXACT)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
            out = model(xm)
            # Fixed "sampled" targets, so that every split draws the same ones.
            opt.fisher_backward(F.cross_entropy(out, ym, reduction=reduction))
            (F.cross_entropy(out, ym) / k).backward()
        opt.step()
        return factors(opt)

    reference = run(1, "mean")
    # The sampled path with the training labels as targets is the empirical Fisher.
    empirical, _ = one_step(mlp, (x, y), classify, 1, "mean")
    for name, (_, S) in reference.items():
        assert_same_factor(S, empirical[name][1], 32 + 3 * 16)
    for k in KS:
        for reduction in ("mean", "sum"):
            got = run(k, reduction)
            for name, (A, S) in reference.items():
                assert_same_factor(got[name][0], A, 32 + 3 * 16)
                assert_same_factor(got[name][1], S, 32 + 3 * 16)


def test_loss_reduction_is_validated_and_documented():
    with pytest.raises(ValueError, match="loss_reduction.*'none'"):
        gd.create("kfac", mlp(), loss_reduction="none")
    assert "loss_reduction" in KFAC.__doc__
