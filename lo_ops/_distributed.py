"""Sharded (DTensor) parameters: FSDP2 ``fully_shard``, HSDP, tensor parallelism and both.

Everything a learned optimizer computes per tensor depends on whole-tensor sums (spec 1.1,
1.2, 3.2). For a DTensor parameter the phases of the reference (``lo_ops._reference``) run on
the rank's local shard (``to_local()``, which never includes FSDP's padding) with the global
shape, and their float64 partial sums are added up across exactly the mesh dimensions that
shard the summed axes: one ``all_reduce`` per phase and process group for all tensors of the
step (``all_reduce_sums``), through ``torch.distributed._functional_collectives`` so that
``torch.compile`` traces it. Which sums cross which groups follows from the placements alone,
which every rank shares, so every rank joins every collective (with zeros for an empty shard).

Optimizer state of a DTensor parameter is kept as DTensors on the parameter's mesh: element-wise
state ``[3, *S]`` / ``S`` with the parameter's placements (shifted by the channel axis), the
factored vectors sharded like the axes they keep and replicated along the one they drop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._reference import Geometry, PartialSum, Slot, slots_of

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _shard_dim(placement) -> int | None:
    if isinstance(placement, (Shard, _StridedShard)):
        return placement.dim
    return None


def geometry(p: Tensor, what: str) -> Geometry:
    """The global shape of DTensor ``p`` and, per axis, the process groups (names) of the mesh
    dimensions that shard it. ``what`` names the parameter in errors."""
    mesh = p.device_mesh
    axis_groups: list[list[str]] = [[] for _ in range(max(p.dim(), 1))]
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(
                f"{what} is a DTensor with a Partial placement on mesh dimension {mesh_dim}; "
                "an optimizer needs its value: redistribute it to Shard or Replicate first"
            )
        d = _shard_dim(placement)
        if d is not None and mesh.size(mesh_dim) > 1:
            axis_groups[d].append(mesh.get_group(mesh_dim).group_name)
    shape = tuple(p.shape) if p.dim() > 0 else (1,)
    return Geometry(shape, tuple(tuple(g) for g in axis_groups))


def local(t: Tensor) -> Tensor:
    """The local part of a DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def local_grad(p: Tensor, g: Tensor, what: str) -> Tensor:
    """The local shard of gradient ``g`` of DTensor ``p``, laid out like ``p`` (redistributed
    if it is not)."""
    if not is_dtensor(g):
        raise ValueError(
            f"{what} is a DTensor but its .grad is a {type(g).__name__}; set a DTensor gradient "
            "with the parameter's mesh and placements"
        )
    if g.device_mesh != p.device_mesh:
        raise ValueError(f"{what}: its gradient lives on another device mesh than the parameter")
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def local_slots(lists: list[list[Tensor]], geometries: list[Geometry]) -> list[Slot]:
    """The ops' lists ``[params, grads, momentum, rms, fac_row, fac_col, fac_diag]`` (DTensors
    or plain tensors) as reference slots of their local parts, with each parameter's geometry."""
    params, grads = lists[0], lists[1]
    local_grads = [
        local_grad(p, g, f"parameter of shape {tuple(p.shape)}") if is_dtensor(p) else g
        for p, g in zip(params, grads)
    ]
    others = [[local(t) for t in ts] for ts in lists[2:]]
    return slots_of([local(p) for p in params], local_grads, *others, geometries=geometries)


def _state_placement(placement, dropped: int | None, channel: bool):
    d = _shard_dim(placement)
    if d is None:
        return Replicate() if placement.is_replicate() else placement
    if d == dropped:
        return Replicate()
    d = d - (1 if dropped is not None and d > dropped else 0) + (1 if channel else 0)
    if isinstance(placement, _StridedShard):
        return _StridedShard(d, split_factor=placement.split_factor)
    return Shard(d)


def state_like(p: Tensor, local: Tensor, global_shape: Sequence[int], *, dropped: int | None = None,
               channel: bool = True) -> Tensor:
    """A DTensor of state for parameter ``p`` from this rank's ``local`` part: the parameter's
    axes (less ``dropped``), after a leading channel axis when ``channel``."""
    placements = [_state_placement(pl, dropped, channel) for pl in p.placements]
    shape = tuple(global_shape)
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def zeros_state(p: Tensor, global_shape: Sequence[int], *, dropped: int | None = None) -> Tensor:
    """Float32 zeros of global shape ``[3 or 1, ...]`` for DTensor ``p`` (see ``state_like``)."""
    local_p = p.to_local()
    local_shape = list(local_p.shape)
    if dropped is not None:
        del local_shape[dropped]
    channel = len(global_shape) == len(local_shape) + 1
    if channel:
        local_shape = [global_shape[0], *local_shape]
    local = torch.zeros(local_shape, dtype=torch.float32, device=local_p.device)
    return state_like(p, local, global_shape, dropped=dropped, channel=channel)


def is_process_group(x) -> bool:
    return torch.distributed.is_available() and isinstance(x, torch.distributed.ProcessGroup)


def group_device(group) -> torch.device:
    """The device a process group's collectives run on: CUDA for NCCL, else the CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over(value: Tensor, group) -> Tensor:
    """The mean of ``value`` over the ranks of ``group`` (``True``: the default group)."""
    import torch.distributed._functional_collectives as funcol

    group = torch.distributed.group.WORLD if group is True else group
    total = funcol.wait_tensor(funcol.all_reduce(value, "sum", group))
    return total / torch.distributed.get_world_size(group)


def all_reduce_sums(items: list[PartialSum]) -> list[Tensor]:
    """Completes partial sums: each is added up across its process groups, one ``all_reduce``
    per group for all the sums that cross it (flattened into one buffer), groups in the order
    they first appear. Every rank lists the same sums in the same order (they follow from the
    placements), so every rank issues the same collectives."""
    import torch.distributed._functional_collectives as funcol

    out = [t for t, _ in items]
    order: list[str] = []
    for _, groups in items:
        order.extend(g for g in groups if g not in order)
    for group in order:
        index = [i for i, (_, groups) in enumerate(items) if group in groups]
        sizes = [out[i].numel() for i in index]
        if sum(sizes) == 0:  # equal on every rank of the group: the kept boxes match
            continue
        flat = torch.cat([out[i].reshape(-1) for i in index])
        flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", group))
        for i, part in zip(index, flat.split(sizes)):
            out[i] = part.view(out[i].shape)
    return out
