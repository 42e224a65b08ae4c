"""Writing a file so that it is either absent, the old one, or complete: never half written.

Both the optimizers' checkpoints and the experiments' run files are written through a temporary
file next to the target and an ``os.replace``, after an ``fsync``: a kill at any moment leaves
the previous file (or none), not a truncated one.

The temporary is created with ``os.open(..., 0o666)`` rather than ``tempfile.mkstemp``, which
creates files 0600 on purpose (private scratch space); ``os.replace`` keeps the mode, so reports
and checkpoints would end up readable by their owner alone. With 0o666 the umask applies, as for
any file a program writes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty, hidden file next to ``path``, opened for writing: ``(fd, its path)``."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # a leftover of a killed writer, or a racing one: another name
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file ``f``.

    The bytes reach the disk before the rename makes them visible; the file gets the usual mode
    of a new file, ``0o666 & ~umask``. Returns the path.
    """
    target = Path(path)
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
