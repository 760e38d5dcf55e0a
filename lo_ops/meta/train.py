"""``python -m lo_ops meta-train``: PES meta-training with checkpoints, resume and
best-checkpoint selection on held-out tasks.

Writes to ``--out``: ``last.pt`` (everything to resume, every ``--checkpoint-every`` steps),
``best/`` (the meta-parameters with the lowest held-out score so far, as a loadable
``SmallFCLOptNetwork`` directory: ``SmallFCLOpt(params, pretrained="OUT/best")``) and
``log.jsonl`` (one line per evaluation).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..networks import SmallFCLOptNetwork, load_small_fc_lopt_network
from .batched import pack_meta
from .pes import PES, PESConfig, evaluate
from .tasks import TeacherStudentMLP

# Training families (every outer step sees all of them) and held-out families (other widths,
# depths, sizes and kinds).
TRAIN_FAMILIES = (
    TeacherStudentMLP(in_dim=8, hidden=(32,), out_dim=4, examples=512, batch=64),
    TeacherStudentMLP(in_dim=6, hidden=(24, 24), out_dim=3, examples=512, batch=32),
    TeacherStudentMLP(in_dim=10, hidden=(32,), out_dim=4, classification=True, examples=512, batch=64),
)
HELD_OUT = (
    TeacherStudentMLP(in_dim=16, hidden=(64,), out_dim=4, examples=512, batch=64),
    TeacherStudentMLP(in_dim=8, hidden=(32, 32), out_dim=2, examples=512, batch=32),
    TeacherStudentMLP(in_dim=12, hidden=(48,), out_dim=5, classification=True, examples=512, batch=64),
)


def held_out_score(theta: torch.Tensor, steps: int, step_mult: float) -> float:
    """Mean over the held-out families of the normalised final loss (lower is better)."""
    scores = [evaluate(f, theta, steps=steps, seed=1000 + i, step_mult=step_mult)
              for i, f in enumerate(HELD_OUT)]
    return sum(scores) / len(scores)


def network_from_theta(theta: torch.Tensor, step_mult: float) -> SmallFCLOptNetwork:
    from .._layout import NUM_DECAYS, PACKED_NUMEL, unpack_weights

    offsets = theta[PACKED_NUMEL:PACKED_NUMEL + NUM_DECAYS].tolist()
    net = SmallFCLOptNetwork(
        decay_offsets={"momentum": offsets[0:3], "rms": offsets[3:4], "adafactor": offsets[4:7]},
        step_mult=step_mult,
    )
    weights = unpack_weights(theta[:PACKED_NUMEL].contiguous())
    with torch.no_grad():
        for layer, (w, b) in zip(net.layers, zip(weights[0::2], weights[1::2])):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return net


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = PESConfig(pairs=args.pairs, sigma=args.sigma, unroll=args.unroll, min_inner=args.min_inner,
                       max_inner=args.max_inner, outer_lr=args.lr, outer_steps=args.steps,
                       warmup=args.warmup, clip=args.clip, seed=args.seed)
    start_net, _ = load_small_fc_lopt_network(args.init)
    step_mult = start_net.step_mult
    offsets = start_net.decay_offsets
    theta0 = pack_meta(start_net.packed_weights(), offsets["momentum"] + offsets["rms"] + offsets["adafactor"])
    pes = PES(list(TRAIN_FAMILIES), theta0, config, step_mult=step_mult)
    best = float("inf")
    last = out / "last.pt"
    if args.resume and last.exists():
        saved = torch.load(last, weights_only=True)
        pes.load_state_dict(saved["pes"])
        best = saved["best"]
        print(f"resumed from {last} at outer step {pes.outer_step} (best held-out {best:.4f})")
    elif pes.outer_step == 0:
        best = held_out_score(pes.theta.detach(), args.eval_steps, step_mult)
        network_from_theta(pes.theta.detach(), step_mult).save_pretrained(out / "best")
        print(f"start: held-out score {best:.4f}")
    t0 = time.time()
    log = (out / "log.jsonl").open("a")
    while pes.outer_step < config.outer_steps:
        score = pes.step()
        step = pes.outer_step
        rate = step / max(1e-9, time.time() - t0)
        sys.stdout.write(f"\rstep {step}/{config.outer_steps}  meta-loss {score:.4f}  best {best:.4f}  "
                         f"{rate:.1f} steps/s ")
        sys.stdout.flush()
        if step % args.eval_every == 0 or step == config.outer_steps:
            held = held_out_score(pes.theta.detach(), args.eval_steps, step_mult)
            improved = held < best
            if improved:
                best = held
                network_from_theta(pes.theta.detach(), step_mult).save_pretrained(out / "best")
            log.write(json.dumps({"step": step, "meta_loss": score, "held_out": held,
                                  "best": best, "time_s": time.time() - t0}) + "\n")
            log.flush()
            print(f"\nstep {step}: held-out {held:.4f}{' (best)' if improved else ''}")
        if step % args.checkpoint_every == 0 or step == config.outer_steps:
            torch.save({"pes": pes.state_dict(), "best": best}, out / "last.pt.tmp")
            (out / "last.pt.tmp").replace(last)
    log.close()
    print(f"\ndone: best held-out score {best:.4f}; weights in {out / 'best'}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output directory (checkpoints, best/, log)")
    parser.add_argument("--init", default=None, help="starting weights (default: the embedded default)")
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
    parser.add_argument("--eval-steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
