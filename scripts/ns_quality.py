"""Newton–Schulz variants against the exact polar factor, and their CPU time (issue 16).

    OMP_NUM_THREADS=1 python scripts/ns_quality.py [--seeds 3] [--rounds 100] [--no-time]

Quality: for 128x256, 256x256 and 256x1024 inputs (Gaussian; singular values log-spaced over
κ = 1e2 and 1e6 with random singular vectors; Gaussian rows scaled over 1e-2..1; Cauchy entries),
each variant -- normalization (Frobenius or AOL),
coefficients (Jordan's or Polar Express) and step count -- runs in float32 and bfloat16 and is
compared with ``U Vᵀ`` of the input's float64 SVD (the polar factor Muon wants; with AOL that is
not the polar factor of the rescaled matrix the iteration starts from). Columns, worst over seeds:

* ``err₂``: ``‖O - U Vᵀ‖₂``, every direction (those with ``σ/‖G‖_F`` far below 1e-3 are not
  converged by any variant, so for κ = 1e6 this is ~1 everywhere);
* ``err₂ big``: ``‖(O - U Vᵀ) V_big‖₂``, on the directions with ``σ/‖G‖_F >= 1e-3`` only;
* ``band``: min and max of ``uᵢᵀ O vᵢ`` over those directions (1 is exact).

The same on the momentum buffers of digits-mlp's hidden matrices after 100 Muon steps (real
gradients), and AOL's floor ``‖polar(D G) - polar(G)‖₂`` on the big directions: the error that
no number of steps removes.

Time: the median over interleaved rounds (shuffled order each round, ``time.thread_time``) of
one ``newton_schulz`` call per variant, for 4 and 5 steps of each normalization; the coefficients
do not change the work. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from guided_descent.linalg.newton_schulz import JORDAN, POLAR_EXPRESS, newton_schulz

SHAPES = [(128, 256), (256, 256), (256, 1024)]
KINDS = ["gaussian", "kappa1e2", "kappa1e6", "rows1e2", "cauchy"]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
THRESHOLD = 1e-3  # σ/‖G‖_F from which a direction counts as "big"

# name -> (normalization, coefficient schedule); the schedule's length is the step count.
VARIANTS: dict[str, tuple[str, tuple]] = {
    "frobenius jordan×5 (default)": ("frobenius", (JORDAN,) * 5),
    "frobenius jordan×4": ("frobenius", (JORDAN,) * 4),
    "frobenius PE×5": ("frobenius", POLAR_EXPRESS),
    "frobenius PE[:4]": ("frobenius", POLAR_EXPRESS[:4]),
    "aol jordan×5": ("aol", (JORDAN,) * 5),
    "aol jordan×4": ("aol", (JORDAN,) * 4),
    "aol PE×5": ("aol", POLAR_EXPRESS),
    "aol PE[:4]": ("aol", POLAR_EXPRESS[:4]),
    "aol PE[1:]": ("aol", POLAR_EXPRESS[1:]),
}


def make_input(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """A float64 (m, n) test matrix (the spectra of tests/test_newton_schulz.py, κ up to 1e6)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "rows1e2":  # Gaussian rows scaled log-uniformly over 1e-2..1, as neurons' grads
        scale = torch.logspace(0, -2, m, dtype=torch.float64)[torch.randperm(m, generator=g)]
        return torch.randn(m, n, generator=g, dtype=torch.float64) * scale[:, None]
    if kind == "cauchy":  # heavy-tailed entries (the paper's Lévy-like case)
        u = torch.rand(m, n, generator=g, dtype=torch.float64)
        return torch.tan(torch.pi * (u - 0.5))
    k = min(m, n)
    decades = {"kappa1e2": 2, "kappa1e6": 6}[kind]
    sv = torch.logspace(0, -decades, k, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * sv) @ V.mT


