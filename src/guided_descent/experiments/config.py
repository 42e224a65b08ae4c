"""The base of every experiment's frozen ``Config`` dataclass.

One dataclass per experiment is the CLI's flags, their help text and the saved ``config.json``
(DESIGN rule 9): each field's ``metadata["help"]`` is its help line; the command line parses a
field from its type (``int``, ``float``, ``str``, ``bool``, or a ``tuple`` of those written as a
comma-separated list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import nn


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text."""
    return field(default=default, metadata={"help": help, **kwargs})


def check_device(device: str) -> None:
    """Raise ``ValueError`` if ``device`` is not a usable torch device on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment has: which optimizers, how many seeds and steps, which device."""

    optimizers: tuple[str, ...] = option((), "comma-separated optimizer names")
    seeds: int = option(1, "number of seeds (0, 1, ..., N-1)")
    steps: int = option(100, "training steps (or the iteration budget) per run")
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers lists a name twice: {','.join(self.optimizers)}")
        check_device(self.device)

    @classmethod
    def quick(cls) -> Self:
        """The reduced configuration behind ``--quick``."""
        return cls()

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild a config from ``config.json`` (lists become tuples again)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kwargs)


# ------------------------------------------------------- --hyper NAME.KEY=VALUE (bench train, step)


def parse_value(text: str) -> Any:
    """A ``--hyper`` value: int, float, bool, None, a torch dtype (``bfloat16``), else the word."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    dtype = getattr(torch, text, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return text


def parse_overrides(entries: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--hyper`` entries ``NAME.KEY=VALUE`` as {optimizer: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        target, eq, text = entry.partition("=")
        name, dot, key = target.strip().partition(".")
        if not (eq and dot and name and key.isidentifier()):
            raise ValueError(f"hyper: expected NAME.KEY=VALUE, got {entry!r}")
        out.setdefault(name, {})[key] = parse_value(text.strip())
    return out


def check_hyper(name: str, kwargs: dict[str, Any]) -> None:
    """Build ``name`` once on a tiny model with ``kwargs``: the registry names what it rejects."""
    import guided_descent as gd  # the library's entry point; experiments sit above it

    probe = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    try:
        opt = gd.create(name, probe, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hyper: {e}") from None
    remove = getattr(opt, "remove_hooks", None)
    if callable(remove):
        remove()
