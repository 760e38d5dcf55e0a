"""Runs test cases in spawned gloo processes on 127.0.0.1 and compares ranks with one process.

``spawn(world_size, fn, *args)`` starts ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialised process group; an exception in any rank
fails the calling test with that rank's traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, store_path, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file store: no port to pick, so no port that another test may still hold.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The case passed. Leave without the interpreter's teardown: now and then a native thread
    # of the collective backend is still being wound down there and the process aborts
    # ("terminate called without an active exception") after every check has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world_size: int, fn, *args) -> None:
    with tempfile.TemporaryDirectory(prefix="lo_ops_dist_") as d:
        mp.spawn(_entry, args=(world_size, os.path.join(d, "store"), fn, args), nprocs=world_size, join=True)


def make_tensors(shapes, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def local_part(full: torch.Tensor, like):
    """The part of ``full`` that DTensor ``like``'s placements give this rank (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


def assert_replicas_equal(t: torch.Tensor, group=None, what: str = "") -> None:
    """Every rank of ``group`` holds bitwise the same ``t``."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t.contiguous(), group=group)
    for r, other in enumerate(gathered):
        assert torch.equal(other, t), f"{what}: rank {r} differs from rank {dist.get_rank()}"
