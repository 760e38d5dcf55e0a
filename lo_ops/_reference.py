"""What the pure-PyTorch references of every family share (spec 1.1, 1.2): the accumulators,
the per-tensor feature normalisation, the MLP, and a step written in phases.

A step is written in phases separated by the sums it takes over a whole tensor (spec 1.1 and
1.2): the row/column sums of ``g^2``, the per-row sums of ``r``, the feature sums of squares.
Each phase returns its sums as float64 *partial sums* with the process groups that shard the
summed axes (``Geometry.groups``); the caller completes them (``reduce``) before the next phase.
On one process the partial sums are already complete; for sharded (DTensor) parameters
``lo_ops.distributed`` adds them up across ranks, one collective per phase for all tensors.
Everything that depends on shape uses the tensor's global shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._layout import factored_axes

# A partial sum and the process groups (names) across which it is still to be added up.
PartialSum = tuple[Tensor, tuple[str, ...]]
Reduce = Callable[[list[PartialSum]], list[Tensor]]


def local_sums(items: list[PartialSum]) -> list[Tensor]:
    """``reduce`` for tensors that are not sharded: the partial sums are the sums."""
    for _, groups in items:
        if groups:
            raise ValueError(f"a sum over a sharded axis (groups {groups}) needs lo_ops.distributed")
    return [t for t, _ in items]


@dataclass(frozen=True)
class Geometry:
    """The global shape of a (possibly sharded) tensor, a 0-d tensor counted as ``[1]``, and
    for each axis the process groups that split it across ranks (none on one process)."""

    shape: tuple[int, ...]
    axis_groups: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, p: Tensor) -> Geometry:
        return cls(tuple(p.shape) if p.dim() > 0 else (1,))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def factored(self) -> bool:
        return len(self.shape) >= 2

    @property
    def axes(self) -> tuple[int, int]:
        """(d0, d1), from the global shape."""
        return factored_axes(self.shape)

    def groups(self, axes: Sequence[int]) -> tuple[str, ...]:
        """The process groups that a sum over ``axes`` must be added up across."""
        if not self.axis_groups:
            return ()
        out: list[str] = []
        for a in axes:
            out.extend(g for g in self.axis_groups[a] if g not in out)
        return tuple(out)

    def all_groups(self) -> tuple[str, ...]:
        return self.groups(range(len(self.shape)))


def _safe_rsqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def _ema(state: Tensor, value: Tensor, decay: Tensor) -> Tensor:
    return decay * state + (1 - decay) * value


def _channels(x: Tensor, ndim: int) -> Tensor:
    """A [3] vector shaped to broadcast against [3, *S] with len(S) == ndim."""
    return x.view(3, *([1] * ndim))


def _mean(total: Tensor, count: int) -> Tensor:
    """float32 of a float64 sum over ``count`` elements."""
    return (total / count).float()


# -- phase 1: row/column sums of g^2 (factored tensors) --------------------------------------------
def gsq_sums(g32: Tensor, geo: Geometry) -> list[PartialSum]:
    """Sums of ``g^2 + 1e-30`` over d0 (for r) and over d1 (for c), float64."""
    d0, d1 = geo.axes
    gsq = (g32 * g32 + 1e-30).double()
    return [(gsq.sum(dim=d0), geo.groups([d0])), (gsq.sum(dim=d1), geo.groups([d1]))]


# -- phase 2: r and c, then the per-row sums of r ------------------------------------------------
def update_factored(r: Tensor, c: Tensor, sum_d0: Tensor, sum_d1: Tensor, decays: Tensor,
                    geo: Geometry) -> PartialSum:
    """Spec 1.1: ``r``/``c`` (``[3, *S without d0/d1]``) take the means of ``g^2`` in place;
    returns the sums of the new ``r`` over its copy of d1."""
    d0, d1 = geo.axes
    nd = len(geo.shape) - 1
    fac_decay = _channels(decays[4:7].clamp(0, 1), nd)
    r.copy_(_ema(r, _mean(sum_d0, geo.shape[d0]), fac_decay))
    c.copy_(_ema(c, _mean(sum_d1, geo.shape[d1]), fac_decay))
    r_d1 = d1 - 1 if d1 > d0 else d1
    return r.double().sum(dim=1 + r_d1), geo.groups([d1])


# -- phase 3: element-wise accumulators and the features -----------------------------------------
def update_elementwise(g32: Tensor, m: Tensor, v: Tensor, u: Tensor | None, decays: Tensor) -> None:
    """Spec 1.1: momentum ``m [3, *S]``, ``v [S]`` and (unfactored) ``u [3, *S]`` in place."""
    nd = g32.dim()
    m.copy_(_ema(m, g32, _channels(decays[0:3], nd)))
    v.copy_(_ema(v, g32 * g32, decays[3].clamp(0, 1)))
    if u is not None:
        u.copy_(_ema(u, g32 * g32 + 1e-30, _channels(decays[4:7].clamp(0, 1), nd)))


def accumulator_inputs(g32: Tensor, m: Tensor, v: Tensor, r: Tensor | None, c: Tensor | None,
                       u: Tensor | None, r_sum_d1: Tensor | None, geo: Geometry) -> dict[str, Tensor]:
    """The per-element inputs of the features from the updated accumulators, each broadcast to
    ``[3, *S]`` or ``S``: ``m``, ``v``, ``fac_g``, ``row``/``col`` (r, c broadcast back, or u),
    their ``row_rsqrt``/``col_rsqrt`` (rsqrt(x + 1e-8)), and ``factor`` (row_factor *
    col_factor) or ``u``. ``r_sum_d1`` is the complete sum of r over its copy of d1."""
    shape = g32.shape
    out = {"m": m, "v": v}
    if r is not None:
        d0, d1 = geo.axes
        r_d1 = d1 - 1 if d1 > d0 else d1
        r_mean = _mean(r_sum_d1, geo.shape[d1]).unsqueeze(1 + r_d1)
        row_factor = _safe_rsqrt(r / (r_mean + 1e-9))
        col_factor = _safe_rsqrt(c)
        r_b = r.unsqueeze(1 + d0)  # broadcast back along d0
        c_b = c.unsqueeze(1 + d1)  # broadcast back along d1
        out["factor"] = row_factor.unsqueeze(1 + d0) * col_factor.unsqueeze(1 + d1)
        out["fac_g"] = g32 * out["factor"]
        out["row"], out["col"] = r_b.expand(3, *shape), c_b.expand(3, *shape)
        out["row_rsqrt"] = torch.rsqrt(r_b + 1e-8).expand(3, *shape)
        out["col_rsqrt"] = torch.rsqrt(c_b + 1e-8).expand(3, *shape)
    else:
        out["u"] = u
        out["fac_g"] = g32 * _safe_rsqrt(u + 1e-9)
        out["row"] = out["col"] = u
        out["row_rsqrt"] = out["col_rsqrt"] = torch.rsqrt(u + 1e-8)
    return out


def feature_sums(feats: Tensor, geo: Geometry) -> PartialSum:
    """Sums of squares of each feature channel over the tensor (spec 1.2), float64."""
    return feats.double().square().sum(dim=0), geo.all_groups()


def normalise(feats: Tensor, sums: Tensor, geo: Geometry) -> Tensor:
    return feats * torch.rsqrt(1e-5 + _mean(sums, geo.numel))


def mlp(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``relu``-``relu``-linear MLP on the rows of ``x`` with (W0, b0, W1, b1, W2, b2)."""
    w0, b0, w1, b1, w2, b2 = weights
    h = torch.relu(x @ w0.T + b0)
    h = torch.relu(h @ w1.T + b1)
    return h @ w2.T + b2


