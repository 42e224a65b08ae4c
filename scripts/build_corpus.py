"""Build the frozen character-level corpus shipped with guided-descent (run once, by hand).

The `charlm` task needs a text corpus that is byte-for-byte identical on every machine and never
downloaded at run time. The Python standard library's sources are real, varied text, carry a
permissive licence (PSF) and sit on every machine with Python -- but they differ between Python
versions, so we freeze one snapshot: the sorted `.py` files of CPython 3.11.7's `Lib/` (without
test suites and site-packages), each preceded by a one-line header naming it, concatenated and cut
to a fixed size, then xz-compressed. The sha256 of the compressed file is recorded by every run in
env.json.

Usage: python scripts/build_corpus.py /path/to/lib/python3.11 src/guided_descent/data/
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import sys
from pathlib import Path

SIZE = 10_000_000  # bytes of source text kept (~2 MB compressed)
SKIP = ("site-packages", "test", "tests", "idle_test")


def main(lib: Path, out: Path) -> None:
    files = sorted(
        p for p in lib.rglob("*.py") if not any(part in SKIP for part in p.relative_to(lib).parts)
    )
    chunks, total = [], 0
    for path in files:
        text = f"# ==== {path.relative_to(lib).as_posix()} ====\n".encode() + path.read_bytes()
        chunks.append(text)
        total += len(text)
        if total >= SIZE:
            break
    data = b"".join(chunks)[:SIZE]
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pystdlib-3.11.7.txt.xz"
    target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    shutil.copy(lib / "LICENSE.txt", out / "PSF-LICENSE.txt")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    size = target.stat().st_size
    print(f"{target}: {len(data)} bytes of text, {size} compressed, sha256 {digest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