def errors(O: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> dict:
    E = O.double() - U @ Vh  # (m, n)
    big = s >= THRESHOLD
    gains = (U.mT @ O.double() @ Vh.mT).diagonal()[big]
    return {
        "err": torch.linalg.matrix_norm(E, ord=2).item(),
        "err_big": torch.linalg.matrix_norm(E @ Vh[big].mT, ord=2).item(),
        "lo": gains.min().item(),
        "hi": gains.max().item(),
    }


def quality(seeds: int) -> None:
    for dname, dtype in DTYPES.items():
        for m, n in SHAPES:
            print(f"\n#### {m}×{n}, {dname} compute (worst of {seeds} seeds)\n")
            print("| variant | " + " | ".join(KINDS) + " |")
            print("|---" * (len(KINDS) + 1) + "|")
            rows: dict[str, list[str]] = {name: [] for name in VARIANTS}
            for kind in KINDS:
                refs = []
                for seed in range(seeds):
                    G = make_input(kind, m, n, seed)
                    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
                    refs.append((G.float(), U, S / torch.linalg.matrix_norm(G), Vh))
                for name, (norm, schedule) in VARIANTS.items():
                    res = [
                        errors(newton_schulz(G, len(schedule), schedule, dtype=dtype,
                                             normalization=norm), U, s, Vh)
                        for G, U, s, Vh in refs
                    ]
                    err = max(r["err"] for r in res)
                    big = max(r["err_big"] for r in res)
                    lo, hi = min(r["lo"] for r in res), max(r["hi"] for r in res)
                    rows[name].append(f"{err:.2f} / {big:.2f} / [{lo:.2f}, {hi:.2f}]")
            for name, cells in rows.items():
                print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nCells: err₂ / err₂ big / band (see the module docstring).")


def digits_momenta(steps: int = 100) -> list[tuple[str, torch.Tensor]]:
    """Muon's momentum buffers of digits-mlp's hidden matrices after ``steps`` steps (batch 128):
    gradients as training makes them, for the variants' errors on real inputs."""
    import guided_descent as gd
    from guided_descent.tasks import digits

    torch.manual_seed(0)
    data = digits.load()
    model = digits.make_mlp((256, 256))
    opt = gd.create("muon", model)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(data.y_train), (128,), generator=g)
        loss = digits.classification_loss(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = []
    for name, p in model.named_parameters():
        buf = opt.state[p].get("momentum_buffer") if p.dim() == 2 else None
        if buf is not None and min(p.shape) >= 64:
            out.append((f"digits-mlp {name} {tuple(p.shape)}", buf.double().clone()))
    return out


def real() -> None:
    momenta = digits_momenta()
    for dname, dtype in DTYPES.items():
        print(f"\n#### digits-mlp momenta after 100 Muon steps, {dname} compute\n")
        print("| variant | " + " | ".join(name for name, _ in momenta) + " |")
        print("|---" * (len(momenta) + 1) + "|")
        refs = []
        for _, G in momenta:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            refs.append((G.float(), U, S / torch.linalg.matrix_norm(G), Vh))
        for vname, (norm, schedule) in VARIANTS.items():
            cells = []
            for G, U, s, Vh in refs:
                O = newton_schulz(G, len(schedule), schedule, dtype=dtype, normalization=norm)
                r = errors(O, U, s, Vh)
                cells.append(
                    f"{r['err']:.2f} / {r['err_big']:.2f} / [{r['lo']:.2f}, {r['hi']:.2f}]"
                )
            print(f"| {vname} | " + " | ".join(cells) + " |")


def aol_floor(seeds: int) -> None:
    """‖(polar(D G) - polar(G))ᵀ U_big‖₂ in float64 (on the wide side, G's directions with
    ``σ/‖G‖_F >= THRESHOLD``): what AOL costs however many steps are taken."""
    print("\n#### AOL's floor on the big directions, float64 SVDs (worst of seeds)\n")
    print("| matrix | " + " | ".join(KINDS) + " | digits-mlp momenta |")
    print("|---" * (len(KINDS) + 2) + "|")

    def floor(G: torch.Tensor) -> float:
        X = G.mT if G.size(-2) > G.size(-1) else G
        A = X @ X.mT
        sums = A.abs().sum(-1)
        D = torch.where(sums > 0, sums.clamp_min(1e-300).rsqrt(), 0.0)  # a zero row stays zero
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        U2, _, Vh2 = torch.linalg.svd(D[:, None] * X, full_matrices=False)
        big = S / torch.linalg.matrix_norm(X) >= THRESHOLD  # as err₂ big: G's null space aside
        E = (U2 @ Vh2 - U @ Vh).mT @ U[:, big]  # (n, big): what happens to G's big directions
        return torch.linalg.matrix_norm(E, ord=2).item()

    real_floors = ", ".join(f"{floor(G):.2f}" for _, G in digits_momenta())
    for m, n in SHAPES:
        cells = [f"{max(floor(make_input(k, m, n, s)) for s in range(seeds)):.2f}" for k in KINDS]
        print(f"| {m}×{n} | " + " | ".join(cells) + f" | {real_floors if m == 128 else ''} |")


def timing(rounds: int) -> None:
    torch.set_num_threads(1)
    print(f"\n#### Time, ms (median of {rounds} interleaved rounds, one thread)\n")
    entries = [(norm, k) for norm in ("frobenius", "aol") for k in (5, 4)]
    head = " | ".join(f"{norm} ×{k}" for norm, k in entries)
    print(f"| matrix | dtype | {head} | aol×4 / frobenius×5 |")
    print("|---" * (len(entries) + 3) + "|")
    for m, n in SHAPES:
        G = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        for dname, dtype in DTYPES.items():
            times: dict[tuple[str, int], list[float]] = {e: [] for e in entries}
            for r in range(rounds + 5):  # 5 untimed warm-up rounds
                order = entries[:]
                random.Random(r).shuffle(order)
                for norm, k in order:
                    t0 = time.thread_time()
                    newton_schulz(G, k, JORDAN, dtype=dtype, normalization=norm)
                    dt = time.thread_time() - t0
                    if r >= 5:
                        times[(norm, k)].append(dt * 1e3)
            med = {e: statistics.median(v) for e, v in times.items()}
            cells = " | ".join(f"{med[e]:.2f}" for e in entries)
            ratio = med[("aol", 4)] / med[("frobenius", 5)]
            print(f"| {m}×{n} | {dname} | {cells} | {ratio:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--no-time", action="store_true", help="skip the timing")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality tables")
    args = ap.parse_args()
    if not args.no_quality:
        quality(args.seeds)
        real()
        aol_floor(args.seeds)
    if not args.no_time:
        timing(args.rounds)


if __name__ == "__main__":
    main()
