"""Understanding-SG figures 2-5, 7-9: the maths of each figure, the nets, and smoke runs.

The default run trains one or two tiny cells per experiment (the PNGs are still
written); ``-m slow`` runs every cell of every smoke preset.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from experiments import framework
from experiments.understanding import fig2, fig3, fig4, fig5, fig5_norms, fig8, nets

# ------------------------------------------------------------------------------ fig. 2


def test_grid_dataset_noise_and_shapes():
    x, y = fig2.grid_dataset("noisy", 10, seed=3)
    assert x.shape == (100, 2) and y.shape == (100,) and set(np.unique(y)) <= {0, 1}
    assert x.min() == -1 and x.max() == 1
    xl, yl = fig2.grid_dataset("linear", 10, seed=3)
    np.testing.assert_array_equal(x, xl)
    assert np.sum(y != yl) == 10  # exactly 10 % of the labels flipped
    # the clean labels are a half-plane through the origin
    w = np.linalg.lstsq(np.c_[xl, np.ones(100)], 2.0 * yl - 1, rcond=None)[0]
    assert np.mean(np.sign(np.c_[xl, np.ones(100)] @ w) == 2 * yl - 1) > 0.95
    _, yr = fig2.grid_dataset("random", 10, seed=3)
    assert 20 < yr.sum() < 80


@pytest.mark.parametrize("conditioning", fig2.CONDITIONINGS)
def test_affine_coefficients_recover_the_linear_sg(conditioning):
    width = 5
    pred = fig2.make_predictor(conditioning, width)
    variables = pred.init(jax.random.key(0), (width,), fig2.NUM_CLASSES)
    # give the zero-initialised module random weights
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) for k, v in
                                          zip(keys, leaves)])
    a, b, c = fig2.affine_coefficients(pred, variables, width)
    h = jax.random.normal(jax.random.key(2), (7, width))
    y1 = jax.nn.one_hot(jnp.arange(7) % 2, 2)
    sg = pred.apply(variables, h, y1 if pred.conditioned else None, train=False)[0]
    np.testing.assert_allclose(sg, h @ a + y1 @ b + c, atol=1e-5)
    if conditioning == "nolabel":
        assert not np.any(b)
    if conditioning == "labelonly":
        assert not np.any(a)
    # the implied loss is the potential of the (symmetrised) linear SG
    a_sym = 0.5 * (a + a.T)
    grad = jax.grad(lambda h: jnp.sum(fig2.implied_loss(a_sym, b, c, h, y1)))(h)
    np.testing.assert_allclose(grad, h @ a_sym + y1 @ b + c, atol=1e-4)


def test_pearson():
    assert fig2.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert fig2.pearson([1, 2, 3], [5, 5, 5]) == 0.0


def test_pearson_within_labels_ignores_a_per_label_constant():
    """The exact SG of the top layer's MSE implies L − ½‖b − y‖²: the per-label offset
    breaks the pooled correlation but not the within-label one."""
    rng = np.random.default_rng(0)
    h, w, b = rng.normal(size=(200, 8)), rng.normal(size=(8, 2)), np.array([0.3, 0.9])
    labels = rng.integers(0, 2, size=200)
    y1 = np.eye(2)[labels]
    true = 0.5 * np.sum((h @ w + b - y1) ** 2, -1)
    a, bb, c = w @ w.T, -w.T, b @ w.T  # SG(h, y) = (hW + b − y)Wᵀ
    implied = np.asarray(fig2.implied_loss(jnp.asarray(a), jnp.asarray(bb), jnp.asarray(c),
                                           jnp.asarray(h), jnp.asarray(y1)))
    np.testing.assert_allclose(true - implied, 0.5 * np.sum((b - y1) ** 2, -1), rtol=1e-4,
                               atol=1e-4)
    assert fig2.pearson(true, implied, labels) == pytest.approx(1.0, abs=1e-6)
    shifted = implied + 500.0 * labels
    assert fig2.pearson(true, shifted) < 0.5
    assert fig2.pearson(true, shifted, labels) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------ nets


def test_middle_cut_matches_fig3():
    assert nets.middle_cut(20) == 11  # "between layers 11 and 12"
    assert nets.interfaces("sg_single", 20) == (11,)
    assert nets.interfaces("sg_every", 4) == (1, 2, 3, 4)
    assert nets.interfaces("backprop", 4) == ()


def test_make_split_and_readouts():
    cfg = nets.NetConfig(depth=4, width=8, batch_size=4, weight_decay=1e-3)
    stages = {"backprop": 1, "sg_single": 2, "sg_every": 5, "dfa": 5}
    splits = {m: nets.make_split(m, cfg) for m in nets.METHODS}
    assert {m: len(s.stages) for m, s in splits.items()} == stages
    assert splits["sg_single"].cuts == (3,)
    assert [s.feedback.name for s in splits["dfa"].stages[:-1]] == ["DFA"] * 4
    assert [s.feedback.name for s in splits["sg_every"].stages[:-1]] == ["cDNI"] * 4
    split = splits["sg_every"]  # readouts across stage boundaries
    states = split.init(jax.random.key(0))
    kernels = nets.hidden_kernels(split, states)
    assert [k.shape for k in kernels] == [(784, 8)] + [(8, 8)] * 3
    acts = nets.hidden_activations(split, states, np.zeros((3, 28, 28, 1), np.float32))
    assert len(acts) == 4 and all(a.shape == (3, 8) for a in acts)


def test_l2_penalty_hits_only_kernels():
    cfg = nets.NetConfig(weight_decay=0.5, lr=0.0)
    params = ({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, {"scale": jnp.ones(2)})
    mask = nets.kernel_mask(params)
    assert mask[0]["kernel"] and not mask[0]["bias"] and not mask[1]["scale"]
    opt = optax.chain(optax.add_decayed_weights(0.5, mask=nets.kernel_mask), optax.sgd(1.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates[0]["kernel"], -0.5)
    np.testing.assert_allclose(updates[0]["bias"], 0.0)
    assert isinstance(nets.optimizer(cfg), optax.GradientTransformation)


def test_label_sorted_sample():
    y = np.array([3, 1, 0, 1, 3, 0, 2, 2, 0])
    x = np.arange(9)
    xs, ys = nets.label_sorted_sample(x, y, 2, 4)
    np.testing.assert_array_equal(ys, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(xs, [2, 5, 1, 3, 6, 7, 0, 4])


# ------------------------------------------------------------------------------ fig. 3


def test_rdm_and_block_distance():
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((3, 20))
    labels = np.repeat(np.arange(3), 4)
    h = protos[labels] * rng.uniform(0.5, 2, (12, 1)) + 5.0  # scale/shift: corr unchanged
    d = fig3.rdm(h)
    same = labels[:, None] == labels[None, :]
    np.testing.assert_allclose(d[same], 0.0, atol=1e-9)
    assert np.all(d[~same] > 0.1)
    assert fig3.rdm(np.zeros((2, 4)))[0, 1] == 1.0  # constant rows: uncorrelated
    stack = np.stack([d, np.zeros_like(d), d])
    dist = fig3.diagonal_block_distances(stack, labels)
    np.testing.assert_allclose(dist, [0.0, 0.0, 0.0], atol=1e-6)
    stack[0][same] = 1.0
    assert fig3.diagonal_block_distances(stack, labels)[0] == pytest.approx(np.sqrt(same.sum()))


# ------------------------------------------------------------------------------ fig. 8


def test_probes():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 6)).astype(np.float32)
    h = x @ rng.standard_normal((6, 10)).astype(np.float32)  # linear, invertible image
    assert fig8.regression_probe_mse(h, x, ridge=1e-8) < 1e-6
    assert fig8.regression_probe_mse(np.zeros((200, 10)), x) == pytest.approx(
        np.mean((x - x.mean(0)) ** 2), rel=1e-4)
    y = (x[:, 0] > 0.5).astype(np.int32) + 2 * (x[:, 1] > 0.5)
    assert fig8.make_classifier_probe(300, 0.05, 4)(x, y) > 0.95


# ------------------------------------------------------------------------------ smoke runs

SMOKE_SUBSETS = {  # one or two cells per experiment keep the default test run short
    fig2: ["cond-mse-noisy-every"],
    fig3: ["sg_single"],
    fig4: ["relu-d3-sg_single"],
    fig5: ["relu-d3-sg_every"],
    fig8: ["sg_single"],  # the same net as fig3's: reused
}
PNGS = {
    fig2: {"fig2a-mse", "fig2-fidelity", "fig2-loss-curves"},
    fig3: {"fig3", "fig7"},
    fig4: {"fig4", "fig4-test-error"},
    fig5: {"fig5"},
    fig8: {"fig8"},
}


def _check_run(module, tmp_path, only):
    exp = module.EXPERIMENT
    assert exp.name.startswith("understanding-fig")
    for preset in framework.PRESETS:
        doc = type(exp.presets[preset]).__doc__
        assert f"make reproduce-{exp.name} PRESET={preset}" in doc
    summary = framework.run_experiment(exp, "smoke", out=tmp_path, only=only, echo=False)
    assert sorted(summary.ran) == sorted(only or [c.id for c in exp.cells_for("smoke")])
    assert {p.stem for p in summary.figures} == PNGS[module]
    for p in summary.figures:
        assert p.stat().st_size > 5000
    return summary


@pytest.mark.reproduce
@pytest.mark.parametrize("module", [fig2, fig4, fig5], ids=lambda m: m.__name__[-4:])
def test_smoke_subset(module, tmp_path):
    summary = _check_run(module, tmp_path, SMOKE_SUBSETS[module])
    for r in summary.results:
        assert np.isfinite(r.metric)
    if module is fig2:
        snaps = summary.results[0].metrics["snapshots"]
        assert len(snaps) == len(fig2.snapshot_steps(fig2.PRESETS["smoke"]))
        assert len(snaps[-1]["implied"]) == len(summary.results[0].metrics["sg_layers"])
        assert len(snaps[-1]["pooled_fidelity"]) == len(snaps[-1]["fidelity"])
    if module is fig5:
        assert len(summary.results[0].metrics["normalised"]) == nets.SMOKE.depth


@pytest.mark.reproduce
def test_smoke_fig3_then_fig8_reuses_the_nets(tmp_path):
    s3 = _check_run(fig3, tmp_path, SMOKE_SUBSETS[fig3])
    r3 = s3.results[0]
    assert fig3.load_rdms(r3).shape == (nets.SMOKE.depth, 40, 40)
    cached = list((tmp_path / nets.CACHE_DIR).iterdir())
    assert len(cached) == 1 and cached[0].name.startswith(SMOKE_SUBSETS[fig3][0])
    s8 = _check_run(fig8, tmp_path, SMOKE_SUBSETS[fig8])
    r8 = s8.results[0]
    assert r8.metric == r3.metric  # the same trained net, not a retrained one
    np.testing.assert_array_equal(r8.curves["test_error"].value, r3.curves["test_error"].value)
    assert len(r8.metrics["probe_accuracy"]) == len(r8.metrics["probe_mse"]) == nets.SMOKE.depth
    assert len(list((tmp_path / nets.CACHE_DIR).iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("module", list(SMOKE_SUBSETS), ids=lambda m: m.__name__[-4:])
def test_smoke_full(module, tmp_path, monkeypatch):
    if module is fig2:
        monkeypatch.setitem(PNGS, fig2, PNGS[fig2] | {"fig9-labelonly-mse"})
    _check_run(module, tmp_path, [])


def test_registered():
    from experiments import registry

    for m in SMOKE_SUBSETS:
        assert m.__name__ in registry.MODULES
    assert sgjax.feedback.dfa  # the DFA baseline used by figs 3, 7, 8


@pytest.mark.parametrize("order", fig5_norms.ORDERS)
def test_fig5_norms_block_orders(order):
    """Both block orders give ``depth`` hidden blocks and the softmax layer; the hidden
    kernels are the blocks' dense kernels, and the net maps images to 10 logits."""
    cfg = dataclasses.replace(nets.SMOKE, depth=3)
    layers = fig5_norms.layers(order, cfg)
    assert len(layers) == cfg.depth + 1
    split = sgjax.split_at(layers, (), loss=sgjax.losses.softmax_cross_entropy,
                           optimizer=nets.optimizer(cfg), input_shape=(28, 28, 1),
                           batch_size=4, num_classes=10)
    states = split.init(jax.random.key(0))
    kernels = nets.hidden_kernels(split, states)
    assert [k.shape for k in kernels] == [(784, cfg.width)] + [(cfg.width, cfg.width)] * 2
    x = jnp.ones((4, 28, 28, 1))
    chex.assert_shape(split.apply(states, x), (4, 10))


def test_fig5_norms_rejects_an_unknown_order():
    with pytest.raises(ValueError, match="bn_relu"):
        fig5_norms.layers("relu_relu", nets.SMOKE)
