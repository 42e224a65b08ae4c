"""Exponential moving average of a model's weights, on ``torch.optim.swa_utils.AveragedModel``.

After optimizer step ``k`` (``k = 1, 2, ...``) with weights ``θ_k``::

    ema_k = d_k · ema_{k-1} + (1 - d_k) · θ_k,    ema_0 = θ_0 (the weights when the EMA is built)
    d_k   = min(decay, (1 + t) / (10 + t)),  t = k - 1   (warm-up on; ``d_k = decay`` when off)

The warm-up (the rule of TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps a
long average (``decay = 0.999``) from being dominated for thousands of steps by the random
initial weights: early on the average forgets fast (``d_1 = 0.1``), and the decay reaches
``decay`` after about ``9 / (1 - decay)`` steps.

Usage::

    ema = EMA(model, decay=0.999)
    for x, y in loader:
        ...; opt.step()
        ema.update()
    with ema.swapped():          # the live model now holds the averaged weights
        evaluate(model)
    # ... and here exactly (bit for bit) its training weights again

**Buffers and batch norm.** Buffers are not averaged: at every :meth:`update` the averaged copy
takes the live model's buffers (``AveragedModel(use_buffers=False)``). A batch-norm layer's
running statistics therefore describe the activations of the *training* weights, not of the
averaged ones; :meth:`refresh_batchnorm` recomputes them for the averaged weights with
``torch.optim.swa_utils.update_bn`` (one pass over some training inputs), as SWA prescribes.
We chose this over averaging the running statistics because an average of statistics gathered
under different weights is not the statistics of the averaged weights, and because integer
buffers (``num_batches_tracked``) have no meaningful average. Call it after the last
:meth:`update` and before evaluating, since the next update copies the live buffers again.

**Precision.** The average is kept in the parameters' dtype. In bfloat16 an update of
``(1 - decay) · (θ - ema)`` with ``decay = 0.999`` is mostly rounded away; keep the EMA of a
bfloat16 model on a float32 copy (build it from a float32 model) if that matters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn


def _check_decay(decay: object) -> None:
    ok = isinstance(decay, (int, float)) and not isinstance(decay, bool)
    if not ok or not 0.0 <= decay < 1.0:  # type: ignore[operator]
        raise ValueError(f"EMA: decay must be a number in [0, 1), got {decay!r}")


def warmup_decay(decay: float, t: int) -> float:
    """``min(decay, (1 + t) / (10 + t))``: the decay of the update after ``t`` earlier ones."""
    return min(decay, (1.0 + t) / (10.0 + t))


class EMA:
    """An exponential moving average of ``model``'s parameters (see the module docstring).

    Args:
        model: the live model; the EMA starts from its current weights.
        decay: ``γ`` in [0, 1); the average's memory is about ``1 / (1 - γ)`` steps.
        warmup: use ``min(γ, (1 + t) / (10 + t))`` instead of ``γ`` (default True).
        device: where to keep the averaged copy (default: the model's device). Keeping it on the
            CPU saves accelerator memory; :meth:`swapped` copies across devices.

    The averaged copy is ``self.module`` (an ``nn.Module`` of the same architecture); you can
    call it directly, or use :meth:`swapped` to evaluate through the live model.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA: model must be an nn.Module, got {type(model).__name__}")
        _check_decay(decay)
        if not isinstance(warmup, bool):
            raise ValueError(f"EMA: warmup must be a bool, got {warmup!r}")
        self.model = model
        self.decay = float(decay)
        self.warmup = warmup
        self._averaged = AveragedModel(model, device=device, multi_avg_fn=self._average)
        self._averaged.requires_grad_(False)  # evaluation through it builds no autograd graph
        # AveragedModel's first update copies the model; doing it now makes θ_0 the starting
        # point (n_averaged = 1), so that update k applies d_k with t = k - 1 as documented.
        self._averaged.update_parameters(model)
        # A Python mirror of n_averaged - 1: reading the tensor every step would force a device
        # sync on an accelerator.
        self._updates = 0
        self._swapped = False

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model."""
        return self._averaged.module

    @property
    def num_updates(self) -> int:
        """How many times :meth:`update` has run since the EMA was built (or its state saved)."""
        return self._updates

    def decay_at(self, t: int) -> float:
        """The decay applied by the update that follows ``t`` earlier updates."""
        return warmup_decay(self.decay, t) if self.warmup else self.decay

    @torch.no_grad()
    def _average(self, ema: list[Tensor], current: list[Tensor], _: Tensor | int) -> None:
        # AveragedModel groups tensors by device and dtype and calls this once per group.
        weight = 1.0 - self.decay_at(self._updates)
        if ema[0].is_floating_point() or ema[0].is_complex():
            torch._foreach_lerp_(ema, current, weight)  # ema += weight * (current - ema)
        else:  # integer parameters have no average; follow the live model
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live model's current weights into the average (call after ``opt.step()``)."""
        if self._swapped:
            raise RuntimeError("EMA.update() inside EMA.swapped(): the live model holds the EMA")
        self._averaged.update_parameters(self.model)
        self._updates += 1

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(live tensor, averaged tensor) for every parameter and buffer, in module order."""
        live = [*self.model.parameters(), *self.model.buffers()]
        avg = [*self.module.parameters(), *self.module.buffers()]
        if len(live) != len(avg):
            raise RuntimeError(
                f"EMA: the model has {len(live)} parameters and buffers, the average {len(avg)}; "
                "was the model changed after the EMA was built?"
            )
        for i, (a, b) in enumerate(zip(live, avg, strict=True)):
            if a.shape != b.shape:
                raise RuntimeError(
                    f"EMA: tensor {i} has shape {tuple(a.shape)} in the model but "
                    f"{tuple(b.shape)} in the average"
                )
        return list(zip(live, avg, strict=True))

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Put the averaged parameters and buffers into the live model; restore on exit.

        The training weights are copied aside and copied back, so after the block they are
        bit-identical to before (also when the block raises), and optimizers, which hold the
        parameter objects, are unaffected. Costs one copy of the model's tensors.
        """
        if self._swapped:
            raise RuntimeError("EMA.swapped() is already active")
        pairs = self._pairs()
        with torch.no_grad():
            saved = [live.detach().clone() for live, _ in pairs]
            for live, avg in pairs:
                live.copy_(avg)
        self._swapped = True
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for (live, _), keep in zip(pairs, saved, strict=True):
                    live.copy_(keep)
            self._swapped = False

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite ``model`` (default: the live model) with the averaged weights, for good."""
        target = self.model if model is None else model
        dst = [*target.parameters(), *target.buffers()]
        src = [*self.module.parameters(), *self.module.buffers()]
        if len(dst) != len(src):
            raise ValueError(f"EMA.copy_to: model has {len(dst)} tensors, the average {len(src)}")
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def refresh_batchnorm(
        self, inputs: Iterable[Any], device: torch.device | str | None = None
    ) -> None:
        """Recompute batch-norm running statistics for the averaged weights.

        ``inputs`` yields input batches (or tuples whose first element is the input), as for
        ``torch.optim.swa_utils.update_bn``, which does the work: it resets the statistics and
        averages them over one pass in training mode. No-op for models without batch norm.
        """
        update_bn(inputs, self.module, device=device)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and buffers, the update count, and the settings they assume."""
        return {
            "averaged": self._averaged.state_dict(),
            "num_updates": self._updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the decay and warm-up settings must match."""
        for key in ("decay", "warmup"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"EMA.load_state_dict: saved {key}={state_dict[key]!r} but this EMA has "
                    f"{key}={getattr(self, key)!r}"
                )
        self._averaged.load_state_dict(state_dict["averaged"])
        self._updates = int(state_dict["num_updates"])

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, warmup={self.warmup}, num_updates={self._updates}, "
            f"module={type(self.module).__name__})"
        )


__all__ = ["EMA", "warmup_decay"]
