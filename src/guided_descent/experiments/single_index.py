"""``single-index``: one feature-learning step under anisotropic inputs (EXPERIMENTS.md §2).

Data ``x ~ N(0, Σ_x)`` (rotated, eigenvalues log-spaced in ``[1/κ, 1]``, ``tr Σ_x = d``),
``y = σ⋆(⟨β⋆, x⟩) + ε``; a two-layer student ``f(x) = aᵀσ(Wx)/√N`` starts from the symmetric
initialisation (paired neurons, ``f ≡ 0``). Step one moves the first layer once on ``n₁ = ψ·d``
samples, by one of these rules (the *methods*):

* ``sgd`` -- ``W₁ = W₀ - η ∇_W L̂``;
* ``preconditioned`` -- ``W₁ = W₀ - η ∇_W L̂ (Σ̂_x + λI)⁻¹``, ``Σ̂_x`` the second moment of the
  same ``n₁`` inputs and ``λ = damping · tr(Σ̂_x)/d`` (see :class:`Config`);
* ``oracle`` -- ``W₁ = W₀ - η ∇_W L̂ Σ_x⁻¹`` with the true covariance;
* ``adam`` -- one step of torch's Adam on ``∇_W L̂`` (sign-like: ``-g/(|g| + eps)``);
* ``batchnorm`` -- one SGD step for the student with batch norm on the pre-activations,
  ``aᵀσ(BN(Wx))/√N`` (full-batch statistics of the ``n₁`` samples);
* ``random_features`` -- no step, ``W₁ = W₀`` (the baseline for step two only).

The step size. The alignment metric does not depend on ``η``, but step two does, and the raw
updates of the methods differ in scale by orders of magnitude (Adam's has entries ``±η``, the
preconditioned one is the gradient times ``Σ̂⁻¹``). So every method's ``η`` is set per seed and
cell so that the update's top singular value is ``step_scale · √N``: with ``W₀``'s unit rows and
``a ~ N(0, 1)``, a typical neuron then moves by about ``step_scale · |a_j|`` along the spike, and
the spike dominates ``W₁``'s spectrum (``‖W₀‖₂ ≈ 1 + √(N/d)``, 2.4 at the defaults, against
``√N = 32``). This is the large-step regime of one-step feature-learning analyses
(``η = Θ(√N)``, Ba et al. 2022, arXiv 2205.01445), with the constant equalised across methods so
that step two compares directions, not step lengths. The ``η`` used are recorded.

Step two fits ``a`` by ridge regression on ``σ(W₁x)/√N`` (``σ(BN(W₁x))/√N`` for ``batchnorm``,
normalised with the step-two training set's statistics) on fresh samples; the penalty is picked
per fit from ``ridge_penalties`` on a validation set and the test MSE is measured on a third set.

Choices that are ours, fixed before any run (their reasons):

* student ``σ = tanh`` (odd, like the default target, with ``E[σ'] ≠ 0`` so the spike exists;
  use ``--activation relu`` for a relu target, whose even part odd features cannot express) and
  ``a ~ N(0, 1)`` (the usual choice of one-step analyses; it spreads the neurons' step lengths);
* ``λ = 0.01 · tr(Σ̂_x)/d``: below the smallest eigenvalue of ``Σ_x`` at κ = 100
  (``≈ 0.047 · tr/d``), so the preconditioner reaches the whole spectrum at every κ of the
  protocol, yet ``(Σ̂_x + λI)⁻¹`` stays bounded by ``100 d / tr Σ̂_x`` at ψ = 1, where
  ``Σ̂_x`` from ``n₁ = d`` samples is nearly singular;
* Adam with torch's default ``eps = 1e-8``: it is how Adam is used, and the median gradient
  entry is 10⁴-10⁵ times larger, so the step is the sign of the gradient (the ratio is recorded;
  ``lr`` only scales the step and is set by the normalisation above); a large
  eps would turn Adam back into SGD (``g/eps``), which says nothing about Adam;
* step two on ``n₂ = 2N`` fresh samples (twice the number of fitted weights, so the fit is
  overdetermined and its variance small next to the differences between methods), ``N/2``
  validation and ``2N`` test samples, and a penalty grid of 10⁻⁴ … 10 in units of the mean
  eigenvalue of the feature Gram (the top of the grid, 10, was added after a first quick run
  picked 1, the old top, for some fits: a grid whose edge wins is too short; no claim threshold
  moved).

Pairing: per seed, ``Q``, ``β⋆``, ``W₀``, ``a`` and the standard normal draws behind every data
set are shared by all κ, ψ and methods; the step-one data sets of the ψ are nested prefixes of one
draw, so a gradient sum over the largest gives every smaller one on the way.

``metrics.jsonl`` gets one ``cell`` record per (method, κ, ψ, seed) (``random_features``: one per
(κ, seed), ``psi`` null); ``summary.json`` the per-seed arrays, medians and the claims.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor

from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import Claim, MetricsWriter, RunDir, require_seeds
from guided_descent.linalg import inverse_root
from guided_descent.tasks import single_index as task

METHODS: tuple[str, ...] = (
    "sgd",
    "preconditioned",
    "oracle",
    "adam",
    "batchnorm",
    "random_features",
)
LABELS: dict[str, str] = {
    "sgd": "SGD",
    "preconditioned": "layer-wise preconditioned",
    "oracle": "oracle Σ_x⁻¹",
    "adam": "Adam (one step)",
    "batchnorm": "SGD + batch norm",
    "random_features": "random features (W₁ = W₀)",
}
# Methods that take a step (all but the random-features baseline).
STEPPED: tuple[str, ...] = tuple(m for m in METHODS if m != "random_features")

# Claim thresholds, fixed by EXPERIMENTS.md §2 before any run.
CEILING_SLACK = 0.02  # SGD's alignment <= ceiling + 0.02
PRECONDITIONED_GAIN = 0.1  # preconditioned >= SGD + 0.1 ...
PRECONDITIONED_FLOOR = 0.9  # ... and >= 0.9
ISOTROPIC_AGREEMENT = 0.05  # |preconditioned - SGD| <= 0.05 at κ = 1
BASELINE_GAP = 0.1  # batch norm and Adam stay >= 0.1 below the preconditioned alignment
# The cells the claims look at.
ANISOTROPIC_KAPPA = 10.0  # κ >= 10 ...
ANISOTROPIC_PSI = 4.0  # ... and ψ >= 4
ISOTROPIC_PSI = 16.0  # κ = 1 and ψ >= 16


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """One step of SGD, layer-wise preconditioning, an oracle, Adam and batch norm on a
    single-index model with anisotropic inputs: spike alignment with β⋆ and test MSE."""

    optimizers: tuple[str, ...] = option(
        METHODS,
        "step-one methods: sgd, preconditioned ((Σ̂+λI)⁻¹), oracle (Σ⁻¹), adam, batchnorm, "
        "random_features (no step)",
    )
    seeds: int = option(5, "number of seeds (0, 1, ..., N-1); each draws Q, β⋆, W₀, a and data")
    steps: int = option(1, "gradient steps in step one; the protocol takes exactly one")
    dim: int = option(512, "input dimension d")
    width: int = option(1024, "student width N (even: N/2 rows of W₀, each used twice)")
    psis: tuple[float, ...] = option(
        (1.0, 4.0, 16.0, 64.0), "step-one sample ratios ψ (n₁ = ψ·d samples)"
    )
    kappas: tuple[float, ...] = option(
        (1.0, 10.0, 100.0), "input condition numbers κ_x (eigenvalues log-spaced in [1/κ, 1])"
    )
    target: str = option("tanh", "target link σ⋆: tanh or relu")
    activation: str = option(
        "tanh",
        "student activation σ: tanh or relu (tanh features are odd; use relu for a relu target)",
    )
    noise: float = option(0.1, "standard deviation of the label noise ε")
    damping: float = option(
        1e-2,
        "preconditioned method's λ in units of tr(Σ̂)/d; 1e-2 sits below the smallest "
        "eigenvalue of Σ_x at κ = 100 (0.047 tr/d), so it undoes the whole spectrum, yet keeps "
        "(Σ̂+λI)⁻¹ bounded at ψ = 1 where Σ̂ is nearly singular",
    )
    step_scale: float = option(
        1.0, "every method's η makes the update's top singular value step_scale·√N"
    )
    adam_eps: float = option(1e-8, "Adam's eps (torch's default: the first step is sign-like)")
    ridge_samples: int = option(2048, "step-two training samples n₂ (fresh)")
    val_samples: int = option(512, "step-two validation samples (picks the ridge penalty)")
    test_samples: int = option(2048, "test samples for the MSE")
    ridge_penalties: tuple[float, ...] = option(
        (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        "step-two ridge penalties, in units of the mean eigenvalue of the feature Gram",
    )
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        for name in self.optimizers:
            if name not in METHODS:
                raise ValueError(
                    f"unknown method {name!r} for single-index; accepted: {', '.join(METHODS)}"
                )
        super().__post_init__()
        if self.steps != 1:
            raise ValueError(f"steps must be 1 (one feature-learning step), got {self.steps!r}")
        if not _is_int(self.dim) or self.dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {self.dim!r}")
        if not _is_int(self.width) or self.width < 2 or self.width % 2:
            raise ValueError(f"width must be an even integer >= 2, got {self.width!r}")
        if not self.psis or not all(_is_real(p) and p > 0 for p in self.psis):
            raise ValueError(f"psis must be finite numbers > 0, got {self.psis!r}")
        if len(set(self.psis)) != len(self.psis):
            raise ValueError(f"psis lists a value twice: {self.psis!r}")
        if not self.kappas or not all(_is_real(k) and k >= 1 for k in self.kappas):
            raise ValueError(f"kappas must be finite numbers >= 1, got {self.kappas!r}")
        if len(set(self.kappas)) != len(self.kappas):
            raise ValueError(f"kappas lists a value twice: {self.kappas!r}")
        for field_name in ("target", "activation"):
            value = getattr(self, field_name)
            if value not in task.ACTIVATIONS:
                raise ValueError(
                    f"{field_name} must be one of {', '.join(task.ACTIVATIONS)}, got {value!r}"
                )
        for field_name, lo in (("noise", 0.0), ("damping", 0.0), ("adam_eps", 0.0)):
            value = getattr(self, field_name)
            if not _is_real(value) or value < lo:
                raise ValueError(f"{field_name} must be a finite number >= {lo}, got {value!r}")
        if not _is_real(self.step_scale) or self.step_scale <= 0:
            raise ValueError(f"step_scale must be a finite number > 0, got {self.step_scale!r}")
        for field_name in ("ridge_samples", "val_samples", "test_samples"):
            value = getattr(self, field_name)
            if not _is_int(value) or value < 2:
                raise ValueError(f"{field_name} must be an integer >= 2, got {value!r}")
        if not self.ridge_penalties or not all(_is_real(p) and p > 0 for p in self.ridge_penalties):
            raise ValueError(
                f"ridge_penalties must be finite numbers > 0, got {self.ridge_penalties!r}"
            )

    @classmethod
    def quick(cls) -> Self:
        """d = 128, N = 256, step-two sets scaled with N; same ψ, κ and 5 seeds."""
        return cls(dim=128, width=256, ridge_samples=512, val_samples=128, test_samples=512)

    def sample_size(self, psi: float) -> int:
        """``n₁ = ψ·d``, rounded, at least 1."""
        return max(1, round(psi * self.dim))


def _median(x: Sequence[float]) -> float:
    return float(np.median(np.asarray(x, dtype=float)))


def _direction(
    method: str,
    grad: Tensor,
    sigma_hat: Tensor,
    problems: task.Problems,
    config: Config,
    batchnorm_grad: Tensor | None,
) -> Tensor:
    """The raw step-one update ``W₁ - W₀`` at ``η = 1`` ``(S, N, d)`` float32.

    ``grad`` ``(S, N, d)`` float64 is ``∇_W L̂`` of the plain student; ``sigma_hat`` ``(S, d, d)``
    float64 the second moment of the same inputs.
    """
    match method:
        case "sgd":
            return (-grad).float()
        case "preconditioned":
            # λ relative to the mean eigenvalue tr(Σ̂)/d: invariant to the scale of x. The
            # library's inverse_root adds an absolute eps, so work on Σ̂ / mean and undo it.
            mean = sigma_hat.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]  # (S, 1, 1)
            m = inverse_root(sigma_hat / mean, 1.0, eps=config.damping) / mean
            return (-grad @ m).float()
        case "oracle":
            return (-grad @ problems.covariance_inverse).float()
        case "adam":
            return task.adam_first_step(grad.float(), config.adam_eps)
        case "batchnorm":
            assert batchnorm_grad is not None
            return -batchnorm_grad
    raise ValueError(f"method {method!r} takes no step")


@dataclass
class _StepTwoData:
    """Fresh samples for step two at one κ: train, validation and test inputs ``(S, n, d)`` and
    labels ``(S, n)``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _step_two(w1: Tensor, data: _StepTwoData, config: Config, batchnorm: bool) -> task.RidgeFit:
    act = config.activation
    stats = task.batchnorm_stats(w1, data.x_train) if batchnorm else None
    return task.ridge_path(
        task.features(w1, data.x_train, act, stats),
        data.y_train,
        task.features(w1, data.x_val, act, stats),
        data.y_val,
        task.features(w1, data.x_test, act, stats),
        data.y_test,
        config.ridge_penalties,
    )


