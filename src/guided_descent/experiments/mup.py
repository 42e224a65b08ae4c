"""``mup``: hyper-parameter transfer across width under μP (EXPERIMENTS.md section 5).

Two measurements, each under the standard parametrization (SP: torch's default initialisation,
one learning rate for every parameter) and under μP (:mod:`guided_descent.mup`, base width
``base_width``, where the two coincide):

* **Coordinate check** -- the mean ``|activation|`` of every layer at each of the first
  ``coord_steps`` training steps, per width, averaged over seeds: for an MLP on digits with Adam
  and with each matrix optimizer of ``optimizers`` (Muon: spectral scaling), and for the small
  GPT of :mod:`guided_descent.tasks.gpt` (Adam) on a synthetic next-token task. μP should keep
  each layer's scale flat across widths; SP lets the later steps grow with width.
* **Learning-rate transfer** -- the MLP's training loss after ``steps`` steps against the learning
  rate (a grid of powers of 2), one curve per width, for each of ``transfer_optimizers``. μP
  should keep the best learning rate in place across widths; under SP it moves.

Data *(ours)*: scikit-learn's bundled 8x8 handwritten digits (1797 images, 64 features,
standardised with the training split's statistics; a fixed 80/20 split), nothing downloaded. The
MLP is ``64 -> w -> w -> 10`` with ReLU and torch's default initialisation. The GPT has two
blocks, head size 16 (so width grows by heads and the attention scale 1/sqrt(16) stays right),
an untied head, GPT-2's N(0, 0.02) initialisation (μP with ``init="fixed"``), and learns a random
first-order Markov chain over 32 tokens.

Pairing: within a seed, SP and μP and every learning rate and width draw their initial weights
from the same seed and see the same batches. For matrix optimizers the matrix groups run at
``matrix_lr_ratio`` times the (AdamW) learning rate.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import guided_descent
from guided_descent import mup
from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.mup_claims import FLAT_BOUND, GROWTH_BOUND, MAX_MUP_SHIFT, claims
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import MetricsWriter, RunDir, require_seeds
from guided_descent.experiments.training import train
from guided_descent.optimizers import get_spec
from guided_descent.tasks.gpt import GPT, GPTConfig

PARAMETRIZATIONS: tuple[str, ...] = ("sp", "mup")
LABELS: dict[str, str] = {"sp": "SP", "mup": "μP"}


# The GPT of the coordinate check (ours): small enough for a CPU, wide enough to show the trend.
GPT_HEAD_DIM = 16
GPT_LAYERS = 2
GPT_VOCAB = 32
GPT_CONTEXT = 16
GPT_BATCH = 8
DIGITS_CLASSES = 10
DIGITS_FEATURES = 64


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Coordinate check and learning-rate transfer across widths, SP vs μP (MLP on digits, GPT)."""

    optimizers: tuple[str, ...] = option(
        ("adam", "muon"), "optimizers of the MLP coordinate check (μP rules for each)"
    )
    transfer_optimizers: tuple[str, ...] = option(
        ("adam",),
        "optimizers of the learning-rate sweep (a matrix optimizer costs ~0.2 s a step "
        "at width 1024 on one core)",
    )
    widths: tuple[int, ...] = option((64, 128, 256, 512, 1024), "hidden widths, narrow to wide")
    base_width: int = option(64, "μP's base width: μP equals SP there")
    seeds: int = option(3, "seeds (initialisation and batch order) per configuration")
    steps: int = option(200, "training steps of each learning-rate sweep run (the fixed budget)")
    batch_size: int = option(64, "minibatch size (MLP)")
    lr_exponents: tuple[int, ...] = option(
        tuple(range(-13, -3)),
        "learning-rate grid as consecutive base-2 exponents (one grid step = 2x); negative "
        "values need '=': --lr-exponents=-12,-11,...",
    )
    coord_lr: float = option(
        0.01, "learning rate of the MLP coordinate check (Adam / AdamW groups)"
    )
    gpt_lr: float = option(0.003, "Adam learning rate of the GPT coordinate check")
    matrix_lr_ratio: float = option(
        2.0, "matrix optimizers: lr of the Muon/Shampoo/SOAP groups over the AdamW groups' lr"
    )
    coord_steps: int = option(10, "training steps recorded by the coordinate check")
    gpt: bool = option(True, "also run the coordinate check on the small GPT (Adam)")
    eval_every: int = option(50, "log the minibatch loss of sweep runs every N steps")
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name in ("optimizers", "transfer_optimizers"):
            names = getattr(self, field_name)
            if field_name == "transfer_optimizers" and not names:
                continue
            if len(set(names)) != len(names):
                raise ValueError(f"{field_name} lists a name twice: {','.join(names)}")
            for name in names:
                get_spec(name)  # an UnknownNameError (ValueError) lists the known names
                if name not in mup.SUPPORTED:
                    raise ValueError(
                        f"{field_name}: no μP rule for {name!r}; supported: "
                        f"{', '.join(mup.SUPPORTED)}"
                    )
        if len(self.widths) < 2 or not all(_is_int(w) and w >= 1 for w in self.widths):
            raise ValueError(f"widths must be at least two integers >= 1, got {self.widths!r}")
        if list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"widths must be strictly increasing, got {self.widths!r}")
        if not _is_int(self.base_width) or self.base_width < 1:
            raise ValueError(f"base_width must be an integer >= 1, got {self.base_width!r}")
        if self.gpt:
            odd = [w for w in (*self.widths, self.base_width) if w % GPT_HEAD_DIM]
            if odd:
                raise ValueError(
                    f"with gpt on, widths and base_width must be multiples of the head size "
                    f"{GPT_HEAD_DIM}; got {odd}"
                )
        k = self.lr_exponents
        if len(k) < 3 or not all(_is_int(e) for e in k):
            raise ValueError(f"lr_exponents must be at least 3 integers, got {k!r}")
        if any(b - a != 1 for a, b in zip(k, k[1:], strict=False)):
            raise ValueError(f"lr_exponents must be consecutive integers (2x apart), got {k!r}")
        for name in ("batch_size", "coord_steps", "eval_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("coord_lr", "gpt_lr", "matrix_lr_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @classmethod
    def quick(cls) -> Self:
        """Widths 32/128/512 (base 32: the same 16x span, 8x cheaper), 1 seed, 150-step sweeps
        on 7 learning rates: about 20 s on one thread."""
        return cls(
            widths=(32, 128, 512),
            base_width=32,
            seeds=1,
            steps=150,
            lr_exponents=tuple(range(-11, -4)),
        )

    @property
    def narrow(self) -> int:
        return self.widths[0]

    @property
    def wide(self) -> int:
        return self.widths[-1]


# --- data and models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits, standardised; inputs ``(n, 64)`` float32, labels ``(n,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device) -> Digits:
        return Digits(
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        )


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The bundled digits, a seeded split, features standardised with the training statistics."""
    # Imported here: the command line imports every experiment to build its flags, and
    # scikit-learn takes about a second to load.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xD161])).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test, tr = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)  # (1797, 64) pixel intensities 0..16
    yt = torch.as_tensor(y, dtype=torch.int64)
    mean, std = xt[tr].mean(0), xt[tr].std(0)
    # Border pixels are always 0 (std 0); the floor keeps them at 0 instead of dividing by 0.
    xt = (xt - mean) / std.clamp_min(1e-3)
    return Digits(xt[tr], yt[tr], xt[test], yt[test])


def make_mlp(width: int) -> nn.Sequential:
    """``64 -> width -> width -> 10`` with ReLU, torch's default init from the global RNG."""
    return nn.Sequential(
        OrderedDict(
            input=nn.Linear(DIGITS_FEATURES, width),
            relu1=nn.ReLU(),
            hidden=nn.Linear(width, width),
            relu2=nn.ReLU(),
            output=nn.Linear(width, DIGITS_CLASSES),
        )
    )


def gpt_config(width: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=GPT_VOCAB,
        context=GPT_CONTEXT,
        n_layer=GPT_LAYERS,
        n_head=width // GPT_HEAD_DIM,
        d_model=width,
        tied=False,
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": make_mlp,
    "gpt": lambda width: GPT(gpt_config(width)),
}
# How each model initialises its weights, in μP's terms.
MODEL_INIT: dict[str, mup.Init] = {"mlp": "fan_in", "gpt": "fixed"}


def _stream_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per (seed, purpose)."""
    entropy = [seed, *stream.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def build(
    model_name: str,
    optimizer: str,
    parametrization: str,
    width: int,
    lr: float,
    seed: int,
    config: Config,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model at ``width`` and its optimizer, under SP or μP, at learning rate ``lr``.

    ``lr`` is the Adam(W)-like learning rate; matrix optimizers run their matrix groups at
    ``config.matrix_lr_ratio * lr``. The initial weights depend on (model, width, seed) only.
    """
    make = MODELS[model_name]
    # fork_rng: the default initialisations draw from the global RNG; seed it, then restore it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream_seed(seed, f"{model_name}-init-{width}"))
        model = make(width)
    model = model.to(config.device)
    hybrid = optimizer in mup.MATRIX
    lrs = {"lr": config.matrix_lr_ratio * lr, "adamw_lr": lr} if hybrid else {"lr": lr}
    if parametrization == "sp":
        return model, guided_descent.create(optimizer, model, on_nonfinite="off", **lrs)
    with torch.device("meta"):
        base = make(config.base_width)
    plan = mup.parametrize(model, base, optimizer, init=MODEL_INIT[model_name])
    return model, guided_descent.create(
        optimizer, plan.param_groups(**lrs), on_nonfinite="off"
    )


class _GPTData:
    """Sequences from a random first-order Markov chain over ``GPT_VOCAB`` tokens (seeded)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(_stream_seed(seed, "gpt-chain"))
        # Peaked rows (temperature 1/3) make the chain learnable but not trivial.
        self.transitions = torch.softmax(3.0 * torch.randn(GPT_VOCAB, GPT_VOCAB, generator=g), -1)
        self.generator = torch.Generator().manual_seed(_stream_seed(seed, "gpt-batches"))
        self.device = device

    def batch(self) -> tuple[Tensor, Tensor]:
        seq = torch.empty(GPT_BATCH, GPT_CONTEXT + 1, dtype=torch.int64)
        seq[:, 0] = torch.randint(0, GPT_VOCAB, (GPT_BATCH,), generator=self.generator)
        for t in range(GPT_CONTEXT):
            probs = self.transitions[seq[:, t]]
            seq[:, t + 1] = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return seq[:, :-1].to(self.device), seq[:, 1:].to(self.device)


# --- coordinate check ---------------------------------------------------------------------------


def coordinate_check(
    config: Config,
    data: Digits,
    model_name: str,
    optimizer: str,
    parametrization: str,
    seed: int,
) -> dict[int, dict[str, list[float]]]:
    """width -> layer -> mean |activation| at steps 0 .. coord_steps-1, for one seed."""
    device = torch.device(config.device)

    lr = config.gpt_lr if model_name == "gpt" else config.coord_lr

    def build_at(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        return build(model_name, optimizer, parametrization, width, lr, seed, config)

    if model_name == "gpt":
        # The same token batches for every width: one list drawn up front.
        chain = _GPTData(seed, device)
        batches = [chain.batch() for _ in range(config.coord_steps)]

        def loss(model: nn.Module, t: int) -> Tensor:
            x, y = batches[t]
            return F.cross_entropy(model(x).reshape(-1, GPT_VOCAB), y.reshape(-1))

    else:
        order = torch.Generator().manual_seed(_stream_seed(seed, "coord-batches"))
        n = data.x_train.shape[0]
        idx = [
            torch.randint(0, n, (config.batch_size,), generator=order).to(device)
            for _ in range(config.coord_steps)
        ]

        def loss(model: nn.Module, t: int) -> Tensor:
            return F.cross_entropy(model(data.x_train[idx[t]]), data.y_train[idx[t]])

    return mup.coordinate_check(build_at, config.widths, loss, config.coord_steps)


def late_steps(steps: int) -> range:
    """The recorded steps a layer's scale is read from: the second half, ``steps // 2 ..``.

    Step 0 is the initialisation (μP shrinks the readout there, by design), and the first updates
    of Adam-like methods are sign-like jumps; the mean over the later half of the steps measures
    where training has taken the activations, with less step-to-step noise than the last step.
    """
    return range(steps // 2, steps)


def coord_summary(scales: dict[str, dict[str, list[float]]], widths: list[int]) -> dict[str, Any]:
    """Per layer, its scale (mean over :func:`late_steps`) per width; max/min over widths
    (``spread``) and widest over narrowest (``growth``)."""
    spread: dict[str, float] = {}
    growth: dict[str, float] = {}
    level: dict[str, list[float]] = {}
    layers = list(scales[str(widths[0])])
    for layer in layers:
        steps = late_steps(len(scales[str(widths[0])][layer]))
        late = [float(np.mean([scales[str(w)][layer][t] for t in steps])) for w in widths]
        level[layer] = late
        spread[layer] = max(late) / min(late) if min(late) > 0 else math.inf
        growth[layer] = late[-1] / late[0] if late[0] > 0 else math.inf
    return {
        "late_scale": level,
        "spread": spread,
        "growth": growth,
        "worst_spread": max(spread.values()),
        "worst_spread_layer": max(spread, key=spread.get),  # type: ignore[arg-type]
        "max_growth": max(growth.values()),
        "max_growth_layer": max(growth, key=growth.get),  # type: ignore[arg-type]
    }


# --- learning-rate transfer ---------------------------------------------------------------------


def _sweep_run(
    config: Config,
    data: Digits,
    optimizer: str,
    parametrization: str,
    width: int,
    exponent: int,
    seed: int,
    metrics: MetricsWriter,
) -> dict[str, float]:
    """Train one MLP for the budget; return its final train loss, test loss and accuracy."""
    model, opt = build("mlp", optimizer, parametrization, width, 2.0**exponent, seed, config)
    order = torch.Generator().manual_seed(_stream_seed(seed, "sweep-batches"))
    n = data.x_train.shape[0]
    # (steps, batch) indices drawn up front on the CPU generator: the same order for every run
    # of this seed, whatever the device.
    batches = torch.randint(0, n, (config.steps, config.batch_size), generator=order)
    batches = batches.to(config.device)

    def batch_loss(step: int) -> Tensor:
        idx = batches[step - 1]
        return F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])

    start = time.perf_counter()
    tags = dict(optimizer=optimizer, parametrization=parametrization, width=width, seed=seed)
    result = train(
        model,
        opt,
        batch_loss,
        config.steps,
        eval_every=config.eval_every,
        metrics=metrics,
        tags={**tags, "lr_exponent": exponent},
        stop_on_nonfinite=True,
    )
    final = {**_evaluate(model, data), "diverged": float(result.diverged)}
    final["seconds"] = time.perf_counter() - start
    metrics.write(event="final", **tags, lr_exponent=exponent, step=result.steps, **final)
    return final


@torch.no_grad()
def _evaluate(model: nn.Module, data: Digits) -> dict[str, float]:
    out = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        logits = model(x)
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
        out[f"{split}_acc"] = float((logits.argmax(1) == y).float().mean())
    return out


def _nan_to_inf(x: float) -> float:
    return math.inf if not math.isfinite(x) else x


def transfer_summary(
    losses: dict[str, list[list[float]]], widths: list[int], exponents: list[int]
) -> dict[str, Any]:
    """Median loss per (width, lr) over seeds, the best exponent per width, and its shift.

    A diverged run (NaN or infinite loss) counts as infinitely bad, so it is never the best.
    """
    median = {
        str(w): [
            float(np.median([_nan_to_inf(v) for v in per_seed])) for per_seed in losses[str(w)]
        ]
        for w in widths
    }
    best = {w: exponents[int(np.argmin(median[w]))] for w in median}
    edge = {w: k in (exponents[0], exponents[-1]) for w, k in best.items()}
    narrow, wide = str(widths[0]), str(widths[-1])
    return {
        "median_loss": median,
        "best_exponent": best,
        "best_at_grid_edge": edge,
        # Signed: negative when the best learning rate falls with width.
        "shift": best[wide] - best[narrow],
        "abs_shift": abs(best[wide] - best[narrow]),
    }


# --- the run ------------------------------------------------------------------------------------


def coord_labels(config: Config) -> list[tuple[str, str]]:
    """(model, optimizer) pairs of the coordinate check."""
    pairs = [("mlp", name) for name in config.optimizers]
    if config.gpt:
        pairs.append(("gpt", "adam"))
    return pairs


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Coordinate checks, then learning-rate sweeps; then ``summary.json`` with the claims."""
    device = torch.device(config.device)
    data = load_digits_split().to(device)
    widths = list(config.widths)
    exponents = list(config.lr_exponents)
    pairs = coord_labels(config)
    n_coord = len(pairs) * len(PARAMETRIZATIONS) * config.seeds
    n_sweep = len(config.transfer_optimizers) * 2 * len(widths) * len(exponents) * config.seeds
    started = time.perf_counter()
    coord: dict[str, dict[str, Any]] = {}
    sweeps: dict[str, dict[str, dict[str, list[list[float]]]]] = {}
    timings: dict[str, float] = {}
    with run.metrics() as metrics, progress.bar(n_coord + n_sweep, "mup", unit="run") as bar:
        t0 = time.perf_counter()
        for model_name, optimizer in pairs:
            label = f"{model_name}/{optimizer}"
            coord[label] = {}
            for param in PARAMETRIZATIONS:
                per_seed = []
                for seed in range(config.seeds):
                    bar.set_postfix_str(f"coord {label} {param} seed={seed}")
                    scales = coordinate_check(config, data, model_name, optimizer, param, seed)
                    per_seed.append(scales)
                    for width, layers in scales.items():
                        for layer, values in layers.items():
                            metrics.write(
                                event="coord",
                                model=model_name,
                                optimizer=optimizer,
                                parametrization=param,
                                seed=seed,
                                width=width,
                                layer=layer,
                                scales=values,
                            )
                    bar.update(1)
                # Mean over seeds, per width, layer and step.
                mean = {
                    str(w): {
                        layer: np.mean([s[w][layer] for s in per_seed], axis=0).tolist()
                        for layer in per_seed[0][w]
                    }
                    for w in widths
                }
                coord[label][param] = {"scales": mean, **coord_summary(mean, widths)}
        timings["coordinate_check"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for optimizer in config.transfer_optimizers:
            sweeps[optimizer] = {}
            for param in PARAMETRIZATIONS:
                table: dict[str, list[list[float]]] = {}
                for width in widths:
                    table[str(width)] = [[] for _ in exponents]
                    for i, k in enumerate(exponents):
                        for seed in range(config.seeds):
                            bar.set_postfix_str(f"sweep {optimizer} {param} w={width} lr=2^{k}")
                            final = _sweep_run(
                                config, data, optimizer, param, width, k, seed, metrics
                            )
                            table[str(width)][i].append(final["train_loss"])
                            bar.update(1)
                sweeps[optimizer][param] = table
        timings["transfer"] = time.perf_counter() - t0
    wall = time.perf_counter() - started

    transfer = {
        name: {
            param: {"train_loss": table, **transfer_summary(table, widths, exponents)}
            for param, table in by_param.items()
        }
        for name, by_param in sweeps.items()
    }
    results: dict[str, Any] = {
        "widths": widths,
        "base_width": config.base_width,
        "lr_exponents": exponents,
        "seeds": config.seeds,
        "coord_steps": config.coord_steps,
        "coord_lr": config.coord_lr,
        "matrix_lr_ratio": config.matrix_lr_ratio,
        "coord": coord,
        "transfer": transfer,
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
        "wall_seconds": wall,
    }
    verdicts = claims(coord, transfer, widths[0], widths[-1])
    run.write_summary(results, require_seeds(verdicts, config.seeds))


__all__ = [
    "FLAT_BOUND",
    "GROWTH_BOUND",
    "MAX_MUP_SHIFT",
    "Config",
    "Digits",
    "build",
    "claims",
    "coord_summary",
    "load_digits_split",
    "make_mlp",
    "run",
    "transfer_summary",
]
