"""Named optimizers: the registry, :func:`create` and our own ``torch.optim.Optimizer`` classes."""

# Importing a module registers its optimizers; the order is the order of `guided-descent list`.
from guided_descent.optimizers import first_order as _first_order  # noqa: F401

# isort: split
# The elementwise adaptive methods, listed after the first-order ones.
from guided_descent.optimizers import ademamix as _ademamix  # noqa: F401
from guided_descent.optimizers import adopt as _adopt  # noqa: F401
from guided_descent.optimizers import mars as _mars  # noqa: F401

# isort: split
from guided_descent.optimizers import kfac as _kfac  # noqa: F401
from guided_descent.optimizers import muon as _muon  # noqa: F401
from guided_descent.optimizers import natural_gradient as _natural_gradient  # noqa: F401
from guided_descent.optimizers import prodigy as _prodigy  # noqa: F401
from guided_descent.optimizers import psgd as _psgd  # noqa: F401
from guided_descent.optimizers import schedule_free as _schedule_free  # noqa: F401
from guided_descent.optimizers import shampoo as _shampoo  # noqa: F401
from guided_descent.optimizers import soap as _soap  # noqa: F401

# isort: split
from guided_descent.optimizers import kl_shampoo as _kl_shampoo  # noqa: F401
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
from guided_descent.optimizers.schedule_free import schedule_free

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
    "schedule_free",
]
