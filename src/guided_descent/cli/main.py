"""The ``guided-descent`` command: argument parsing and printing only.

    guided-descent list
    guided-descent run [EXPERIMENT] [--quick] [--out DIR] [--seeds N] [--steps N] [--device D]
                       [--optimizers a,b] [experiment flags]
    guided-descent run --resume RUN_DIR
    guided-descent bench step [--device D] [--optimizers a,b] [--out DIR] [--quick] [--nproc N]
    guided-descent bench train TASK [--optimizers a,b] [--peers] [--seeds N] [--budget-steps N]
                               [--budget-minutes M] [--lr-sweep] [--device D] [--quick] [--out DIR]
                               [--nproc N]
    guided-descent bench suite [--quick] [--workloads a,b] [--tracks defaults,tuned] [--seeds N]
                               [--sweep-factors x,y] [--peers] [--out DIR]
    guided-descent report RUN_DIR [--docs DIR]

``--nproc N`` relaunches the command on N processes through ``torchrun`` (experiments that split
their work across processes only: a one-process experiment refuses it rather than run N copies).

Exit codes: 0 success, 1 a run or report that failed (one-line message), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from guided_descent.cli.args import add_config_arguments
from guided_descent.experiments.records import RunDirError, record_command

# Set for the ranks of a --nproc launch: the command line the user typed.
LAUNCH_COMMAND = "GUIDED_DESCENT_COMMAND"

PROG = "guided-descent"
_EXTRA_MODULES = {"numpy", "matplotlib", "sklearn", "tqdm"}


class UsageError(Exception):
    """Bad input found after parsing; printed with the usage and exit code 2."""


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        default=argparse.SUPPRESS,
        help="a reduced configuration that finishes in well under a minute on 2 CPU cores",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="write the run into exactly DIR (default: runs/<experiment>/<timestamp>)",
    )
    parser.add_argument(
        "--nproc",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="run on N processes of this machine, launched through torchrun (gloo on CPU, nccl "
        "on CUDA); only for experiments that split work across processes (bench step)",
    )
    _add_quiet(parser)


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is often fastest for small models "
        "on a busy machine)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from guided_descent.experiments import BENCHMARKS, EXPERIMENTS, FLAGSHIP
    from guided_descent.experiments.config import ExperimentConfig

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Optimizers from SGD to layer-wise preconditioning, and the experiments "
        "that show when they matter.",
    )
    _add_quiet(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("list", help="list experiments and optimizers, one line each")

    run = commands.add_parser(
        "run",
        help="run an experiment and write its report",
        description="Run EXPERIMENT (default: the flagship " + " + ".join(FLAGSHIP) + ") and "
        "write config.json, env.json, metrics.jsonl, summary.json, figures and report.md.",
    )
    _add_run_flags(run)
    run.add_argument(
        "--resume",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="RUN_DIR",
        help="continue an interrupted run (or flagship run) with its recorded configuration",
    )
    add_config_arguments(run, ExperimentConfig, only={"seeds", "device"})
    experiments = run.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for info in EXPERIMENTS.values():
        config_cls = info.load().Config
        sub = experiments.add_parser(
            info.name, help=info.summary, description=config_cls.__doc__ or info.summary
        )
        _add_run_flags(sub)
        add_config_arguments(sub, config_cls)

    bench = commands.add_parser(
        "bench",
        help="benchmark the optimizers (step time, memory) and write a report",
        description="Benchmarks write a run directory like `run` does.",
    )
    kinds = bench.add_subparsers(dest="benchmark", metavar="KIND", required=True)
    for kind, info in BENCHMARKS.items():
        config_cls = info.load().Config
        sub = kinds.add_parser(kind, help=info.summary, description=config_cls.__doc__)
        if "task" in config_cls.__dataclass_fields__:
            # `bench train TASK`: the task may also be given as a positional argument.
            sub.add_argument("task_positional", nargs="?", metavar="TASK", default=None,
                             help="the workload (same as --task)")
        _add_run_flags(sub)
        add_config_arguments(sub, config_cls)

    report = commands.add_parser(
        "report", help="re-render a run's tables and figures from its files (no training)"
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.add_argument(
        "--docs",
        type=Path,
        default=None,
        metavar="DIR",
        help="a bench suite run only: also write DIR/leaderboard.md (figure in DIR/figures/) and "
        "fill the suite's marked regions of DIR/recipes.md and DIR/../README.md",
    )
    _add_quiet(report)
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    import guided_descent
    from guided_descent.experiments import BENCHMARKS, EXPERIMENTS

    print("Experiments:")
    for info in EXPERIMENTS.values():
        print(f"  {info.name:<18} {info.summary}")
    print("Benchmarks:")
    for kind, info in BENCHMARKS.items():
        print(f"  {kind:<18} {info.summary}")
    print("Optimizers:")
    for spec in guided_descent.optimizers().values():
        print(f"  {spec.summary()}  [{spec.reference}]")
    return 0


def _config(name: str, args: argparse.Namespace, preset: str = "default") -> Any:
    from guided_descent.experiments import get_experiment

    config_cls = get_experiment(name).load().Config
    if preset != "default":
        base = getattr(config_cls, preset)()
    else:
        base = config_cls.quick() if getattr(args, "quick", False) else config_cls()
    names = {f for f in base.__dataclass_fields__}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    positional = getattr(args, "task_positional", None)
    if positional is not None:
        if "task" in overrides and overrides["task"] != positional:
            raise UsageError(f"task given twice: {positional!r} and --task {overrides['task']!r}")
        overrides["task"] = positional
    try:
        return base.replace(**overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name}: {e}") from None


def _cmd_run(args: argparse.Namespace) -> int:
    from guided_descent.experiments import FLAGSHIP, execute, prepare, resume
    from guided_descent.experiments.progress import Progress
    from guided_descent.experiments.records import RunDir, default_run_dir

    progress = Progress(enabled=not getattr(args, "quiet", False))
    name = getattr(args, "experiment", None)
    names = [name] if name else list(FLAGSHIP)
    if getattr(args, "resume", None) is not None:
        _check_processes(args, [], "--resume")
        return _resume(args, progress)
    _check_processes(args, names, name or "the flagship run")
    # Validate everything before any work; the flagship's sub-runs take their presets.
    configs = {n: _config(n, args, "default" if name else FLAGSHIP[n]) for n in names}
    if name and getattr(args, "nproc", 1) > 1:
        return _launch(args, default_run_dir(name))
    if name and _launched_rank() > 0:
        with tempfile.TemporaryDirectory() as scratch:  # rank 0 writes and prints the run
            execute(name, configs[name], RunDir.create(Path(scratch) / "run"), Progress(False))
        return 0
    out = getattr(args, "out", None) or default_run_dir(name or "flagship")
    top = RunDir.create(out)
    with _resumable(top.path):
        if name:
            print(f"running {name} -> {top.path}", file=sys.stderr)
            execute(name, configs[name], top, progress)
        else:
            # Every sub-run is recorded before any starts, so --resume can finish all of them.
            runs = {n: RunDir.create(top.path / n) for n in names}
            for n, run in runs.items():
                prepare(n, configs[n], run)
            for n, run in runs.items():
                print(f"running {n} -> {run.path}", file=sys.stderr)
                resume(run, progress)
    return _finish(top.path)


def _resume(args: argparse.Namespace, progress: Any) -> int:
    from guided_descent.experiments import resume
    from guided_descent.experiments.records import RunDir, RunDirError
    from guided_descent.report import is_run, sub_runs

    given = [f"--{k}" for k in ("quick", "out", "seeds", "steps", "device", "optimizers")
             if k in vars(args)]
    if getattr(args, "experiment", None) or given:
        raise UsageError(
            "--resume continues a run with the configuration it was started with; do not "
            "combine it with an experiment name or " + (", ".join(given) or "other flags")
        )
    path = Path(args.resume)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory")
    runs = [RunDir.open(path)] if is_run(path) else [RunDir.open(p) for p in sub_runs(path)]
    if not runs:
        raise RunDirError(f"{path} holds no run to resume (no config.json in it or below)")
    with _resumable(path):
        for run in runs:
            if run.finished:
                print(f"{run.path} already finished", file=sys.stderr)
                continue
            print(f"resuming {run.path}", file=sys.stderr)
            try:
                resume(run, progress)
            except (ValueError, TypeError) as e:
                raise UsageError(f"cannot resume {run.path}: {e}") from None
    return _finish(path)


@contextmanager
def _resumable(path: Path) -> Iterator[None]:
    """On Ctrl-C or SIGTERM: say where the kept records are and how to continue, exit 130."""

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: interrupted; finished records are kept in {path}\n"
            f"continue with: {PROG} run --resume {path}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(path: Path) -> int:
    from guided_descent.report import render

    report = render(path)
    _print_claims(path)
    print(report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from guided_descent.experiments import BENCHMARKS, execute
    from guided_descent.experiments.progress import Progress
    from guided_descent.experiments.records import RunDir, default_run_dir

    info = BENCHMARKS[args.benchmark]
    _check_processes(args, [info.name], f"bench {args.benchmark}")
    config = _config(info.name, args)
    check = getattr(config, "check_world_size", None)
    if check is not None:
        try:
            check(max(getattr(args, "nproc", 1), int(os.environ.get("WORLD_SIZE", "1"))))
        except ValueError as e:
            raise UsageError(f"{info.name}: {e}") from None
    if getattr(args, "nproc", 1) > 1:
        return _launch(args, default_run_dir(info.name))
    if _launched_rank() > 0:
        # Another rank of a torchrun launch: rank 0 writes and prints the run.
        with tempfile.TemporaryDirectory() as scratch:
            execute(info.name, config, RunDir.create(Path(scratch) / "run"), Progress(False))
        return 0
    run = RunDir.create(getattr(args, "out", None) or default_run_dir(info.name))
    print(f"running {info.name} -> {run.path}", file=sys.stderr)
    execute(info.name, config, run, Progress(enabled=not getattr(args, "quiet", False)))
    return _finish(run.path)


def _launched_rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _check_processes(args: argparse.Namespace, names: list[str], what: str) -> None:
    """Refuse ``--nproc N > 1`` (or a torchrun launch) for experiments that run in one process:
    they would run N identical copies."""
    from guided_descent.experiments import get_experiment

    nproc = getattr(args, "nproc", 1)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc == 1 and launched == 1:
        return
    if nproc > 1 and launched > 1:
        raise UsageError("--nproc inside a torchrun launch: give one or the other")
    single = [n for n in names if not getattr(get_experiment(n).load(), "MULTI_PROCESS", False)]
    if single or not names:
        raise UsageError(
            f"{what} runs in one process; {nproc if nproc > 1 else launched} processes would "
            "run identical copies. Several processes: bench step or bench train --nproc N"
        )


def _launch(args: argparse.Namespace, default_out: Path) -> int:
    """Run this command again on ``--nproc`` processes through ``torchrun`` (standalone: one
    machine, a free port); every rank gets the same ``--out``."""
    argv = _without_nproc(args.command_line)
    if "out" not in args:
        argv += ["--out", str(default_out)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "--module",
        "guided_descent",
        *argv,
    ]
    print(f"launching {args.nproc} processes: {' '.join(command[1:])}", file=sys.stderr)
    env = {**os.environ, LAUNCH_COMMAND: shlex.join(args.command_line)}
    return subprocess.call(command, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _print_claims(path: Path) -> None:
    from guided_descent.experiments.records import SUMMARY, claim_reason, claim_verdict, read_json
    from guided_descent.report import is_run, sub_runs

    for run_dir in [path] if is_run(path) else sub_runs(path):
        for claim in read_json(run_dir / SUMMARY)["claims"]:
            why = claim_reason(claim)
            print(f"  {claim_verdict(claim):<9}  {run_dir.name}: {claim['name']} = "
                  f"{claim['value']}" + (f" ({why})" if why else ""), file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> int:
    from guided_descent.experiments.records import CONFIG, read_json
    from guided_descent.report import render

    if args.docs is not None:
        config = args.run_dir / CONFIG
        if not config.is_file() or read_json(config).get("experiment") != "bench_suite":
            raise UsageError(f"--docs needs a bench suite run directory; {args.run_dir} is not one")
        from guided_descent.report.bench_suite import publish

        print(publish(args.run_dir, args.docs))
        return 0
    print(render(args.run_dir))
    return 0


def _missing_extra(e: ModuleNotFoundError) -> NoReturn:
    if e.name and e.name.split(".")[0] in _EXTRA_MODULES:
        _fail(
            f"this command needs the 'cli' extra (missing module {e.name!r}): "
            "pip install 'guided-descent[cli]'"
        )
    raise e


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as e:
        _missing_extra(e)
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # for a torchrun relaunch
    # What env.json records: the user's command, also in the ranks a --nproc launch starts.
    launched_by = os.environ.get(LAUNCH_COMMAND)
    record_command(shlex.split(launched_by) if launched_by else args.command_line)
    commands = {"list": _cmd_list, "run": _cmd_run, "bench": _cmd_bench, "report": _cmd_report}
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return commands[args.command](args)
    except UsageError as e:
        parser.error(str(e))
    except RunDirError as e:
        _fail(str(e))
    except ModuleNotFoundError as e:
        _missing_extra(e)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished records are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
