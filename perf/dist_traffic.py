"""Collectives and bytes per optimizer step on sharded (FSDP2-style Shard(0)) parameters.

Spawns W gloo processes on 127.0.0.1, shards a parameter set of ../shared/bench/param_sets.json
along dim 0 (as FSDP2's fully_shard does), takes optimizer steps with random gradients and
records every functional collective the step issues (count, payload bytes). The reference
point is one FSDP2 all-gather of the parameters (fp32), which each training step does at
least once. Also times the step with the fused phase ops and with the phased reference, and
the same optimizer in one process on the whole tensors (the ratio's baseline, same run). Writes perf/results/dist_traffic_<set>_w<W>.json and prints a table.

    python perf/dist_traffic.py [--set vit_tiny_16] [--world-size 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LO_OPS_SHARED", ROOT / ".." / "shared")).resolve()


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "all_to_all_single")


class CollectiveLog(TorchDispatchMode):
    """Records the functional collectives (op name, payload bytes) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = str(func.overloadpacket).partition(".")
        if namespace == "_c10d_functional" and name in COLLECTIVES:
            t = args[0]
            self.calls.append((name, t.numel() * t.element_size()))
        return func(*args, **(kwargs or {}))


def _worker(rank, world, port, shapes, velo_weights, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import lo_ops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)

    def sharded(t):
        return distribute_tensor(t, mesh, [Shard(0)] if t.dim() else [Replicate()], src_data_rank=None)

    full = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    results = {}
    makers = {"SmallFCLOpt": lambda ps, fused: lo_ops.SmallFCLOpt(ps, fused=fused)}
    if velo_weights:
        makers["VeLO"] = lambda ps, fused: lo_ops.VeLO(ps, num_steps=1000, pretrained=velo_weights, fused=fused)

    def run(name, opt, params, grad):
        """Median step time and the collectives of the last step (after a warm-up step)."""
        logs, times = [], []
        for k in range(steps + 1):
            for p in params:
                p.grad = grad(torch.randn(p.shape, generator=gen) * 1e-3)
            log = CollectiveLog()
            dist.barrier()
            start = time.perf_counter()
            with log:
                opt.step(loss=torch.tensor(1.0 / (k + 1))) if name == "VeLO" else opt.step()
            times.append(time.perf_counter() - start)
            logs.append(log.calls)
        return sorted(times[1:])[len(times[1:]) // 2], logs[-1]

    for name, make in makers.items():
        # The same step in one process on the whole tensors (fused kernels, 1 thread): the
        # baseline of this run.
        params = [torch.nn.Parameter(t.clone()) for t in full]
        one_process, _ = run(name, make(params, True), params, lambda g: g)
        timings = {}
        for path, fused in (("fused", True), ("reference", False)):
            params = [torch.nn.Parameter(sharded(t.clone())) for t in full]
            timings[path], calls = run(name, make(params, fused), params, sharded)
        results[name] = {
            "collectives_per_step": len(calls),
            "by_kind": {kind: sum(1 for c, _ in calls if c == kind) for kind in sorted({c for c, _ in calls})},
            "payload_bytes_per_step": sum(b for _, b in calls),
            "step_seconds_median": timings["fused"],
            "reference_step_seconds_median": timings["reference"],
            "one_process_step_seconds_median": one_process,
            "ratio_to_one_process": timings["fused"] / one_process,
        }
    if rank == 0:
        param_bytes = sum(t.numel() * 4 for t in full)
        # A ring all-gather brings each rank the (W - 1) / W of the parameters it lacks; a ring
        # all-reduce of P bytes sends (and receives) 2 (W - 1) / W * P per rank.
        summary = {
            "param_set": out["set"], "world_size": world, "tensors": len(shapes),
            "parameters": sum(t.numel() for t in full),
            "fsdp2_all_gather_bytes_per_rank": param_bytes * (world - 1) / world,
            "torch": torch.__version__,
            "optimizers": {},
        }
        for name, r in results.items():
            sent = r["payload_bytes_per_step"] * 2 * (world - 1) / world
            summary["optimizers"][name] = dict(
                r, ring_bytes_per_rank=sent,
                ratio_to_fsdp2_all_gather=sent / summary["fsdp2_all_gather_bytes_per_rank"],
            )
        Path(out["path"]).write_text(json.dumps(summary, indent=2) + "\n")
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="vit_tiny_16")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--velo-weights", default=str(SHARED / "fixtures" / "velo_init" / "pylo_hub"),
                    help="VeLO meta-weights (any; traffic does not depend on their values); '' skips VeLO")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(s) for s in json.loads((SHARED / "bench" / "param_sets.json").read_text())[args.set]]
    out = args.out or str(ROOT / "perf" / "results" / f"dist_traffic_{args.set}_w{args.world_size}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world_size, port, shapes, args.velo_weights, args.steps,
                            {"path": out, "set": args.set}), nprocs=args.world_size)
    summary = json.loads(Path(out).read_text())
    print(f"{summary['param_set']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"W={summary['world_size']}; one FSDP2 all-gather: "
          f"{summary['fsdp2_all_gather_bytes_per_rank'] / 1e6:.2f} MB/rank")
    for name, r in summary["optimizers"].items():
        print(f"  {name}: {r['collectives_per_step']} collectives/step {r['by_kind']}, payload "
              f"{r['payload_bytes_per_step'] / 1e3:.1f} kB, ring {r['ring_bytes_per_rank'] / 1e3:.1f} kB/rank "
              f"({100 * r['ratio_to_fsdp2_all_gather']:.2f}% of the all-gather), "
              f"step {1e3 * r['step_seconds_median']:.0f} ms (phase ops; phased reference "
              f"{1e3 * r['reference_step_seconds_median']:.0f} ms; one process on whole tensors "
              f"{1e3 * r['one_process_step_seconds_median']:.0f} ms: ratio "
              f"{r['ratio_to_one_process']:.2f}; CPU, 1 thread per rank)")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
