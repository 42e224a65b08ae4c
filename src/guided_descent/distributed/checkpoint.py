"""Distributed checkpoints of our optimizers through ``torch.distributed.checkpoint`` (DCP).

DCP writes one checkpoint from all ranks -- a DTensor (an FSDP2 shard) as its piece of the
global tensor, a plain tensor as a replicated value written once -- and loads it into a template
state dict of any layout, so a run saved on N ranks resumes on M. Its
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (``torch.distributed.checkpoint.
state_dict``) key the optimizer state by parameter name, so that it survives the change of
wrapper (DDP's ``module.`` prefix) and of world size. This module adds what our optimizers need
on top, in :class:`OptimizerState` (a DCP ``Stateful``):

* **The tag.** ``get_optimizer_state_dict`` keeps ``state`` and ``param_groups`` only, and would
  drop the ``"guided_descent"`` tag (optimizer name, format, step and skip counters).
  :class:`OptimizerState` saves it beside them, checks it on load (a checkpoint of another
  optimizer is refused) and restores the counters after ``set_optimizer_state_dict``.
* **List-valued state** (Shampoo's one factor per block, ``None`` for a block without one):
  DCP's nested state dicts store a list element by element and ``None`` as an object, so it
  round-trips. ``StateDictOptions(flatten_optimizer_state_dict=True)`` does not (torch's
  flattening takes tensors, numbers and dicts only) and is refused.
* **State kept by one owner** (Shampoo and SOAP on FSDP2-sharded parameters: the owner rank
  keeps the whole state of a matrix, full tensors; the other ranks an empty entry). Every key is
  written by its owner; on load each rank asks for the keys of the matrices it owns under the
  new world size, wherever they were written.
* **The template.** To build one, torch initializes a fresh optimizer's state with a zero-
  gradient, zero-learning-rate step. Loading replaces that state; the warnings it would raise
  (K-FAC: "no curvature estimate yet") are silenced and the counters restored. State that such
  a step does not create -- K-FAC's factors and inverses appear only after a forward pass has
  been recorded -- would be missing from the template and silently not loaded; given the
  checkpoint's metadata (:func:`load_checkpoint` reads it), :class:`OptimizerState` adds a
  placeholder for every saved key of a parameter whose template state lacks it. Saving an
  optimizer that never stepped runs that step on the live optimizer (torch's behaviour): save
  after the first step (SOAP's first step only builds its first basis; run after the
  initialization step it would move instead).

Usage, on every rank (or in a single process; DCP needs no process group there)::

    from guided_descent import distributed as gdd
    gdd.save_checkpoint("ckpt/step100", model=model, optimizer=opt)
    ...
    gdd.load_checkpoint("ckpt/step100", model=model, optimizer=opt)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from guided_descent.distributed.dtensor import is_dtensor
from guided_descent.optimizers.checkpoint import STATE_KEY, check_tag, restore_tag


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # Without a process group DCP warns on every call that it assumes one process: that is the
    # documented single-process use here, not a mistake to point out.
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    # The zero-gradient step torch uses to build a template warns like a real one would.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class ModelState:
    """A model for DCP (``Stateful``): its state dict keyed by parameter names, wrappers and
    sharding taken into account (``get_model_state_dict`` / ``set_model_state_dict``)."""

    def __init__(self, model: nn.Module, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState:
    """An optimizer of the library (or of torch) for DCP (``Stateful``): see the module
    docstring for what it adds to ``get/set_optimizer_state_dict``.

    ``checkpoint``: the metadata of the checkpoint about to be loaded
    (``dcp.FileSystemReader(path).read_metadata()``), so that state keys a fresh optimizer does
    not create are read too; :func:`load_checkpoint` passes it. ``key`` is this object's key in
    the state dict given to DCP.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        options: StateDictOptions | None = None,
        *,
        checkpoint: Metadata | None = None,
        key: str = "optimizer",
    ) -> None:
        if options is not None and options.flatten_optimizer_state_dict:
            raise ValueError(
                "OptimizerState: flatten_optimizer_state_dict=True cannot hold list-valued "
                "state such as Shampoo's per-block factors; use the default (nested) layout"
            )
        self.model = model
        self.optimizer = optimizer
        self.options = options
        self.checkpoint = checkpoint
        self.key = key

    def _tag(self) -> dict[str, Any] | None:
        tag = self.optimizer.state_dict().get(STATE_KEY)
        return dict(tag) if tag is not None else None

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state
        tag = self._tag()
        with _quiet():
            state_dict = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if tag is not None:
            if fresh:  # the template step is not a step of training: keep the counters
                restore_tag(self.optimizer, tag)
            state_dict[STATE_KEY] = tag
        if self.checkpoint is not None:
            _add_saved_keys(state_dict["state"], self.checkpoint, self.key)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        tag = state_dict.pop(STATE_KEY, None)
        name = getattr(self.optimizer, "STATE_NAME", None)
        if tag is not None and name is not None:
            check_tag(name, tag)  # before anything is loaded
        with _quiet():
            set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)
        if tag is not None and name is not None:
            restore_tag(self.optimizer, tag)


