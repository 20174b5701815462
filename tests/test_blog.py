"""The blog post's experiment: the post's weight-gradient synthetic gradients against a
hand-written numpy port of its notebook (``synthetic_vs_stale``), the refit schedule,
shapes, the stale control, the claims, and a smoke run end to end."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from experiments.__main__ import main
from experiments.blog import birdseye
from experiments.blog import weight_gradients as wg
from experiments.framework import CellResult, verdicts

SIZES = (12, 6, 4)  # D, H, K: small enough for float64 references
B = 5


def _batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (steps, B, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[2], (steps, B)).astype(np.int32)
    return x, y


def _np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree._asdict().items()}


# ----------------------------------------------------------- the notebook, in numpy


def _forward(X, model):
    h1 = np.maximum(X @ model["W1"] + model["b1"], 0)
    h2 = np.maximum(h1 @ model["W2"] + model["b2"], 0)
    e = np.exp(h2 - h2.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), [h1, h2]


def _backward(X, y, probs, hs, model):
    # the notebook's backward: the output ReLU is ignored, the hidden one masks
    dh2 = probs.copy()
    dh2[range(len(y)), y] -= 1
    dh2 /= len(y)
    dh1 = dh2 @ model["W2"].T
    dh1[hs[0] <= 0] = 0
    return {"W1": X.T @ dh1, "b1": dh1.sum(0), "W2": hs[0].T @ dh2, "b2": dh2.sum(0)}


SOURCE = {"W1": 0, "b1": 0, "W2": 1, "b2": 1}


def _synthetic_reference(model, smodel, xs, ys, lr, slr, every):
    """The notebook's synthetic training loop, step by step; returns the states."""
    states = []
    for i, (X, y) in enumerate(zip(xs, ys)):
        X = X.astype(np.float64)
        probs, hs = _forward(X, model)
        synthetic = {k: hs[SOURCE[k]] @ smodel[k] for k in smodel}
        if i % every == 0:
            grads = _backward(X, y, probs, hs, model)
            ds = {k: -grads[k].ravel() + synthetic[k] for k in grads}
            smodel = {k: smodel[k] - slr * hs[SOURCE[k]].T @ ds[k] for k in smodel}
        est = {k: np.reshape(synthetic[k].sum(0), model[k].shape) / len(y) for k in model}
        model = {k: model[k] - lr * est[k] for k in model}
        states.append((model, smodel, grads))
    return states


def _stale_reference(model, xs, ys, lr, every):
    states = []
    for i, (X, y) in enumerate(zip(xs, ys)):
        X = X.astype(np.float64)
        probs, hs = _forward(X, model)
        if i % every == 0:
            grads = _backward(X, y, probs, hs, model)
        model = {k: model[k] - lr * grads[k] for k in model}
        states.append(model)
    return states


