"""``python -m lo_ops demo``: a small classifier trained with lo_ops' offline learned optimizers
and with AdamW.

The offline learned optimizers are the ones that need no download: SmallFCLOpt with lo_ops'
embedded default, and Celo and Celo-Adam with their published weights (shipped in the
package), all untuned at lr 1 (Celo and Celo-Adam told the run length). The data are
scikit-learn's bundled handwritten digits (8x8 images, 10 classes; no download) when
scikit-learn is installed (``pip install 'lo_ops[examples]'``; ``make demo`` does it), and
otherwise a synthetic 10-class teacher-student problem. A 64-128-10 MLP trains with each
optimizer on the same batches; the command prints a progress bar per optimizer, a table of
final training loss, test loss and test accuracy, names the best offline learned optimizer
(lowest final test loss), and writes train and test loss curves of it and AdamW (the other
learned optimizers thinner) to a PNG when matplotlib is installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ._plotting import pyplot
from .small_fc_lopt.network import DEFAULT_WEIGHTS_DIR


def describe_default() -> str:
    """What the embedded default is, from the provenance shipped with it."""
    path = DEFAULT_WEIGHTS_DIR / "provenance.json"
    if not path.is_file():
        return "The embedded default is a hand-built normalised Adam (not meta-trained; see README)."
    p = json.loads(path.read_text())
    return (f"The embedded default was meta-trained by lo_ops: {p['outer_step']} outer PES steps "
            f"({p['wall_time_s'] / 60:.0f} min on {p.get('machine', 'one machine')}) on small MLP tasks, "
            "scikit-learn's digits with a narrower MLP among them; it is used here untuned, at lr 1, "
            f"as is AdamW at its common default lr 1e-3 (details: {DEFAULT_WEIGHTS_DIR / 'README.md'}).")


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x = torch.randn(2000, 64, generator=gen)
        teacher = torch.randn(64, 10, generator=gen)
        y = (torch.tanh(x) @ teacher).argmax(dim=1)
        source = "a synthetic 10-class problem (install scikit-learn for the digits)"
    else:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        source = "scikit-learn's digits (1797 images of 8x8 pixels, 10 classes)"
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = torch.randperm(len(x), generator=gen)
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test], source


def _progress(name: str, step: int, total: int, loss: float) -> None:
    width = 30
    done = int(width * step / total)
    sys.stdout.write(f"\r  {name:12s} [{'#' * done}{'.' * (width - done)}] {step:4d}/{total}  loss {loss:<10.3g}")
    sys.stdout.flush()


def smoothed(values: list[float], window: int = 0) -> list[float]:
    """Centred moving average (window: about 1/30 of the run, odd; shorter at the ends), in
    log space, as the losses span orders of magnitude."""
    import math

    window = window or max(1, len(values) // 30) | 1
    logs = [math.log(max(v, 1e-30)) for v in values]
    half, out = window // 2, []
    for i in range(len(logs)):
        part = logs[max(0, i - half): i + half + 1]
        out.append(math.exp(sum(part) / len(part)))
    return out


def run(args) -> int:
    import lo_ops

    xt, yt, xv, yv, source = _data(args.seed)
    print(f"lo_ops demo: a 64-128-10 MLP on {source}, {args.steps} steps of batch 128 "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads: the learned optimizers fit the "
          "training set to ~1e-7, so the last digits of their losses change with the thread count)")
    print(describe_default())
    print("Celo and Celo-Adam use the published weights of Moudgil et al. (TMLR 2025, MIT licence) "
          "shipped with lo_ops, untuned at lr 1 with num_steps = the run length.")
    optimizers = {
        "SmallFCLOpt": lambda ps: lo_ops.SmallFCLOpt(ps, lr=args.lr),
        "Celo": lambda ps: lo_ops.Celo(ps, num_steps=args.steps),
        "Celo-Adam": lambda ps: lo_ops.CeloAdam(ps, num_steps=args.steps),
        "AdamW 1e-3": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    }
    learned_names = ["SmallFCLOpt", "Celo", "Celo-Adam"]
    if args.velo:
        optimizers["VeLO"] = lambda ps: lo_ops.VeLO(ps, num_steps=args.steps, pretrained=args.velo)
    results, curves, test_curves = {}, {}, {}
    every = max(1, args.steps // 40)
    for name, make in optimizers.items():
        torch.manual_seed(args.seed + 1)  # same initialisation and batches for every optimizer
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        opt = make(model.parameters())
        batches = torch.Generator().manual_seed(args.seed + 2)
        curve, test_curve = [], []
        t0 = time.perf_counter()
        for step in range(args.steps):
            idx = torch.randint(0, len(xt), (128,), generator=batches)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                return loss

            loss = opt.step(closure).detach().item()
            curve.append(loss)
            if step % every == 0 or step == args.steps - 1:
                with torch.no_grad():
                    test_curve.append((step + 1, float(torch.nn.functional.cross_entropy(model(xv), yv))))
            if step % max(1, args.steps // 50) == 0 or step == args.steps - 1:
                _progress(name, step + 1, args.steps, loss)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            train_loss = float(torch.nn.functional.cross_entropy(model(xt), yt))
            logits = model(xv)
            test_loss = float(torch.nn.functional.cross_entropy(logits, yv))
            accuracy = float((logits.argmax(1) == yv).float().mean())
        results[name] = (train_loss, test_loss, accuracy, seconds)
        curves[name] = curve
        test_curves[name] = test_curve
        print()
    print(f"\n  {'optimizer':12s} {'train loss':>10s} {'test loss':>10s} {'test acc':>9s} {'time':>7s}")
    for name, (train_loss, test_loss, accuracy, seconds) in results.items():
        print(f"  {name:12s} {train_loss:10.3g} {test_loss:10.3g} {accuracy:9.3f} {seconds:6.1f}s")
    finite = [n for n in learned_names if results[n][1] == results[n][1]]
    best = min(finite, key=lambda n: results[n][1]) if finite else learned_names[0]
    b, adamw = results[best], results["AdamW 1e-3"]
    print(f"\n  Best offline learned optimizer here (lowest final test loss): {best} "
          f"(test loss {b[1]:.3g}, accuracy {b[2]:.3f}; AdamW 1e-3: {adamw[1]:.3g}, {adamw[2]:.3f}).")
    for name in learned_names:
        r = results[name]
        if r[0] < adamw[0] and r[1] > adamw[1]:
            print(f"  {name} fits the {len(xt)} training examples further than AdamW 1e-3 but its test loss is "
                  "higher: its predictions get more confident (compare the test accuracy).")
    plt = pyplot() if args.plot else None
    if plt is not None:
        fig, (ax, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
        for name in curves:
            main = name in (best, "AdamW 1e-3")
            style = dict(linewidth=1.6 if main else 0.7, alpha=1.0 if main else 0.5,
                         label=name + (" (best learned)" if name == best else ""))
            line, = ax.plot(range(1, len(curves[name]) + 1), smoothed(curves[name]), **style)
            ax.plot(range(1, len(curves[name]) + 1), curves[name], color=line.get_color(), linewidth=0.5,
                    alpha=0.15)
            ax_test.plot(*zip(*test_curves[name]), **style)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.1 * min(min(smoothed(c)) for c in curves.values()))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (batch; bold: moving average)")
        ax_test.set_xlabel("step")
        ax_test.set_ylabel("test loss")
        ax_test.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    chance = float(torch.log(torch.tensor(10.0)))
    learned_ok = all(r[0] == r[0] for r in results.values()) and all(results[n][0] < chance for n in learned_names)
    return 0 if learned_ok else 1


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1.0, help="SmallFCLOpt's lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="runs/demo_losses.png",
                        help="loss-curve PNG (needs matplotlib; empty to skip)")
    parser.add_argument("--velo", default=None, metavar="WEIGHTS",
                        help="also train with VeLO, loading its weights from WEIGHTS (any layout)")