def _run_kappa(
    config: Config,
    kappa: float,
    device: torch.device,
    metrics: MetricsWriter,
    bar: Any,
) -> dict[str, Any]:
    """Every method, ψ and seed at one κ; returns this κ's part of ``summary.json``."""
    seeds = list(range(config.seeds))
    d, width = config.dim, config.width
    problems = task.make_problems(kappa, d, seeds).to(device)
    covariance = problems.covariance
    ceiling = task.ceiling(covariance, problems.beta)  # (S,)
    w0, a = task.symmetric_init(width, d, seeds, device)
    sizes = [config.sample_size(p) for p in config.psis]

    r, xi = task.standard_draws(seeds, "step-one", max(sizes), d, device)
    x1, y1 = task.sample(problems, r, xi, config.target, config.noise)
    del r, xi
    n2, nv, nt = config.ridge_samples, config.val_samples, config.test_samples
    r, xi = task.standard_draws(seeds, "step-two", n2 + nv + nt, d, device)
    x2, y2 = task.sample(problems, r, xi, config.target, config.noise)
    del r, xi
    data = _StepTwoData(
        x2[:, :n2], y2[:, :n2], x2[:, n2 : n2 + nv], y2[:, n2 : n2 + nv],
        x2[:, n2 + nv :], y2[:, n2 + nv :],
    )  # fmt: skip
    sums = task.nested_gradient_sums(w0, a, x1, y1, sizes, config.activation)

    out: dict[str, Any] = {
        "ceiling": ceiling.tolist(),
        "sign_limit": task.sign_limit(covariance, problems.beta).tolist(),
        "target_variance": data.y_test.var(dim=-1).tolist(),
        "alignment": {},
        "test_mse": {},
        "val_mse": {},
        "penalty": {},
        "eta": {},
        "adam_gradient_over_eps": [],
    }
    stepped = [m for m in config.optimizers if m in STEPPED]
    for m in stepped:
        for key in ("alignment", "test_mse", "val_mse", "penalty", "eta"):
            out[key][m] = []

    for psi, n in zip(config.psis, sizes, strict=True):
        g_sum, xx_sum = sums[n]
        # ∇_W L̂ = -(1/(n√N)) Σᵢ rᵢ (a ⊙ σ'(W₀xᵢ)) xᵢᵀ
        grad = -g_sum / (n * math.sqrt(width))  # (S, N, d) float64
        sigma_hat = xx_sum / n
        bn_grad = None
        if "batchnorm" in stepped:
            bn_grad = task.batchnorm_gradient(w0, a, x1[:, :n], y1[:, :n], config.activation)
        if "adam" in stepped:
            # How far the first Adam step is from a pure sign step: |g| / eps per entry.
            out["adam_gradient_over_eps"].append(
                float(grad.abs().median()) / config.adam_eps if config.adam_eps > 0 else math.inf
            )
        for m in stepped:
            delta = _direction(m, grad, sigma_hat, problems, config, bn_grad)
            v, s1 = task.top_direction(delta)
            eta = config.step_scale * math.sqrt(width) / s1  # (S,) float64
            w1 = w0 + eta.to(delta.dtype)[:, None, None] * delta
            align = task.alignment(v, problems.beta)
            fit = _step_two(w1, data, config, batchnorm=(m == "batchnorm"))
            for key, value in (
                ("alignment", align),
                ("test_mse", fit.test_mse),
                ("val_mse", fit.val_mse),
                ("penalty", fit.penalty),
                ("eta", eta),
            ):
                out[key][m].append(value.tolist())
            for s in seeds:
                metrics.write(
                    event="cell",
                    method=m,
                    kappa=kappa,
                    psi=psi,
                    n1=n,
                    seed=s,
                    alignment=align[s].item(),
                    ceiling=ceiling[s].item(),
                    test_mse=fit.test_mse[s].item(),
                    val_mse=fit.val_mse[s].item(),
                    ridge_penalty=fit.penalty[s].item(),
                    eta=eta[s].item(),
                )
            bar.update(1)
    if "random_features" in config.optimizers:
        fit = _step_two(w0, data, config, batchnorm=False)
        out["random_features"] = {
            "test_mse": fit.test_mse.tolist(),
            "val_mse": fit.val_mse.tolist(),
            "penalty": fit.penalty.tolist(),
        }
        for s in seeds:
            metrics.write(
                event="cell",
                method="random_features",
                kappa=kappa,
                psi=None,
                n1=0,
                seed=s,
                alignment=None,
                ceiling=ceiling[s].item(),
                test_mse=fit.test_mse[s].item(),
                val_mse=fit.val_mse[s].item(),
                ridge_penalty=fit.penalty[s].item(),
                eta=0.0,
            )
        bar.update(1)
    return out


