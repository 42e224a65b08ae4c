"""Recognising FSDP2's sharded parameters (DTensors) and describing how they are cut.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a ``DTensor`` sharded on one
dimension (dimension 0 by default, another with ``shard_placement_fn``) over a 1-D device mesh.
Rank ``r`` holds the ``r``-th chunk of ``torch.chunk`` semantics: chunks of ``ceil(n / N)`` rows,
the last ones shorter or empty. :class:`ShardLayout` computes every rank's chunk from the global
shape alone, so a rank knows how many elements it will receive from each peer without asking.

Only that layout is supported for the matrix optimizers: a parameter replicated on its mesh is
treated like a plain tensor, and other layouts (2-D meshes as in HSDP, ``Partial``, strided
shards) raise ``ValueError`` naming the placement. Elementwise optimizers need none of this: they
run on DTensors as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``.

    No DTensor can exist before its module is imported, so this costs nothing (and imports
    nothing) in programs that never use one.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (sharing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """How a tensor of global ``shape`` is cut along ``dim`` over ``world_size`` ranks."""

    shape: tuple[int, ...]
    dim: int
    world_size: int

    @property
    def sizes(self) -> tuple[int, ...]:
        """Length of every rank's chunk along ``dim`` (``torch.chunk``: ``ceil(n/N)`` each)."""
        n = self.shape[self.dim]
        chunk = -(-n // self.world_size)  # ceil
        return tuple(max(0, min(chunk, n - r * chunk)) for r in range(self.world_size))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where every rank's chunk starts along ``dim``."""
        out, start = [], 0
        for size in self.sizes:
            out.append(start)
            start += size
        return tuple(out)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.dim] = self.sizes[rank]
        return tuple(shape)

    def numel(self, rank: int) -> int:
        count = 1
        for n in self.local_shape(rank):
            count *= n
        return count

    def chunk(self, full: Tensor, rank: int) -> Tensor:
        """``rank``'s part of the full tensor (a view)."""
        return full.narrow(self.dim, self.offsets[rank], self.sizes[rank])


def shard_layout(p: Tensor) -> ShardLayout | None:
    """The layout of a sharded DTensor parameter; ``None`` for a plain or replicated tensor.

    Raises ``ValueError`` for DTensor layouts the matrix optimizers do not handle.
    """
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    mesh = p.device_mesh
    if mesh.ndim == 1 and len(placements) == 1:
        placement = placements[0]
        if isinstance(placement, Replicate):
            return None
        if type(placement) is Shard:  # not a subclass such as _StridedShard
            dim = placement.dim % p.dim()
            return ShardLayout(tuple(p.shape), dim, mesh.size())
    raise ValueError(
        f"a DTensor parameter of shape {tuple(p.shape)} has placements {placements} on a "
        f"{mesh.ndim}-D mesh; the matrix optimizers support FSDP2's layout (one Shard(dim) on a "
        "1-D mesh) and replicated parameters"
    )


def mesh_group(params: Iterable[Tensor]) -> Any:
    """The process group of the (single) device mesh the sharded parameters live on.

    Raises ``ValueError`` when sharded parameters live on different meshes: one optimizer
    exchanges over one group.
    """
    groups = []
    for p in params:
        if shard_layout(p) is not None:
            group = p.device_mesh.get_group()
            if all(group is not g for g in groups):
                groups.append(group)
    if len(groups) > 1:
        raise ValueError(
            f"sharded parameters live on {len(groups)} different device meshes; one optimizer "
            "supports one (build one optimizer per mesh)"
        )
    return groups[0] if groups else None


def layouts_of(params: Sequence[Tensor]) -> list[ShardLayout | None]:
    return [shard_layout(p) for p in params]
