"""Pure ``Tensor -> Tensor`` matrix functions shared by the preconditioned optimizers.

One canonical implementation of each: no optimizer keeps its own copy (DESIGN rule 4).
"""

from guided_descent.linalg.matrix_functions import (
    MatrixFunctionError,
    condition_number,
    eigh,
    inverse_root,
    matrix_power_from_eigh,
)

__all__ = [
    "MatrixFunctionError",
    "condition_number",
    "eigh",
    "inverse_root",
    "matrix_power_from_eigh",
]
