"""Times one optimizer step on the parameter shapes of a real model.

Compares lo_ops' fused SmallFCLOpt, MuLO, VeLO, Celo and Celo-Adam steps with their pure-PyTorch
references and with torch.optim.AdamW(fused=True), all measured in the same run on the same
tensors, and writes a JSON result to perf/results/. Ratios, not absolute times, are the
targets. VeLO runs with the test meta-weights of ../shared/fixtures (same shapes, hence same
cost, as the published ones) unless --velo-weights names others; Celo and Celo-Adam with the
published weights shipped in the package.

    python perf/bench_step.py [--set vit_tiny_16] [--device cpu] [--dtype float32]
                              [--only velo_fused,adamw_fused]

On CUDA every fused optimizer (and AdamW) is also timed compiled
(`torch.compile(step, fullgraph=True)`, suffix `_compiled`) and captured in a CUDA graph
(suffix `_graph`). On the CPU, `--cuda-emulation lockstep|adversarial` also times the fused lo_ops
steps through the CUDA kernels under lo_ops.testing's CUDA emulator (suffix `_emulated_cuda`,
`--emulation-repeats` steps): what the emulator costs, not how fast a GPU is. ../shared is found
next to the repository, or at $LO_OPS_SHARED.
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
SHARED = Path(os.environ.get("LO_OPS_SHARED", HERE.parent.parent / "shared"))
PARAM_SETS = SHARED / "bench" / "param_sets.json"
MULO_WEIGHTS = SHARED / "fixtures" / "small_fc_lopt_init" / "pylo_hub" / "MetaMLP"
VELO_WEIGHTS = SHARED / "fixtures" / "velo_init" / "jax" / "params.msgpack"


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


def time_step(step, device, warmup, repeats):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def cuda_graph(step):
    """The step captured in a CUDA graph (after warm-up steps on a side stream): graph.replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="vit_tiny_16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reference-repeats", type=int, default=3)
    ap.add_argument("--velo-weights", default=str(VELO_WEIGHTS))
    ap.add_argument("--only", default=None, help="comma-separated cases to run")
    ap.add_argument("--skip-reference", action="store_true", help="leave out the eager references")
    ap.add_argument("--cuda-emulation", choices=["lockstep", "adversarial"], default=None,
                    help="also time the fused lo_ops steps under the CUDA emulator (CPU only)")
    ap.add_argument("--emulation-repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.cuda_emulation and args.device != "cpu":
        ap.error("--cuda-emulation runs the CUDA kernels on CPU tensors: use --device cpu")

    shapes = json.loads(PARAM_SETS.read_text())[args.set]
    dtype = getattr(torch, args.dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    results = {}
    velo_net = lo_ops.load_velo_network(args.velo_weights)[0] if args.only is None or "velo" in args.only else None
    loss = torch.tensor(2.5, device=args.device)

    def plain(make):
        def build(ps):
            return make(ps).step
        return build

    def velo(fused):
        def build(ps):
            opt = lo_ops.VeLO(ps, num_steps=10_000, pretrained=velo_net, fused=fused)
            return lambda: opt.step(loss=loss)
        return build

    def celo(cls, fused):
        def build(ps):
            opt = cls(ps, num_steps=10_000, fused=fused)
            return lambda: opt.step(loss=loss)
        return build

    def mulo(fused):
        # μP-like groups: 2-d+ tensors whose two leading sizes are both >= 64 get 1/fan_in
        # (vit_tiny_16: 3 groups, so 3 op calls), the rest 1; the test meta-weights.
        def build(ps):
            scales = {}
            for p in ps:
                s = 1.0 / p.shape[1] if p.dim() >= 2 and min(p.shape[:2]) >= 64 else 1.0
                scales.setdefault(s, []).append(p)
            groups = [{"params": v, "mup_scale": s} for s, v in scales.items()]
            return lo_ops.MuLO(groups, pretrained=str(MULO_WEIGHTS), fused=fused).step
        return build

    cuda = args.device.startswith("cuda")
    cases = {
        "adamw_fused": (plain(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True, capturable=cuda)),
                        args.repeats),
        "small_fc_lopt_fused": (plain(lambda ps: lo_ops.SmallFCLOpt(ps, fused=True)), args.repeats),
        "small_fc_lopt_reference": (plain(lambda ps: lo_ops.SmallFCLOpt(ps, fused=False)), args.reference_repeats),
        "mulo_fused": (mulo(True), args.repeats),
        "mulo_reference": (mulo(False), args.reference_repeats),
        "velo_fused": (velo(True), args.repeats),
        "velo_reference": (velo(False), args.reference_repeats),
        "celo_fused": (celo(lo_ops.Celo, True), args.repeats),
        "celo_reference": (celo(lo_ops.Celo, False), args.reference_repeats),
        "celo_adam_fused": (celo(lo_ops.CeloAdam, True), args.repeats),
        "celo_adam_reference": (celo(lo_ops.CeloAdam, False), args.reference_repeats),
    }
    if cuda:  # the fused steps also compiled and captured in a CUDA graph
        for name in [n for n in cases if not n.endswith("reference")]:
            build, repeats = cases[name]
            cases[name + "_compiled"] = ((lambda b: lambda ps: torch.compile(b(ps), fullgraph=True))(build), repeats)
            cases[name + "_graph"] = ((lambda b: lambda ps: cuda_graph(b(ps)))(build), repeats)
    if args.cuda_emulation:  # the fused lo_ops steps through the emulated CUDA kernels
        from lo_ops.testing import cuda_emulation, load_cuda_emulator

        load_cuda_emulator()

        def emulated(build):
            def make(ps):
                step = build(ps)

                def run():
                    with cuda_emulation(args.cuda_emulation):
                        return step()
                return run
            return make

        for name in ("small_fc_lopt_fused", "mulo_fused", "velo_fused", "celo_fused", "celo_adam_fused"):
            cases[name + "_emulated_cuda"] = (emulated(cases[name][0]), args.emulation_repeats)
    if args.skip_reference:
        cases = {k: v for k, v in cases.items() if not k.endswith("reference")}
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(cases)
        if unknown:
            ap.error(f"unknown cases {sorted(unknown)}; choose from {sorted(cases)}")
        cases = {k: v for k, v in cases.items() if k in wanted}
    for name, (build, repeats) in cases.items():
        params = make_params(shapes, args.device, dtype)
        results[name] = time_step(build(params), args.device, warmup=1, repeats=repeats)
        print(f"{name:28s} {results[name]['median_ms']:10.2f} ms (median of {repeats})", flush=True)

    def ratio(a, b):
        return results[a]["median_ms"] / results[b]["median_ms"] if a in results and b in results else None

    ratios = {
        "small_fc_lopt_reference_over_fused": ratio("small_fc_lopt_reference", "small_fc_lopt_fused"),
        "small_fc_lopt_fused_over_adamw": ratio("small_fc_lopt_fused", "adamw_fused"),
        "mulo_reference_over_fused": ratio("mulo_reference", "mulo_fused"),
        "mulo_fused_over_small_fc_lopt_fused": ratio("mulo_fused", "small_fc_lopt_fused"),
        "velo_reference_over_fused": ratio("velo_reference", "velo_fused"),
        "velo_fused_over_adamw": ratio("velo_fused", "adamw_fused"),
        "velo_fused_over_small_fc_lopt_fused": ratio("velo_fused", "small_fc_lopt_fused"),
        "celo_reference_over_fused": ratio("celo_reference", "celo_fused"),
        "celo_fused_over_adamw": ratio("celo_fused", "adamw_fused"),
        "celo_adam_reference_over_fused": ratio("celo_adam_reference", "celo_adam_fused"),
        "celo_adam_fused_over_adamw": ratio("celo_adam_fused", "adamw_fused"),
    }
    for mode in ("_compiled", "_graph"):
        for opt in ("small_fc_lopt", "mulo", "velo", "celo", "celo_adam"):
            ratios[f"{opt}_fused{mode}_over_adamw{mode}"] = ratio(f"{opt}_fused{mode}", f"adamw_fused{mode}")
    for opt in ("small_fc_lopt", "mulo", "velo", "celo", "celo_adam"):
        ratios[f"{opt}_fused_emulated_cuda_over_fused"] = ratio(f"{opt}_fused_emulated_cuda", f"{opt}_fused")
    ratios = {k: v for k, v in ratios.items() if v is not None}
    for k, v in ratios.items():
        print(f"{k:28s} {v:10.2f}x")
    record = {
        "set": args.set, "tensors": len(shapes), "parameters": numel, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu": cpu_description(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cuda_emulation": args.cuda_emulation,
        "results": results, "ratios": ratios,
        "date": time.strftime("%Y-%m-%d"),
    }
    suffix = "_emulated_cuda" if args.cuda_emulation else ""
    out = args.out or HERE / "results" / f"bench_step_{args.set}_{args.device}_{args.dtype}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