def _assert_close(ours, ref, what):
    for k in ref:
        np.testing.assert_allclose(np.asarray(ours[k], np.float64), ref[k], rtol=2e-4,
                                   atol=1e-6, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("every", [1, 3])
def test_synthetic_step_is_the_notebooks(every):
    """Each step of the post's synthetic gradients (the network, the synthetic gradient
    model and the refit target) equals the notebook's loop in float64."""
    lr, slr, steps = 0.5, 0.05, 7  # large rates, so a wrong update shows
    method = wg.synthetic(lr, slr, every, SIZES)
    state = method.init(jax.random.key(0))
    ref = _synthetic_reference(_np(state.params), _np(state.smodel), *_batches(steps),
                               lr, slr, every)
    step = jax.jit(method.step, static_argnums=3)
    xs, ys = _batches(steps)
    for t in range(steps):
        state = step(state, xs[t], ys[t], t % every == 0)
        model, smodel, target = ref[t]
        _assert_close(_np(state.params), model, f"params after step {t}")
        _assert_close(_np(state.smodel), smodel, f"smodel after step {t}")
        _assert_close(_np(state.target), target, f"target after step {t}")
        assert int(state.step) == t + 1


def test_stale_step_is_the_notebooks():
    method = wg.stale(0.5, 3, SIZES)
    state = method.init(jax.random.key(1))
    xs, ys = _batches(7, seed=1)
    ref = _stale_reference(_np(state.params), xs, ys, 0.5, 3)
    step = jax.jit(method.step, static_argnums=3)
    for t in range(7):
        state = step(state, xs[t], ys[t], t % 3 == 0)
        _assert_close(_np(state.params), ref[t], f"stale params after step {t}")


def test_backprop_gradients_are_the_notebooks_backward():
    params = wg.init_params(jax.random.key(2), SIZES)
    xs, ys = _batches(1, seed=2)
    model = _np(params)
    probs, hs = _forward(xs[0].astype(np.float64), model)
    _assert_close(_np(wg.gradients(params, xs[0], ys[0])),
                  _backward(xs[0].astype(np.float64), ys[0], probs, hs, model), "gradients")


def test_run_steps_refits_only_every_period():
    """The scan-fused loop refits on steps 0, every, 2·every, … and only then: it equals
    the step-by-step loop with those fresh flags, and between refits the synthetic model
    and its target do not move while the network does."""
    every, steps = 4, 12
    method = wg.synthetic(0.1, 0.05, every, SIZES)
    state0 = method.init(jax.random.key(3))
    xs, ys = _batches(steps, seed=3)
    x = jnp.asarray(xs.reshape(-1, SIZES[0]))
    y = jnp.asarray(ys.reshape(-1))
    idx = jnp.arange(steps * B).reshape(steps, B)
    fused = wg.run_steps(method)(state0, idx, x, y)
    step = jax.jit(method.step, static_argnums=3)
    state, refits = state0, []
    for t in range(steps):
        before = state
        state = step(state, xs[t], ys[t], t % every == 0)
        moved = not np.array_equal(np.asarray(before.smodel.W1), np.asarray(state.smodel.W1))
        same_target = all(np.array_equal(a, b) for a, b in zip(before.target, state.target))
        assert moved != same_target
        refits.append(moved)
        assert not np.array_equal(np.asarray(before.params.W1), np.asarray(state.params.W1))
    assert refits == [t % every == 0 for t in range(steps)]
    chex.assert_trees_all_close(fused, state, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="whole number of periods"):
        wg.run_steps(method)(state0, idx[:every + 1], x, y)


def test_shapes():
    """The post's shapes (784-100-10; traced, not computed), and the batch mean of the
    per-example predictions computed from the mean activation (small sizes)."""
    params = jax.eval_shape(lambda k: wg.init_params(k, (784, 100, 10)), jax.random.key(4))
    chex.assert_shape(list(params), [(784, 100), (100,), (100, 10), (10,)])
    smodel = jax.eval_shape(wg.init_synthetic, jax.random.key(5), params)
    chex.assert_shape(list(smodel), [(100, 78_400), (100, 100), (10, 1_000), (10, 10)])
    hs = jax.eval_shape(wg.activations, params, jnp.ones((3, 784)))
    chex.assert_shape(hs, [(3, 100), (3, 10)])
    chex.assert_shape(list(jax.eval_shape(wg.predictions, smodel, hs)),
                      [(3, 78_400), (3, 100), (3, 1_000), (3, 10)])
    chex.assert_trees_all_equal_shapes(jax.eval_shape(wg.synthetic_gradient, smodel, hs,
                                                      params), params)
    small = wg.init_params(jax.random.key(4), SIZES)
    sm = wg.init_synthetic(jax.random.key(5), small)
    hs = wg.activations(small, jnp.asarray(_batches(1)[0][0]))
    mean = jax.tree.map(lambda p, q: jnp.reshape(jnp.mean(p, 0), q.shape),
                        wg.predictions(sm, hs), small)
    chex.assert_trees_all_close(wg.synthetic_gradient(sm, hs, small), mean, rtol=1e-5,
                                atol=1e-8)
    assert wg.parameter_count((784, 100, 10)) == {"network": 79_510,
                                                  "synthetic_model": 7_860_100}


def test_init_scales_are_the_notebooks():
    params = wg.init_params(jax.random.key(6), (784, 100, 10))
    np.testing.assert_allclose(np.std(params.W1), 1 / np.sqrt(100), rtol=0.02)
    np.testing.assert_allclose(np.std(params.W2), 1 / np.sqrt(10), rtol=0.1)
    smodel = wg.init_synthetic(jax.random.key(7), wg.init_params(jax.random.key(8),
                                                                 (50, 20, 10)))
    np.testing.assert_allclose(np.std(smodel.W1), 0.1 / np.sqrt(1_000), rtol=0.03)


def test_batch_indices_are_epochs_of_permutations():
    idx = wg.batch_indices(23, 12, 5, seed=0)  # 4 batches per epoch, 3 epochs
    assert idx.shape == (12, 5)
    for e in range(3):
        epoch = idx[4 * e:4 * e + 4].ravel()
        assert len(set(epoch.tolist())) == 20 and epoch.max() < 23
    assert not np.array_equal(idx[:4], idx[4:8])
    np.testing.assert_array_equal(idx, wg.batch_indices(23, 12, 5, seed=0))
    with pytest.raises(ValueError, match="exceeds"):
        wg.batch_indices(3, 1, 5, seed=0)


def test_sign_agreement_ignores_small_entries():
    s = jnp.array([1.0, -1.0, 1.0, 1e-4, 2.0])
    t = jnp.array([2.0, -3.0, -1.0, 5.0, 1e-5])
    assert float(wg.sign_agreement(s, t)) == pytest.approx(2 / 3)


def test_probes_compare_the_applied_gradient():
    method = wg.stale(0.1, 2, SIZES)
    state = method.init(jax.random.key(8))
    xs, ys = _batches(2, seed=8)
    state = method.step(state, xs[0], ys[0], True)
    out = wg.stale_agreement(state, (xs[0], ys[0]), (xs[1], ys[1]))
    # the stored gradient is the gradient of batch 0 at the initial parameters; at the
    # moved parameters the same batch's gradient is close to it but not equal
    assert 0.9 < float(out["cosine_same_batch"]) < 1.0
    syn = wg.synthetic(0.1, 0.05, 2, SIZES)
    s = syn.step(syn.init(jax.random.key(9)), xs[0], ys[0], True)
    keys = set(wg.synthetic_agreement(s, (xs[1], ys[1]), (xs[0], ys[0])))
    assert keys == {"cosine_same_batch", "cosine_same_batch_W2", "cosine_population",
                    "cosine_target_W2", "sign_agreement_target"}


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_bad_period_is_named(bad):
    with pytest.raises(ValueError, match=f"every={bad!r}"):
        wg.synthetic(0.1, 0.1, bad)


def test_bad_method_and_stops_are_named():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        birdseye.post_method("sgd", birdseye.PostConfig())
    method = wg.synthetic(0.1, 0.1, 10, SIZES)
    data = (np.zeros((20, 12), np.float32), np.zeros(20, np.int32)) * 2
    with pytest.raises(ValueError, match="multiple of the method's period 10"):
        wg.train(method, jax.random.key(0), data, 15, 2, [5, 15], 0)


# ----------------------------------------------------------- the experiment


def test_cells_and_claims():
    cells = {c.id: c for c in birdseye.cells("quick")}
    assert cells["post-stale"].paper == 90.0 and cells["post-synthetic"].paper == 89.9
    assert cells["post-backprop"].paper is None and cells["edit-synthetic"].paper is None
    claims = {c.id: c for c in birdseye.EXPERIMENT.claims_for("quick")}
    assert claims["post-stale-caption"].cells == ("post-stale",)
    assert claims["post-heatmap-target"].key == "cosine_distance_target_W2"
    quick = birdseye.PRESETS["quick"].post
    assert (quick.steps, quick.lr, quick.sg_lr, quick.batch_size, quick.hidden,
            quick.every) == (7_500, 2e-2, 1e-4, 10, 100, 10)


def _result(cell_id, metric, **metrics):
    cell = next(c for c in birdseye.cells("quick") if c.id == cell_id)
    return CellResult(cell, metric, metrics, {}, 0, 0.0, {})


@pytest.mark.parametrize("synthetic,stale,even", [
    (89.9, 90.0, ("holds", "holds")), (91.5, 90.0, ("holds", "holds")),
    (92.5, 90.0, ("differs", "holds")), (87.5, 90.0, ("holds", "differs"))])
def test_evenly_matched_reads_both_directions(synthetic, stale, even):
    """"Evenly matched" holds when the accuracies are within EVEN points either way."""
    found = {"post-synthetic": _result("post-synthetic", synthetic,
                                       cosine_distance_target_W2=0.7,
                                       cosine_distance_same_batch=1.1),
             "post-stale": _result("post-stale", stale)}
    v = {x.claim.id: x.status for x in verdicts.check_all(birdseye.EXPERIMENT, "quick", found)}
    assert (v["post-even-synthetic"], v["post-even-stale"]) == even
    assert v["post-heatmap-target"] == "holds" and v["post-heatmap-same-batch"] == "differs"
    assert v["post-stale-caption"] == "holds" and v["post-runtime-retracted"] == "not run"


def test_edit_parameter_counts():
    counts = birdseye.parameter_counts(birdseye.PRESETS["quick"].edit)
    assert counts == {"network": 89_610, "sg_ours_activation_grads": 20_200,
                      "sg_post_parameter_grads": 1_111_000}


@pytest.mark.slow  # about 15 s alone, a minute on a loaded CPU
def test_smoke_run(tmp_path):
    only = ["post-synthetic", "edit-synthetic"]
    assert main(["run", "blog", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", *only]) == 0
    out = tmp_path / "blog" / "smoke"
    records = {c: json.loads((out / "cells" / f"{c}.json").read_text()) for c in only}
    for record in records.values():
        assert math.isfinite(record["metric"])
    post = records["post-synthetic"]["metrics"]
    assert {"heatmap_synthetic_W2", "heatmap_target_W2", "cosine_distance_target_W2",
            "cosine_distance_same_batch", "accuracy_per_seed"} <= set(post)
    assert np.asarray(post["heatmap_synthetic_W2"]).shape == (16, 10)
    assert {"heatmap_cosine_distance", "parameters"} <= set(records["edit-synthetic"]["metrics"])
    for fig in ("blog-accuracy", "blog-heatmaps", "blog-agreement"):
        assert (out / f"{fig}.png").stat().st_size > 0
    assert "post-heatmap-target" in (out / "table.md").read_text()


@pytest.mark.slow
def test_edit_stale_split_reuses_gradients():
    """The EDIT arm's stale method: parameters move by the same step for `every` updates."""
    cfg = birdseye.EditConfig(steps=4, lr=0.1, sg_lr=1e-5, eval_every=4, chunk=4,
                              hidden=(8, 8), every=3, batch_size=4)
    split = birdseye.make_split("stale", cfg, (28, 28, 1))
    sched = sgjax.sync(split)
    step = jax.jit(sched.step)
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    ts = sched.init(jax.random.key(1), (x, jnp.arange(4)))
    w = [ts.stages[0].params]
    for t in range(4):
        xb = jax.random.uniform(jax.random.key(10 + t), (4, 28, 28, 1))
        ts, _ = step(ts, (xb, jnp.arange(4) + t))
        w.append(ts.stages[0].params)
    d = [jax.tree.map(lambda a, b: b - a, w[i], w[i + 1]) for i in range(4)]
    chex.assert_trees_all_close(d[0], d[1], atol=1e-6)
    chex.assert_trees_all_close(d[0], d[2], atol=1e-6)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(d[0], d[3], atol=1e-6)
    assert isinstance(optax.sgd(0.1), optax.GradientTransformation)
