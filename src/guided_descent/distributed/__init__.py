"""Several processes: matrix work split between ranks, FSDP2-sharded parameters, DCP checkpoints.

The library layer for data-parallel training with the matrix optimizers (torch only):

* :mod:`~guided_descent.distributed.plan` -- cost estimates (FLOPs) per matrix and the balanced
  assignment of matrices to ranks (:func:`assign`), pure functions.
* :mod:`~guided_descent.distributed.split` -- :class:`WorkSplit`: each rank computes its share
  and the results are exchanged with a few collectives per step; what was computed and sent is
  counted in :class:`SplitStats` (reported by ``optimizer.diagnostics()["distributed"]``).
* :mod:`~guided_descent.distributed.dtensor` -- FSDP2's sharded parameters and their layout.
* :mod:`~guided_descent.distributed.checkpoint` -- ``torch.distributed.checkpoint`` for our
  optimizers: save on N ranks, load on M.
* :mod:`~guided_descent.distributed.launch` -- the process group from ``torchrun``'s environment.

See ``docs/distributed.md`` for the design and measurements.
"""

from typing import Any

from guided_descent.distributed.launch import ProcessInfo, process_group_from_env
from guided_descent.distributed.plan import Assignment, assign
from guided_descent.distributed.split import SplitStats, TensorSpec, WorkSplit, resolve

_CHECKPOINT = ("ModelState", "OptimizerState", "load_checkpoint", "save_checkpoint")


def __getattr__(name: str) -> Any:
    # torch.distributed.checkpoint imports DTensor and much more: load it when first asked for,
    # not with every `import guided_descent`.
    if name in _CHECKPOINT:
        from guided_descent.distributed import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Assignment",
    "ModelState",
    "OptimizerState",
    "ProcessInfo",
    "SplitStats",
    "TensorSpec",
    "WorkSplit",
    "assign",
    "load_checkpoint",
    "process_group_from_env",
    "resolve",
    "save_checkpoint",
]
