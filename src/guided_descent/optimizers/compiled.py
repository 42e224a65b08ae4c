"""The opt-in compiled update path: ``compile_update=True`` on Lion, Muon, Shampoo and SOAP.

With the option on, the optimizer calls its free update function (:func:`~.lion.lion`,
:func:`~guided_descent.preconditioners.orthogonalize.muon_update`,
:func:`~guided_descent.preconditioners.soap.soap_update`,
:func:`~guided_descent.preconditioners.shampoo.shampoo_block_direction`) through
``torch.compile(fullgraph=True)``; everything around it -- state creation, the refresh schedule,
eigendecompositions and inverse roots, the distributed split, diagnostics -- stays eager, so a
refresh step does not cost a recompilation and nothing host-side is traced.

Only functions without a learning rate are compiled: the step size is applied eagerly. A Python
float that changes every step (a scheduled ``lr``) is either specialized by dynamo -- one
recompilation per value until the recompile limit -- or, in torch 2.13 with Lion's update written
out (``lr`` in ``alpha=-lr`` and in the step-RMS diagnostic), silently reused from the previous
compilation: the third step of a schedule moved by the second step's ``lr``. SOAP's bias
corrections likewise read the ``step`` tensor, not a host int, when compiled.

What to expect from it:

* the first steps compile (seconds per distinct parameter-list layout on CPU inductor); a second
  shape costs one more compilation, after which dynamo treats sizes as symbolic, so a normal run
  compiles a handful of graphs per function (``tests/test_compile_update.py`` bounds it);
* results equal the eager path up to float rounding (inductor fuses and reorders elementwise
  arithmetic), not bit for bit;
* whether it is faster depends on the device and the model: ``guided-descent bench step`` with
  ``--hyper NAME.compile_update=true`` measures it, and docs/benchmarks.md has the numbers that
  keep eager the default.

Inside an outer ``torch.compile(opt.step)`` the free functions are called directly: the outer
graph traces them anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# One compiled wrapper per free function and process: dynamo's cache lives on the wrapped code
# object, so wrapping the same function twice would only add a second guard table to consult.
_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled(fn: F) -> F:
    """``fn`` compiled with ``torch.compile(fn, fullgraph=True)``, built once per process."""
    wrapper = _COMPILED.get(fn)
    if wrapper is None:
        wrapper = _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return wrapper  # type: ignore[return-value]  # same signature as fn


def kernel(fn: F, enabled: bool) -> F:
    """``fn`` itself, or its compiled form when ``enabled`` and not already being traced."""
    if enabled and not torch.compiler.is_compiling():
        return compiled(fn)
    return fn


def check_compile_update(owner: str, value: Any) -> bool:
    """``value`` as a bool, or a ``ValueError`` naming it (a typo must not turn the option on)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: compile_update must be True or False, got {value!r}")
    return value
