"""Run records: the files a run directory holds, written so that nothing is lost.

A run directory holds ``config.json``, ``env.json``, ``metrics.jsonl`` (appended and flushed line
by line, so an interrupted run keeps every finished record), ``summary.json`` (results and
claims), ``report.md`` and figures. JSON files are written atomically: a temporary file in the same
directory, then ``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch

from guided_descent import files
from guided_descent.linalg.newton_schulz import cpu_bf16_matmul

CONFIG = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
REPORT = "report.md"


class RunDirError(Exception):
    """A run directory that cannot be created, written or read; the message is one line."""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``
    (:func:`guided_descent.files.write_atomic`: never half written, mode ``0o666 & ~umask``)."""
    payload = data.encode() if isinstance(data, str) else data
    files.write_atomic(path, lambda f: f.write(payload))


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write; non-finite floats become ``null`` / ``"inf"`` so the file stays JSON."""
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# The three verdicts a claim can reach (BENCHMARKS.md, "Measuring fairly" 7): a claim whose
# evidence is missing -- nobody reached the target, a seed crashed or diverged, one seed only, a
# NaN -- is UNDECIDED with its reason, never PASS.
PASS, FAIL, UNDECIDED = "PASS", "FAIL", "UNDECIDED"
VERDICTS = (PASS, FAIL, UNDECIDED)


@dataclass(frozen=True)
class Outcome:
    """A verdict reached by a test other than comparing one number with a threshold (e.g. the
    paired seed test of a ranking), with the reason a reader can check against the tables."""

    verdict: str
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not self.reason:
            raise ValueError(f"a {self.verdict} outcome needs a reason")

    @classmethod
    def undecided(cls, reason: str) -> Outcome:
        return cls(UNDECIDED, reason)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Claim:
    """A statement checked against what the run measured: PASS, FAIL or UNDECIDED, with a reason.

    By default the verdict compares ``value`` with ``threshold`` through ``op`` (one of ``<=``,
    ``>=``, ``<``, ``>``, ``==``, ``within`` -- ``threshold`` a pair ``[lo, hi]``, bounds
    included); a ``None`` or NaN value is UNDECIDED (no number to judge). ``outcome``, when
    given, is the verdict of a test the experiment ran on the per-seed data instead (a ranking's
    paired test, or "the evidence is missing"); ``value``, ``op`` and ``threshold`` then describe
    the claim. An outcome cannot PASS a claim whose value is missing. ``passed`` is
    ``verdict == PASS``; none of these can be set by hand.
    """

    name: str
    statement: str
    value: float | None
    op: str
    threshold: float | Sequence[float]
    outcome: Outcome | None = None

    OPS = ("<=", ">=", "<", ">", "==", "within")

    def __post_init__(self) -> None:
        if self.op not in self.OPS:
            raise ValueError(f"claim {self.name}: op must be one of {self.OPS}, got {self.op!r}")
        if self.op == "within" and (
            not isinstance(self.threshold, Sequence) or len(self.threshold) != 2
        ):
            raise ValueError(f"claim {self.name}: 'within' needs [lo, hi], got {self.threshold!r}")
        if self.outcome is not None and self.outcome.verdict == PASS and _missing(self.value):
            raise ValueError(f"claim {self.name}: cannot PASS without a value")

    def _holds(self) -> bool:
        v, t = self.value, self.threshold
        match self.op:
            case "<=":
                return v <= t
            case ">=":
                return v >= t
            case "<":
                return v < t
            case ">":
                return v > t
            case "==":
                return v == t
            case _:
                return t[0] <= v <= t[1]

    def _threshold_text(self) -> str:
        t = self.threshold
        return f"within [{t[0]:.4g}, {t[1]:.4g}]" if self.op == "within" else f"{self.op} {t:.4g}"

    @property
    def verdict(self) -> str:
        if self.outcome is not None:
            return self.outcome.verdict
        if _missing(self.value):
            return UNDECIDED
        return PASS if self._holds() else FAIL

    @property
    def reason(self) -> str:
        if self.outcome is not None:
            return self.outcome.reason
        if _missing(self.value):
            return "no value to judge (a run diverged or did not produce this number)"
        word = "holds" if self._holds() else "does not hold"
        return f"value {self.value:.4g} {self._threshold_text()} {word}"

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def undecided(self, reason: str) -> Claim:
        """This claim with its verdict replaced by UNDECIDED for ``reason``."""
        return dataclasses.replace(self, outcome=Outcome.undecided(reason))

    def to_dict(self) -> dict[str, Any]:
        threshold = list(self.threshold) if self.op == "within" else self.threshold
        return {
            "name": self.name,
            "statement": self.statement,
            "value": self.value,
            "op": self.op,
            "threshold": threshold,
            "verdict": self.verdict,
            "reason": self.reason,
            # Kept for readers of the first schema (``passed`` only): True exactly on PASS.
            "passed": self.passed,
        }


def claim_verdict(claim: Mapping[str, Any]) -> str:
    """The verdict of a claim as ``summary.json`` stores it; files written before verdicts had
    three states hold only ``passed`` (True/False), read as PASS/FAIL."""
    verdict = claim.get("verdict")
    if verdict in VERDICTS:
        return verdict
    return PASS if claim.get("passed") else FAIL


def claim_reason(claim: Mapping[str, Any]) -> str:
    """The reason stored with a claim (empty for files of the first schema)."""
    return str(claim.get("reason") or "")


def require_seeds(claims: Sequence[Claim], seeds: int, minimum: int = 2,
                  exempt: Sequence[str] = ()) -> list[Claim]:
    """Every claim judged over seeds becomes UNDECIDED when the run had fewer than ``minimum``
    seeds: one seed has no spread, so its verdict could be luck. ``exempt`` names claims that do
    not depend on seeds (a deterministic identity)."""
    if seeds >= minimum:
        return list(claims)
    why = (f"{seeds} seed(s): a claim over seeds needs at least {minimum} to see the spread "
           "(BENCHMARKS.md rule 7)")
    return [c if c.name in exempt else c.undecided(why) for c in claims]


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout this package runs from, if it is one (else ``None``)."""
    where = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if not commit:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# The command line that started this process, when it is the ``guided-descent`` command
