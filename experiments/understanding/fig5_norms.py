"""Fig. 5 diagnostic: each hidden layer's squared weight norm over training (backprop).

Fig. 5's claim is about a trained net's shape of norms; ``understanding-fig5`` records
only the end point. This trains the ``quick`` backprop net of :mod:`fig5` for a multiple
of its budget and records ``‖W_l‖²_F`` of every hidden kernel at initialisation and at a
few steps, for two block orders: ``dense → batch norm → relu`` (sgjax's, :mod:`nets`) and
``dense → relu → batch norm`` (one reading of supp. C's "hidden relu units followed by
batch normalisation layers"). With batch norm after every hidden kernel the loss does not
depend on a kernel's scale, so its norm is set only by the L2 penalty against the growth
its own updates cause: the shape can move with the budget.

Command (writes ``OUT/fig5-norms.json`` and ``OUT/fig5-norms.png``)::

    SGJAX_DATA_DIR=... python -m experiments.understanding.fig5_norms OUT
    # options: --steps 24000 --every 2000 --orders bn_relu relu_bn --weight-decay 1e-3;
    # --plot only redraws the PNG
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import sgjax
from experiments import training
from experiments.framework.reports import save_report_png
from experiments.understanding import SG_EXAMPLE_SCALE, fig5, nets

ORDERS = ("bn_relu", "relu_bn")


def layers(order: str, cfg: nets.NetConfig) -> list[sgjax.Layer]:
    """The backprop net's layers with hidden blocks in ``order`` (:data:`ORDERS`)."""
    if order == "bn_relu":
        return training.mlp_layers(cfg.depth + 1, cfg.width, 10)
    if order == "relu_bn":
        L = sgjax.layers
        first = [L.serial(L.flatten, L.dense(cfg.width), L.relu, L.batch_norm())]
        rest = [L.serial(L.dense(cfg.width), L.relu, L.batch_norm())
                for _ in range(cfg.depth - 1)]
        return first + rest + [L.dense(10)]
    raise ValueError(f"order {order!r}; valid: {', '.join(ORDERS)}")


class _Ctx:
    """The part of :class:`experiments.framework.RunContext` ``train_and_evaluate`` uses."""

    def __init__(self, seed: int = 0):
        self.seed, self.curves = seed, {}

    def key(self):
        return jax.random.key(self.seed)

    def restore(self, state):
        return 0, state

    def progress(self, steps, start=0):
        return type("Bar", (), {"update": lambda self, n: None})()

    def log(self, step, **values):
        for k, v in values.items():
            self.curves.setdefault(k, []).append((int(step), float(v)))

    def save(self, step, state):
        pass

    def close(self):
        pass


def run(order: str, cfg: nets.NetConfig, steps: int, every: int) -> dict:
    """Train ``order``'s backprop net for ``steps`` steps (``train_classifier``'s batches,
    keys and initialisation); ``‖W_l‖²`` of every hidden kernel at step 0 and every
    ``every`` steps, with the test error (%) there."""
    split = sgjax.split_at(layers(order, cfg), (), loss=sgjax.losses.softmax_cross_entropy,
                           optimizer=nets.optimizer(cfg), input_shape=(28, 28, 1),
                           batch_size=cfg.batch_size, num_classes=10,
                           example_scale=SG_EXAMPLE_SCALE)
    ds = nets.load_mnist(cfg)
    schedule = sgjax.sync(split)
    x_train = jnp.asarray(ds.x_train.reshape(-1, 28, 28, 1))
    y_train = jnp.asarray(ds.y_train)
    x_test = jnp.asarray(ds.x_test.reshape(-1, 28, 28, 1))
    y_test = jnp.asarray(ds.y_test)
    ctx = _Ctx()
    k_init, k_data = jax.random.split(ctx.key())
    state = schedule.init(k_init, sgjax.Batch(x_train[:cfg.batch_size],
                                              y_train[:cfg.batch_size]))
    apply = training.inference_fn(split)
    norms, errors = {}, {}

    def evaluate(ts, step):
        norms[int(step)] = [float(np.sum(np.square(k)))
                            for k in nets.hidden_kernels(split, ts.stages)]
        errors[int(step)] = float(training.evaluate_error(apply, ts.stages, x_test, y_test))
        return {}

    evaluate(state, 0)
    training.train_and_evaluate(
        ctx, schedule, state, steps=steps, chunk=cfg.chunk, eval_every=every,
        batch_fn=training.uniform_batches(cfg.batch_size), data=(x_train, y_train),
        key=k_data, evaluate=evaluate)
    return {"norms": norms, "test_error": errors, "loss": ctx.curves.get("loss", [])}


def plot(out: pathlib.Path) -> None:
    """``OUT/fig5-norms.png`` from ``OUT/fig5-norms.json``: per block order, each hidden
    layer's ``‖W_l‖² / max_k ‖W_k‖²`` (the claim's ``normalised``) at each logged step."""
    from matplotlib.figure import Figure

    data = json.loads((out / "fig5-norms.json").read_text())
    runs = data["runs"]
    fig = Figure(figsize=(6.2 * len(runs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (order, r) in zip(axes, runs.items()):
        steps = sorted(r["norms"], key=int)
        cmap = __import__("matplotlib").colormaps["viridis"]
        for i, st in enumerate(steps):
            sq = np.asarray(r["norms"][st])
            ax.plot(np.arange(1, len(sq) + 1), sq / sq.max(), marker=".", ms=3,
                    color=cmap(i / max(len(steps) - 1, 1)),
                    label=f"step {st}: err {r['test_error'][st]:.2f}%")
        ax.set_title(_ORDER_WORDS.get(order, order.replace("_", " → ")), fontsize=10)
        ax.set_xlabel("hidden layer")
        ax.set_ylabel("‖W‖² / max")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title="test error", title_fontsize="x-small")
    wd = data["config"]["weight_decay"]
    fig.suptitle(f"Backprop, 20 hidden layers of 128, L2 {wd:g}, Adam 1e-4: normalised "
                 "squared kernel norms over training", fontsize=9)
    save_report_png(fig, out / "fig5-norms.png")


_ORDER_WORDS = {"bn_relu": "dense → BN → ReLU (sgjax)", "relu_bn": "dense → ReLU → BN"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--steps", type=int, default=24000)
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--orders", nargs="+", default=list(ORDERS))
    ap.add_argument("--weight-decay", type=float, default=None,
                    help="L2 penalty (default: fig5's quick, 1e-3)")
    ap.add_argument("--plot", action="store_true", help="only redraw OUT/fig5-norms.png")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.out)
        return
    cfg = dataclasses.replace(fig5.PRESETS["quick"].net, depth=20, activation="relu")
    if args.weight_decay is not None:
        cfg = dataclasses.replace(cfg, weight_decay=args.weight_decay)
    out = {"config": dataclasses.asdict(cfg), "steps": args.steps, "runs": {}}
    for order in args.orders:
        t0 = time.time()
        out["runs"][order] = run(order, cfg, args.steps, args.every)
        out["runs"][order]["wall_s"] = time.time() - t0
        print(order, out["runs"][order]["wall_s"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fig5-norms.json").write_text(json.dumps(out, indent=1))
    plot(args.out)


if __name__ == "__main__":
    main()
