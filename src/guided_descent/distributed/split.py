"""Splitting an optimizer's matrix work across ranks and sharing the results: :class:`WorkSplit`.

A :class:`WorkSplit` is a process group plus the bookkeeping of what was computed and sent. It
offers the three exchanges the matrix optimizers need, each a handful of collectives per step
whatever the number of matrices (tensors are packed into one flat buffer per dtype):

* :meth:`WorkSplit.map` -- **replicated** inputs (DDP: every rank holds the same factors): each
  rank computes the items :func:`~guided_descent.distributed.plan.assign` gives it, then one
  ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.13) per dtype hands every
  result to every rank. Each rank's buffer is
  padded to the longest; with cost-balanced owners the padding is small.
* :meth:`WorkSplit.map_sharded` -- **sharded** inputs (FSDP2: every rank holds a chunk of each
  matrix): one ``all_to_all_single`` per dtype sends every chunk of item ``i`` to ``i``'s owner,
  which assembles the full matrix, computes, and a second ``all_to_all_single`` sends each rank
  its chunk of the result (plus a few small whole tensors, e.g. a flag or an RMS). Only the owner
  ever holds a full matrix; each rank receives as many bytes as it owns, not the whole model.
* :meth:`WorkSplit.sum` -- one ``all_reduce`` of a list of tensors (K-FAC's statistics).

Results equal single-process ones bit for bit where the computation on the owner is the same as
single-process (it is the same function on the same bits; only the batch it is stacked with may
differ, which changes nothing for the per-matrix kernels used here at one thread, and is tested
to 1e-5 relative otherwise).

**Statistics** (:class:`SplitStats`), per kind of work: calls, items computed here out of all,
estimated cost here out of all, the wall and CPU seconds spent computing this rank's share
(measured only when ``timing=True``: on a GPU that needs a device synchronisation; CPU time is
the work itself, unaffected by other processes sharing the cores), collectives and bytes sent and
received per phase (``gather``/``scatter`` for sharded work, ``share`` for replicated results,
``reduce`` for sums).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn

from guided_descent.distributed.dtensor import ShardLayout
from guided_descent.distributed.plan import assign

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class TensorSpec(NamedTuple):
    """Shape, dtype and device of a tensor a rank will receive (known before it is computed)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype, t.device)

    @property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count


PHASES = ("gather", "scatter", "share", "reduce")


@dataclass
class KindStats:
    """Counters of one kind of work (``"newton_schulz"``, ``"inverse_root"``, ...) on this rank."""

    calls: int = 0
    items: int = 0
    items_here: int = 0
    cost: float = 0.0
    cost_here: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    collectives: int = 0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def as_dict(self, timed: bool) -> dict[str, Any]:
        calls = max(self.calls, 1)
        return {
            "calls": self.calls,
            "items": self.items,
            "items_here": self.items_here,
            "cost_share": self.cost_here / self.cost if self.cost else None,
            "seconds": self.seconds if timed else None,
            "seconds_per_call": self.seconds / calls if timed else None,
            "cpu_seconds": self.cpu_seconds if timed else None,
            "collectives_per_call": self.collectives / calls,
            "bytes_sent_per_call": {k: v / calls for k, v in self.sent.items() if v},
            "bytes_received_per_call": {k: v / calls for k, v in self.received.items() if v},
        }


