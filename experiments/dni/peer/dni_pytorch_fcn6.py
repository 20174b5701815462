"""Independent check of :mod:`experiments.dni.degradation` on koz4k/dni-pytorch (issue 18).

A.1's 6-layer MNIST FCN (5 hidden blocks of linear 256, batch norm, ReLU; a linear
classifier), one ``dni.BackwardInterface`` after every hidden block (the peer's own
update-unlock wiring: each block is updated from the synthetic gradient of the interface
above it, and each synthesizer regresses the gradient that arrives from above, which is
itself the next synthetic gradient backpropagated through the next block), its
``BasicSynthesizer`` with two hidden layers of 256 (ReLU, no batch norm, zero-initialised
output, as the peer ships it), one Adam over every parameter at a constant learning rate,
batch 256 drawn uniformly with replacement, the batch-mean cross-entropy (the peer regresses
gradients in the mean loss's units with ``2/B·(SG − target)``; ``--reduction sum`` makes
them per-example gradients, as sgjax's ``example_scale``), inputs in [0, 1].

Not part of the suite (it needs torch and the peer's ``dni.py``); run with a torch venv::

    PYTHONPATH=<dni-pytorch checkout> /work/venv-torch/bin/python \\
        experiments/dni/peer/dni_pytorch_fcn6.py --mode dni --steps 3000

Prints the test error and the mean training loss every ``--every`` steps, then the same
``err_rise``/``loss_rise`` as :func:`experiments.dni.degradation.rise` (window 3).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import dni
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(root):
    x = lambda n: torch.tensor(idx(f"{root}/{n}-images-idx3-ubyte.gz").reshape(-1, 784) / 255.,
                               dtype=torch.float32)
    y = lambda n: torch.tensor(idx(f"{root}/{n}-labels-idx1-ubyte.gz").astype(np.int64))
    return x("train"), y("train"), x("t10k"), y("t10k")


class Net(nn.Module):
    def __init__(self, depth, mode):
        super().__init__()
        dims = [784] + [256] * (depth - 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU())
            for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(256, 10)
        self.mode = mode
        if mode != "bprop":
            ctx = 10 if mode == "cdni" else None
            self.interfaces = nn.ModuleList(
                dni.BackwardInterface(dni.BasicSynthesizer(
                    256, n_hidden=0 if mode == "cdni" else 2, hidden_dim=256,
                    context_dim=ctx))
                for _ in self.blocks)

    def forward(self, x, y=None):
        context = F.one_hot(y, 10).float() if (self.mode == "cdni" and y is not None) else None
        with dni.synthesizer_context(context):
            for k, block in enumerate(self.blocks):
                x = block(x)
                if self.mode != "bprop":
                    x = self.interfaces[k](x)
        return self.out(x)


def rise(values, window=3):
    v = np.asarray(values, np.float64)
    window = max(1, min(window, len(v)))
    avg = np.convolve(v, np.ones(window) / window, mode="valid")
    return float(avg.min()), float(avg[-1]), float(avg[-1] - avg.min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("bprop", "dni", "cdni"), default="dni")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.environ.get("SGJAX_DATA_DIR", ".") + "/mnist")
    ap.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                    help="sum: the synthesizers regress per-example gradients (sgjax's "
                         "example_scale = B); Adam trains the layers the same either way")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load(a.data)
    net = Net(a.depth, a.mode)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    curve, losses, t0 = [], [], time.time()
    for step in range(1, a.steps + 1):
        idx_ = torch.randint(0, xtr.shape[0], (256,), generator=gen)
        net.train()
        opt.zero_grad()
        loss = F.cross_entropy(net(xtr[idx_], ytr[idx_]), ytr[idx_], reduction=a.reduction)
        loss.backward()
        opt.step()
        losses.append(float(loss) / (256 if a.reduction == "sum" else 1))
        if step % a.every == 0:
            net.eval()
            with torch.no_grad():
                err = 100.0 * float((net(xte).argmax(-1) != yte).float().mean())
            curve.append((step, err, float(np.mean(losses))))
            losses = []
            print(f"{step} test_error={err:.2f} loss={curve[-1][2]:.4f}", flush=True)
    e_min, e_end, e_rise = rise([c[1] for c in curve])
    l_min, l_end, l_rise = rise([c[2] for c in curve])
    summary = dict(mode=a.mode, depth=a.depth, lr=a.lr, steps=a.steps, seed=a.seed,
                   reduction=a.reduction,
                   final_test_error=curve[-1][1], test_error_min=e_min, err_rise=e_rise,
                   loss_min=l_min, loss_end=l_end, loss_rise=l_rise,
                   wall_s=round(time.time() - t0, 1), curve=curve)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
