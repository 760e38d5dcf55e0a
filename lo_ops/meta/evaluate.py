"""``python -m lo_ops evaluate``: a learned optimizer against AdamW on held-out tasks.

For every task family, `seeds` copies (each its own initialisation and data) train for
`steps` steps with: the learned optimizer (no tuning, lr = 1), AdamW at lr 1e-3, and AdamW at
each lr of a grid (the best final training loss per family counts as "AdamW tuned"). Reported
per method: final full-data training loss, test loss (held-out examples of the same task) and,
for classification, test accuracy; mean and standard deviation over the seeds. Written as
JSON (and a PNG bar chart when matplotlib is installed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._plotting import pyplot
from ..networks import load_small_fc_lopt_network
from .batched import BatchedSmallFCLOpt, network_meta
from .tasks import TeacherStudentMLP, sklearn_families

ADAMW_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
# Never used in meta-training (lo_ops.meta.train uses other widths, depths and seeds).
EVAL_FAMILIES = {
    "regression_wide": TeacherStudentMLP(in_dim=16, hidden=(128,), out_dim=4, examples=1024, batch=64),
    "regression_deep": TeacherStudentMLP(in_dim=8, hidden=(32, 32, 32), out_dim=2, examples=1024, batch=64),
    "regression_narrow": TeacherStudentMLP(in_dim=4, hidden=(16,), out_dim=1, examples=1024, batch=32),
    "classification_3": TeacherStudentMLP(in_dim=12, hidden=(64,), out_dim=3, classification=True,
                                          examples=1024, batch=64),
    "classification_10": TeacherStudentMLP(in_dim=20, hidden=(64, 64), out_dim=10, classification=True,
                                           examples=1024, batch=64),
}


def _train(family, make_step, seeds: int, steps: int, seed: int) -> dict:
    """Trains `seeds` copies; returns per-copy metrics (lists)."""
    gen = torch.Generator().manual_seed(seed)
    params = family.init_params(seeds, gen)
    x, y = family.make_data(seeds, gen)
    n_train = int(0.8 * x.shape[1])
    xt, yt, xv, yv = x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:]
    step = make_step(params)
    rows = torch.arange(seeds).unsqueeze(1)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (seeds, family.batch), generator=gen)
        with torch.enable_grad():
            loss = family.loss(params, xt[rows, idx], yt[rows, idx])
            grads = torch.autograd.grad(loss.sum(), params)
        step(grads)
    with torch.no_grad():
        out = {"train_loss": family.loss(params, xt, yt), "test_loss": family.loss(params, xv, yv)}
        if family.classification:
            predicted = family.forward(params, xv).argmax(-1)
            out["test_accuracy"] = (predicted == yv).float().mean(dim=1)
    return {k: v.tolist() for k, v in out.items()}


def _learned(theta: torch.Tensor, step_mult: float, exp_mult: float):
    def make(params):
        opt = BatchedSmallFCLOpt(params, step_mult=step_mult, exp_mult=exp_mult)
        thetas = theta.expand(params[0].shape[0], -1).contiguous()
        return lambda grads: opt.step(grads, thetas)
    return make


def _adamw(lr: float):
    def make(params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # element-wise: per copy

        def step(grads):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return step
    return make


def _summary(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def evaluate_weights(pretrained=None, *, steps: int = 500, seeds: int = 4, seed: int = 2024,
                     datasets: bool = True) -> dict:
    """The report of ``lo_ops evaluate``; ``datasets`` adds scikit-learn's bundled datasets
    (when installed) to the synthetic families."""
    net, _ = load_small_fc_lopt_network(pretrained)
    theta = network_meta(net)
    report = {"steps": steps, "seeds": seeds, "families": {}}
    families = dict(EVAL_FAMILIES) | (sklearn_families() if datasets else {})
    for i, (name, family) in enumerate(families.items()):
        s = seed + 100 * i  # the same tasks for every method
        runs = {"learned": _train(family, _learned(theta, net.step_mult, net.exp_mult), seeds, steps, s)}
        for lr in ADAMW_GRID:
            runs[f"adamw_{lr:g}"] = _train(family, _adamw(lr), seeds, steps, s)
        tuned = min((k for k in runs if k.startswith("adamw_")),
                    key=lambda k: _summary(runs[k]["train_loss"])["mean"])
        fam = {k: {m: _summary(v) for m, v in r.items()} for k, r in runs.items()}
        fam["adamw_tuned"] = dict(fam[tuned], lr=float(tuned.split("_", 1)[1]))
        learned, best = fam["learned"]["train_loss"]["mean"], fam["adamw_tuned"]["train_loss"]["mean"]
        fam["verdict"] = {
            "train_loss_within_10pct_of_tuned": learned <= 1.1 * best,
            "beats_adamw_1e-3": learned < fam["adamw_0.001"]["train_loss"]["mean"],
            "test_loss_within_10pct_of_tuned":
                fam["learned"]["test_loss"]["mean"] <= 1.1 * fam["adamw_tuned"]["test_loss"]["mean"],
        }
        report["families"][name] = fam
    return report


def write_plot(report: dict, path: Path) -> bool:
    """A bar chart of the final training losses; False (and nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(report["families"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (method, label) in enumerate((("learned", "learned"), ("adamw_tuned", "AdamW tuned"),
                                         ("adamw_0.001", "AdamW 1e-3"))):
        means = [report["families"][n][method]["train_loss"]["mean"] for n in names]
        stds = [report["families"][n][method]["train_loss"]["std"] for n in names]
        ax.bar([i + 0.27 * (j - 1) for i in range(len(names))], means, 0.27, yerr=stds, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("final training loss")
    ax.set_title(f"{report.get('weights', 'learned')}: {report['steps']} steps, {report['seeds']} seeds")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args) -> int:
    t0 = time.time()
    report = evaluate_weights(args.weights, steps=args.steps, seeds=args.seeds,
                              datasets=not args.no_datasets)
    report["weights"] = args.weights or "embedded default"
    report["time_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'family':20s} {'learned':>10s} {'AdamW tuned':>12s} {'AdamW 1e-3':>11s}   (final training loss)")
    for name, fam in report["families"].items():
        print(f"{name:20s} {fam['learned']['train_loss']['mean']:10.4g} "
              f"{fam['adamw_tuned']['train_loss']['mean']:12.4g} {fam['adamw_0.001']['train_loss']['mean']:11.4g}")
    print(f"wrote {out}")
    if args.plot and write_plot(report, Path(args.plot)):
        print(f"wrote {args.plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--weights", default=None, help="weights to evaluate (default: the embedded default)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default="perf/results/evaluate.json")
    parser.add_argument("--plot", default=None, help="also write a PNG (needs matplotlib)")
    parser.add_argument("--no-datasets", action="store_true",
                        help="leave out scikit-learn's bundled datasets (digits, wine, breast cancer)")
