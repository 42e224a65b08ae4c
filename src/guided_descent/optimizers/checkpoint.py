"""Versioned optimizer state dicts, checks that a state dict fits an optimizer, checkpoint files.

**The state-dict tag.** Every optimizer that :func:`guided_descent.create` returns adds one entry
to the usual ``{"state": ..., "param_groups": ...}``::

    state_dict["guided_descent"] = {"format": 1, "optimizer": "Adam",
                                    "steps": 120, "skipped_steps": 2}

``torch.optim.Optimizer.load_state_dict`` reads only ``state`` and ``param_groups``, so a tagged
state dict still loads into a plain ``torch.optim`` optimizer, and an untagged one (saved by plain
torch or before the tag existed) loads into ours with the counters at 0.

**Mismatches.** Before loading, :func:`check_state_dict` compares the state dict with the
optimizer and raises :class:`StateDictMismatchError` (a ``ValueError``) saying what differs: the
optimizer or format named in the tag, the number of param groups or of parameters in a group, a
group's ``algorithm`` tag or missing hyper-parameters, or a parameter whose saved state has
another shape or lacks the keys this optimizer keeps. torch itself would load most of these
silently (it matches state by position) and fail, or worse not fail, steps later.

**Checkpoint files.** :func:`save_checkpoint` writes ``{model, optimizer, extra}`` atomically
(a temporary file in the same directory, then ``os.replace``: a crash mid-write leaves the old
checkpoint intact); :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` (no
arbitrary code runs from a checkpoint) and turns a truncated or corrupted file into one
:class:`CheckpointError` line instead of a deep torch traceback.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from guided_descent.files import write_atomic

STATE_KEY = "guided_descent"  # the tag's key in an optimizer state dict; torch ignores it
STATE_FORMAT = 1  # bump when a key or the meaning of saved state changes incompatibly

CHECKPOINT_FORMAT = "guided-descent-checkpoint"
CHECKPOINT_VERSION = 1


class StateDictMismatchError(ValueError):
    """An optimizer state dict that does not fit the optimizer it is loaded into."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or not ours."""


class TaggedOptimizer(Protocol):
    """What :func:`check_state_dict` needs from an optimizer (see ``guard.GuardedOptimizer``)."""

    STATE_NAME: str
    STRICT_GROUP_KEYS: bool
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]: ...


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def check_tag(owner: str, tag: Any) -> None:
    """Raise :class:`StateDictMismatchError` unless ``tag`` is a state-dict tag this version
    reads, written by the optimizer named ``owner``."""
    fmt = tag.get("format") if isinstance(tag, Mapping) else None
    if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= STATE_FORMAT:
        raise StateDictMismatchError(
            f"{owner}: the state dict has guided-descent state format {fmt!r}; this version "
            f"reads formats 1 to {STATE_FORMAT} (was it saved by a newer guided-descent?)"
        )
    saved_name = tag.get("optimizer")
    if saved_name != owner:
        raise StateDictMismatchError(
            f"{owner}: the state dict was saved by optimizer {saved_name!r}, expected {owner!r}"
        )


def restore_tag(optimizer: Any, tag: Mapping[str, Any]) -> None:
    """Set the counters a tag carries on a guided-descent optimizer, after its state was loaded
    by a path that drops the tag (``torch.distributed.checkpoint``'s ``set_optimizer_state_dict``
    keeps only ``state`` and ``param_groups``). What ``GuardedOptimizer.load_state_dict`` does
    with the tag of a state dict loaded directly. An empty tag (a state dict saved before tags
    existed) resets the counters."""
    if tag:
        check_tag(optimizer.STATE_NAME, tag)
    optimizer._steps = int(tag.get("steps", 0))
    optimizer._skipped_steps = int(tag.get("skipped_steps", 0))
    if getattr(optimizer, "_counters", None) is not None:
        optimizer._counters.zero_()  # steps counted on the device belong to the replaced run
    optimizer._last_skip = None
    optimizer._observed = {}
    optimizer._load_extra_tag(tag)


