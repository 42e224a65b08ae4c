"""How a parameter tensor is seen as one or more matrices by a matrix method.

A matrix method (Muon, Shampoo, SOAP) acts on matrices, but parameters come in other shapes: a
convolution kernel ``(out, in, *kernel)``, the packed query/key/value projection of
``nn.MultiheadAttention`` ``(3d, d)``, the gate blocks of a GRU ``(3h, in)`` or an LSTM
``(4h, in)``, a stack of expert matrices ``(E, m, n)``. A *view* says which matrices a parameter
holds. Every view is a reshape of the row-major parameter to ``(count, m, n)``:

* ``"flatten"`` -- one matrix ``(shape[0], prod(shape[1:]))``: a convolution kernel's rows are its
  output channels (Jordan et al.'s convention for Muon); a 2-D parameter is itself;
* ``"batch"`` -- every leading index is a matrix of the last two dimensions: ``(E, m, n)`` is
  ``E`` matrices ``(m, n)``;
* ``"split:K"`` -- the rows are ``K`` stacked blocks of equal height, each a matrix
  ``(shape[0] / K, prod(shape[1:]))``: ``"split:3"`` separates Q, K and V of a packed projection,
  ``"split:3H"`` (``3·heads``) every head of each, ``"split:4"`` an LSTM's four gates.

Because all three are reshapes, a view never copies and ``count · m · n`` is the parameter's
size. Shampoo and SOAP see a ``"flatten"`` parameter as the tensor it is (one factor per
dimension, their references' treatment of convolutions); ``"batch"`` and ``"split:K"`` give them
one preconditioner per matrix, like Muon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FLATTEN = "flatten"
BATCH = "batch"
SPLIT = "split"
VIEW_KINDS: tuple[str, ...] = (FLATTEN, BATCH, SPLIT)


def parse_view(view: object) -> tuple[str, int]:
    """``(kind, blocks)`` of a view: ``("flatten", 1)``, ``("batch", 0)`` or ``("split", K)``.

    Raises ``ValueError`` naming the value for anything else (``"split:0"``, ``"rows"``, 3, ...).
    """
    if view == FLATTEN:
        return FLATTEN, 1
    if view == BATCH:
        return BATCH, 0
    if isinstance(view, str) and view.startswith(f"{SPLIT}:"):
        count = view[len(SPLIT) + 1 :]
        if count.isdigit() and int(count) >= 1:
            return SPLIT, int(count)
    raise ValueError(
        f"matrix_view must be 'flatten', 'batch' or 'split:K' with an integer K >= 1, "
        f"got {view!r}"
    )


def split_view(blocks: int) -> str:
    """The view that cuts the rows into ``blocks`` equal matrices (``"flatten"`` for one)."""
    return FLATTEN if blocks == 1 else f"{SPLIT}:{blocks}"


def matrix_shape(shape: Sequence[int], view: str) -> tuple[int, int, int]:
    """``(count, m, n)``: how a parameter of ``shape`` is seen as ``count`` matrices ``(m, n)``."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs a parameter with >= 2 dimensions, got {shape}")
    kind, blocks = parse_view(view)
    if kind == FLATTEN:
        return 1, shape[0], math.prod(shape[1:])
    if kind == BATCH:
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    if shape[0] % blocks:
        raise ValueError(
            f"matrix_view {view!r} cuts the rows into {blocks} equal blocks, but the parameter "
            f"of shape {shape} has {shape[0]} rows"
        )
    return blocks, shape[0] // blocks, math.prod(shape[1:])


def block_lengths(shape: Sequence[int], view: str) -> tuple[int, ...]:
    """Per dimension, the length of the pieces a view cuts it into (the whole length: uncut).

    ``"flatten"``: ``shape``; ``"batch"``: 1 for every dimension but the last two;
    ``"split:K"``: ``shape[0] / K`` for dimension 0. Block-wise methods (Shampoo, SOAP) cut along
    these first, then apply their own size limits inside each piece, so that no block straddles
    two of the view's matrices.
    """
    shape = tuple(shape)
    kind, _ = parse_view(view)
    _count, m, _n = matrix_shape(shape, view)
    if kind == FLATTEN:
        return shape
    if kind == BATCH:
        return (1,) * (len(shape) - 2) + shape[-2:]
    return (m, *shape[1:])
