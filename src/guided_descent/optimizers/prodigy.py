"""Prodigy: Adam with a learning rate it estimates itself (Mishchenko & Defazio 2023,
arXiv 2306.06101, Algorithm 3 "Prodigy (Adam version)").

Adam's step size is ``lr · d``, where ``d`` estimates the distance ``‖x_0 - x_*‖`` from the
start to a solution and only grows. With ``g`` the gradient, ``x_0`` the starting point and
``β3 = √β2`` by default::

    m <- β1 m + (1 - β1) d g                       v <- β2 v + (1 - β2) d² g²
    r <- β3 r + lr d² ⟨g, x_0 - x⟩                 s <- β3 s + lr d² g
    d <- max(d, d_coef · r / ‖s‖₁)                 x <- x - lr d m / (√v + d eps)

(the paper's ``(1 - β3)`` factors on ``r`` and ``s`` cancel in the ratio). ``lr`` is a factor on
the estimate: leave it at 1. Warm-up and decay schedules multiply ``lr`` as usual; Prodigy
itself needs neither (a ``growth_rate`` of e.g. 1.02 caps how fast ``d`` grows, which acts as a
warm-up). The schedule-free wrapper works with it: ``schedule_free("prodigy", model)`` weights
its average by ``lr · d``.

**Ours, tested against** ``prodigyopt`` **(v1.1.2, the authors' package), bit for bit.** The
operations are the package's, in its order (the running sums ``r`` and ``s`` are scaled by
``d/d0`` to keep them away from underflow, as there). We do not return the package's class:
its step reads two numbers to the host per parameter (``.item()`` on a dot product and on
``‖s‖₁``), which on an accelerator stalls the device once per parameter; ours reads all of them
at once, one host sync per step. It also writes the decayed gradient into ``p.grad`` with
coupled weight decay (DESIGN rule 3: never), prints to stdout when weight decay is on, and would
make the library depend on it. Where ours differs on purpose: a param group with ``lr = 0`` is
frozen (the package still applies decoupled weight decay to it at the global step size).

**Limits** (as in the package): one ``d`` for all param groups, so every group's ``lr`` must be
the same, or 0 to freeze it; FSDP2-sharded parameters are refused (each rank would estimate its
own ``d`` from its shard).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from guided_descent.distributed.dtensor import is_dtensor
from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.transforms.descend import step_rms


def _sliced(t: Tensor, slice_p: int) -> Tensor:
    """Every ``slice_p``-th entry of ``t`` flattened: the entries the statistics use."""
    return t.flatten()[::slice_p]


def prodigy_init(p: Tensor, slice_p: int, beta1: float) -> dict[str, Tensor | int]:
    """The state of a parameter at its first step (the package's keys and layout).

    ``p0`` is the starting point (a 0-d zero when ``p`` is all zeros, saving its memory),
    ``s`` the running sum of scaled gradients, both on every ``slice_p``-th entry; ``exp_avg``
    (only with ``beta1 > 0``) and ``exp_avg_sq`` Adam's moments.
    """
    state: dict[str, Tensor | int] = {"step": 0}
    state["s"] = torch.zeros_like(_sliced(p, slice_p)).detach()
    if p.any():
        state["p0"] = _sliced(p, slice_p).detach().clone()
    else:
        state["p0"] = torch.tensor(0, device=p.device, dtype=p.dtype)
    if beta1 > 0:
        state["exp_avg"] = torch.zeros_like(p).detach()
    state["exp_avg_sq"] = torch.zeros_like(p).detach()
    return state


def prodigy_statistics_(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    d: float,
    dlr: float,
    d0: float,
    beta1: float,
    beta2: float,
    beta3: float,
    slice_p: int,
    safeguard_warmup: bool,
) -> tuple[Tensor, Tensor]:
    """Update ``state``'s moments and ``s`` in place with ``grad``; return ``⟨g, p0 - p⟩`` and
    ``‖s‖₁`` as 0-d tensors in ``p``'s dtype (not yet read to the host: the caller reads every
    parameter's at once).
    """
    sliced_grad = _sliced(grad, slice_p)
    dot = torch.dot(sliced_grad, state["p0"] - _sliced(p, slice_p))
    if beta1 > 0:
        state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
    alpha = (d / d0) * d if safeguard_warmup else (d / d0) * dlr
    s = state["s"]
    s.mul_(beta3).add_(sliced_grad, alpha=alpha)
    return dot, s.abs().sum()


def prodigy_estimate(
    d: float,
    d0: float,
    d_max: float,
    numerator: float,
    denominator: float,
    *,
    d_coef: float,
    growth_rate: float,
) -> tuple[float, float, float]:
    """``(d, d_max, d_hat)`` after a step: ``d_hat = d_coef · r / ‖s‖₁``; ``d`` grows to the
    largest estimate so far, by at most ``growth_rate`` per step (the package's rule: at the
    first growth ``d`` jumps to ``d_hat`` unbounded)."""
    d_hat = d_coef * numerator / denominator
    if d == d0:
        d = max(d, d_hat)
    d_max = max(d_max, d_hat)
    return min(d_max, d * growth_rate), d_max, d_hat


def prodigy_step_(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    d: float,
    dlr: float,
    eps: float,
    weight_decay: float,
    decouple: bool,
    beta1: float,
) -> Tensor:
    """``p -= dlr · m / (√v + d·eps)`` (``dlr · d · g / ...`` without a first moment), after
    decoupled weight decay; returns the step's RMS (weight decay excluded) as a 0-d tensor."""
    state["step"] += 1
    denom = state["exp_avg_sq"].sqrt().add_(d * eps)
    if weight_decay != 0 and decouple:
        p.add_(p, alpha=-weight_decay * dlr)
    if beta1 > 0:
        p.addcdiv_(state["exp_avg"], denom, value=-dlr)
        return step_rms(torch.div(state["exp_avg"], denom, out=denom), dlr)
    p.addcdiv_(grad, denom, value=-dlr * d)
    return step_rms(torch.div(grad, denom, out=denom), dlr * d)


class Prodigy(GuardedOptimizer, torch.optim.Optimizer):
    """Prodigy (Mishchenko & Defazio 2023, arXiv 2306.06101): Adam whose step size ``lr · d``
    is estimated as it trains (see the module docstring for the rule).

    Args:
        params: parameters or param-group dicts (every group's ``lr`` the same, or 0).
        lr: a factor on the estimated step size. Default 1.0: leave it unless unstable.
        betas: Adam's ``(β1, β2)``. Default (0.9, 0.999).
        beta3: decay of the statistics ``r`` and ``s``; ``None``: ``√β2``.
        eps: added to ``√v`` (scaled by ``d``). Default 1e-8.
        weight_decay: decay of the weights. Default 0.
        decouple: AdamW-style decoupled decay (``p -= lr·d·wd·p``; default) or an L2 term
            added to the gradient.
        use_bias_correction: Adam's bias correction in the step size. Default off.
        safeguard_warmup: leave ``lr`` out of ``s`` (for schedules with a warm-up). Default off.
        d0: the initial estimate. Default 1e-6.
        d_coef: a factor on the estimate, the preferred way to tune (0.5 and 2 work too).
        growth_rate: ``d`` grows by at most this factor per step. Default ``inf``.
        slice_p: compute ``r`` and ``s`` on every ``slice_p``-th entry (memory; 11 is
            reasonable, an approximation for values > 1). Default 1.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"``.

    State per parameter: ``exp_avg`` (without it when ``β1 = 0``), ``exp_avg_sq`` (each the
    parameter's size), ``s`` and ``p0`` (``1/slice_p`` of it), ``step``. Per group: ``d``,
    ``d_max``, ``d_hat``, ``d_numerator``, ``d_denom``, ``k``.
    """

    STATE_NAME = "Prodigy"

    def __init__(
        self,
        params,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
        *,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(
            lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
            decouple=decouple, use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
            slice_p=slice_p,
        )
        validate_hyperparams("prodigy", hyper)
        if lr <= 0:
            raise ValueError(f"prodigy: lr must be > 0 (a factor on the estimate), got {lr!r}")
        self._init_guard(on_nonfinite)
        defaults = dict(hyper, d=d0, d_max=d0, d_numerator=0.0, k=0)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if any(is_dtensor(p) for p in group["params"]):
            raise ValueError(
                "prodigy: FSDP2-sharded (DTensor) parameters are not supported: each rank would "
                "estimate its own step size from its shard"
            )
        self._check_lrs()

    def _check_lrs(self) -> None:
        lrs = [float(g["lr"]) for g in self.param_groups]
        if any(lr not in (0.0, max(lrs)) for lr in lrs):
            raise ValueError(
                f"prodigy: every param group's lr must be the same (or 0 to freeze the group): "
                f"got {lrs}; Prodigy estimates one step size for all of them"
            )

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        shapes = {"exp_avg_sq": tuple(p.shape)}
        if group["betas"][0] > 0:
            shapes["exp_avg"] = tuple(p.shape)
        return ("step", "s", "p0", *shapes), shapes

    @torch.no_grad()
    def _update(self) -> None:
        self._check_lrs()  # a scheduler could have set them apart
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max = first["k"], first["d"], first["d_max"]
        lr = max(float(g["lr"]) for g in self.param_groups)
        bias_correction = 1.0
        if first["use_bias_correction"]:
            bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
        dlr = d * lr * bias_correction

        # Statistics of every parameter, then one read to the host (the package reads two
        # numbers per parameter); the sums are then formed in its order, in Python floats.
        stepped: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        scales, reads = [], []
        for group in self.param_groups:
            decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Prodigy does not support sparse gradients")
                grad = p.grad
                if decay != 0 and not group["decouple"]:
                    grad = grad.add(p, alpha=decay)  # a new tensor: p.grad is never modified
                state = self.state[p]
                if "step" not in state:
                    state.update(prodigy_init(p, group["slice_p"], beta1))
                if float(group["lr"]) > 0.0:
                    dot, s_norm = prodigy_statistics_(
                        p, grad, state, d=d, dlr=dlr, d0=group["d0"], beta1=beta1,
                        beta2=beta2, beta3=beta3, slice_p=group["slice_p"],
                        safeguard_warmup=group["safeguard_warmup"],
                    )
                    scales.append((d / group["d0"]) * dlr)
                    reads += [dot.to(torch.float64), s_norm.to(torch.float64)]
                    stepped.append((group, p, grad))
        values = torch.stack(reads).tolist() if reads else []
        delta_numerator = d_denom = 0.0
        for i, scale in enumerate(scales):
            delta_numerator += scale * values[2 * i]
            d_denom += values[2 * i + 1]
        if d_denom == 0:  # no gradient signal yet: no step (the package's rule)
            return
        numerator = first["d_numerator"] * beta3 + delta_numerator
        d, d_max, d_hat = prodigy_estimate(
            d, self.param_groups[-1]["d0"], d_max, numerator, d_denom,
            d_coef=first["d_coef"], growth_rate=first["growth_rate"],
        )
        for group in self.param_groups:
            group.update(d_numerator=numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
            group["k"] += 1
        for group, p, grad in stepped:
            rms = prodigy_step_(
                p, grad, self.state[p], d=d, dlr=dlr, eps=group["eps"],
                weight_decay=group["weight_decay"], decouple=group["decouple"], beta1=beta1,
            )
            self._observe(p, update_rms=rms)


SPEC = register(
    OptimizerSpec(
        name="prodigy",
        family="adaptive",
        rule="Adam with step lr*d, d = max(d, sum_t d_t²<g_t, x0 - x_t> / |sum_t d_t² g_t|_1) "
        "(EMAs with beta3); lr = 1",
        state="4x (first and second moments, s, x0; s and x0 1/slice_p)",
        state_buffers=4.0,
        reference="Mishchenko & Defazio 2023, arXiv 2306.06101",
        factory=Prodigy,
        defaults=dict(lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    )
)
