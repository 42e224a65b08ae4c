"""Named optimizers: the registry, :func:`create` and our own ``torch.optim.Optimizer`` classes."""

# Importing a module registers its optimizers; the order is the order of `guided-descent list`.
from guided_descent.optimizers import first_order as _first_order  # noqa: F401
from guided_descent.optimizers import kfac as _kfac  # noqa: F401
from guided_descent.optimizers import muon as _muon  # noqa: F401
from guided_descent.optimizers import natural_gradient as _natural_gradient  # noqa: F401
from guided_descent.optimizers import psgd as _psgd  # noqa: F401
from guided_descent.optimizers import shampoo as _shampoo  # noqa: F401
from guided_descent.optimizers import soap as _soap  # noqa: F401
from guided_descent.optimizers.checkpoint import (
    CheckpointError,
    StateDictMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from guided_descent.optimizers.guard import GuardedOptimizer, NonFiniteGradientError
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
    "CheckpointError",
    "GuardedOptimizer",
    "Lion",
    "NonFiniteGradientError",
    "OptimizerSpec",
    "StateDictMismatchError",
    "UnknownNameError",
    "create",
    "get_spec",
    "lion",
    "load_checkpoint",
    "optimizers",
    "register",
    "save_checkpoint",
]
