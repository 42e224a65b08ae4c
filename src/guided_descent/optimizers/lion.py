"""Lion: sign of an interpolated momentum (Chen et al. 2023, arXiv 2302.06675).

Update rule, for gradient ``g`` and momentum ``m`` (one buffer per parameter)::

    c = beta1 * m + (1 - beta1) * g          # the direction: interpolate, then take the sign
    p = p * (1 - lr * weight_decay)          # decoupled weight decay, as in AdamW
    p = p - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g          # the momentum kept for the next step

Every coordinate moves by exactly ``lr`` (or 0 where ``c`` is 0), so Lion wants a learning rate
3-10x smaller than AdamW's and, to keep ``lr * weight_decay`` equal, a 3-10x larger weight decay.

``cautious=True`` keeps only the coordinates of ``sign(c)`` that agree with ``g`` (rescaled by the
kept fraction: C-Lion, arXiv 2411.16085); ``cautious_weight_decay=True`` decays only where
``sign(c)`` and ``p`` agree (arXiv 2510.12402). Both are
:mod:`guided_descent.transforms.cautious`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from guided_descent.optimizers.compiled import check_compile_update, kernel
from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.transforms.cautious import (
    CAUTIOUS_OFF,
    cautious_update,
    decayed,
    with_group_keys,
)
from guided_descent.transforms.descend import step_rms
from guided_descent.transforms.masking import commit_
from guided_descent.transforms.state_dtype import (
    STATE_DTYPE_DEFAULT,
    compute_dtype,
    parse_state_dtype,
    state_zeros,
)


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    foreach: bool = False,
    ok: Tensor | None = None,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    compile_directions: bool = False,
) -> list[Tensor]:
    """Apply one Lion step in place to ``params`` and ``exp_avgs`` (functional form).

    Returns the RMS of each parameter's step ``lr · sign(c)`` (weight decay excluded) as 0-d
    tensors: ``lr`` times the square root of the fraction of non-zero signs, for diagnostics.
    ``ok`` (a 0-d bool tensor) commits the step only where it is true, leaving parameters and
    buffers bit-identical otherwise, without a host sync (:func:`~..transforms.masking.commit_`).
    ``cautious`` / ``cautious_weight_decay``: see the module docstring; either one takes the
    per-tensor path (the mask's kept fraction is per tensor). ``compile_directions``: compute
    the signs and the momentum (:func:`lion_directions_`) through ``torch.compile``
    (per-tensor path; see :mod:`guided_descent.optimizers.compiled`). So does a momentum stored
    in another dtype than its parameter's (``state_dtype``): it is read widened to at least
    float32, the step is the float32 step from that value, and the new momentum is rounded into
    the buffer once.
    """
    apart = any(m.dtype != p.dtype for p, m in zip(params, exp_avgs, strict=True))
    if foreach and not (cautious or cautious_weight_decay or compile_directions or apart):
        return _lion_foreach(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, ok)
    directions = kernel(lion_directions_, compile_directions)(
        grads, exp_avgs, beta1=beta1, beta2=beta2, maximize=maximize, ok=ok
    )
    return _lion_apply(
        params, grads, directions, lr, weight_decay, maximize, ok, cautious,
        cautious_weight_decay,
    )


def _step_rms(sign_norm: Tensor, numel: int, lr: float) -> Tensor:
    # ‖sign(c)‖ = sqrt(#non-zeros); the step's RMS is lr·‖sign(c)‖/sqrt(numel).
    norm = sign_norm.to(torch.promote_types(sign_norm.dtype, torch.float32))
    return norm * (lr / math.sqrt(numel)) if numel else norm * 0.0


def lion_directions_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    maximize: bool = False,
    ok: Tensor | None = None,
) -> list[Tensor]:
    """``sign(beta1 m + (1 - beta1) g)`` per tensor (new tensors), and each momentum advanced in
    place to ``beta2 m + (1 - beta2) g`` (only where ``ok``). No learning rate: the part of the
    step that compiles without a recompilation per scheduled ``lr``."""
    signs = []
    for g, m in zip(grads, exp_avgs, strict=True):
        if maximize:
            g = -g
        if m.dtype != g.dtype:  # stored apart (state_dtype): compute widened, round once
            dtype = compute_dtype(m, g)
            g, wide = g.to(dtype), m.to(dtype)
            signs.append(wide.lerp(g, 1.0 - beta1).sign_())
            commit_(m, wide.lerp(g, 1.0 - beta2), ok)
            continue
        signs.append(m.lerp(g, 1.0 - beta1).sign_())  # a fresh buffer, signed in place
        if ok is None:
            m.lerp_(g, 1.0 - beta2)
        else:
            commit_(m, m.lerp(g, 1.0 - beta2), ok)
    return signs


def _lion_apply(
    params, grads, directions, lr, weight_decay, maximize, ok=None, cautious=False,
    cautious_weight_decay=False,
) -> list[Tensor]:
    norms = []
    for p, g, u in zip(params, grads, directions, strict=True):
        if cautious:
            u = cautious_update(u, -g if maximize else g)
        decay = lr * weight_decay
        if ok is None:
            decayed(p, u, decay, cautious_weight_decay, inplace=True)
            p.add_(u, alpha=-lr)
        else:  # the same arithmetic out of place, kept only where ok
            new = decayed(p, u, decay, cautious_weight_decay, inplace=False)
            commit_(p, new.add(u, alpha=-lr), ok)
        norms.append(step_rms(u, lr))
    return norms


def _lion_foreach(
    params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, ok=None
) -> list[Tensor]:
    # _foreach kernels need one device and dtype per call.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    norms: list[Tensor | None] = [None] * len(params)
    for idx in buckets.values():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        if maximize:
            gs = torch._foreach_neg(gs)
        cs = torch._foreach_lerp(ms, gs, 1.0 - beta1)
        torch._foreach_sign_(cs)
        if ok is None:
            if weight_decay != 0.0:
                torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
            torch._foreach_add_(ps, cs, alpha=-lr)
            torch._foreach_lerp_(ms, gs, 1.0 - beta2)
        else:  # the same arithmetic out of place, kept only where ok
            news = torch._foreach_mul(ps, 1.0 - lr * weight_decay)
            torch._foreach_add_(news, cs, alpha=-lr)
            for p, new in zip(ps, news, strict=True):
                commit_(p, new, ok)
            for m, new in zip(ms, torch._foreach_lerp(ms, gs, 1.0 - beta2), strict=True):
                commit_(m, new, ok)
        for i, norm in zip(idx, torch._foreach_norm(cs, 2.0), strict=True):
            norms[i] = _step_rms(norm, params[i].numel(), lr)
    return norms  # type: ignore[return-value]  # every index was filled by its bucket


class Lion(GuardedOptimizer, torch.optim.Optimizer):
    """Lion (EvoLved Sign Momentum), Chen et al. 2023, arXiv 2302.06675.

    Args:
        params: parameters or param-group dicts.
        lr: step size; every coordinate moves by ``lr`` per step. Default 1e-4 (the lecture's).
        betas: ``(beta1, beta2)``: interpolation for the update direction and decay of the kept
            momentum. Default (0.9, 0.99).
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.
        cautious: zero the coordinates of ``sign(c)`` whose sign disagrees with the gradient and
            rescale the rest by the kept fraction (C-Lion, arXiv 2411.16085). Default False.
        cautious_weight_decay: apply the weight decay only where ``sign(c)`` and the parameter
            have the same sign (arXiv 2510.12402). Default False.
        maximize: ascend instead of descend.
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it when all
            parameters are on a GPU.
        compile_update: compute the signs and the momentum (:func:`lion_directions_`) through
            ``torch.compile(fullgraph=True)``; the learning rate and weight decay are applied
            eagerly (:mod:`guided_descent.optimizers.compiled`). Default False (eager; measured
            in docs/benchmarks.md).
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        state_dtype: the dtype ``exp_avg`` is stored in: ``None`` (default) the parameter's;
            ``torch.bfloat16`` halves a float32 model's state (``torch.float32`` or the names
            ``"bfloat16"``/``"float32"`` are accepted too). A step reads it widened to float32,
            computes what the float32 path computes and rounds into it once
            (:mod:`guided_descent.transforms.state_dtype`); such a group takes the per-tensor
            path, not ``foreach``.

    State per parameter: ``exp_avg`` (one buffer the size of the parameter, in its dtype or in
    ``state_dtype``).
    """

    STATE_NAME = "Lion"
    MASKED_SKIP = True

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        compile_update: bool = False,
        on_nonfinite: str = "skip",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            weight_decay=weight_decay,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            foreach=foreach,
        )
        validate_hyperparams("lion", defaults)
        self.compile_update = check_compile_update("lion", compile_update)
        defaults["state_dtype"] = parse_state_dtype("lion", state_dtype)
        self._init_guard(on_nonfinite)
        super().__init__(params, defaults)
        self._place_counters(None)  # before any compiled step, which could not create them

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        return ("exp_avg",), {"exp_avg": tuple(p.shape)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load after the guard's checks; a state dict saved before the cautious flags
        existed loads with both off; the momentum is restored in the dtype it was saved in (torch
        would cast a ``state_dtype`` buffer to the parameter's dtype)."""
        state_dict = with_group_keys(state_dict, STATE_DTYPE_DEFAULT)
        super().load_state_dict(with_group_keys(state_dict, CAUTIOUS_OFF))
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {}).get("exp_avg")
            if isinstance(saved, Tensor) and saved.dtype != self.state[p]["exp_avg"].dtype:
                self.state[p]["exp_avg"] = saved.to(device=p.device, copy=True)

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the missing momentum of ``group``'s parameters that have a gradient; dynamo runs
        a method of this name eagerly under ``torch.compile`` (see ``HybridOptimizer``)."""
        for p in group["params"]:
            if p.grad is not None and not self.state.get(p):
                self.state[p]["exp_avg"] = state_zeros(p, group.get("state_dtype"))

    @torch.no_grad()
    def _update(self, ok: Tensor | None = None) -> None:
        for group in self.param_groups:
            if self._sync_free_step:
                self._init_group(group)
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = state_zeros(p, group.get("state_dtype"))
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            beta1, beta2 = group["betas"]
            step_rms = lion(
                params,
                grads,
                exp_avgs,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=foreach,
                ok=ok,
                cautious=group.get("cautious", False),
                cautious_weight_decay=group.get("cautious_weight_decay", False),
                compile_directions=self.compile_update,
            )
            for p, value in zip(params, step_rms, strict=True):
                self._observe(p, update_rms=value)
