"""The library layers never import the application layers (DESIGN: imports only point down)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import guided_descent

PACKAGE = Path(guided_descent.__file__).parent
APPLICATION = ("experiments", "report", "tasks", "cli")


def library_files() -> list[Path]:
    files = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in APPLICATION or rel.name == "__main__.py":
            continue
        files.append(path)
    return files


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = path.relative_to(PACKAGE).parent.parts[: len(path.parts) - node.level]
                prefix = ".".join(("guided_descent", *base))
                names.add(f"{prefix}.{node.module}" if node.module else prefix)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_library_files_exist():
    names = {p.relative_to(PACKAGE).parts[0] for p in library_files()}
    assert "optimizers" in names


def test_library_never_imports_application_layers():
    offenders = []
    for path in library_files():
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "guided_descent" and len(parts) > 1 and parts[1] in APPLICATION:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_importing_the_library_loads_no_application_code_or_plotting():
    # torch itself imports tqdm and numpy when present, so only check what torch does not load.
    code = (
        "import sys, guided_descent\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')"
        " or any(m.startswith('guided_descent.' + a) for a in "
        f"{APPLICATION!r})]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
