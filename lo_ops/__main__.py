"""Command line: ``python -m lo_ops demo``, ``convert``, ``meta-train`` and ``evaluate``."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def demo(args) -> int:
    """Trains a small MLP on a synthetic teacher-student task (no download) and prints losses."""
    import lo_ops

    torch.manual_seed(args.seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x = torch.randn(4096, 16)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(4096, 4)

    def run(name, make_opt):
        torch.manual_seed(args.seed + 1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                    torch.nn.ReLU(), torch.nn.Linear(128, 4))
        opt = make_opt(model.parameters())
        t0 = time.perf_counter()
        for step in range(args.steps):
            idx = torch.randint(0, x.shape[0], (256,))

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
                loss.backward()
                return loss

            loss = opt.step(closure)
            if step % args.every == 0 or step == args.steps - 1:
                print(f"  {name:12s} step {step:4d}  loss {loss.item():.5f}")
        with torch.no_grad():
            final = torch.nn.functional.mse_loss(model(x), y).item()
        print(f"  {name:12s} full-data loss after {args.steps} steps: {final:.5f} "
              f"({time.perf_counter() - t0:.2f} s)")
        return final

    print("lo_ops demo: a 16-128-128-4 MLP learns a random teacher network (MSE)")
    print(f"SmallFCLOpt with the embedded default weights (lr={args.lr}):")
    ours = run("SmallFCLOpt", lambda ps: lo_ops.SmallFCLOpt(ps, lr=args.lr))
    print("AdamW(lr=1e-3) for comparison:")
    base = run("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    start = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    print(f"loss of predicting zero: {start:.5f}; SmallFCLOpt: {ours:.5f}; AdamW: {base:.5f}")
    ok = ours < start
    if args.velo:
        print(f"VeLO with the weights in {args.velo} (num_steps={args.steps}):")
        velo = run("VeLO", lambda ps: lo_ops.VeLO(ps, num_steps=args.steps, pretrained=args.velo))
        print(f"VeLO: {velo:.5f}")
        ok = ok and velo == velo  # finite
    return 0 if ok else 1


def convert(args) -> int:
    """Converts VeLO meta-weights to lo_ops' own single-directory layout."""
    from lo_ops.velo_networks import convert_velo

    source = args.source[0] if len(args.source) == 1 else tuple(args.source)
    try:
        out = convert_velo(source, args.out, revision=args.revision)
    except (OSError, ValueError, TypeError) as e:
        print(f"lo_ops convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote VeLO weights in lo_ops' layout to {out} (config.json, model.safetensors); "
          f"load them with lo_ops.VeLO(params, num_steps, pretrained={str(out)!r})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lo_ops")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small model with SmallFCLOpt and print the losses")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--velo", default=None, metavar="WEIGHTS",
                   help="also train with VeLO, loading its weights from WEIGHTS (any layout)")
    p.set_defaults(func=demo)
    c = sub.add_parser(
        "convert",
        help="convert VeLO weights (Google's msgpack file, PyLO's directories or Hub repos) "
             "to lo_ops' own layout",
    )
    c.add_argument(
        "source", nargs="+",
        help="a flax-msgpack checkpoint file; a directory with VeLO_RNN/ and VeLO_MLP/; or two "
             "PyLO directories or Hub repo ids (VeLO_RNN then VeLO_MLP)",
    )
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--revision", default=None, help="Hub revision (for repo ids)")
    c.set_defaults(func=convert)
    from lo_ops.meta import train as meta_train

    mt = sub.add_parser("meta-train", help="meta-train small_fc_lopt with PES (checkpoints, resume)")
    meta_train.add_arguments(mt)
    mt.set_defaults(func=meta_train.main)
    from lo_ops.meta import evaluate as meta_evaluate

    ev = sub.add_parser("evaluate", help="a learned optimizer against AdamW (tuned and at 1e-3) on held-out tasks")
    meta_evaluate.add_arguments(ev)
    ev.set_defaults(func=meta_evaluate.main)
    args = parser.parse_args(argv)
    if args.func is convert and len(args.source) > 2:
        parser.error("convert takes one source, or two (VeLO_RNN and VeLO_MLP)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
