"""Named optimizers: the registry, :func:`create` and our own ``torch.optim.Optimizer`` classes."""

from guided_descent.optimizers import first_order as _first_order  # noqa: F401  (registers)
from guided_descent.optimizers.lion import Lion, lion
from guided_descent.optimizers.registry import (
    OptimizerSpec,
    UnknownNameError,
    create,
    get_spec,
    optimizers,
    register,
)

__all__ = [
    "Lion",
    "OptimizerSpec",
    "UnknownNameError",
    "create",
    "get_spec",
    "lion",
    "optimizers",
    "register",
]