def _cells(
    kappas: Sequence[float], psis: Sequence[float], kappa_ok: Any, psi_ok: Any
) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i, k in enumerate(kappas)
        for j, p in enumerate(psis)
        if kappa_ok(k) and psi_ok(p)
    ]


def _cell_name(kappas: Sequence[float], psis: Sequence[float], cell: tuple[int, int]) -> str:
    i, j = cell
    return f"κ={kappas[i]:g}, ψ={psis[j]:g}"


def claims(results: dict[str, Any]) -> list[Claim]:
    """The §2 claims, aggregated as fixed before any run: per cell the median over seeds, then
    the worst cell of the claim's range. A claim whose methods or cells were not run is left
    out rather than failed."""
    kappas, psis = results["kappas"], results["psis"]
    align = results["alignment"]
    mse = results["test_mse"]
    med = {m: np.median(np.asarray(v, dtype=float), axis=-1) for m, v in align.items()}
    # (κ, ψ, seed) arrays
    ceiling = np.asarray(results["ceiling"], dtype=float)[:, None, :]
    aniso = _cells(kappas, psis, lambda k: k >= ANISOTROPIC_KAPPA, lambda p: p >= ANISOTROPIC_PSI)
    iso = _cells(kappas, psis, lambda k: k == 1.0, lambda p: p >= ISOTROPIC_PSI)
    out: list[Claim] = []

    def worst(values: dict[tuple[int, int], float], largest: bool) -> tuple[float, str]:
        cell = (max if largest else min)(values, key=values.__getitem__)
        return float(values[cell]), _cell_name(kappas, psis, cell)

    if aniso and "sgd" in align:
        excess = np.median(np.asarray(align["sgd"], dtype=float) - ceiling, axis=-1)
        value, where = worst({c: excess[c] for c in aniso}, largest=True)
        out.append(
            Claim(
                name="sgd_at_ceiling",
                statement=(
                    "at κ ≥ 10, ψ ≥ 4 SGD's spike is no better aligned than Σ_xβ⋆: value = "
                    "largest over those cells of the median over seeds of (SGD alignment − "
                    f"ceiling cos∠(Σ_xβ⋆, β⋆)); worst cell {where}"
                ),
                value=value,
                op="<=",
                threshold=CEILING_SLACK,
            )
        )
    if aniso and "sgd" in align and "preconditioned" in align:
        margin = {
            c: med["preconditioned"][c]
            - max(med["sgd"][c] + PRECONDITIONED_GAIN, PRECONDITIONED_FLOOR)
            for c in aniso
        }
        value, where = worst(margin, largest=False)
        out.append(
            Claim(
                name="preconditioned_beats_sgd",
                statement=(
                    "at κ ≥ 10, ψ ≥ 4 the preconditioned alignment is ≥ max(SGD + 0.1, 0.9): "
                    "value = smallest over those cells of median(preconditioned) − "
                    f"max(median(SGD) + 0.1, 0.9), medians over seeds; worst cell {where}"
                ),
                value=value,
                op=">=",
                threshold=0.0,
            )
        )
    if iso and "sgd" in align and "preconditioned" in align:
        gap = {c: abs(med["preconditioned"][c] - med["sgd"][c]) for c in iso}
        value, where = worst(gap, largest=True)
        out.append(
            Claim(
                name="isotropic_agreement",
                statement=(
                    "at κ = 1, ψ ≥ 16 (no bias to remove) SGD and the preconditioned step agree: "
                    "value = largest over those cells of |median(preconditioned) − median(SGD)|, "
                    f"medians over seeds; worst cell {where}"
                ),
                value=value,
                op="<=",
                threshold=ISOTROPIC_AGREEMENT,
            )
        )
    for m, name in (("batchnorm", "batch norm"), ("adam", "one Adam step")):
        if aniso and m in align and "preconditioned" in align:
            gap = {c: med["preconditioned"][c] - med[m][c] for c in aniso}
            value, where = worst(gap, largest=False)
            out.append(
                Claim(
                    name=f"{m}_below_preconditioned",
                    statement=(
                        f"at κ ≥ 10, ψ ≥ 4 {name} does not remove the bias: value = smallest "
                        f"over those cells of median(preconditioned) − median({m}) alignment, "
                        f"medians over seeds; worst cell {where}"
                    ),
                    value=value,
                    op=">=",
                    threshold=BASELINE_GAP,
                )
            )
    if aniso and "sgd" in mse and "preconditioned" in mse:
        mse_med = {m: np.median(np.asarray(v, dtype=float), axis=-1) for m, v in mse.items()}
        ratio = {c: mse_med["preconditioned"][c] / mse_med["sgd"][c] for c in aniso}
        value, where = worst(ratio, largest=True)
        out.append(
            Claim(
                name="mse_preconditioned_below_sgd",
                statement=(
                    "at κ ≥ 10, ψ ≥ 4 step two's test MSE is lower after the preconditioned step "
                    "than after SGD's: value = largest over those cells of median(MSE "
                    f"preconditioned) / median(MSE SGD), medians over seeds; worst cell {where}"
                ),
                value=value,
                op="<",
                threshold=1.0,
            )
        )
    return out


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Every κ, ψ, method and seed; then the summary with medians and claims."""
    device = torch.device(config.device)
    started = time.perf_counter()
    stepped = [m for m in config.optimizers if m in STEPPED]
    per_kappa = len(stepped) * len(config.psis) + ("random_features" in config.optimizers)
    total = per_kappa * len(config.kappas)
    by_kappa: list[dict[str, Any]] = []
    with (
        torch.no_grad(),
        run.metrics() as metrics,
        progress.bar(total, "single-index", unit="cell") as bar,
    ):
        for kappa in config.kappas:
            bar.set_postfix_str(f"κ={kappa:g}")
            by_kappa.append(_run_kappa(config, kappa, device, metrics, bar))

    def gather(key: str) -> dict[str, Any]:
        # {method: [κ][ψ][seed]}
        return {m: [k[key][m] for k in by_kappa] for m in stepped}

    results: dict[str, Any] = {
        "kappas": list(config.kappas),
        "psis": list(config.psis),
        "n1": [config.sample_size(p) for p in config.psis],
        "dim": config.dim,
        "width": config.width,
        "seeds": config.seeds,
        "methods": list(config.optimizers),
        "labels": {m: LABELS[m] for m in config.optimizers},
        "ceiling": [k["ceiling"] for k in by_kappa],
        "sign_limit": [k["sign_limit"] for k in by_kappa],
        "target_variance": [k["target_variance"] for k in by_kappa],
        "alignment": gather("alignment"),
        "test_mse": gather("test_mse"),
        "val_mse": gather("val_mse"),
        "penalty": gather("penalty"),
        "eta": gather("eta"),
        "adam_gradient_over_eps": [k["adam_gradient_over_eps"] for k in by_kappa],
        # Smallest eigenvalue of Σ_x per κ (the mean is 1): what λ / (tr/d) is compared with.
        "smallest_eigenvalue": [
            float(task.input_spectrum(k, config.dim)[0]) for k in config.kappas
        ],
        "damping": config.damping,
        "step_scale": config.step_scale,
        "ridge_penalties": list(config.ridge_penalties),
        "noise": config.noise,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if "random_features" in config.optimizers:
        results["random_features"] = {
            key: [k["random_features"][key] for k in by_kappa]
            for key in ("test_mse", "val_mse", "penalty")
        }
    results["medians"] = {
        "alignment": {
            m: np.median(np.asarray(v, dtype=float), axis=-1).tolist()
            for m, v in results["alignment"].items()
        },
        "test_mse": {
            m: np.median(np.asarray(v, dtype=float), axis=-1).tolist()
            for m, v in results["test_mse"].items()
        },
        "ceiling": [_median(c) for c in results["ceiling"]],
    }
    results["wall_seconds"] = time.perf_counter() - started
    run.write_summary(results, require_seeds(claims(results), config.seeds))


__all__ = ["LABELS", "METHODS", "STEPPED", "Config", "claims", "run"]
