"""Interleaved optimizer.step() timing on a bench workload's MLP: ours, an older commit's, peers'.

    python scripts/step_speed.py digits muon,soap,torch-muon,pto-muon,pto-soap [--before REV]
    python scripts/step_speed.py digits-cnn soap,pto-soap   # mnist1d-cnn, digits-autoencoder too

Every round, each optimizer takes one step on its own copy of the model with the same gradient,
in a shuffled order, so that a shared, busy machine slows every entry alike; the time is this
thread's CPU time (``time.thread_time``), the median over rounds is printed (and the mean, which
includes Shampoo's and SOAP's periodic refreshes), then our entries' ratios to the others.
Run with ``OMP_NUM_THREADS=1``. Entries: a registry name (ours), ``NAME:float32`` (ours with
``ns_dtype=torch.float32``), ``NAME:compiled`` (ours with ``compile_update=True``; the warm-up
rounds absorb the compilation), ``NAME:before`` (commit REV of ``--before``, imported as a
renamed copy of its ``src/guided_descent``), or a peer name (``guided-descent bench train
--help``). ``bench train --peers`` times steps inside training, one optimizer after another;
this script is the like-for-like comparison when the machine's load changes while it runs.
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

import guided_descent as gd
from guided_descent.experiments import peers
from guided_descent.tasks import digits, mnist1d

# Each bench train workload's model at its default size ("digits": digits-mlp, and so on).
MODELS = {
    "digits": digits.make_mlp,
    "mnist1d": mnist1d.make_mlp,
    "digits-cnn": digits.make_cnn,
    "mnist1d-cnn": mnist1d.make_cnn,
    "digits-autoencoder": digits.make_autoencoder,
}


def import_before(rev: str) -> object:
    """``guided_descent`` as of commit ``rev``, importable beside the current one."""
    root = Path(tempfile.mkdtemp(prefix="gd_before_"))
    data = subprocess.run(["git", "archive", rev, "src/guided_descent"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    package = root / "gd_before"
    (root / "src" / "guided_descent").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bguided_descent\b", "gd_before", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("gd_before")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=tuple(MODELS), help="the bench train workload's model")
    ap.add_argument("entries", help="comma-separated entries (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--before", default=None, help="git revision for NAME:before entries")
    args = ap.parse_args()
    torch.set_num_threads(1)
    before = import_before(args.before) if args.before else None
    make = MODELS[args.task]

    entries = []
    with peers.heavyball_compile(False):
        for spec in args.entries.split(","):
            torch.manual_seed(0)
            model = make()
            name, _, tag = spec.partition(":")
            if peers.is_peer(name):
                opt = peers.create(name, model).optimizer
            elif tag == "before":
                if before is None:
                    raise SystemExit(f"{spec}: give --before REV")
                opt = before.create(name, model)  # type: ignore[attr-defined]
            elif tag == "float32":
                opt = gd.create(name, model, ns_dtype=torch.float32)
            elif tag == "compiled":
                opt = gd.create(name, model, compile_update=True)
            else:
                opt = gd.create(name, model)
            entries.append((spec, model, opt, []))
    g = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in entries[0][1].parameters()]
    grads = [[torch.randn(s, generator=g) * 0.01 for s in shapes] for _ in range(10)]
    order = random.Random(0)
    warmup = 20  # covers the first preconditioner refreshes and oneDNN's first calls
    with peers.heavyball_compile(False):
        for i in range(args.rounds + warmup):
            for _spec, model, opt, times in order.sample(entries, len(entries)):
                for p, grad in zip(model.parameters(), grads[i % len(grads)], strict=True):
                    p.grad = grad
                start = time.thread_time()
                opt.step()
                if i >= warmup:
                    times.append(time.thread_time() - start)
    median = {spec: statistics.median(t) * 1e3 for spec, _m, _o, t in entries}
    mean = {spec: statistics.mean(t) * 1e3 for spec, _m, _o, t in entries}
    for spec in median:
        print(f"{args.task} {spec:18s} median {median[spec]:7.3f} ms  mean {mean[spec]:7.3f} ms")
    ours = [s for s in median if not peers.is_peer(s.partition(":")[0]) and ":" not in s]
    for spec in ours:
        for other in median:
            if other != spec:
                print(f"  {spec} / {other}: median {median[spec] / median[other]:.3f}, "
                      f"mean {mean[spec] / mean[other]:.3f}")


if __name__ == "__main__":
    main()