def _add_saved_keys(state: dict[str, Any], metadata: Metadata, key: str) -> None:
    """Placeholders in the template ``state`` for every saved state key of a parameter whose
    template state exists but lacks that key (shapes and dtypes from the checkpoint metadata).

    Only parameters whose template state holds plain tensors are completed: a placeholder is a
    full plain tensor, right for replicated state and for state kept whole by one owner; a
    parameter without template state (not owned here) gets none.
    """
    missing: dict[str, dict[str, list[tuple[tuple, Any]]]] = {}
    for flat, path in metadata.planner_data.items():
        if len(path) < 4 or path[0] != key or path[1] != "state":
            continue
        fqn, name = path[2], path[3]
        entry = state.get(fqn)
        if not entry or name in entry:
            continue
        missing.setdefault(fqn, {}).setdefault(name, []).append(
            (tuple(path[4:]), metadata.state_dict_metadata[flat])
        )
    for fqn, names in missing.items():
        tensors = [v for v in state[fqn].values() if isinstance(v, torch.Tensor)]
        if any(is_dtensor(t) for t in tensors):
            continue
        device = tensors[0].device if tensors else torch.device("cpu")
        for name, items in names.items():
            if items[0][0] == ():  # a plain value
                state[fqn][name] = _placeholder(items[0][1], device)
                continue
            # A list (Shampoo-style per-block state): one element per saved index.
            values: list[Any] = [None] * (1 + max(int(sub[0]) for sub, _ in items))
            for sub, md in items:
                values[int(sub[0])] = _placeholder(md, device)
            state[fqn][name] = values


def _placeholder(md: Any, device: torch.device) -> Any:
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(tuple(md.size), dtype=md.properties.dtype, device=device)
    return None  # an object: DCP replaces it with the saved one


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: Any = None,
) -> None:
    """Write ``model``'s and ``optimizer``'s state to the DCP checkpoint directory ``path``.

    Call it on every rank of ``process_group`` (the default group; or in a single process without
    one). Every rank writes its own shards; replicated tensors are written once.
    """
    state: dict[str, Any] = {"model": ModelState(model)}
    if optimizer is not None:
        state["optimizer"] = OptimizerState(model, optimizer)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=os.fspath(path), process_group=process_group)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: Any = None,
) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` and ``optimizer``, in place.

    The world size and the wrapping (plain, DDP, FSDP2) may differ from the saving run's: each
    rank reads the pieces its own parameters and state need. Build the optimizer as for a new
    run, then load, then train.
    """
    state: dict[str, Any] = {"model": ModelState(model)}
    if optimizer is not None:
        _check_saved_optimizer(path, optimizer, process_group)
        metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
        state["optimizer"] = OptimizerState(model, optimizer, checkpoint=metadata)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), process_group=process_group)


def _check_saved_optimizer(
    path: str | os.PathLike[str], optimizer: torch.optim.Optimizer, process_group: Any
) -> None:
    """Read the saved tag alone first: a checkpoint of another optimizer is refused with our
    one-line message, not with DCP's list of state keys the template asks for and it lacks."""
    name = getattr(optimizer, "STATE_NAME", None)
    if name is None:
        return
    probe: dict[str, Any] = {"optimizer": {STATE_KEY: {"format": 0, "optimizer": ""}}}
    try:
        with _single_process_quiet():
            dcp.load(probe, checkpoint_id=os.fspath(path), process_group=process_group)
    except Exception:  # noqa: BLE001 -- no tag saved (a torch optimizer): the full load decides
        return
    check_tag(name, probe["optimizer"][STATE_KEY])
