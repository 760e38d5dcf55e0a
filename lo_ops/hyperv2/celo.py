"""``lo_ops.Celo`` and ``lo_ops.CeloAdam``: the Celo authors' learned optimizers (spec section 5)
on the HyperV2 engine, with their published weights shipped in the package."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _distributed, _phases
from .. import _reference as shared
from .._layout import (
    CELO_ADAM_EPSILON,
    CELO_LSTM_HIDDEN,
    VELO_GRAD_CLIP,
    state_shapes,
)
from .._optim import accumulator_state, group_lr, phase, split_buckets
from . import reference as ref
from .optimizer import HyperV2Optimizer

_LSTM_STATE = {"lstm_hidden": (CELO_LSTM_HIDDEN,), "lstm_cell": (CELO_LSTM_HIDDEN,)}


class _CeloBase(HyperV2Optimizer):
    """Celo and Celo-Adam: one learned LSTM schedule for all tensors (spec 5.1).

    Their LSTM input is the same for every tensor (time and loss features) and the LSTM starts
    from one learned state, so every tensor's LSTM row is the same at every step: the LSTM runs
    on one row, whose ``lr_mult`` serves every tensor, and its state is global (``lstm_hidden``,
    ``lstm_cell`` in ``global_state``).
    """

    def _global_shapes(self) -> dict[str, tuple[int, ...]]:
        return super()._global_shapes() | _LSTM_STATE

    def _init_global_state(self, device: torch.device) -> dict[str, Tensor]:
        return super()._init_global_state(device) | {
            "lstm_hidden": self._net.init_hidden[0].clone(),
            "lstm_cell": self._net.init_cell[0].clone(),
        }

    def _schedule(self, loss_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The LSTM on the one shared row: ``(lr_mult [1], hidden' [1, h], cell' [1, h])``."""
        gs = self.global_state
        X = self._shared_lstm_inputs(loss_features)[None]
        hidden, cell, _, lr_mult = ref.per_tensor_network(X, gs["lstm_hidden"][None], gs["lstm_cell"][None], self._net)
        return lr_mult, hidden, cell

    def _commit_schedule(self, skip: Tensor, hidden: Tensor, cell: Tensor) -> None:
        gs = self.global_state
        gs["lstm_hidden"].copy_(torch.where(skip, gs["lstm_hidden"], hidden[0]))
        gs["lstm_cell"].copy_(torch.where(skip, gs["lstm_cell"], cell[0]))

    def _stepped(self, group):
        """``(i, p, state)`` of the group's parameters this step updates: those with a (dense)
        gradient and at least one element."""
        for i, p in enumerate(group["params"]):
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter {i} of its "
                    f"param group, shape {tuple(p.shape)}); use a dense gradient"
                )
            yield i, p, self._ensure_state(p)

    def _finite(self, loss_t: Tensor, grad_lists: list[list[Tensor]]) -> Tensor:
        """Whether the loss and every gradient element are finite, without a host sync
        (``lo_ops._phases.nonfinite_found``)."""
        grad_lists = [grads for grads in grad_lists if grads]
        if not grad_lists:
            return torch.isfinite(loss_t)
        return torch.isfinite(loss_t) & ~_phases.nonfinite_found(grad_lists).to(loss_t.device)


