"""Optimizer state stored in another dtype than the parameter's (the ``state_dtype=`` option).

A float32 model's momentum kept in bfloat16 takes half the memory. What is stored is all that
changes: a step reads the buffer widened to at least float32 (and to the gradient's dtype),
computes exactly what the float32 path computes from that value, and rounds into the buffer once,
when it is stored (:func:`~guided_descent.transforms.masking.commit_` rounds into the
destination's dtype). The step itself uses the unrounded result; only the next step sees the
rounding. ``torch.optim.Muon`` keeps its momentum in the parameter's dtype, so a bf16 model gets
bf16 state there; here that is one choice among ``None`` (the parameter's dtype: the arithmetic
of a parameter-dtype buffer, unchanged), ``torch.bfloat16`` and ``torch.float32``.
"""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import Tensor

# The stored dtypes offered, by the names a string may give (``--hyper muon.state_dtype=...``
# arrives as a torch.dtype already; a config file or a caller may pass the word).
STATE_DTYPES: Final[dict[str, torch.dtype]] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# What a param group saved before the option existed means: the parameter's dtype.
STATE_DTYPE_DEFAULT: Final[dict[str, Any]] = {"state_dtype": None}


def check_state_dtype(owner: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` and ``value`` unless it is an accepted state dtype."""
    if value is None:
        return
    if isinstance(value, torch.dtype) and value in STATE_DTYPES.values():
        return
    if isinstance(value, str) and value in STATE_DTYPES:
        return
    raise ValueError(
        f"{owner}: state_dtype must be None (the parameter's dtype), torch.bfloat16 or "
        f"torch.float32 (or the names {tuple(STATE_DTYPES)}), got {value!r}"
    )


def parse_state_dtype(owner: str, value: Any) -> torch.dtype | None:
    """``value`` checked (:func:`check_state_dtype`) and as a ``torch.dtype`` (or ``None``)."""
    check_state_dtype(owner, value)
    return STATE_DTYPES[value] if isinstance(value, str) else value


def state_zeros(p: Tensor, dtype: torch.dtype | str | None) -> Tensor:
    """A zero buffer shaped and laid out like ``p``, in ``dtype`` (``None``: ``p``'s dtype; a
    name is read as :func:`parse_state_dtype` reads it, for a param group added with one)."""
    dtype = parse_state_dtype("state_dtype", dtype)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a step computes in when a stored buffer's dtype differs from the gradient's:
    the widest of the tensors' dtypes and float32 (bf16 state of a float32 model: float32;
    float32 state of a bf16 model: float32; any state of a float64 model: float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
