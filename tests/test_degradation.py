"""experiments/dni/degradation.py: why deep unconditioned DNI degrades at a constant
learning rate (issue 18): the arms, the oracle schedule, the rise metric, the claims."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgjax
from experiments import registry
from experiments.__main__ import main
from experiments.dni import degradation as D
from experiments.dni import fcn


def test_registered_with_every_preset():
    assert registry.load_module("experiments.dni.degradation") is D.EXPERIMENT
    assert [c.id for c in D.cells("quick")] == list(D.ARMS)
    assert D.PRESETS["quick"].depth == 6 and D.PRESETS["paper"].sg_hidden == (1024, 1024)
    assert D.PRESETS["paper"].lr == 3e-5  # A.1's rate, held constant


@pytest.mark.parametrize("arm", [a for a in D.ARMS if a.startswith("dni-")])
def test_each_ablation_changes_one_thing(arm):
    base, changed = D.ARMS["dni"], D.ARMS[arm]
    diff = [f for f in D.Arm._fields if f != "label" and getattr(base, f) != getattr(changed, f)]
    assert len(diff) == 1, diff


def test_the_decay_arm_alone_gets_the_papers_schedule_shape():
    cfg = D.PRESETS["quick"]
    assert cfg.train(D.ARMS["dni"]).lr_boundaries == ()
    assert cfg.train(D.ARMS["dni-lr-decay"]).lr_boundaries == (cfg.steps * 3 // 5,
                                                              cfg.steps * 4 // 5)


def test_unknown_arm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arms \\['dni-typo'\\]"):
        D.Config(depth=3, steps=4, lr=1e-3, sg_hidden=(), eval_every=2, arms=("dni-typo",))


def test_rise_is_the_climb_of_the_moving_average_from_its_best():
    curve = [(1, 5.0), (2, 3.0), (3, 1.0), (4, 3.0), (5, 5.0)]
    assert D.rise(curve, 1) == (1.0, 5.0, 4.0)
    lo, end, up = D.rise(curve, 3)  # averages 3, 7/3, 3
    np.testing.assert_allclose((lo, end, up), (7 / 3, 3.0, 2 / 3))
    assert D.rise([(1, 2.0)], 3) == (2.0, 2.0, 0.0)


def _smoke_split():
    cfg = D.PRESETS["smoke"].train(D.ARMS["dni"])
    pred = D.make_predictor(D.ARMS["dni"], D.PRESETS["smoke"])
    split = fcn.fcn_split(3, "every", sgjax.feedback.synthetic(pred), cfg, (28, 28, 1))
    x = jax.random.uniform(jax.random.key(1), (cfg.batch_size, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (cfg.batch_size,), 0, 10)
    return split, pred, x, y


def test_true_gradients_are_backprops_through_the_stages_above():
    split, pred, x, y = _smoke_split()
    states = split.init(jax.random.key(0))
    hs, grads = jax.jit(lambda s, x, y: D.true_gradients(split, s, x, y))(states, x, y)
    assert grads[0] is None and len(hs) == len(split.stages)
    for k in range(len(split.stages) - 1):
        _, true = jax.jit(lambda s, x, y, k=k: fcn.gradient_pair(split, s, k, pred, x, y))(
            states, x, y)  # an independent code path
        np.testing.assert_allclose(x.shape[0] * grads[k + 1], true, rtol=1e-4, atol=1e-6)


def test_true_target_sync_fits_the_true_gradient_and_updates_the_stages_as_sync():
    split, pred, x, y = _smoke_split()
    oracle, plain = D.true_target_sync(split), sgjax.sync(split)
    ts = plain.init(jax.random.key(0), (x, y))
    _, true = jax.jit(lambda s, x, y: D.true_gradients(split, s, x, y))(ts.stages, x, y)
    new_o, info_o = jax.jit(oracle.step)(ts, (x, y))
    new_p, info_p = jax.jit(plain.step)(ts, (x, y))
    B = x.shape[0]
    for k in range(len(split.stages) - 1):
        # the SG models start at zero, so the first SG loss is the target's own size
        np.testing.assert_allclose(info_o[f"sg_loss/{k}"], jnp.sum((B * true[k + 1]) ** 2),
                                   rtol=1e-5)
        np.testing.assert_allclose(info_o[f"target_norm/{k}"], jnp.mean(
            jnp.linalg.norm((B * true[k + 1]).reshape(B, -1), axis=-1)), rtol=1e-5)
    np.testing.assert_allclose(info_o["loss"], info_p["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves([s.params for s in new_o.stages]),
                    jax.tree.leaves([s.params for s in new_p.stages])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # layers: same SG update
    # ... but the bottom SG model was fitted to a different target than sync's
    assert not np.allclose(info_o["sg_loss/0"], info_p["sg_loss/0"])


def test_claims_cover_every_arm_on_both_rises():
    claims = D.claims("quick")
    assert {c.cells[0] for c in claims} == set(D.ARMS)
    assert {c.key for c in claims} == {"err_rise", "loss_rise"}
    assert all(c.kind == "at_most" for c in claims)
    assert all(c.cause for c in claims if D.ARMS[c.cells[0]].method == "dni")


@pytest.mark.slow
def test_smoke_cells_end_to_end(tmp_path):
    assert main(["run", "degradation", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", "dni", "dni-true-target"]) == 0
    cells = tmp_path / "degradation" / "smoke" / "cells"
    for arm in ("dni", "dni-true-target"):
        record = json.loads((cells / f"{arm}.json").read_text())
        m = record["metrics"]
        assert m["err_rise"] >= 0 and m["loss_rise"] >= 0
        assert m["test_error_end"] - m["test_error_min"] == pytest.approx(m["err_rise"])
        for name in ("sg_norm_1", "target_norm_1", "sg_cosine_1", "sg_bn_var_1",
                     "true_cosine_1", "true_norm_0", "sg_loss_0"):
            assert name in record["curves"], name
    assert (tmp_path / "degradation" / "smoke" / "degradation.png").exists()
