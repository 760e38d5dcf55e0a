"""μP coordinate check of lo_ops.MuLO: how much a few steps change a μP MLP's hidden
activations as the width grows, with the μP multipliers of ``lo_ops.mup.param_groups`` and
without them (``mup_scale`` 1 everywhere).

Under μP the change of each hidden activation coordinate stays of the same size at every
width; without the multipliers it grows with the width (a hidden matrix's ``fan_in`` updates
add up coherently). This follows from the update rule, whatever the meta-weights, so the check
runs with any small_fc_lopt checkpoint (by default the test meta-weights of
``../shared/fixtures``, which say nothing about training quality).

The model is the μLO tasks' MLP (spec 6.3): input layer, two hidden layers, ReLU,
``lo_ops.mup.MuReadout``, initialised by ``lo_ops.mup.init_``; one fixed batch; ``--steps``
steps. Per width and setting: the standard deviation over the batch and the coordinates of
(activation after the steps - activation at init), for each hidden layer's output and the
logits, the mean over ``--seeds`` seeds. Writes ``perf/results/mulo_coord_check.json``,
``.md`` and (with matplotlib) ``.png``.

    python perf/mulo_coord_check.py [--widths 64 128 256 512 1024 2048] [--steps 3]
                                    [--weights DIR_OR_HUB_ID] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

import lo_ops

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("LO_OPS_SHARED", HERE.parent.parent / "shared"))
WEIGHTS = SHARED / "fixtures" / "small_fc_lopt_init" / "pylo_hub" / "MetaMLP"
LAYERS = ("inp", "h1", "h2", "out")


class MuMLP(nn.Module):
    def __init__(self, width: int, d_in: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.out = lo_ops.mup.MuReadout(width, classes)

    def forward(self, x):
        acts = {}
        for name in LAYERS[:-1]:
            x = acts[name] = torch.relu(getattr(self, name)(x))
        acts["out"] = self.out(x)
        return acts


def run(width: int, mup: bool, *, steps: int, seed: int, weights: str, d_in: int, classes: int, batch: int):
    torch.manual_seed(seed)
    model = lo_ops.mup.init_(MuMLP(width, d_in, classes))
    gen = torch.Generator().manual_seed(1000 + seed)  # the same data at every width
    x = torch.randn(batch, d_in, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    groups = lo_ops.mup.param_groups(model)  # (h1, h2: both sizes are the width)
    if not mup:
        for g in groups:
            g["mup_scale"] = 1.0
    opt = lo_ops.MuLO(groups, pretrained=weights)
    with torch.no_grad():
        start = model(x)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x)["out"], y).backward()
        opt.step()
    with torch.no_grad():
        end = model(x)
    return {name: (end[name] - start[name]).std().item() for name in LAYERS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--weights", default=str(WEIGHTS), help="small_fc_lopt meta-weights (directory or Hub id)")
    ap.add_argument("--d-in", type=int, default=48)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "mulo_coord_check"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for setting, mup in (("mup", True), ("no_multipliers", False)):
        results[setting] = {}
        for w in args.widths:
            runs = [run(w, mup, steps=args.steps, seed=s, weights=args.weights, d_in=args.d_in,
                        classes=args.classes, batch=args.batch) for s in range(args.seeds)]
            results[setting][w] = {name: sum(r[name] for r in runs) / len(runs) for name in LAYERS}
            print(setting, w, {k: f"{v:.3g}" for k, v in results[setting][w].items()}, flush=True)
    w0, w1 = args.widths[0], args.widths[-1]
    growth = {s: {n: results[s][w1][n] / results[s][w0][n] for n in LAYERS} for s in results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "seeds": args.seeds, "weights": args.weights if not Path(args.weights).exists()
            else os.path.relpath(args.weights, HERE.parent), "d_in": args.d_in, "batch": args.batch}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "std_of_change": results,
                                                    f"growth_{w0}_to_{w1}": growth}, indent=1) + "\n")
    lines = [f"# μP coordinate check of lo_ops.MuLO ({args.steps} steps, mean of {args.seeds} seeds)", "",
             "Standard deviation of (activation after the steps - at init), per layer output.", ""]
    for setting, title in (("mup", "μP multipliers (lo_ops.mup.param_groups)"),
                           ("no_multipliers", "mup_scale = 1 everywhere")):
        lines += [f"## {title}", "", "| width | " + " | ".join(LAYERS) + " |",
                  "|---|" + "---|" * len(LAYERS)]
        lines += [f"| {w} | " + " | ".join(f"{results[setting][w][n]:.3g}" for n in LAYERS) + " |"
                  for w in args.widths]
        lines += [f"| {w1}/{w0} | " + " | ".join(f"{growth[setting][n]:.3g}x" for n in LAYERS) + " |", ""]
    lines += [f"torch {meta['torch']}, {meta['threads']} threads, weights {meta['weights']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (setting, title) in zip(axes, (("mup", "μP multipliers"), ("no_multipliers", "mup_scale = 1"))):
        for n in LAYERS:
            ax.plot(args.widths, [results[setting][w][n] for w in args.widths], marker="o", label=n)
        ax.set(xscale="log", yscale="log", xlabel="width", title=f"MuLO, {title}")
    axes[0].set_ylabel(f"std of activation change after {args.steps} steps")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
