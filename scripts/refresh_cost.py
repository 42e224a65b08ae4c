"""Cost and quality of an eigenbasis refresh by ``eigh`` against SOAP's QR power step, per size.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/refresh_cost.py [--sizes 32,64,...]
        [--batches 1,4] [--budget 4] [--quality-only | --timing-only]

Timing: for every factor size ``n`` and batch ``b`` (``b`` same-size factors, which the library
decomposes in one batched call), each round runs every variant once, in a shuffled order, so a
shared, busy machine slows them alike; the median of this thread's CPU time
(``time.thread_time``) over rounds is printed, in ms. Variants:

- ``eigh``: ``torch.linalg.eigh`` of the ``(b, n, n)`` float32 stack, alone;
- ``initial``: SOAP's first basis, :func:`~guided_descent.preconditioners.soap.initial_bases`
  (tie-break ``2e-2``, the canonical ``eigh`` with its symmetrization, ordering, copies);
- ``qr``: ``torch.linalg.qr`` of one ``(b, n, n)`` product, alone;
- ``refresh``: SOAP's refresh, :func:`~guided_descent.preconditioners.soap.refresh_bases` at SOAP's
  defaults (shift ``1e-3``, sorted, condition estimates) from the previous basis;
- ``invroot``: Shampoo's :func:`~guided_descent.preconditioners.shampoo.inverse_roots` at its
  defaults (root 4 of a matrix's factor, ``epsilon=1e-12``, ``relative_epsilon=1e-6``).

The factors: ``F ← β F + (1 - β) G Gᵀ`` (``β = 0.95``, SOAP's) with ``G = U diag(s) Z`` of shape
``n × n`` -- ``Z`` Gaussian, ``s_i = 1/(i+1)`` a decaying gradient spectrum, ``U`` orthogonal and
drifting a little every step. ``full``: 20 such steps (full rank). ``early``: 2 steps with
``G`` of shape ``n × n/8`` (rank ``n/4``, the rank-deficient factor SOAP's first basis and
Shampoo's first root see).

Quality: starting from the exact eigenbasis of a ``full`` factor, the factor takes 10 more steps
(one ``precondition_frequency``), then the basis is refreshed; three times in a row. After each
refresh it prints the off-diagonal mass ``‖offdiag(Qᵀ F Q)‖_F / ‖F‖_F`` for: the stale basis (no
refresh), the chained QR refresh, ``eigh`` of ``F`` (rounding only), and ``eigh`` of the
tie-broken ``F`` (SOAP's first basis, what ``eigh`` would give at a refresh with the same
well-posedness fix).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from guided_descent.optimizers.shampoo import RELATIVE_EPSILON
from guided_descent.optimizers.soap import REFRESH_SHIFT, TIEBREAK
from guided_descent.preconditioners.shampoo import inverse_roots
from guided_descent.preconditioners.soap import initial_bases, refresh_bases

BETA = 0.95  # SOAP's shampoo_beta default (its betas[1])
FREQUENCY = 10  # SOAP's and Shampoo's precondition_frequency default


class Drift:
    """``b`` factors ``F ← β F + (1 - β) G Gᵀ``, ``G = U diag(s) Z`` with a drifting ``U``."""

    def __init__(self, n: int, b: int, seed: int, width: int | None = None) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.n, self.b, self.width = n, b, width or n
        self.U = torch.linalg.qr(self.randn(b, n, n))[0]  # (b, n, n) float32
        self.s = 1.0 / torch.arange(1, n + 1, dtype=torch.float32)  # (n,)
        self.F = torch.zeros(b, n, n)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen)

    def step(self) -> Tensor:
        # A small random rotation of the gradient's principal directions per step.
        noise = self.randn(self.b, self.n, self.n) / self.n**0.5
        self.U = torch.linalg.qr(self.U + 0.01 * noise)[0]
        G = (self.U * self.s) @ self.randn(self.b, self.n, self.width)  # (b, n, width)
        self.F = BETA * self.F + (1 - BETA) * (G @ G.mT) / self.width
        return self.F


def factors(kind: str, n: int, b: int, seed: int = 0) -> Tensor:
    if kind == "full":
        drift = Drift(n, b, seed)
        for _ in range(20):
            drift.step()
    else:  # early: two gradients of rank n/8 each
        drift = Drift(n, b, seed, width=max(1, n // 8))
        for _ in range(2):
            drift.step()
    return drift.F.clone()


def variants(F: Tensor, Q_prev: Tensor) -> dict[str, Callable[[], object]]:
    Fs, Qs = list(F), list(Q_prev)
    PQ = F @ Q_prev
    return {
        "eigh": lambda: torch.linalg.eigh(F),
        "initial": lambda: initial_bases(Fs, TIEBREAK),
        "qr": lambda: torch.linalg.qr(PQ),
        "refresh": lambda: refresh_bases(Fs, Qs, REFRESH_SHIFT),
        "invroot": lambda: inverse_roots(Fs, [4] * len(Fs), 1e-12, RELATIVE_EPSILON),
    }


def timing(sizes: list[int], batches: list[int], kinds: list[str], budget: float) -> None:
    """Median ms per variant; ``budget`` seconds of measurement per (kind, n, b) at most."""
    names = list(variants(torch.eye(2)[None], torch.eye(2)[None]))
    print("kind   n     b  rounds " + " ".join(f"{v:>9s}" for v in names)
          + "  refresh/eigh refresh/initial invroot/eigh")
    shuffle = random.Random(0)
    for kind in kinds:
        for n in sizes:
            for b in batches:
                F = factors(kind, n, b)
                Q_prev = torch.stack(initial_bases(list(factors(kind, n, b, seed=1)), 0.0))
                runs = variants(F, Q_prev)
                start = time.thread_time()
                for fn in runs.values():  # warm-up: first calls, and one round's cost
                    fn()
                per_round = max(time.thread_time() - start, 1e-6)
                rounds = int(min(60, max(5, budget / per_round)))
                times: dict[str, list[float]] = {v: [] for v in runs}
                for _ in range(rounds):
                    for name in shuffle.sample(names, len(names)):
                        t0 = time.thread_time()
                        runs[name]()
                        times[name].append(time.thread_time() - t0)
                med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
                print(f"{kind:6s} {n:5d} {b:2d} {rounds:6d} "
                      + " ".join(f"{med[v]:9.3f}" for v in names)
                      + f"  {med['refresh'] / med['eigh']:12.2f}"
                      f" {med['refresh'] / med['initial']:15.2f}"
                      f" {med['invroot'] / med['eigh']:12.2f}", flush=True)


def off_diagonal(Q: Tensor, F: Tensor) -> float:
    """Largest over the batch of ``‖offdiag(Qᵀ F Q)‖_F / ‖F‖_F`` (float64 products)."""
    Q, F = Q.double(), F.double()
    D = Q.mT @ F @ Q
    off = D - torch.diag_embed(D.diagonal(dim1=-2, dim2=-1))
    return float((torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(F)).max())


def quality(sizes: list[int], refreshes: int = 3, b: int = 2) -> None:
    print(f"off-diagonal mass after each refresh (worst of {b} factors), "
          "stale / QR refresh / eigh / eigh of tie-broken F")
    for n in sizes:
        drift = Drift(n, b, seed=0)
        for _ in range(20):
            drift.step()
        Q = torch.stack(initial_bases(list(drift.F), 0.0))  # exact basis to start from
        cells = []
        for _ in range(refreshes):
            for _ in range(FREQUENCY):
                F = drift.step()
            stale = off_diagonal(Q, F)
            Q = torch.stack([r.basis for r in refresh_bases(list(F), list(Q), REFRESH_SHIFT)])
            exact = torch.stack(initial_bases(list(F), 0.0))
            tied = torch.stack(initial_bases(list(F), TIEBREAK))
            cells.append(f"{stale:.1e} / {off_diagonal(Q, F):.1e} / {off_diagonal(exact, F):.1e}"
                         f" / {off_diagonal(tied, F):.1e}")
        print(f"n={n:5d}  " + "  |  ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,64,128,256,512,1024")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--kinds", default="full,early")
    ap.add_argument("--budget", type=float, default=4.0,
                    help="seconds of measurement per (kind, size, batch), at least 5 rounds")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.quality_only:
        timing(sizes, [int(b) for b in args.batches.split(",")], args.kinds.split(","),
               args.budget)
    if not args.timing_only:
        quality(sizes)


if __name__ == "__main__":
    main()
