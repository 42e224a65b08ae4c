"""Benchmark tasks: each builds, trains a few steps on the CPU and evaluates; data is local."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

import guided_descent as gd
from guided_descent.routing import route
from guided_descent.tasks import charlm, digits, kron_quadratic, mnist1d
from guided_descent.tasks.gpt import GPTConfig


def _train(model: torch.nn.Module, loss_of_batch, steps: int = 5, name: str = "adamw"
           ) -> list[float]:
    opt = gd.create(name, model)
    losses = []
    for step in range(steps):
        loss = loss_of_batch(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ---- digits ------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = digits.load(), digits.load()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # 20 % of every class


@pytest.mark.parametrize("make", [digits.make_mlp, digits.make_cnn])
def test_digits_classifiers_train_and_evaluate(make):
    torch.manual_seed(0)
    data = digits.load()
    model = make()
    x, y = data.x_train[:128], data.y_train[:128]
    losses = _train(model, lambda _: digits.classification_loss(model(x), y), steps=15)
    assert losses[-1] < losses[0]
    loss, acc = digits.classification_scores(model, data.x_test, data.y_test)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


def test_digits_autoencoder_shape_and_training():
    torch.manual_seed(0)
    data = digits.load()
    model = digits.make_autoencoder()
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert [64, *widths] == list(digits.AUTOENCODER_WIDTHS)
    x = data.x_train[:256]
    losses = _train(model, lambda _: digits.reconstruction_loss(model(x), x), steps=20)
    assert losses[-1] < losses[0]
    assert digits.reconstruction_mse(model, data.x_test) > 0


# ---- MNIST-1D ----------------------------------------------------------------------------------


def test_mnist1d_generated_locally_without_touching_global_rngs(monkeypatch):
    pytest.importorskip("mnist1d")
    import mnist1d.data as package_data  # "as": the name mnist1d stays our task module

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; the task must call make_dataset")

    monkeypatch.setattr(package_data, "get_dataset", no_download)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    mnist1d._generate.cache_clear()
    data = mnist1d.load(num_samples=200)
    assert np.array_equal(np.random.get_state()[1], np_before)
    assert random.getstate() == py_before
    assert data.x_train.shape == (160, 40) and data.x_test.shape == (40, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    again = mnist1d.load(num_samples=200)  # cached, and copies: the cache cannot be mutated
    again.x_train.zero_()
    assert torch.equal(mnist1d.load(num_samples=200).x_train, data.x_train)
    assert len(data.sha256) == 64


@pytest.mark.parametrize("make", [mnist1d.make_mlp, mnist1d.make_cnn])
def test_mnist1d_models_train_and_evaluate(make):
    pytest.importorskip("mnist1d")
    torch.manual_seed(0)
    data = mnist1d.load(num_samples=400)
    model = make()
    assert model(data.x_test).shape == (80, 10)
    x, y = data.x_train[:100], data.y_train[:100]
    losses = _train(model, lambda _: mnist1d.loss_fn(model(x), y), steps=15)
    assert losses[-1] < losses[0]
    loss, acc = mnist1d.scores(model, data.x_test, data.y_test)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


def test_mnist1d_cnn_is_the_papers_layout():
    model = mnist1d.make_cnn()
    assert sum(p.numel() for p in model.parameters()) == 5210
    convs = [m for m in model if isinstance(m, torch.nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(5, 2), (3, 2), (3, 2)]


def test_mnist1d_transformer_layout_and_shapes():
    model = mnist1d.make_transformer()  # 8 patches of 5, width 32, 4 heads, 2 blocks
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert len(blocks) == 2
    for block in blocks:
        assert block.self_attn.batch_first and block.self_attn.num_heads == 4
        assert block.linear1.out_features == 128 and block.norm_first
        assert block.dropout.p == block.dropout1.p == block.dropout2.p == 0.0
    # Each block has its own initial weights (nn.TransformerEncoder would deep-copy one).
    assert not torch.equal(blocks[0].linear1.weight, blocks[1].linear1.weight)
    assert model.embed.weight.shape == (32, 5) and model.pos.shape == (8, 32)
    # The classifier is the last nn.Linear registered: routing's output head.
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1] is model.head and model.head.out_features == 10
    assert model(torch.randn(7, 40)).shape == (7, 10)
    assert mnist1d.make_transformer(patch=4, d_model=16, n_head=2)(torch.randn(3, 40)).shape == (
        3, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patch": 3}, "patch"), ({"d_model": 30, "n_head": 4}, "n_head"), ({"layers": 0}, "layers")],
)
def test_mnist1d_transformer_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mnist1d.make_transformer(**kwargs)


def test_mnist1d_gru_layout_and_shapes():
    model = mnist1d.make_gru()  # 20 steps of 2 samples, one GRU layer of 64 units
    assert isinstance(model.rnn, torch.nn.GRU) and model.rnn.batch_first
    assert model.rnn.weight_ih_l0.shape == (3 * 64, 2) and model.rnn.weight_hh_l0.shape == (192, 64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [model.head] and model.head.in_features == 64
    assert model(torch.randn(7, 40)).shape == (7, 10)
    assert mnist1d.make_gru(patch=4, hidden=16)(torch.randn(3, 40)).shape == (3, 10)
    for kwargs, message in [({"patch": 3}, "patch"), ({"hidden": 0}, "hidden"),
                            ({"layers": 0}, "layers")]:
        with pytest.raises(ValueError, match=message):
            mnist1d.make_gru(**kwargs)


def test_mnist1d_gru_reads_the_sequence_in_order():
    """The GRU reads patch ``t`` at step ``t``: the logits are those of an explicit loop of
    ``nn.GRUCell`` over the patches with the same weights (float32 rounding apart), and
    reversing the sequence changes them."""
    torch.manual_seed(0)
    model = mnist1d.make_gru()
    cell = torch.nn.GRUCell(2, 64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.rnn, f"{name}_l0"))
    x = torch.randn(5, 40)
    with torch.no_grad():
        h = torch.zeros(5, 64)
        for t in range(20):
            h = cell(x[:, 2 * t: 2 * t + 2], h)
        # 20 recurrent steps of sums of <= 66 float32 terms of O(1) values; measured 3e-7.
        torch.testing.assert_close(model(x), model.head(h), rtol=1e-5, atol=1e-5)
        assert (model(x.flip(1)) - model(x)).abs().max() > 1e-3


def test_mnist1d_transformer_reads_contiguous_patches_as_tokens():
    """With the positional embedding zeroed, mean pooling makes the model invariant to the order
    of the patches: permuting contiguous blocks of 5 samples leaves the logits unchanged, and
    permuting samples across patches does not. This pins down how the signal is cut."""
    torch.manual_seed(0)
    model = mnist1d.make_transformer()
    with torch.no_grad():
        model.pos.zero_()
    x = torch.randn(16, 40)
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    moved = x.unflatten(1, (8, 5))[:, perm].flatten(1)
    with torch.no_grad():
        out, out_moved = model(x), model(moved)
        out_mixed = model(x[:, torch.randperm(40, generator=torch.Generator().manual_seed(1))])
    # Only the summation order changes (attention sums, the mean over 8 patches). Float32
    # rounding (2^-24 ~ 6e-8 per operation) of O(1) activations through two blocks of sums of
    # <= 128 terms stays near 1e-6 (measured 2e-7 on logits of size ~1); 1e-5 leaves a margin.
    torch.testing.assert_close(out_moved, out, rtol=1e-5, atol=1e-5)
    assert (out_mixed - out).abs().max() > 1e-2


def test_mnist1d_transformer_is_deterministic():
    """Same seed, same weights; dropout is 0, so two training-mode forwards agree bit for bit;
    the eval-mode fused kernel agrees with the training-mode path to float32 rounding."""

    def build() -> torch.nn.Module:
        torch.manual_seed(5)
        return mnist1d.make_transformer()

    a, b = build(), build()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    x = torch.randn(32, 40)
    assert torch.equal(a(x), a(x))
    a.eval()
    with torch.no_grad():
        fused = a(x)  # eval + no_grad: TransformerEncoderLayer's fast path
    # Different kernels, same math: the differences are summation-order rounding, bounded as
    # in the test above (measured 4e-7).
    torch.testing.assert_close(fused, b(x).detach(), rtol=1e-5, atol=1e-5)


def test_mnist1d_transformer_trains_and_evaluates():
    pytest.importorskip("mnist1d")
    torch.manual_seed(0)
    data = mnist1d.load(num_samples=400)
    model = mnist1d.make_transformer()
    x, y = data.x_train[:100], data.y_train[:100]
    losses = _train(model, lambda _: mnist1d.loss_fn(model(x), y), steps=15)
    assert losses[0] == pytest.approx(np.log(10), rel=0.2)  # near uniform at initialisation
    assert losses[-1] < losses[0]
    loss, acc = mnist1d.scores(model, data.x_test, data.y_test)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


# ---- kron-quadratic ----------------------------------------------------------------------------


def test_kron_problem_conditioning_and_exact_excess_risk():
    problem = kron_quadratic.make_problem(dim=16, kappa=100.0, noise=0.0, seed=3)
    s = torch.linalg.svdvals(problem.a.double())
    assert float(s.max() / s.min()) == pytest.approx(100.0, rel=1e-3)
    model = kron_quadratic.make_model(problem)
    # Only X trains; routing treats it as a hidden matrix (the frozen A layer is the "head").
    assert [p.shape for p in model.parameters() if p.requires_grad] == [(16, 16)]
    table = route(model, "muon")
    assert [r.algorithm for r in table.routes] == ["muon"]
    with torch.no_grad():
        kron_quadratic.trainable_matrix(model).normal_()
    # Noise-free, the loss over many probes estimates the closed-form excess risk.
    v, y = kron_quadratic.sample_batch(problem, 20000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = float(kron_quadratic.loss_fn(model(v), y))
    assert sampled == pytest.approx(kron_quadratic.excess_risk(model, problem), rel=0.05)


def test_kron_trains_with_a_matrix_method():
    problem = kron_quadratic.make_problem(dim=16, kappa=10.0, seed=0)
    model = kron_quadratic.make_model(problem)
    g = torch.Generator().manual_seed(1)

    def loss_of_batch(_: int) -> torch.Tensor:
        v, y = kron_quadratic.sample_batch(problem, 32, g)
        return kron_quadratic.loss_fn(model(v), y)

    _train(model, loss_of_batch, steps=30, name="muon")
    assert kron_quadratic.excess_risk(model, problem) < kron_quadratic.initial_excess_risk(
        problem
    )


# ---- charlm ------------------------------------------------------------------------------------


def test_charlm_corpus_is_the_frozen_snapshot():
    packed = charlm.corpus_path().read_bytes()
    assert hashlib.sha256(packed).hexdigest() == charlm.CORPUS_SHA256
    data = charlm.load_corpus()
    assert len(data) == charlm.CORPUS_BYTES
    assert data.startswith(b"# ==== __future__.py ====\n")
    licence = charlm.corpus_path().parent / charlm.LICENCE
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in licence.read_text()


def test_charlm_refuses_a_corpus_with_another_hash(monkeypatch, tmp_path):
    fake = tmp_path / charlm.CORPUS
    fake.write_bytes(b"not the corpus")
    monkeypatch.setattr(charlm, "corpus_path", lambda: fake)
    charlm.load_corpus.cache_clear()
    try:
        with pytest.raises(charlm.CorpusError, match="sha256"):
            charlm.load_corpus()
    finally:
        charlm.load_corpus.cache_clear()


def test_charlm_split_is_interleaved_blocks():
    corpus = charlm.split(charlm.load_corpus())
    assert corpus.val.numel() == 7 * charlm.BLOCK == 458_752
    assert corpus.train.numel() + corpus.val.numel() == charlm.CORPUS_BYTES
    raw = charlm.load_corpus()
    start = (charlm.VAL_EVERY - 1) * charlm.BLOCK  # the first validation block
    assert bytes(corpus.val[:64].tolist()) == raw[start : start + 64]


def test_charlm_batches_windows_and_tiny_model_train():
    torch.manual_seed(0)
    corpus = charlm.load()
    layout = charlm.SIZES["cpu"]
    assert charlm.make_model(layout).num_parameters() == 445_952
    tiny = GPTConfig(vocab_size=256, context=16, n_layer=1, n_head=2, d_model=32)
    model = charlm.make_model(tiny)
    g = torch.Generator().manual_seed(0)
    offsets = charlm.batch_offsets(corpus.train.numel(), tiny.context, 4, 10, g)
    assert offsets.shape == (10, 4)
    x, y = charlm.windows(corpus.train, offsets[0], tiny.context)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    losses = _train(
        model,
        lambda s: charlm.loss_fn(model(charlm.windows(corpus.train, offsets[s], 16)[0]),
                                 charlm.windows(corpus.train, offsets[s], 16)[1]),
        steps=10,
    )
    assert losses[0] == pytest.approx(np.log(256), rel=0.05)  # uniform over bytes at init
    assert losses[-1] < losses[0]
    vx, vy = charlm.windows(corpus.val, charlm.val_offsets(corpus.val.numel(), 16, 8), 16)
    assert np.isfinite(charlm.evaluate(model, vx, vy, batch=3))
