"""Makes a meta-training result the embedded default: ``python -m lo_ops.meta.ship RUN/best``.

Copies the network (``config.json``, ``model.safetensors``) into the package's weights
directory, evaluates it there with ``lo_ops evaluate`` (written to ``--evaluation``, with a
PNG next to it), and writes the provenance the run recorded (command, seed, wall time, outer
steps, commit) together with the evaluation table to ``provenance.json`` and the model card
``README.md``. Nothing is written unless the source loads and carries its provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..small_fc_lopt.network import DEFAULT_WEIGHTS_DIR, load_small_fc_lopt_network
from .evaluate import evaluate_weights, write_plot

CARD = """---
library_name: lo_ops
tags:
- learned-optimizer
- lo_ops
- small_fc_lopt
---

# small_fc_lopt: the embedded default of lo_ops

Meta-trained by lo_ops itself (`lo_ops.meta`, antithetic PES on lo_ops' fused step) on small
MLP tasks: synthetic teacher-student regression and classification and scikit-learn's digits.
It is what `lo_ops.SmallFCLOpt(params)` uses when no weights are given; use it with `lr = 1`.
Meta-training ran inner runs of {min_inner}-{max_inner} steps, so its learned step-size
schedule (a function of the step count, through the time features: a short warm-up, then a
decay) is made for runs of about that length; other lengths are outside what it was trained for.

- command: `{command}`
- seed: {seed}; outer steps: {outer_step} (the best held-out score of a run configured for
  {outer_steps}); wall time to that step: {wall_time_s:.0f} s on {machine}
- lo_ops commit: `{lo_ops_commit}`; torch {torch}
- `step_mult = {step_mult}`, `exp_mult = {exp_mult}` (the magnitude output is a log step size)
- start: `{init}` (`lo_ops.small_fc_lopt.network.normalised_adam_network(exp_mult=1.0, schedule_units=True)`)

## Evaluation (`python -m lo_ops evaluate`, {steps} steps, {seeds} seeds)

No task below is a meta-training task: the synthetic ones have other widths, depths and
sizes, digits is classified by a wider MLP than in meta-training, and wine and breast cancer
are datasets meta-training never saw.

Final training loss (mean over seeds); AdamW tuned = the best of lr in {{1e-3, 3e-3, 1e-2, 3e-2}}
per task by final training loss.

| task | learned | AdamW tuned (lr) | AdamW 1e-3 | learned / tuned | test loss learned / tuned |
|---|---|---|---|---|---|
{rows}
"""


def evaluation_rows(report: dict) -> str:
    rows = []
    for name, fam in report["families"].items():
        learned, tuned = fam["learned"]["train_loss"]["mean"], fam["adamw_tuned"]["train_loss"]["mean"]
        test = fam["learned"]["test_loss"]["mean"] / fam["adamw_tuned"]["test_loss"]["mean"]
        rows.append(f"| {name} | {learned:.3g} | {tuned:.3g} ({fam['adamw_tuned']['lr']:g}) | "
                    f"{fam['adamw_0.001']['train_loss']['mean']:.3g} | {learned / tuned:.2f} | {test:.2f} |")
    return "\n".join(rows)


def ship(source: Path, target: Path, evaluation: Path, machine: str, *, steps: int = 500, seeds: int = 4) -> dict:
    provenance_path = source / "provenance.json"
    if not provenance_path.is_file():
        raise FileNotFoundError(f"{source} has no provenance.json (write it with python -m lo_ops meta-train)")
    provenance = json.loads(provenance_path.read_text())
    net, layout = load_small_fc_lopt_network(source)
    if layout != "lo_ops":
        raise ValueError(f"{source} is in {layout}'s layout; ship a lo_ops meta-training result")
    target.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(target)
    report = evaluate_weights(target, steps=steps, seeds=seeds)
    report["weights"] = "embedded default"
    evaluation.parent.mkdir(parents=True, exist_ok=True)
    evaluation.write_text(json.dumps(report, indent=1) + "\n")
    write_plot(report, evaluation.with_suffix(".png"))
    provenance["machine"] = machine
    provenance["evaluation"] = report
    (target / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    cfg = provenance["config"]
    (target / "README.md").write_text(CARD.format(
        rows=evaluation_rows(report), steps=report["steps"], seeds=report["seeds"],
        min_inner=cfg["min_inner"], max_inner=cfg["max_inner"], **provenance))
    return provenance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lo_ops.meta.ship", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a meta-training result (OUT/best of lo_ops meta-train)")
    parser.add_argument("--target", type=Path, default=DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--evaluation", type=Path, default=Path("perf/results/evaluate.json"))
    parser.add_argument("--machine", default="a 2-core CPU", help="where meta-training ran (for the card)")
    args = parser.parse_args(argv)
    provenance = ship(args.source, args.target, args.evaluation, args.machine)
    print(f"shipped {args.source} (outer step {provenance['outer_step']}) to {args.target}")
    print(evaluation_rows(provenance["evaluation"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