# (set by the CLI): recorded in env.json so every number in a report names its command.
_COMMAND: list[str] | None = None


def record_command(argv: Sequence[str] | None) -> None:
    """Remember ``guided-descent ARGV...`` for the ``env.json`` of runs this process writes."""
    global _COMMAND
    _COMMAND = None if argv is None else ["guided-descent", *argv]


def environment(device: str) -> dict[str, Any]:
    """Versions, device, commit and command: what ``env.json`` records."""
    from importlib import metadata

    import guided_descent

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    dev = torch.device(device)
    info: dict[str, Any] = {
        "guided_descent": guided_descent.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        # Whether Muon's ns_dtype=None computes large CPU matrices in bf16 (linalg.newton_schulz).
        "cpu_bf16_matmul": cpu_bf16_matmul(),
        "device": str(dev),
        "packages": {
            name: version(name) for name in ("numpy", "matplotlib", "scikit-learn", "tqdm")
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if _COMMAND is not None:
        info["command"] = shlex.join(_COMMAND)
    if dev.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed process left unfinished, so appends start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes it at once.

    Opening repairs a torn last line (a run killed mid-write), so a resumed run appends cleanly.
    """

    def __init__(self, path: Path) -> None:
        _drop_torn_tail(Path(path))
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class RunDir:
    """One run's directory and the writers for its files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run (one with ``config.json``), e.g. to resume it."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise RunDirError(f"{path} holds no run to resume (no {CONFIG})")
        return cls(path)

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``summary.json``."""
        return (self.path / SUMMARY).is_file()

    def finished_units(self, fields: Sequence[str], event: str = "final") -> dict[tuple, dict]:
        """Records of units of work that completed before an interruption, by their key.

        A resumable experiment writes one ``event`` record per finished unit (e.g. one
        (optimizer, width, seed) training run) carrying everything its summary needs; on resume
        it takes those instead of recomputing them.
        """
        return {
            tuple(r[f] for f in fields): r
            for r in read_metrics(self.path)
            if r.get("event") == event and all(f in r for f in fields)
        }

    def keep_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite ``metrics.jsonl`` atomically with only the records ``keep`` accepts.

        On resume, the partial records of a unit that did not finish are dropped because the
        unit runs again and writes them anew. Returns how many records were dropped.
        """
        rows = read_metrics(self.path)
        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows) or (self.path / METRICS).exists():
            write_atomic(
                self.file(METRICS), "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
            )
        return len(rows) - len(kept)

    @classmethod
    def create(cls, path: Path) -> RunDir:
        """Make ``path`` (and parents). Refuse a directory that already holds a run."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"cannot write the run to {path}: it exists and is not a directory")
        if (path / CONFIG).exists() or (path / SUMMARY).exists():
            raise RunDirError(
                f"{path} already holds a run; choose another --out or remove it first"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"cannot write the run to {path}: {e.strerror or e}") from None
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, experiment: str, config: Any) -> None:
        write_json(self.file(CONFIG), {"experiment": experiment, "config": config})

    def write_env(self, device: str) -> None:
        write_json(self.file(ENV), environment(device))

    def write_summary(self, results: Mapping[str, Any], claims: Sequence[Claim]) -> None:
        write_json(
            self.file(SUMMARY),
            {"results": results, "claims": [c.to_dict() for c in claims]},
        )

    @contextmanager
    def metrics(self) -> Iterator[MetricsWriter]:
        writer = MetricsWriter(self.file(METRICS))
        try:
            yield writer
        finally:
            writer.close()


def default_run_dir(experiment: str, root: Path = Path("runs")) -> Path:
    """``runs/<experiment>/<UTC timestamp>``, with a suffix if that name is taken."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = root / experiment / stamp
    candidate, i = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{stamp}-{i}")
        i += 1
    return candidate