def check_state_dict(optimizer: TaggedOptimizer, state_dict: Any) -> None:
    """Raise :class:`StateDictMismatchError` saying how ``state_dict`` does not fit ``optimizer``.

    Checks, in order: the tag (format version, optimizer name), the number of param groups and of
    parameters per group, each group's ``algorithm`` tag, the hyper-parameters a group of ours
    needs (torch's own classes fill missing ones from their defaults, so they are not asked),
    and every parameter's saved state: the keys the optimizer always keeps and the shapes of the
    tensors whose shape it knows.
    """
    owner = optimizer.STATE_NAME
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        found = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else None
        raise StateDictMismatchError(
            f"{owner}: not an optimizer state dict: expected the keys 'state' and "
            f"'param_groups', found {found if found is not None else type(state_dict).__name__}"
        )
    tag = state_dict.get(STATE_KEY)
    if tag is not None:
        check_tag(owner, tag)

    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise StateDictMismatchError(
            f"{owner}: the optimizer has {len(groups)} param group(s), the state dict "
            f"{len(saved_groups)}"
        )
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved["params"]):
            raise StateDictMismatchError(
                f"{owner}: param group {i} has {len(group['params'])} parameter(s), the state "
                f"dict's has {len(saved['params'])}"
            )
        if group.get("algorithm") != saved.get("algorithm"):
            raise StateDictMismatchError(
                f"{owner}: param group {i} is a {group.get('algorithm')!r} group, the state "
                f"dict's is {saved.get('algorithm')!r}"
            )
        if optimizer.STRICT_GROUP_KEYS:
            needed = [k for k in group if k in optimizer.defaults and k != "params"]
            missing = [k for k in needed if k not in saved]
            if missing:
                raise StateDictMismatchError(
                    f"{owner}: param group {i} of the state dict lacks {missing}; expected the "
                    f"hyper-parameters {sorted(needed)}, found {sorted(k for k in saved)}"
                )

    saved_state = state_dict["state"]
    saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
    params = ((i, g, p) for i, g in enumerate(groups) for p in g["params"])
    for index, (saved_id, (i, group, p)) in enumerate(zip(saved_ids, params, strict=True)):
        entry = saved_state.get(saved_id)
        if not entry:
            continue  # no state yet (never stepped): nothing can disagree
        where = f"{owner}: parameter {index} (param group {i}, shape {_shape(p)})"
        if not isinstance(entry, Mapping):
            raise StateDictMismatchError(
                f"{where}: its saved state is a {type(entry).__name__}, not a dict"
            )
        required, shapes = optimizer.expected_state(p, group)
        missing = [k for k in required if k not in entry]
        if missing:
            raise StateDictMismatchError(
                f"{where}: the saved state lacks {missing}; expected the keys {sorted(required)}, "
                f"found {sorted(map(str, entry))} (state of another optimizer?)"
            )
        for key, shape in shapes.items():
            value = entry.get(key)
            if isinstance(value, Tensor) and _shape(value) != tuple(shape):
                raise StateDictMismatchError(
                    f"{where}: state {key!r} has shape {_shape(value)} in the state dict, "
                    f"expected {tuple(shape)}"
                )


# ------------------------------------------------------------------------------ checkpoint files


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> Path:
    """Write ``model``'s and ``optimizer``'s state dicts and ``extra`` to ``path``, atomically.

    ``extra`` holds whatever else a resume needs (step counter, scheduler state, RNG states);
    its values must load under ``torch.load(weights_only=True)``: tensors, numbers, strings,
    ``None`` and lists/tuples/dicts of them. The file is written next to ``path`` and moved over
    it with ``os.replace``, so a crash mid-write never leaves a truncated checkpoint at ``path``.
    Returns ``path`` as a ``Path``.
    """
    target = Path(os.fspath(path))
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "save_checkpoint: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if not target.parent.is_dir():
        raise CheckpointError(f"save_checkpoint: directory {target.parent} does not exist")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": None if model is None else model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    # Through a temporary file and a rename, the bytes on disk first (guided_descent.files).
    write_atomic(target, lambda f: torch.save(payload, f))
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0].strip() if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _unpickler_detail(err: BaseException) -> str:
    """The useful line of torch's long weights-only message (e.g. ``Unsupported operand 35``)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return match.group(1).strip()[:160] if match else _first_line(err)


def _check_archive(source: Path) -> None:
    """Raise :class:`CheckpointError` if the zip archive ``torch.save`` wrote is damaged.

    torch reads tensor data without checking the archive's CRC-32 checksums, so flipped bytes
    inside a tensor would load silently as wrong numbers. ``ZipFile.testzip`` checks every member:
    one extra read of the file, paid only when a checkpoint is loaded.
    """
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{source} is truncated or corrupted ({_first_line(err)})") from None
    if bad is not None:
        raise CheckpointError(
            f"{source} is truncated or corrupted (checksum mismatch in archive member {bad!r})"
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` and ``optimizer``; return its ``extra``.

    Tensors are read onto ``map_location`` (CPU by default) and moved to the parameters' devices
    by the ``load_state_dict`` calls. Raises :class:`CheckpointError` with a one-line message when
    the file is missing, truncated or corrupted (checked against the archive's checksums first),
    holds objects ``weights_only`` loading refuses, is not a guided-descent checkpoint or is from
    a newer version, lacks the model or optimizer asked for, or when their states do not fit
    (the message then carries the mismatch, e.g. which parameter has which shape).
    """
    source = Path(os.fspath(path))
    if not source.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    _check_archive(source)
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(
                f"{source} holds a {refused.group(1)} object, which weights_only loading "
                "refuses; save only tensors, numbers, strings and containers of them in extra"
            ) from None
        raise CheckpointError(
            f"{source} is truncated or corrupted ({_unpickler_detail(err)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{source} is truncated or corrupted ({_first_line(err)})"
        ) from None
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source} is not a guided-descent checkpoint (written by save_checkpoint); "
            f"found {type(payload).__name__}"
            + (f" with keys {sorted(map(str, payload))}" if isinstance(payload, Mapping) else "")
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint version {version!r}; this guided-descent reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    for what, target in (("model", model), ("optimizer", optimizer)):
        if target is not None and payload.get(what) is None:
            raise CheckpointError(f"{source} holds no {what} state, but a {what} was given")
    if model is not None:
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as err:
            summary = " ".join(str(err).split())  # torch's message spans several lines
            raise CheckpointError(f"{source}: the model state does not fit: {summary}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{source}: the optimizer state does not fit: {_first_line(err)}"
            ) from err
    extra = payload.get("extra")
    return dict(extra) if isinstance(extra, Mapping) else {}
