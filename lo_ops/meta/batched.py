"""small_fc_lopt over many copies of a model at once, each copy with its own meta-parameters.

The copies' parameters are stacked (``[N, *S]`` per tensor of the model); each copy's slice
is one tensor to the fused op, so one ``small_fc_lopt_step_`` call steps all N x L tensors,
with the meta-weights and decays given per tensor (``[N * L, P]``, ``[N * L, 7]``). This is
the inner loop of meta-training: the copies are the perturbed particles of an evolution
strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._layout import NUM_DECAYS, PACKED_NUMEL, decays_from_offsets, state_shapes

META_NUMEL = PACKED_NUMEL + NUM_DECAYS  # meta-weights, then the 7 decay offsets


def split_meta(theta: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., META_NUMEL]`` -> (packed meta-weights ``[..., P]``, effective decays ``[..., 7]``)."""
    return theta[..., :PACKED_NUMEL], decays_from_offsets(theta[..., PACKED_NUMEL:])


def pack_meta(packed_weights: Tensor, offsets: Sequence[float] | Tensor) -> Tensor:
    """The meta-parameter vector of a network: its packed weights and its 7 decay offsets."""
    off = torch.as_tensor(offsets, dtype=torch.float32).reshape(NUM_DECAYS)
    return torch.cat([packed_weights.detach().float().reshape(-1), off])


def network_meta(net) -> Tensor:
    """The meta-parameter vector of a ``SmallFCLOptNetwork`` (its weights and decay offsets)."""
    o = net.decay_offsets
    return pack_meta(net.packed_weights(), o["momentum"] + o["rms"] + o["adafactor"])


class BatchedSmallFCLOpt:
    """Optimizer state for N copies of a model whose parameters are stacked tensors.

    Args:
        params: the model's parameters, each stacked over copies (``[N, *S]``; updated in
            place, so they may be leaves that require grad).
        step_mult, exp_mult: as for ``SmallFCLOpt``.

    ``step(grads, theta, lr)`` applies one step to every copy: ``grads`` are stacked like the
    parameters, ``theta`` is ``[N, META_NUMEL]`` (one meta-parameter vector per copy).
    """

    def __init__(self, params: Sequence[Tensor], *, step_mult: float = 0.001, exp_mult: float = 0.001):
        if not params:
            raise ValueError("BatchedSmallFCLOpt needs at least one stacked parameter")
        n = params[0].shape[0]
        for i, p in enumerate(params):
            if p.dim() < 1 or p.shape[0] != n:
                raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; every parameter must be stacked over the same {n} copies")
            if not p.is_contiguous():
                raise ValueError(f"params[{i}] must be contiguous (each copy's slice is stepped in place)")
        self.params = list(params)
        self.copies = n
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        dev = params[0].device
        # Stacked state, channel axis after the copy axis; one slice per copy and tensor.
        self.state = []
        for p in self.params:
            shapes = state_shapes(p.shape[1:])
            self.state.append({k: torch.zeros((n, *s), dtype=torch.float32, device=dev) for k, s in shapes.items()})
        self.steps = torch.zeros(n, len(self.params), dtype=torch.float32, device=dev)
        self._views = self._state_lists()

    def reset(self, copies: Tensor | Sequence[int] | None = None) -> None:
        """Zeroes the state (accumulators, step count) of the given copies (all if None)."""
        index = slice(None) if copies is None else torch.as_tensor(copies, dtype=torch.long)
        for st in self.state:
            for v in st.values():
                v[index] = 0
        self.steps[index] = 0

    def _state_lists(self):
        """The per-(copy, tensor) views the op takes, built once: the views stay valid because
        parameters and state are only ever updated in place."""
        params, momentum, rms, fac_row, fac_col, fac_diag, steps = ([] for _ in range(7))
        for c in range(self.copies):
            for i, p in enumerate(self.params):
                st = self.state[i]
                params.append(p.data[c])
                momentum.append(st["momentum"][c])
                rms.append(st["rms"][c])
                steps.append(self.steps[c, i])
                if p.dim() - 1 >= 2:
                    fac_row.append(st["fac_row"][c])
                    fac_col.append(st["fac_col"][c])
                else:
                    fac_diag.append(st["fac_diag"][c])
        return params, momentum, rms, fac_row, fac_col, fac_diag, steps

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], theta: Tensor, lr: float | Tensor = 1.0) -> None:
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        for i, (g, p) in enumerate(zip(grads, self.params)):
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")
        if theta.shape != (self.copies, META_NUMEL):
            raise ValueError(f"theta must be [{self.copies}, {META_NUMEL}], got {tuple(theta.shape)}")
        device = self.params[0].device
        weights, decays = split_meta(theta.to(device=device, dtype=torch.float32))
        per_tensor = len(self.params)
        weights = weights.repeat_interleave(per_tensor, dim=0).contiguous()
        decays = decays.repeat_interleave(per_tensor, dim=0).contiguous()
        lr = torch.as_tensor(lr, dtype=torch.float32, device=device).reshape(())
        grads = [g.detach().to(p.dtype).contiguous() for g, p in zip(grads, self.params)]
        params, momentum, rms, fac_row, fac_col, fac_diag, steps = self._views
        g = [grads[i][c] for c in range(self.copies) for i in range(len(self.params))]
        torch.ops.lo_ops.small_fc_lopt_step_(params, g, momentum, rms, fac_row, fac_col, fac_diag, steps,
                                             lr, weights, decays, 0.0, self.step_mult, self.exp_mult)
