"""``python -m lo_ops evaluate``: a learned optimizer against AdamW on held-out tasks.

For every task family, `seeds` copies (each its own initialisation and data) train for
`steps` steps with: the small_fc_lopt weights under test (no tuning, lr = 1), Celo and
Celo-Adam with their published weights (shipped in the package; ``num_steps`` = the run
length, lr = 1, no tuning; one optimizer per copy, fed that copy's loss), AdamW at lr 1e-3,
and AdamW at each lr of a grid (the best final training loss per family counts as "AdamW
tuned"). Reported
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
from ..small_fc_lopt.network import load_small_fc_lopt_network
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
    step = make_step(params, steps)
    rows = torch.arange(seeds).unsqueeze(1)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (seeds, family.batch), generator=gen)
        with torch.enable_grad():
            loss = family.loss(params, xt[rows, idx], yt[rows, idx])
            grads = torch.autograd.grad(loss.sum(), params)
        step(grads, loss.detach())
    with torch.no_grad():
        out = {"train_loss": family.loss(params, xt, yt), "test_loss": family.loss(params, xv, yv)}
        if family.classification:
            predicted = family.forward(params, xv).argmax(-1)
            out["test_accuracy"] = (predicted == yv).float().mean(dim=1)
    return {k: v.tolist() for k, v in out.items()}


def _learned(theta: torch.Tensor, step_mult: float, exp_mult: float):
    def make(params, steps):
        opt = BatchedSmallFCLOpt(params, step_mult=step_mult, exp_mult=exp_mult)
        thetas = theta.expand(params[0].shape[0], -1).contiguous()
        return lambda grads, loss: opt.step(grads, thetas)
    return make


def _adamw(lr: float):
    def make(params, steps):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # element-wise: per copy

        def step(grads, loss):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return step
    return make


def _hyperv2(cls):
    """One ``cls`` optimizer (lo_ops.Celo, lo_ops.CeloAdam) per copy, on that copy's slices of
    the batched parameters, with ``num_steps`` = the run length and that copy's loss."""
    def make(params, steps):
        copies = params[0].shape[0]
        views = [[p.detach()[c] for p in params] for c in range(copies)]
        opts = [cls(v, num_steps=steps) for v in views]

        def step(grads, loss):
            for c, (opt, v) in enumerate(zip(opts, views)):
                for p, g in zip(v, grads):
                    p.grad = g[c]
                opt.step(loss=loss[c])
        return step
    return make


# The offline learned optimizers compared next to the weights under test ("learned").
PUBLISHED = {"celo": "Celo", "celo_adam": "CeloAdam"}


def _summary(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def evaluate_weights(pretrained=None, *, steps: int = 500, seeds: int = 4, seed: int = 2024,
                     datasets: bool = True, published: tuple[str, ...] = ()) -> dict:
    """The report of ``lo_ops evaluate``; ``datasets`` adds scikit-learn's bundled datasets
    (when installed) to the synthetic families; ``published`` names the published learned
    optimizers (keys of ``PUBLISHED``) to run too."""
    import lo_ops

    net, _ = load_small_fc_lopt_network(pretrained)
    theta = network_meta(net)
    report = {"steps": steps, "seeds": seeds, "families": {}}
    families = dict(EVAL_FAMILIES) | (sklearn_families() if datasets else {})
    for i, (name, family) in enumerate(families.items()):
        s = seed + 100 * i  # the same tasks for every method
        runs = {"learned": _train(family, _learned(theta, net.step_mult, net.exp_mult), seeds, steps, s)}
        for key in published:
            runs[key] = _train(family, _hyperv2(getattr(lo_ops, PUBLISHED[key])), seeds, steps, s)
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
    published = tuple(k for k in args.published.split(",") if k) if args.published else ()
    unknown = set(published) - set(PUBLISHED)
    if unknown:
        print(f"lo_ops evaluate: unknown --published {sorted(unknown)}; choose from {sorted(PUBLISHED)}")
        return 2
    report = evaluate_weights(args.weights, steps=args.steps, seeds=args.seeds,
                              datasets=not args.no_datasets, published=published)
    report["weights"] = args.weights or "embedded default"
    report["time_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    methods = ["learned", *published, "adamw_tuned", "adamw_0.001"]
    names = {"learned": "small_fc_lopt", "celo": "Celo", "celo_adam": "Celo-Adam",
             "adamw_tuned": "AdamW tuned", "adamw_0.001": "AdamW 1e-3"}
    for metric in ("train_loss", "test_loss", "test_accuracy"):
        print(f"\n{metric.replace('_', ' ')} after {args.steps} steps (mean of {args.seeds} seeds)")
        print(f"{'family':20s}" + "".join(f"{names[m]:>14s}" for m in methods))
        for name, fam in report["families"].items():
            if metric not in fam["learned"]:
                continue
            print(f"{name:20s}" + "".join(f"{fam[m][metric]['mean']:14.4g}" for m in methods))
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
    parser.add_argument("--published", default="celo,celo_adam",
                        help="published learned optimizers to run too, comma-separated "
                             "(celo, celo_adam; empty for none)")
    parser.add_argument("--no-datasets", action="store_true",
                        help="leave out scikit-learn's bundled datasets (digits, wine, breast cancer)")
