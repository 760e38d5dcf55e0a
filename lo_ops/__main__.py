"""Command line: ``python -m lo_ops demo``, ``convert``, ``meta-train`` and ``evaluate``."""

from __future__ import annotations

import argparse
import sys


def convert(args) -> int:
    """Converts VeLO, Celo or Celo-Adam meta-weights to lo_ops' own single-directory layout."""
    from lo_ops.hyperv2.network import _NAMES, convert_hyperv2, load_hyperv2_network

    source = args.source[0] if len(args.source) == 1 else tuple(args.source)
    try:
        out = convert_hyperv2(source, args.out, args.architecture, revision=args.revision)
        architecture = load_hyperv2_network(out, args.architecture)[0].architecture
    except (OSError, ValueError, TypeError) as e:
        print(f"lo_ops convert: {e}", file=sys.stderr)
        return 2
    cls = {"velo": "VeLO", "celo": "Celo", "celo_adam": "CeloAdam"}[architecture]
    print(f"wrote {_NAMES[architecture]} weights in lo_ops' layout to {out} (config.json, model.safetensors); "
          f"load them with lo_ops.{cls}(params, num_steps, pretrained={str(out)!r})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lo_ops")
    sub = parser.add_subparsers(dest="command", required=True)
    from lo_ops import demo

    p = sub.add_parser("demo", help="train a small classifier with the embedded default and with AdamW")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    c = sub.add_parser(
        "convert",
        help="convert VeLO, Celo or Celo-Adam weights (Google's msgpack file, the Celo authors' "
             "theta.state, PyLO's directories or Hub repos) to lo_ops' own layout",
    )
    c.add_argument(
        "source", nargs="+",
        help="a flax-msgpack checkpoint file (VeLO's, or a Celo / Celo-Adam theta.state); a "
             "directory with VeLO_RNN/ and VeLO_MLP/; or two PyLO directories or Hub repo ids "
             "(VeLO_RNN then VeLO_MLP)",
    )
    c.add_argument("--architecture", choices=["velo", "celo", "celo_adam"], default=None,
                   help="check that the source holds this optimizer's weights (default: whichever it holds)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the sub-command's own arguments (recorded in meta-training provenance)
    if args.func is convert and len(args.source) > 2:
        parser.error("convert takes one source, or two (VeLO_RNN and VeLO_MLP)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