def apply_update(p: Tensor, p32: Tensor, step: Tensor, lr: Tensor, weight_decay: float) -> None:
    """``p <- p - lr * step``, then decoupled weight decay; written back in p's dtype."""
    new_p = p32 - lr * step.view(p32.shape)
    new_p = new_p - lr * weight_decay * new_p
    p.copy_(new_p.view(p.shape))


# -- a bucket of tensors, phase by phase --------------------------------------------------------
@dataclass
class Slot:
    """One tensor's (local) parameter, gradient and float32 state as the phases see them."""

    p: Tensor
    g: Tensor
    momentum: Tensor
    rms: Tensor
    row: Tensor | None
    col: Tensor | None
    diag: Tensor | None
    geo: Geometry

    @property
    def shape(self) -> torch.Size:
        """The local shape, a 0-d tensor's as [1]."""
        return self.p.shape if self.p.dim() > 0 else torch.Size([1])

    def views(self, g32: Tensor):
        """momentum, rms and (unfactored) u viewed with the local shape."""
        shape = self.shape
        m = self.momentum.view(3, *shape)
        v = self.rms.view(shape)
        u = self.diag.view(3, *shape) if self.diag is not None else None
        return m, v, u

    def g32(self, clip: float | None = None) -> Tensor:
        g32 = self.g.float().reshape(self.shape)
        return g32 if clip is None else torch.clamp(g32, -clip, clip)

    def p32(self) -> Tensor:
        return self.p.float().reshape(self.shape)


