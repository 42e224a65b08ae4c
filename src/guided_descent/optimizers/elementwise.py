"""The shell that AdEMAMix, MARS and ADOPT share: per-parameter float32 state and a step counter.

Each of these methods is an elementwise rule (no matrix work) on a few buffers the size of the
parameter. What they have in common, kept here once:

* **State in float32** (float64 for float64 parameters): a bfloat16 parameter gets float32
  moments, its gradient is promoted before it enters them, and the update is computed in float32
  and rounded into the parameter once (:func:`~guided_descent.transforms.descend.descend_`).
  A buffer that only keeps a copy of a gradient (MARS's ``last_grad``) stays in the gradient's
  dtype, which holds it exactly.
  ``torch.optim.Optimizer.load_state_dict`` would cast such state to the parameter's dtype;
  :meth:`ElementwiseOptimizer.load_state_dict` restores it as saved.
* **A step counter per parameter**, ``state["step"]``: a 0-d float32 tensor on the parameter's
  device (like torch's Adam), so that bias corrections and the methods' own step-driven
  schedules are computed on the device and a sync-free step (``ok`` given) reads nothing on the
  host. float32 counts exactly up to 2^24 steps.
* **The masked step**: with ``ok`` (a 0-d bool tensor) every state write and the parameter write
  go through :func:`~guided_descent.transforms.masking.commit_`; the in-place and the masked
  paths run the same kernels, so where ``ok`` is true they give the same bits.

A subclass names its buffers (:attr:`ElementwiseOptimizer.BUFFERS`) and implements
:meth:`ElementwiseOptimizer._group_step`, which hands a group's tensors to the method's
functional form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor

from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.transforms.masking import commit_, count_


def state_dtype(p: Tensor) -> torch.dtype:
    """float32 for bfloat16/float16/float32 parameters, float64 for float64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


def select(condition: Tensor, a: float, b: float, like: Tensor) -> Tensor:
    """``a`` where ``condition`` (a 0-d bool tensor) else ``b``: a 0-d tensor of ``like``'s dtype
    and device, each number rounded to that dtype once (``torch.where`` on two Python numbers
    would give float32, which loses digits a float64 state needs)."""
    return torch.where(condition, torch.full((), a, dtype=like.dtype, device=like.device), b)


def lerp_(dst: Tensor, end: Tensor, weight: float | Tensor, ok: Tensor | None) -> None:
    """``dst += weight · (end − dst)`` in place, kept only where ``ok`` (``None``: always)."""
    if ok is None:
        dst.lerp_(end, weight)
    else:
        commit_(dst, dst.lerp(end, weight), ok)


def ema_sq_(dst: Tensor, x: Tensor, beta: float, ok: Tensor | None) -> None:
    """``dst = beta · dst + (1 − beta) · x²`` in place (torch Adam's arithmetic), kept where
    ``ok``."""
    if ok is None:
        dst.mul_(beta).addcmul_(x, x, value=1.0 - beta)
    else:
        commit_(dst, dst.mul(beta).addcmul_(x, x, value=1.0 - beta), ok)


def advance_(step: Tensor, ok: Tensor | None) -> Tensor:
    """Count a step (only where ``ok``) and return this step's number ``t`` (a 0-d tensor).

    ``t`` is ``step + 1`` whether or not the step is kept: a skipped step computes an update it
    then discards, from the same ``t`` a kept step would use.
    """
    t = step + 1
    count_(step, ok)
    return t


class ElementwiseOptimizer(GuardedOptimizer, torch.optim.Optimizer):
    """Base of the elementwise adaptive optimizers (see the module docstring)."""

    MASKED_SKIP = True
    BUFFERS: ClassVar[tuple[str, ...]] = ()  # param-shaped state tensors, created as zeros
    # Those of BUFFERS that only ever hold a copy of a gradient: kept in the parameter's dtype
    # (a gradient has it), which holds the copy exactly at a fraction of float32's memory.
    GRADIENT_COPIES: ClassVar[tuple[str, ...]] = ()
    # The method's functional form, called by the default :meth:`_group_step` as
    # ``RULE(params, grads, *BUFFERS lists, steps, lr=, beta1=, beta2=, **HYPER, maximize=, ok=)``
    # and returning the RMS of each parameter's step; HYPER maps its keyword names to group keys.
    RULE: ClassVar[Callable[..., list[Tensor]]]
    HYPER: ClassVar[Mapping[str, str]] = {}

    def _setup(
        self, name: str, params: Any, hyper: dict[str, Any], maximize: bool, on_nonfinite: str
    ) -> None:
        """The constructor's common tail: validate ``hyper`` (error messages name ``name``), set
        up the non-finite guard and the groups, and place the device counters."""
        validate_hyperparams(name, hyper)
        self._init_guard(on_nonfinite)
        torch.optim.Optimizer.__init__(self, params, {**hyper, "maximize": maximize})
        self._place_counters(None)  # before any compiled step, which could not create them

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        return ("step", *self.BUFFERS), dict.fromkeys(self.BUFFERS, tuple(p.shape))

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in self.BUFFERS:
            dtype = p.dtype if key in self.GRADIENT_COPIES else state_dtype(p)
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the missing state of ``group``'s parameters that have a gradient; dynamo runs a
        method of this name eagerly under ``torch.compile`` (see ``HybridOptimizer``)."""
        for p in group["params"]:
            if p.grad is not None and not self.state.get(p):
                self._init_state(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then every state tensor restored in the dtype it was saved in, on the
        parameter's device (torch would cast float32 moments to a bfloat16 parameter's dtype and
        leave the step counter where it was loaded)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @torch.no_grad()
    def _update(self, ok: Tensor | None = None) -> None:
        for group in self.param_groups:
            if self._sync_free_step:
                self._init_group(group)
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.STATE_NAME} does not support sparse gradients")
                if not self.state.get(p):
                    self._init_state(p)
                params.append(p)
                grads.append(p.grad)
                states.append(self.state[p])
            if not params:
                continue
            step_rms = self._group_step(group, params, grads, states, ok)
            for p, value in zip(params, step_rms, strict=True):
                self._observe(p, update_rms=value)

    def _group_step(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        ok: Tensor | None,
    ) -> list[Tensor]:
        """One step of the method on a group's parameters that have gradients; returns the RMS of
        each parameter's step as 0-d tensors (for diagnostics)."""
        beta1, beta2 = group["betas"]
        return type(self).RULE(
            params,
            grads,
            *([s[key] for s in states] for key in (*self.BUFFERS, "step")),
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            **{arg: group[key] for arg, key in self.HYPER.items()},
            maximize=group["maximize"],
            ok=ok,
        )
