"""Progress bars that ``--quiet`` turns off; experiments never import tqdm themselves."""

from __future__ import annotations

import sys
from typing import Any


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class Progress:
    """Makes progress bars (tqdm on stderr) or silent stand-ins when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str, unit: str = "step") -> Any:
        if not self.enabled:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False
        )


SILENT = Progress(enabled=False)