def slots_of(params, grads, momentum, rms, fac_row, fac_col, fac_diag, geometries=None) -> list[Slot]:
    """The ops' argument lists as slots (fac_row/fac_col hold the tensors with ndim >= 2 in
    order, fac_diag the others)."""
    out, fi, di = [], 0, 0
    for i, p in enumerate(params):
        geo = geometries[i] if geometries is not None else Geometry.of(p)
        if geo.factored:
            row, col, diag = fac_row[fi], fac_col[fi], None
            fi += 1
        else:
            row, col, diag = None, None, fac_diag[di]
            di += 1
        out.append(Slot(p, grads[i], momentum[i], rms[i], row, col, diag, geo))
    return out


def gsq_phase(slots: list[Slot], g32s: list[Tensor]) -> list[PartialSum]:
    """Phase 1: the row/column sums of g^2 of the factored slots, two per slot, in order."""
    return [x for s, g32 in zip(slots, g32s) if s.geo.factored for x in gsq_sums(g32, s.geo)]


def factored_phase(slots: list[Slot], decays: list[Tensor], sums: list[Tensor]) -> list[PartialSum]:
    """Phase 2: r and c of the factored slots from phase 1's complete sums; their row sums."""
    factored = [i for i, s in enumerate(slots) if s.geo.factored]
    return [update_factored(slots[i].row, slots[i].col, sums[2 * k], sums[2 * k + 1], decays[i], slots[i].geo)
            for k, i in enumerate(factored)]


def feature_phase(slots: list[Slot], g32s: list[Tensor], decays: list[Tensor], row_sums: list[Tensor],
                  feature_fn: Callable[[int, Tensor, dict], Tensor]) -> tuple[list[dict], list[PartialSum]]:
    """Phase 3: m, v, u of every slot, the per-element inputs (accumulator_inputs) and the
    feature sums of squares of ``feature_fn(i, g32, inputs)``."""
    row_sum = dict(zip((i for i, s in enumerate(slots) if s.geo.factored), row_sums))
    accs, partial = [], []
    for i, s in enumerate(slots):
        m, v, u = s.views(g32s[i])
        update_elementwise(g32s[i], m, v, u, decays[i])
        acc = accumulator_inputs(g32s[i], m, v, s.row, s.col, u, row_sum.get(i), s.geo)
        accs.append(acc)
        partial.append(feature_sums(feature_fn(i, g32s[i], acc), s.geo))
    return accs, partial


def slot_tensors(slots: list[Slot]) -> list[Tensor]:
    """Everything a step may change: parameters and state."""
    return [t for s in slots for t in (s.p, s.momentum, s.rms, s.row, s.col, s.diag) if t is not None]


def keep_if(skip: Tensor, tensors: list[Tensor], saved: list[Tensor]) -> None:
    """Where ``skip`` (a bool scalar) is true, ``tensors`` get ``saved`` back (no host sync)."""
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(skip, old, t))
