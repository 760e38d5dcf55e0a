"""Times one optimizer step on the parameter shapes of a real model.

Compares lo_ops' fused SmallFCLOpt step with its pure-PyTorch reference and with
torch.optim.AdamW(fused=True), all measured in the same run on the same tensors, and writes
a JSON result to perf/results/. Ratios, not absolute times, are the targets.

    python perf/bench_step.py [--set vit_tiny_16] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import lo_ops

HERE = Path(__file__).resolve().parent
PARAM_SETS = HERE.parent.parent / "shared" / "bench" / "param_sets.json"


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def cpu_description():
    """The processor model and the vector instruction sets the CPU kernel can use."""
    info = {"cpu_isa_cap": os.environ.get("LO_OPS_CPU_ISA")}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"})
            break
    return info


def time_step(opt, device, warmup, repeats):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="vit_tiny_16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reference-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    shapes = json.loads(PARAM_SETS.read_text())[args.set]
    dtype = getattr(torch, args.dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    results = {}
    cases = {
        "adamw_fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), args.repeats),
        "small_fc_lopt_fused": (lambda ps: lo_ops.SmallFCLOpt(ps, fused=True), args.repeats),
        "small_fc_lopt_reference": (lambda ps: lo_ops.SmallFCLOpt(ps, fused=False), args.reference_repeats),
    }
    for name, (make, repeats) in cases.items():
        params = make_params(shapes, args.device, dtype)
        results[name] = time_step(make(params), args.device, warmup=1, repeats=repeats)
        print(f"{name:28s} {results[name]['median_ms']:10.2f} ms (median of {repeats})", flush=True)
    fused = results["small_fc_lopt_fused"]["median_ms"]
    ratios = {
        "reference_over_fused": results["small_fc_lopt_reference"]["median_ms"] / fused,
        "fused_over_adamw": fused / results["adamw_fused"]["median_ms"],
    }
    for k, v in ratios.items():
        print(f"{k:28s} {v:10.2f}x")
    record = {
        "set": args.set, "tensors": len(shapes), "parameters": numel, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu": cpu_description(),
        "results": results, "ratios": ratios,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.out or HERE / "results" / f"bench_step_{args.set}_{args.device}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
