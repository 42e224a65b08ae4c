"""guided-descent: torch.optim-compatible optimizers, from SGD to layer-wise preconditioning.

Library entry points::

    import guided_descent as gd
    opt = gd.create("lion", model, lr=3e-4)   # a torch.optim.Optimizer
    gd.optimizers()["lion"].reference         # what the registry knows
    gd.schedules.scheduler(opt, gd.schedules.Cosine(1000))   # LambdaLR with a closed-form schedule
    ema = gd.EMA(model, decay=0.999)          # weight EMA (torch's AveragedModel underneath)
    opt = gd.schedule_free("muon", model)     # any registered optimizer, schedule-free
    gd.mup.parametrize(model, base_model, "adam")            # μP groups and init rescaling
    gd.save_checkpoint(path, model=model, optimizer=opt, step=t)   # atomic; load_checkpoint

The library depends on torch only; experiments, reports and the ``guided-descent`` command live in
``guided_descent.experiments`` / ``report`` / ``cli`` and are never imported from here.
"""

from guided_descent import mup, schedules
from guided_descent.ema import EMA
from guided_descent.optimizers import (
    CheckpointError,
    Lion,
    NonFiniteGradientError,
    OptimizerSpec,
    StateDictMismatchError,
    UnknownNameError,
    create,
    load_checkpoint,
    optimizers,
    register,
    save_checkpoint,
    schedule_free,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EMA",
    "Lion",
    "NonFiniteGradientError",
    "OptimizerSpec",
    "StateDictMismatchError",
    "UnknownNameError",
    "__version__",
    "create",
    "load_checkpoint",
    "mup",
    "optimizers",
    "register",
    "save_checkpoint",
    "schedule_free",
    "schedules",
]