class SplitStats:
    """What this rank computed and exchanged, by kind of work (see the module docstring).

    ``timed``: whether the splits counting here measure compute time (``WorkSplit.timing``).
    """

    def __init__(self) -> None:
        self.kinds: dict[str, KindStats] = {}
        self.timed = False

    def kind(self, name: str) -> KindStats:
        if name not in self.kinds:
            self.kinds[name] = KindStats()
        return self.kinds[name]

    def reset(self) -> None:
        self.kinds.clear()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: per kind, per-call averages and totals."""
        return {name: k.as_dict(self.timed) for name, k in self.kinds.items()}


def _group_rank_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "a process group was given but torch.distributed is not initialized "
                "(call torch.distributed.init_process_group first)"
            )
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_single(output: Tensor, input: Tensor, group: Any) -> None:
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _dtype_key(spec: TensorSpec) -> tuple[str, str]:
    return (str(spec.dtype), str(spec.device))


def _wire(t: Tensor) -> Tensor:
    # Collectives do not all take bool; a bool tensor travels as its bytes.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _check_payload(
    kind: str, index: int, payload: Sequence[Tensor], specs: Sequence[TensorSpec]
) -> None:
    if len(payload) != len(specs):
        raise RuntimeError(
            f"{kind}: item {index} produced {len(payload)} tensors, expected {len(specs)}"
        )
    for t, spec in zip(payload, specs, strict=True):
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise RuntimeError(
                f"{kind}: item {index} produced a {t.dtype} tensor of shape {tuple(t.shape)}, "
                f"expected {spec.dtype} {spec.shape}"
            )


class WorkSplit:
    """A process group over which an optimizer splits its matrix work (module docstring).

    Args:
        group: the process group; ``None`` is the default (world) group. Without an initialized
            ``torch.distributed`` the split has one rank and does everything locally (so code
            written for ``torchrun`` also runs as a plain script).
        timing: measure the seconds each rank spends on its own share (synchronizing the device
            around it on a GPU). Off by default: a synchronisation stalls the CPU's run-ahead.
        stats: where to count (and whether to time: ``stats.timed``); a new
            :class:`SplitStats` by default. An optimizer shares one between its splits.
    """

    def __init__(
        self, group: Any = None, *, timing: bool = False, stats: SplitStats | None = None
    ) -> None:
        self.group = group
        self.rank, self.world_size = _group_rank_world(group)
        self.stats = stats if stats is not None else SplitStats()
        if timing:
            self.timing = True

    @property
    def timing(self) -> bool:
        """Whether compute time is measured; shared by every split that shares ``stats``."""
        return self.stats.timed

    @timing.setter
    def timing(self, value: bool) -> None:
        self.stats.timed = bool(value)

    def __repr__(self) -> str:
        return f"WorkSplit(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------------------ helpers

    @contextmanager
    def _clock(self, kind: str, devices: Sequence[torch.device]) -> Iterator[None]:
        if not self.timing:
            yield
            return
        cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
        for d in cuda:
            torch.cuda.synchronize(d)
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        for d in cuda:
            torch.cuda.synchronize(d)
        stats = self.stats.kind(kind)
        stats.seconds += time.perf_counter() - start
        # CPU time of this process (all its threads): the work itself, unaffected by other
        # processes competing for the cores, which wall time is not on a shared machine.
        stats.cpu_seconds += time.process_time() - cpu_start

    def _count(self, kind: str, owners: Sequence[int], costs: Sequence[float]) -> None:
        stats = self.stats.kind(kind)
        stats.calls += 1
        stats.items += len(owners)
        stats.items_here += sum(1 for o in owners if o == self.rank)
        stats.cost += float(sum(costs))
        here = (c for c, o in zip(costs, owners, strict=True) if o == self.rank)
        stats.cost_here += float(sum(here))

    def _traffic(self, kind: str, phase: str, sent: int, received: int) -> None:
        stats = self.stats.kind(kind)
        stats.collectives += 1
        stats.sent[phase] += sent
        stats.received[phase] += received

    # ------------------------------------------------------------------------------ replicated

    def map(
        self,
        kind: str,
        costs: Sequence[float],
        specs: Sequence[Sequence[TensorSpec]],
        compute: Callable[[list[int]], Sequence[Sequence[Tensor]]],
        *,
        own_storage: bool = True,
    ) -> list[list[Tensor]]:
        """Compute every item once, on its owner, and give every rank every result.

        ``costs[i]`` and ``specs[i]`` (the tensors item ``i`` produces) must be the same on
        every rank. ``compute(indices)`` computes the listed items (ascending) and returns one
        sequence of tensors per item, matching ``specs``. Returns, on every rank, the results of
        all items. ``own_storage=False`` returns received results as views of one receive
        buffer (fine for results used at once, wasteful for results kept in state).
        """
        if len(costs) != len(specs):
            raise ValueError(f"{kind}: {len(costs)} costs but {len(specs)} specs")
        plan = assign(costs, self.world_size)
        mine = list(plan.owned(self.rank))
        devices = [s.device for item in specs for s in item]
        with self._clock(kind, devices):
            produced = list(compute(mine)) if mine else []
        if len(produced) != len(mine):
            raise RuntimeError(f"{kind}: computed {len(produced)} items, expected {len(mine)}")
        results: list[list[Tensor] | None] = [None] * len(costs)
        for i, payload in zip(mine, produced, strict=True):
            payload = list(payload)
            _check_payload(kind, i, payload, specs[i])
            results[i] = payload
        self._count(kind, plan.owners, costs)
        if self.world_size > 1:
            self._share(kind, plan.owners, specs, results, own_storage)
        return results  # type: ignore[return-value]  # every item was filled by its owner

    def _share(
        self,
        kind: str,
        owners: Sequence[int],
        specs: Sequence[Sequence[TensorSpec]],
        results: list[list[Tensor] | None],
        own_storage: bool,
    ) -> None:
        for i, owner in enumerate(owners):
            if owner != self.rank:
                results[i] = [None] * len(specs[i])  # type: ignore[list-item]
        slots: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for i, item in enumerate(specs):
            for j, spec in enumerate(item):
                slots[_dtype_key(spec)].append((i, j))
        for key in sorted(slots):
            members = slots[key]
            i0, j0 = members[0]
            dtype, device = specs[i0][j0].dtype, specs[i0][j0].device
            per_rank: list[list[tuple[int, int]]] = [[] for _ in range(self.world_size)]
            for i, j in members:
                per_rank[owners[i]].append((i, j))
            sizes = [sum(specs[i][j].numel for i, j in part) for part in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            wire_dtype = torch.uint8 if dtype == torch.bool else dtype
            send = torch.zeros(width, dtype=wire_dtype, device=device)
            mine = per_rank[self.rank]
            if mine:
                flat = torch.cat([_wire(results[i][j]).reshape(-1) for i, j in mine])
                send[: sizes[self.rank]].copy_(flat)
            recv = torch.empty(self.world_size * width, dtype=wire_dtype, device=device)
            _all_gather_single(recv, send, group=self.group)
            itemsize = send.element_size()
            received = sum(sizes) - sizes[self.rank]
            self._traffic(
                kind, "share", width * itemsize * (self.world_size - 1), received * itemsize
            )
            for rank, part in enumerate(per_rank):
                if rank == self.rank:
                    continue
                offset = rank * width
                for i, j in part:
                    spec = specs[i][j]
                    piece = recv[offset : offset + spec.numel]
                    if dtype == torch.bool:
                        piece = piece.view(torch.bool)
                    piece = piece.view(spec.shape)
                    results[i][j] = piece.clone() if own_storage else piece  # type: ignore[index]
                    offset += spec.numel

    # ------------------------------------------------------------------------------ sharded

    def map_sharded(
        self,
        kind: str,
        owners: Sequence[int],
        costs: Sequence[float],
        inputs: Sequence[Tensor],
        layouts: Sequence[ShardLayout],
        compute: Callable[[list[int], list[Tensor]], Sequence[tuple[Tensor, Sequence[Tensor]]]],
        *,
        out_dtypes: Sequence[torch.dtype],
        extra_specs: Sequence[Sequence[TensorSpec]],
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Assemble each sharded item on its owner, compute there, hand every rank its chunk.

        ``inputs[i]`` is this rank's chunk of item ``i`` (``layouts[i]``); ``owners[i]`` its
        owner (the same on every rank: from :func:`~guided_descent.distributed.plan.assign`
        over a fixed set of items when the owner keeps state for it). ``compute(indices,
        full_inputs)`` gets the items this rank owns (ascending) and their full tensors, and
        returns per item ``(full_output, extras)``: an output of the input's global shape in
        ``out_dtypes[i]``, and small tensors (``extra_specs[i]``, same dtype) that every rank
        receives whole. Returns this rank's chunk of every output and every item's extras.
        """
        n = len(inputs)
        if not (len(owners) == len(costs) == len(layouts) == len(out_dtypes) == n):
            raise ValueError(
                f"{kind}: owners, costs, inputs, layouts and out_dtypes differ in length"
            )
        mine = [i for i in range(n) if owners[i] == self.rank]
        full = self._gather(kind, owners, inputs, layouts, mine)
        with self._clock(kind, [t.device for t in inputs]):
            produced = list(compute(mine, [full[i] for i in mine])) if mine else []
        if len(produced) != len(mine):
            raise RuntimeError(f"{kind}: computed {len(produced)} items, expected {len(mine)}")
        outputs: dict[int, tuple[Tensor, list[Tensor]]] = {}
        for i, (out, extras) in zip(mine, produced, strict=True):
            extras = list(extras)
            _check_payload(
                kind,
                i,
                [out, *extras],
                [TensorSpec(layouts[i].shape, out_dtypes[i], out.device), *extra_specs[i]],
            )
            outputs[i] = (out, extras)
        self._count(kind, owners, costs)
        devices = [t.device for t in inputs]
        return self._scatter(kind, owners, layouts, outputs, out_dtypes, extra_specs, devices)

    def _gather(
        self,
        kind: str,
        owners: Sequence[int],
        inputs: Sequence[Tensor],
        layouts: Sequence[ShardLayout],
        mine: list[int],
    ) -> dict[int, Tensor]:
        me = self.rank
        for i, (t, layout) in enumerate(zip(inputs, layouts, strict=True)):
            if tuple(t.shape) != layout.local_shape(me):
                raise ValueError(
                    f"{kind}: item {i} has a local shard of shape {tuple(t.shape)} on rank {me}; "
                    f"a {layout.shape} tensor cut along dim {layout.dim} over "
                    f"{layout.world_size} ranks gives {layout.local_shape(me)}"
                )
        full: dict[int, Tensor] = {}
        by_dtype: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, t in enumerate(inputs):
            by_dtype[_dtype_key(TensorSpec.of(t))].append(i)
        for key in sorted(by_dtype):
            items = by_dtype[key]
            ref = inputs[items[0]]
            sends = [[i for i in items if owners[i] == dest] for dest in range(self.world_size)]
            in_splits = [sum(layouts[i].numel(me) for i in part) for part in sends]
            owned = [i for i in items if owners[i] == me]
            out_splits = [
                sum(layouts[i].numel(src) for i in owned) for src in range(self.world_size)
            ]
            parts = [inputs[i].reshape(-1) for part in sends for i in part]
            send = torch.cat(parts) if parts else ref.new_empty(0)
            recv = ref.new_empty(sum(out_splits))
            if self.world_size > 1:
                dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
                itemsize = ref.element_size()
                self._traffic(
                    kind,
                    "gather",
                    (sum(in_splits) - in_splits[me]) * itemsize,
                    (sum(out_splits) - out_splits[me]) * itemsize,
                )
            else:
                recv = send
            pieces: dict[int, list[Tensor]] = {i: [] for i in owned}
            offset = 0
            for src in range(self.world_size):
                for i in owned:
                    count = layouts[i].numel(src)
                    piece = recv[offset : offset + count]
                    pieces[i].append(piece.view(layouts[i].local_shape(src)))
                    offset += count
            for i in owned:
                full[i] = torch.cat(pieces[i], dim=layouts[i].dim)
        return full

    def _scatter(
        self,
        kind: str,
        owners: Sequence[int],
        layouts: Sequence[ShardLayout],
        outputs: Mapping[int, tuple[Tensor, list[Tensor]]],
        out_dtypes: Sequence[torch.dtype],
        extra_specs: Sequence[Sequence[TensorSpec]],
        devices: Sequence[torch.device],
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        me = self.rank
        n = len(owners)
        local_out: list[Tensor | None] = [None] * n
        extras_out: list[list[Tensor] | None] = [None] * n
        by_dtype: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i in range(n):
            by_dtype[(str(out_dtypes[i]), str(devices[i]))].append(i)
        for key in sorted(by_dtype):
            items = by_dtype[key]
            dtype, device = out_dtypes[items[0]], devices[items[0]]
            extra_numel = {i: sum(s.numel for s in extra_specs[i]) for i in items}
            owned = [i for i in items if owners[i] == me]
            in_splits = [
                sum(layouts[i].numel(dest) + extra_numel[i] for i in owned)
                for dest in range(self.world_size)
            ]
            from_src = [[i for i in items if owners[i] == src] for src in range(self.world_size)]
            out_splits = [
                sum(layouts[i].numel(me) + extra_numel[i] for i in part) for part in from_src
            ]
            parts = []
            for dest in range(self.world_size):
                for i in owned:
                    out, extras = outputs[i]
                    parts.append(layouts[i].chunk(out, dest).reshape(-1))
                    parts.extend(e.reshape(-1) for e in extras)
            send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
            recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
            if self.world_size > 1:
                dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
                itemsize = recv.element_size()
                self._traffic(
                    kind,
                    "scatter",
                    (sum(in_splits) - in_splits[me]) * itemsize,
                    (sum(out_splits) - out_splits[me]) * itemsize,
                )
            else:
                recv = send
            offset = 0
            for part in from_src:
                for i in part:
                    count = layouts[i].numel(me)
                    local_out[i] = recv[offset : offset + count].view(layouts[i].local_shape(me))
                    offset += count
                    extras = []
                    for spec in extra_specs[i]:
                        extras.append(recv[offset : offset + spec.numel].view(spec.shape))
                        offset += spec.numel
                    extras_out[i] = extras
        return local_out, extras_out  # type: ignore[return-value]  # every item was filled

    # ------------------------------------------------------------------------------ sums

    def sum(self, kind: str, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The elementwise sum over ranks of every tensor (one ``all_reduce`` per dtype)."""
        if self.world_size == 1 or not tensors:
            return list(tensors)
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_dtype[_dtype_key(TensorSpec.of(t))].append(i)
        for key in sorted(by_dtype):
            items = by_dtype[key]
            flat = torch.cat([tensors[i].reshape(-1) for i in items])
            dist.all_reduce(flat, group=self.group)
            bytes_ = flat.numel() * flat.element_size()
            self._traffic(kind, "reduce", bytes_, bytes_)
            offset = 0
            for i in items:
                count = tensors[i].numel()
                out[i] = flat[offset : offset + count].view(tensors[i].shape)
                offset += count
        return out  # type: ignore[return-value]


# Accepted by the matrix optimizers' ``distributed`` argument (see :func:`resolve`).
Distributed: TypeAlias = "bool | WorkSplit | ProcessGroup | None"


def resolve(distributed: Distributed, model: nn.Module | None = None) -> WorkSplit | None:
    """The :class:`WorkSplit` an optimizer's ``distributed`` argument asks for.

    * ``None`` (default): automatic -- a split over the model's process group when ``model`` is a
      ``torch.nn.parallel.DistributedDataParallel`` module (DDP guarantees identical replicas),
      otherwise none. FSDP2-sharded parameters are recognised at step time whatever this says.
    * ``False``: no split: every rank computes everything (the replicas still agree: identical
      inputs give identical results).
    * ``True``: a split over the default group (one rank when torch.distributed is not
      initialized, so the same script runs without ``torchrun``).
    * a process group, or a :class:`WorkSplit` (e.g. ``WorkSplit(timing=True)``): that one.
    """
    if distributed is None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return WorkSplit(model.process_group)
        return None
    if distributed is False:
        return None
    if distributed is True:
        return WorkSplit()
    if isinstance(distributed, WorkSplit):
        return distributed
    if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        return WorkSplit(distributed)
    raise TypeError(
        "distributed must be None (automatic), a bool, a torch.distributed.ProcessGroup or a "
        f"guided_descent.distributed.WorkSplit, got {distributed!r}"
    )


def auto(distributed: Distributed, target: Any) -> Distributed:
    """What a factory passes on: the automatic choice (:func:`resolve` with ``None``) made with
    the model the factory was given, anything explicit unchanged."""
    if distributed is None and isinstance(target, nn.Module):
        return resolve(None, target)
    return distributed


def local_state_bytes(state: Mapping[Any, Any]) -> int:
    """Bytes of optimizer state this rank holds (a DTensor counts its local shard; each storage
    once)."""
    from guided_descent.distributed.dtensor import local

    seen: set[int] = set()
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            t = local(value)
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for entry in state.values():
        walk(entry)
    return total


def distributed_report(state: Mapping[Any, Any], splits: Sequence[WorkSplit | None]) -> dict:
    """The ``"distributed"`` entry of an optimizer's ``diagnostics()`` (empty without a split):
    this rank, the world size, the state bytes held here and :class:`SplitStats`."""
    active = [s for s in splits if s is not None]
    if not active:
        return {}
    return {
        "distributed": {
            "rank": active[0].rank,
            "world_size": active[0].world_size,
            "state_bytes": local_state_bytes(state),
            "work": active[0].stats.as_dict(),
        }
    }
