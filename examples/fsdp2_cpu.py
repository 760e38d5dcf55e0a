"""Trains a small MLP with FSDP2 (``fully_shard``) and a lo_ops optimizer on the CPU (gloo).

    torchrun --nproc-per-node 2 examples/fsdp2_cpu.py [--steps 300] [--optimizer small_fc_lopt]
             [--velo-weights PATH] [--checkpoint DIR]

Each rank draws its own batches of a synthetic regression task; FSDP2 averages the gradients.
The optimizer runs on each rank's shards and adds up the whole-tensor statistics across the
ranks, so the run takes the steps one process would take. VeLO reads the loss: it is averaged
over the ranks by the optimizer (``all_reduce_loss=True``). ``--checkpoint`` saves the model
and optimizer with torch.distributed.checkpoint at the end (loadable at another world size).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lo_ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizer", choices=["small_fc_lopt", "velo"], default="small_fc_lopt")
    ap.add_argument("--velo-weights", default=None, help="VeLO meta-weights (see python -m lo_ops convert)")
    ap.add_argument("--checkpoint", default=None, help="directory for a distributed checkpoint at the end")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    teacher = torch.nn.Linear(32, 8)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 8))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    if args.optimizer == "velo":
        opt = lo_ops.VeLO(model.parameters(), num_steps=args.steps, pretrained=args.velo_weights,
                          all_reduce_loss=True)
    else:
        opt = lo_ops.SmallFCLOpt(model.parameters())

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = torch.tanh(teacher(x))
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach()) if args.optimizer == "velo" else opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean.item() / world:.5f}", flush=True)

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