class Celo(_CeloBase):
    """Celo (Moudgil et al., TMLR 2025): a learned LSTM learning-rate schedule that knows the
    horizon, and a learned per-element MLP update rule (spec 5.1, 5.2).

    Each step: the loss buffer takes the step's loss; the LSTM runs once on the 18 shared
    inputs (time and loss features) and gives ``lr_mult = 0.1 * exp(h s + s0)``; then one fused
    op per (param group, dtype) updates the accumulators and parameters with VeLO's per-element
    MLP (``lo_ops::velo_step_``) on Celo's single weight set.

    Args:
        params: parameters or param groups (group keys: ``lr``, ``weight_decay``); all on one
            device.
        num_steps: the training horizon (total number of steps planned): the schedule's time
            features and loss buffer depend on it.
        lr: multiplies every step (``lr = 1`` reproduces the original); a 0-d tensor, so LR
            schedulers change it without recompiling a compiled ``step``.
        weight_decay: decoupled, ``p <- p - lr * weight_decay * p`` after the update.
        pretrained: None (default): the published weights shipped with lo_ops (MIT, see
            ``lo_ops/weights/celo/``); or the authors' ``theta.state`` file, a directory or Hub
            repo in lo_ops' layout, or a ``CeloNetwork``.
        step_mult, exp_mult: override the checkpoint's (0.001 each).
        all_reduce_loss, partitioned, capturable, fused, revision: as for ``lo_ops.VeLO``.

    ``step(closure=None, *, loss=None)`` needs the loss. Parameters without ``.grad`` (and
    empty ones) are skipped. If the loss or any gradient is not finite the whole step is
    skipped (parameters and all state unchanged, the step not counted), decided on the device
    without a host sync. Finite gradients are clipped to [-1000, 1000] as in the original.
    """

    architecture = "celo"
    _profile_name = "celo"
    _ops = ("velo_step_",)
    _phase_ops = ("factored_gsq_sums", "factored_update_", "velo_feature_sums_", "velo_apply_")

    def _parameter_state(self, p: Tensor) -> dict[str, Tensor]:
        return accumulator_state(p)

    def _parameter_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return state_shapes(p.shape)

    def _collect(self):
        buckets = []
        for group in self.param_groups:
            lists = [[] for _ in range(7)]
            for i, p, state in self._stepped(group):
                for k, t in enumerate((p, p.grad, state["momentum"], state["rms"])):
                    lists[k].append(t)
                if p.dim() >= 2:
                    lists[4].append(state["fac_row"])
                    lists[5].append(state["fac_col"])
                else:
                    lists[6].append(state["fac_diag"])
            if self._sharded:
                buckets.extend((group, s) for s in self._local_slots(lists))
            else:
                buckets.extend((group, b) for b in split_buckets(lists).values())
        if not buckets and self._partition_group is None:
            return None
        return buckets

    def _update(self, buckets, loss_t, loss_features):
        if self._sharded:
            with phase("lo_ops.celo.sharded_update"):
                if self._phased_fused_for(self._device):
                    finite, hidden, cell = self._mlp_step_phased_fused(buckets, loss_t, loss_features)
                    self._commit_schedule(~finite, hidden, cell)
                    return finite
                return self._update_sharded(buckets, loss_t, loss_features)
        with phase("lo_ops.celo.nonfinite_check"):
            finite = self._all_finite(self._finite(loss_t, [b[1] for _, b in buckets]))
            skip = ~finite
        with phase("lo_ops.celo.schedule"):
            lr_mult, hidden, cell = self._schedule(loss_features)
        with phase("lo_ops.celo.update"):
            fused = self._fused_for(self._device)
            velo_step = torch.ops.lo_ops.velo_step_ if fused else ref.velo_step_
            for group, b in buckets:
                T = len(b[0])
                velo_step(b[0], b[1], b[2], b[3], b[4], b[5], b[6], group_lr(group, self._device),
                          ref.shared_mlp_weights(self._mlp_sets, T), lr_mult.expand(T).contiguous(), skip,
                          float(group["weight_decay"]), self.step_mult, self.exp_mult)
        with phase("lo_ops.celo.commit"):
            self._commit_schedule(skip, hidden, cell)
        return finite

    def _update_sharded(self, slot_groups, loss_t, loss_features):
        """DTensor parameters where the device has no phase ops: the reference's phases on
        local shards, each phase's sums completed across ranks (lo_ops._distributed), the
        non-finite test riding with the first round's sums."""
        reduce = _distributed.all_reduce_sums
        groups = [g for g, _ in slot_groups]
        slots = [s for _, s in slot_groups]
        tensors = shared.slot_tensors(slots)
        saved = [t.clone() for t in tensors]
        g32s = [s.g32(clip=VELO_GRAD_CLIP) for s in slots]
        p32s = [s.p32() for s in slots]
        decays = [self._velo_decays] * len(slots)
        bad = [((~torch.isfinite(s.g)).sum().double()[None], s.geo.all_groups()) for s in slots]
        first = reduce(shared.gsq_phase(slots, g32s) + bad)
        n_gsq = len(first) - len(slots)
        gsq, bad = first[:n_gsq], first[n_gsq:]
        finite = torch.isfinite(loss_t)
        if bad:
            finite = finite & (torch.cat(bad).sum() == 0)
        lr_mult, hidden, cell = self._schedule(loss_features)
        row_sums = reduce(shared.factored_phase(slots, decays, gsq))
        weights = ref.shared_mlp_weights(self._mlp_sets, 1)[0]
        feature_fn = lambda i, g32, acc: ref.features(g32, p32s[i], acc)  # noqa: E731
        accs, partial = shared.feature_phase(slots, g32s, decays, row_sums, feature_fn)
        for i, (s, acc, total) in enumerate(zip(slots, accs, reduce(partial))):
            if s.geo.numel == 0:
                continue
            group = groups[i]
            ref.element_step(s, feature_fn(i, g32s[i], acc), p32s[i], total, weights, lr_mult[0],
                             lr=group_lr(group, self._device), weight_decay=float(group["weight_decay"]),
                             step_mult=self.step_mult, exp_mult=self.exp_mult)
        shared.keep_if(~finite, tensors, saved)
        self._commit_schedule(~finite, hidden, cell)
        return finite


