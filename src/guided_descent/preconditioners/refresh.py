"""Preconditioner refreshes that a sync-free or compiled step can call: results plus flags.

Shampoo's inverse roots and SOAP's eigenbases come from :func:`~..shampoo.inverse_roots`,
:func:`~..soap.initial_bases` and :func:`~..soap.refresh_bases`, which decide on the host: a
decomposition that fails is retried in float64 and with jitter, and reported as ``None`` or a
false ``ok``. A step that decides on the device (see :mod:`guided_descent.optimizers.guard`) wants
instead, for every factor, a result of a fixed shape and a 0-d bool ``ok`` to commit it by --
the functions here. Under ``torch.compile`` they run as opaque custom operators
(``guided_descent::...``): dynamo cannot trace host decisions, so the compiled graph calls the
eager code at that point and continues with its outputs. Outside compile they call the eager
functions directly (a custom operator's first call costs about a second of set-up).

A failed result is zeros with ``ok`` false: callers must commit with ``ok`` and never use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from guided_descent.preconditioners.shampoo import inverse_roots
from guided_descent.preconditioners.soap import initial_bases, refresh_bases


def _fresh(x: Tensor) -> Tensor:
    """A contiguous copy: a custom operator's outputs may not alias its inputs, and the fake
    kernels promise ``empty_like`` layouts (an eigenbasis may come back transposed in memory)."""
    return x.clone(memory_format=torch.contiguous_format)


def _false(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.bool, device=like.device)


def _true(like: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=like.device)


def _roots(
    factors: list[Tensor], roots: list[int], epsilon: float, relative_epsilon: float = 0.0
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    out, conditions, oks = [], [], []
    results = inverse_roots(factors, roots, epsilon, relative_epsilon)
    for F, result in zip(factors, results, strict=True):
        if result is None:
            out.append(torch.zeros_like(F))
            conditions.append(F.new_zeros(()))
            oks.append(_false(F))
        else:
            out.append(_fresh(result.root))
            conditions.append(_fresh(result.condition.to(F.dtype)))
            oks.append(_true(F))
    return out, conditions, oks


@torch.library.custom_op("guided_descent::inverse_roots", mutates_args=())
def _roots_op(
    factors: list[Tensor], roots: list[int], epsilon: float, relative_epsilon: float
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    return _roots(factors, roots, epsilon, relative_epsilon)


@_roots_op.register_fake
def _(factors, roots, epsilon, relative_epsilon):
    return (
        [torch.empty_like(F) for F in factors],
        [F.new_empty(()) for F in factors],
        [torch.empty((), dtype=torch.bool, device=F.device) for F in factors],
    )


def flagged_inverse_roots(
    factors: Sequence[Tensor],
    roots: Sequence[int],
    epsilon: float,
    relative_epsilon: float = 0.0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(roots, condition numbers, ok)`` of :func:`~..shampoo.inverse_roots`, one per factor."""
    op = _roots_op if torch.compiler.is_compiling() else _roots
    return op(list(factors), list(roots), float(epsilon), float(relative_epsilon))


def _bases(factors: list[Tensor], tiebreak: float = 0.0) -> tuple[list[Tensor], list[Tensor]]:
    out, oks = [], []
    for F, basis in zip(factors, initial_bases(factors, tiebreak), strict=True):
        out.append(torch.zeros_like(F) if basis is None else _fresh(basis))
        oks.append(_false(F) if basis is None else _true(F))
    return out, oks


@torch.library.custom_op("guided_descent::initial_bases", mutates_args=())
def _bases_op(factors: list[Tensor], tiebreak: float) -> tuple[list[Tensor], list[Tensor]]:
    return _bases(factors, tiebreak)


@_bases_op.register_fake
def _(factors, tiebreak):
    return (
        [torch.empty_like(F) for F in factors],
        [torch.empty((), dtype=torch.bool, device=F.device) for F in factors],
    )


def flagged_initial_bases(
    factors: Sequence[Tensor], tiebreak: float = 0.0
) -> tuple[list[Tensor], list[Tensor]]:
    """``(bases, ok)`` of :func:`~..soap.initial_bases`, one per factor."""
    op = _bases_op if torch.compiler.is_compiling() else _bases
    return op(list(factors), float(tiebreak))


def _refresh(
    factors: list[Tensor], bases: list[Tensor], shift: float = 0.0, sort: bool = True
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    results = refresh_bases(factors, bases, shift, sort)
    return (
        [_fresh(r.basis) for r in results],
        [_fresh(r.order) for r in results],
        [_fresh(r.ok.reshape(())) for r in results],
        [_fresh(r.condition.to(F.dtype)) for r, F in zip(results, factors, strict=True)],
    )


@torch.library.custom_op("guided_descent::refresh_bases", mutates_args=())
def _refresh_op(
    factors: list[Tensor], bases: list[Tensor], shift: float, sort: bool
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    return _refresh(factors, bases, shift, sort)


@_refresh_op.register_fake
def _(factors, bases, shift, sort):
    return (
        [torch.empty_like(F) for F in factors],
        [torch.empty(F.shape[0], dtype=torch.int64, device=F.device) for F in factors],
        [torch.empty((), dtype=torch.bool, device=F.device) for F in factors],
        [F.new_empty(()) for F in factors],
    )


def flagged_refresh_bases(
    factors: Sequence[Tensor], bases: Sequence[Tensor], shift: float = 0.0, sort: bool = True
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(bases, column orders, ok, condition estimates)`` of :func:`~..soap.refresh_bases`."""
    op = _refresh_op if torch.compiler.is_compiling() else _refresh
    return op(list(factors), list(bases), float(shift), bool(sort))
