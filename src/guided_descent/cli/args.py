"""Turning an experiment's ``Config`` dataclass into argparse flags (DESIGN rule 9)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints


def _scalar_parser(tp: type, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            if tp is bool:
                low = text.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return tp(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} expects {tp.__name__} values, got {text!r}"
            ) from None

    return parse


def _list_parser(tp: type, flag: str) -> Callable[[str], tuple[Any, ...]]:
    item = _scalar_parser(tp, flag)

    def parse(text: str) -> tuple[Any, ...]:
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{flag} expects a comma-separated list, got {text!r}")
        return tuple(item(p) for p in parts)

    return parse


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls: type, only: set[str] | None = None
) -> None:
    """Add one ``--flag`` per field of ``config_cls`` (all defaulting to SUPPRESS).

    Defaults are left out of the namespace so that only what the user typed overrides the
    configuration (the default one or the ``--quick`` one).
    """
    hints = get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help
        if f.default is not dataclasses.MISSING:
            default = _describe(f.default).replace("%", "%%")
            help_text = f"{help_text} (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        origin = get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is tuple:
            item = get_args(tp)[0]
            kwargs.update(type=_list_parser(item, flag), metavar=f"{item.__name__.upper()},...")
        elif origin in (typing.Union, types.UnionType):
            raise TypeError(f"{config_cls.__name__}.{f.name}: optional fields are not supported")
        else:
            kwargs.update(type=_scalar_parser(tp, flag), metavar=tp.__name__.upper())
        parser.add_argument(flag, **kwargs)
