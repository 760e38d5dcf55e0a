"""``python -m lo_ops meta-train``: PES meta-training with checkpoints, resume and
best-checkpoint selection on held-out tasks.

Writes to ``--out``: ``last.pt`` (everything to resume, every ``--checkpoint-every`` steps),
``best/`` (the meta-parameters with the lowest held-out score so far, as a loadable
``SmallFCLOptNetwork`` directory: ``SmallFCLOpt(params, pretrained="OUT/best")``) and
``log.jsonl`` (one line per evaluation).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..small_fc_lopt.network import (
    SmallFCLOptNetwork,
    load_small_fc_lopt_network,
    normalised_adam_network,
)
from .batched import network_meta
from .evaluate import ADAMW_GRID, _adamw, _learned, _train
from .pes import PES, PESConfig, geometric_mean
from .tasks import DatasetMLP, TeacherStudentMLP

# Training families (every outer step sees all of them) and held-out families (other widths,
# depths, sizes and kinds). lo_ops.meta.evaluate's families differ from both.
TRAIN_FAMILIES = (
    TeacherStudentMLP(in_dim=8, hidden=(32,), out_dim=4, examples=512, batch=64),
    TeacherStudentMLP(in_dim=6, hidden=(24, 24), out_dim=3, examples=512, batch=32),
    TeacherStudentMLP(in_dim=10, hidden=(32,), out_dim=4, classification=True, examples=512, batch=64),
    TeacherStudentMLP(in_dim=16, hidden=(48, 48), out_dim=8, classification=True, examples=512, batch=32),
    TeacherStudentMLP(in_dim=6, hidden=(16, 16, 16), out_dim=3, examples=512, batch=32),
)
# scikit-learn's digits (bundled, no download) with a narrower MLP than the evaluation's;
# wine and breast cancer stay held out as datasets never seen in meta-training.
DATASET_FAMILIES = (DatasetMLP(dataset="digits", in_dim=64, hidden=(32,), out_dim=10, batch=64),)
START = "normalised-adam"  # --init's default: normalised Adam with its schedule units open
HELD_OUT = (
    TeacherStudentMLP(in_dim=16, hidden=(64,), out_dim=4, examples=512, batch=64),
    TeacherStudentMLP(in_dim=8, hidden=(32, 32), out_dim=2, examples=512, batch=32),
    TeacherStudentMLP(in_dim=12, hidden=(48,), out_dim=5, classification=True, examples=512, batch=64),
    TeacherStudentMLP(in_dim=6, hidden=(24,), out_dim=1, examples=512, batch=32),
    TeacherStudentMLP(in_dim=16, hidden=(32, 32), out_dim=6, classification=True, examples=512, batch=32),
)


def adamw_reference(steps: int, seeds: int = 8) -> list[float]:
    """Per held-out family: the final training loss (geometric mean over copies) of AdamW at
    the best learning rate of ADAMW_GRID, on the same tasks as ``held_out_score``."""
    refs = []
    for i, family in enumerate(HELD_OUT):
        runs = [_train(family, _adamw(lr), seeds, steps, 1000 + i)["train_loss"] for lr in ADAMW_GRID]
        refs.append(min(geometric_mean(r) for r in runs))
    return refs


def held_out_score(theta: torch.Tensor, steps: int, step_mult: float, exp_mult: float,
                   reference: list[float], seeds: int = 8) -> float:
    """How far the learned optimizer is from per-family tuned AdamW on the held-out families:
    the geometric mean over families of (final training loss / AdamW's), each ratio floored
    at 0.8 so that beating AdamW far on one family cannot hide falling behind on another
    (lower is better; 0.8 means at least 20% better everywhere)."""
    ratios = []
    for i, (family, ref) in enumerate(zip(HELD_OUT, reference)):
        losses = _train(family, _learned(theta, step_mult, exp_mult), seeds, steps, 1000 + i)["train_loss"]
        ratios.append(max(geometric_mean(losses) / ref, 0.8))
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def start_network(init: str | None) -> SmallFCLOptNetwork:
    """``--init``: "normalised-adam" (the construction of ``normalised_adam_network`` with its
    schedule units and ``exp_mult = 1``, so that the magnitude output is a log step size), or
    anything ``SmallFCLOpt(pretrained=...)`` takes (None: the embedded default)."""
    if init == START:
        return normalised_adam_network(exp_mult=1.0, schedule_units=True)
    return load_small_fc_lopt_network(None if init == "default" else init)[0]


def network_from_theta(theta: torch.Tensor, step_mult: float, exp_mult: float = 0.001) -> SmallFCLOptNetwork:
    from .._layout import NUM_DECAYS, PACKED_NUMEL, unpack_weights

    offsets = theta[PACKED_NUMEL:PACKED_NUMEL + NUM_DECAYS].tolist()
    net = SmallFCLOptNetwork(
        decay_offsets={"momentum": offsets[0:3], "rms": offsets[3:4], "adafactor": offsets[4:7]},
        step_mult=step_mult,
        exp_mult=exp_mult,
    )
    weights = unpack_weights(theta[:PACKED_NUMEL].contiguous())
    with torch.no_grad():
        for layer, (w, b) in zip(net.layers, zip(weights[0::2], weights[1::2])):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return net


def _commit() -> str | None:
    """The lo_ops git commit this run's code comes from (with "+dirty" for local changes), if
    the package runs from a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def save_best(theta: torch.Tensor, directory: Path, provenance: dict) -> None:
    """The meta-parameters as a loadable network directory, with how they were made."""
    net = network_from_theta(theta, provenance["step_mult"], provenance["exp_mult"])
    net.save_pretrained(directory)
    (directory / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")


def training_families(datasets: bool) -> list[TeacherStudentMLP]:
    """The meta-training families; ``datasets`` adds DATASET_FAMILIES (needs scikit-learn)."""
    families = list(TRAIN_FAMILIES)
    if datasets:
        try:
            import sklearn  # noqa: F401
        except ImportError as e:
            raise SystemExit("meta-train: the digits family needs scikit-learn "
                             "(pip install 'lo_ops[examples]', or pass --no-datasets)") from e
        families += DATASET_FAMILIES
    return families


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = PESConfig(pairs=args.pairs, sigma=args.sigma, unroll=args.unroll, min_inner=args.min_inner,
                       max_inner=args.max_inner, outer_lr=args.lr, outer_steps=args.steps,
                       warmup=args.warmup, clip=args.clip, seed=args.seed, objective=args.objective,
                       reparam=args.reparam, balance=not args.no_balance, subset=args.subset, weighting=args.weighting)
    start_net = start_network(args.init)
    step_mult, exp_mult = start_net.step_mult, start_net.exp_mult
    theta0 = network_meta(start_net)
    families = training_families(not args.no_datasets)
    pes = PES(families, theta0, config, step_mult=step_mult, exp_mult=exp_mult)
    # What a resumed run must agree with (everything but the number of outer steps is fixed).
    run = {"config": {k: v for k, v in vars(config).items() if k != "outer_steps"},
           "families": [repr(f) for f in families], "step_mult": step_mult, "exp_mult": exp_mult}
    reference = adamw_reference(args.eval_steps)
    best = float("inf")
    last = out / "last.pt"
    wall = 0.0
    command = "python -m lo_ops meta-train " + shlex.join(args.argv) if getattr(args, "argv", None) else None

    commit = _commit()  # the code this run starts from

    def provenance(step: int, held: float, elapsed: float) -> dict:
        return {"command": command, "seed": config.seed, "outer_step": step, "outer_steps": config.outer_steps,
                "wall_time_s": round(elapsed, 1), "held_out_score": held, "lo_ops_commit": commit,
                "torch": torch.__version__, "families": run["families"], "config": run["config"],
                "step_mult": step_mult, "exp_mult": exp_mult, "init": args.init}

    if args.resume and last.exists():
        saved = torch.load(last, weights_only=True)
        if saved.get("run") != run:
            raise SystemExit(f"meta-train: {last} was written by a run with other settings; "
                             f"saved {saved.get('run')}, now {run}")
        pes.load_state_dict(saved["pes"])
        best, wall = saved["best"], saved.get("wall_s", 0.0)
        print(f"resumed from {last} at outer step {pes.outer_step} (best held-out {best:.4f})")
    else:
        best = held_out_score(pes.theta.detach(), args.eval_steps, step_mult, exp_mult, reference)
        save_best(pes.theta.detach(), out / "best", provenance(0, best, 0.0))
        print(f"start: held-out score {best:.4f}")
    t0 = time.time() - wall
    first = pes.outer_step
    log = (out / "log.jsonl").open("a")
    while pes.outer_step < config.outer_steps:
        score = pes.step()
        step = pes.outer_step
        rate = (step - first) / max(1e-9, time.time() - t0 - wall)
        sys.stdout.write(f"\rstep {step}/{config.outer_steps}  meta-loss {score:.4f}  best {best:.4f}  "
                         f"{rate:.1f} steps/s ")
        sys.stdout.flush()
        if step % args.eval_every == 0 or step == config.outer_steps:
            held = held_out_score(pes.theta.detach(), args.eval_steps, step_mult, exp_mult, reference)
            improved = held < best
            if improved:
                best = held
                save_best(pes.theta.detach(), out / "best", provenance(step, held, time.time() - t0))
            log.write(json.dumps({"step": step, "meta_loss": score, "held_out": held,
                                  "best": best, "time_s": time.time() - t0}) + "\n")
            log.flush()
            print(f"\nstep {step}: held-out {held:.4f}{' (best)' if improved else ''}")
        if step % args.checkpoint_every == 0 or step == config.outer_steps:
            torch.save({"pes": pes.state_dict(), "best": best, "run": run, "wall_s": time.time() - t0},
                       out / "last.pt.tmp")
            (out / "last.pt.tmp").replace(last)
    log.close()
    print(f"\ndone: best held-out score {best:.4f}; weights in {out / 'best'}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output directory (checkpoints, best/, log)")
    parser.add_argument("--init", default=START,
                        help=f"starting weights: {START!r} (default), a directory or Hub repo id, "
                             "or 'default' for the embedded default")
    parser.add_argument("--steps", type=int, default=1000, help="outer steps")
    parser.add_argument("--pairs", type=int, default=8, help="antithetic pairs")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--min-inner", type=int, default=50)
    parser.add_argument("--max-inner", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3, help="outer AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-steps", type=int, default=500,
                        help="inner steps of the held-out runs (against AdamW tuned over the same steps)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--objective", choices=("log", "loss"), default="log",
                        help="score of an unroll: mean log normalised loss, or mean normalised loss")
    parser.add_argument("--reparam", type=float, default=0.0,
                        help="weight reparameterisation: log-scale half-width (0: off)")
    parser.add_argument("--subset", choices=("all", "head"), default="all",
                        help="meta-parameters to train: all, or the output layer and decay offsets")
    parser.add_argument("--weighting", choices=("uniform", "late"), default="uniform",
                        help="weight of inner step t of a run of length T in the objective: 1, or 2t/T")
    parser.add_argument("--no-balance", action="store_true",
                        help="sum the families' antithetic differences as they are (default: each in units "
                             "of its own RMS)")
    parser.add_argument("--no-datasets", action="store_true",
                        help="leave out the digits family (which needs scikit-learn)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