class CeloAdam(_CeloBase):
    """Celo-Adam (Moudgil et al., TMLR 2025): Adam driven by Celo's learned LSTM learning-rate
    schedule (spec 5.1, 5.3).

    Each step: the loss buffer takes the step's loss; the LSTM runs once on the 18 shared
    inputs and gives ``lr_mult = 0.1 * exp(h s + s0)``; then one fused op per (param group,
    dtype) (``lo_ops::celo_adam_step_``) takes the bias-corrected Adam step (decays 0.9/0.999,
    epsilon 1e-8) with learning rate ``lr_mult * step_mult``.

    Args as for ``lo_ops.Celo``; ``pretrained=None`` loads the published Celo-Adam weights
    shipped with lo_ops (``lo_ops/weights/celo_adam/``). ``exp_mult`` has no effect here.
    The state of a parameter is ``exp_avg`` and ``exp_avg_sq`` (float32, the parameter's shape;
    Celo-Adam's factored accumulators never affect its step and are not kept).
    """

    architecture = "celo_adam"
    _profile_name = "celo_adam"
    _ops = ("celo_adam_step_",)

    def _parameter_state(self, p: Tensor) -> dict[str, Tensor]:
        if _distributed.is_dtensor(p):
            return {key: _distributed.zeros_state(p, p.shape) for key in ("exp_avg", "exp_avg_sq")}
        return {key: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                for key in ("exp_avg", "exp_avg_sq")}

    def _parameter_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _collect(self):
        buckets = []
        for group in self.param_groups:
            by_dtype: dict[Any, list[list[Tensor]]] = {}
            for i, p, state in self._stepped(group):
                lists = by_dtype.setdefault(p.dtype, [[], [], [], []])
                g = p.grad
                if _distributed.is_dtensor(p):
                    g = _distributed.local_grad(p, g, f"parameter {i} of shape {tuple(p.shape)}")
                for k, t in enumerate((p, g, state["exp_avg"], state["exp_avg_sq"])):
                    lists[k].append(_distributed.local(t))
            buckets.extend((group, b) for b in by_dtype.values())
        if not buckets and self._partition_group is None:
            return None
        return buckets

    def _update(self, buckets, loss_t, loss_features):
        with phase("lo_ops.celo_adam.nonfinite_check"):
            finite = self._finite(loss_t, [b[1] for _, b in buckets])
            if self._sharded:  # each rank holds shards of the gradients: agree over all ranks
                import torch.distributed._functional_collectives as funcol

                bad = funcol.wait_tensor(funcol.all_reduce((~finite).float().reshape(1), "sum",
                                                           torch.distributed.group.WORLD))
                finite = bad[0] == 0
            finite = self._all_finite(finite)
            skip = ~finite
        with phase("lo_ops.celo_adam.schedule"):
            lr_mult, hidden, cell = self._schedule(loss_features)
        with phase("lo_ops.celo_adam.update"):
            fused = self._fused_for(self._device)
            adam_step = torch.ops.lo_ops.celo_adam_step_ if fused else ref.celo_adam_step_
            iteration = self.global_state["iteration"]
            for group, b in buckets:
                T = len(b[0])
                adam_step(b[0], b[1], b[2], b[3], group_lr(group, self._device), lr_mult.expand(T).contiguous(),
                          iteration, skip, float(group["weight_decay"]), self.step_mult, CELO_ADAM_EPSILON)
        with phase("lo_ops.celo_adam.commit"):
            self._commit_schedule(skip, hidden, cell)
        return finite

