"""Profiles a few steps of one lo_ops optimizer with torch.profiler and explains their time.

Every phase of a step runs under a ``torch.profiler`` range named ``lo_ops.<optimizer>.<phase>``
(and its ops appear as ``lo_ops::<op>``). This script profiles ``--steps`` steps (after
``--warmup``) on the parameter shapes of a real model (``../shared/bench/param_sets.json``)
and writes to ``perf/results/``:

- ``profile_<optimizer>_<set>_<device>.json``: a chrome trace (open in ``chrome://tracing`` or
  Perfetto);
- ``profile_<optimizer>_<set>_<device>.md`` / ``.summary.json``: per phase, its calls and its
  time per step (host; on CUDA also the device time of the kernels it launched), and which
  share of ``Optimizer.step``'s time lies inside events whose names start with ``lo_ops``;
- ``profile_<optimizer>_<set>_<device>.png``: the phases as a bar chart (with matplotlib).

    python perf/profile_step.py --optimizer velo [--set vit_tiny_16] [--device cpu]
                                [--steps 5] [--threads N]

VeLO runs with the test meta-weights of ../shared/fixtures unless --velo-weights names others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import lo_ops

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("LO_OPS_SHARED", HERE.parent.parent / "shared"))
PARAM_SETS = SHARED / "bench" / "param_sets.json"
VELO_WEIGHTS = SHARED / "fixtures" / "velo_init" / "jax" / "params.msgpack"
OPTIMIZERS = ("small_fc_lopt", "velo", "celo", "celo_adam")


def make_optimizer(name: str, params, velo_weights=VELO_WEIGHTS, **kw):
    """The optimizer ``name`` on ``params`` and a function taking one step."""
    loss = torch.tensor(2.5, device=params[0].device)
    if name == "small_fc_lopt":
        opt = lo_ops.SmallFCLOpt(params, **kw)
        return opt, opt.step
    if name == "velo":
        opt = lo_ops.VeLO(params, num_steps=10_000, pretrained=lo_ops.load_velo_network(velo_weights)[0], **kw)
    else:
        opt = {"celo": lo_ops.Celo, "celo_adam": lo_ops.CeloAdam}[name](params, num_steps=10_000, **kw)
    return opt, lambda: opt.step(loss=loss)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def analyse(events, optimizer_class: str, steps: int) -> dict:
    """From a profile's events (``prof.events()``): the time of every ``Optimizer.step`` of
    ``optimizer_class``, the share of it inside ``lo_ops`` events (the union of their
    intervals on the step's thread), and per ``lo_ops.`` phase its calls and time per step."""
    step_name = f"Optimizer.step#{optimizer_class}.step"
    step_events = [e for e in events if e.name == step_name]
    if not step_events:
        raise RuntimeError(f"no {step_name!r} event in the profile")
    lo_events = [e for e in events if e.name.startswith("lo_ops")]
    step_us = covered_us = 0.0
    for s in step_events:
        a, b = s.time_range.start, s.time_range.end
        inside = [(max(a, e.time_range.start), min(b, e.time_range.end)) for e in lo_events
                  if e.thread == s.thread and e.time_range.end > a and e.time_range.start < b]
        step_us += b - a
        covered_us += _union(inside)
    # The phases: ranges lo_ops.<optimizer>.<phase> inside lo_ops.<optimizer>.step (the step
    # after its closure), which holds them; its time outside them is a row of its own.
    phases: dict[str, dict] = {}
    outer = {"calls": 0, "host_us": 0.0, "device_us": 0.0}
    for e in lo_events:
        if not e.name.startswith("lo_ops."):
            continue
        row = outer if e.name.endswith(".step") else phases.setdefault(
            e.name, {"calls": 0, "host_us": 0.0, "device_us": 0.0})
        row["calls"] += 1
        row["host_us"] += e.time_range.end - e.time_range.start
        row["device_us"] += getattr(e, "device_time_total", 0.0)
    nested = [e for e in lo_events if e.name.startswith("lo_ops.") and not e.name.endswith(".step")]
    depth1 = [e for e in nested if e.cpu_parent is None or not e.cpu_parent.name.startswith("lo_ops.")
              or e.cpu_parent.name.endswith(".step")]
    between = outer["host_us"] - sum(e.time_range.end - e.time_range.start for e in depth1)
    per_step = {name: {"calls_per_step": row["calls"] / steps, "host_ms": row["host_us"] / steps / 1e3,
                       "device_ms": row["device_us"] / steps / 1e3} for name, row in phases.items()}
    if outer["calls"]:
        per_step["(between phases)"] = {"calls_per_step": 0, "host_ms": max(between, 0.0) / steps / 1e3,
                                        "device_ms": 0.0}
    return {
        "steps": len(step_events),
        "step_ms": step_us / len(step_events) / 1e3,
        "lo_ops_share": covered_us / step_us if step_us else 0.0,
        "phases": dict(sorted(per_step.items(), key=lambda kv: -kv[1]["host_ms"])),
    }


def profile_steps(step, device: str, warmup: int, steps: int):
    """Runs ``warmup`` steps, then profiles ``steps`` steps; returns the profiler."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return prof


def table(summary: dict, header: str) -> str:
    lines = [header, "",
             f"`Optimizer.step`: {summary['step_ms']:.3f} ms per step; inside `lo_ops` events: "
             f"{100 * summary['lo_ops_share']:.1f}%", "",
             "| phase | calls/step | host ms/step | share of step | device ms/step |", "|---|---|---|---|---|"]
    for name, row in summary["phases"].items():
        lines.append(f"| `{name}` | {row['calls_per_step']:g} | {row['host_ms']:.3f} | "
                     f"{100 * row['host_ms'] / summary['step_ms']:.1f}% | {row['device_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart", file=sys.stderr)
        return False
    names = list(summary["phases"])[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh([n.split(".", 2)[-1] for n in names], [summary["phases"][n]["host_ms"] for n in names],
            color="tab:blue", label="host")
    if any(summary["phases"][n]["device_ms"] > 0 for n in names):
        ax.barh([n.split(".", 2)[-1] for n in names], [summary["phases"][n]["device_ms"] for n in names],
                color="tab:orange", alpha=0.6, label="device (kernels)")
        ax.legend()
    ax.set_xlabel("ms per step")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", default="velo", choices=OPTIMIZERS)
    ap.add_argument("--set", default="vit_tiny_16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--fused", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--velo-weights", default=str(VELO_WEIGHTS))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = json.loads(PARAM_SETS.read_text())[args.set]
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(args.device, getattr(torch, args.dtype)))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(args.device, p.dtype)
        params.append(p)
    fused = {"auto": None, "true": True, "false": False}[args.fused]
    opt, step = make_optimizer(args.optimizer, params, args.velo_weights, fused=fused)
    prof = profile_steps(step, args.device, args.warmup, args.steps)
    summary = analyse(prof.events(), type(opt).__name__, args.steps)
    summary.update(optimizer=args.optimizer, set=args.set, device=args.device, dtype=args.dtype,
                   threads=torch.get_num_threads(), numel=sum(p.numel() for p in params),
                   torch=torch.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile_{args.optimizer}_{args.set}_{args.device.split(':')[0]}"
    prof.export_chrome_trace(str(stem.with_suffix(".json")))
    Path(f"{stem}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = (f"### {type(opt).__name__} on {args.set} ({summary['numel'] / 1e6:.2f}M parameters, "
              f"{args.dtype}, {args.device}, {summary['threads']} threads, torch {torch.__version__})")
    text = table(summary, header)
    stem.with_suffix(".md").write_text(text)
    plot(summary, header.lstrip("# "), stem.with_suffix(".png"))
    print(text)
    return summary


if __name__ == "__main__":
    main()
