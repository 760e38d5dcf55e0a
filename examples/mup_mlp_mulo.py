"""Trains a μP MLP (the μLO tasks' model, spec 6.3) with lo_ops.MuLO, no patched package needed.

    python examples/mup_mlp_mulo.py [--width 1024] [--steps 200] [--weights btherien/mulo]

The model: input layer, two hidden layers of ``--width`` units with ReLU, and
``lo_ops.mup.MuReadout`` (the readout multiplier after the bias), initialised by
``lo_ops.mup.init_``. ``lo_ops.mup.param_groups`` gives the hidden matrices their μP
multiplier ``1/fan_in`` (the param-group key ``mup_scale``) and everything else 1. The data:
scikit-learn's digits (8x8 images, 10 classes) when scikit-learn is installed, else a synthetic
10-class task; full-batch steps, the test accuracy at the end.

``--weights``: the published μLO meta-weights by Hub id (downloaded once, then read from the
Hugging Face cache) or any local small_fc_lopt checkpoint directory.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lo_ops


class MuMLP(nn.Module):
    def __init__(self, d_in: int, width: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.out = lo_ops.mup.MuReadout(width, classes)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.h1(x))
        x = torch.relu(self.h2(x))
        return self.out(x)


def data(seed: int = 0):
    """(x_train, y_train, x_test, y_test), standardised."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        y = torch.tensor(digits.target)
    except ImportError:
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(10, 64, generator=gen) * 2
        y = torch.randint(0, 10, (1800,), generator=gen)
        x = centers[y] + torch.randn(1800, 64, generator=gen) * 3
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.8 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--weights", default="btherien/mulo", help="μLO meta-weights: Hub id or local directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    x, y, x_test, y_test = data(args.seed)
    model = lo_ops.mup.init_(MuMLP(x.shape[1], args.width, 10))
    # h1, h2: mup_scale = 1/width; the rest 1. Said by name: at --width 64 (the digits' input
    # size) the input layer would look hidden to the size-based inference.
    groups = lo_ops.mup.param_groups(model, hidden=["h1.weight", "h2.weight"])
    opt = lo_ops.MuLO(groups, pretrained=args.weights)
    for group in groups:
        print(f"mup_scale {group['mup_scale']:.6g}: {', '.join(group['names'])}")
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if step == 1 or step % max(args.steps // 10, 1) == 0:
            print(f"step {step:4d}  train loss {loss.item():.3g}", flush=True)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        test_loss = nn.functional.cross_entropy(model(x_test), y_test).item()
    print(f"test loss {test_loss:.3g}  test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
