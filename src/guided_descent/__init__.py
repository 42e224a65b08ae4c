"""guided-descent: torch.optim-compatible optimizers, from SGD to layer-wise preconditioning.

Library entry points::

    import guided_descent as gd
    opt = gd.create("lion", model, lr=3e-4)   # a torch.optim.Optimizer
    gd.optimizers()["lion"].reference         # what the registry knows

The library depends on torch only; experiments, reports and the ``guided-descent`` command live in
``guided_descent.experiments`` / ``report`` / ``cli`` and are never imported from here.
"""

from guided_descent.optimizers import (
    Lion,
    OptimizerSpec,
    UnknownNameError,
    create,
    optimizers,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "Lion",
    "OptimizerSpec",
    "UnknownNameError",
    "__version__",
    "create",
    "optimizers",
    "register",
]
