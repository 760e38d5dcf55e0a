"""``lo_ops.SmallFCLOpt``: the small_fc_lopt learned optimizer as a torch.optim.Optimizer."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from .. import _distributed, _phases
from .._layout import effective_decays, state_shapes, unpack_weights
from .._optim import (
    LearnedOptimizer,
    accumulator_state,
    check_lr,
    check_weight_decay,
    group_lr,
    phase,
    split_buckets,
)
from . import reference
from .network import check_decay_offsets, load_small_fc_lopt_network


_STATE_KEYS_FACTORED = ("step", "momentum", "rms", "fac_row", "fac_col")
_STATE_KEYS_DIAGONAL = ("step", "momentum", "rms", "fac_diag")


class SmallFCLOpt(LearnedOptimizer):
    """small_fc_lopt (``AdafacMLPLOpt``): each element's step comes from a 39-32-32-2 MLP.

    Args:
        params: parameters or param groups (group keys: ``lr``, ``weight_decay``).
        lr: multiplies every step (``lr = 1`` reproduces the original). Kept as a 0-d tensor
            so LR schedulers change it without recompiling a compiled ``step``.
        weight_decay: decoupled, ``p <- p - lr * weight_decay * p`` after the update.
        pretrained: None (the embedded default), a local directory in lo_ops' or PyLO's
            layout, a Hugging Face repo id, or a meta-network module.
        step_mult: overrides the checkpoint's (PyLO weights: 0.01; lo_ops': from config).
        exp_mult: overrides the checkpoint's (PyLO and Google weights: 0.001; the embedded
            default's: 1.0, from its config).
        decay_offsets: ``{"momentum": [3], "rms": [1], "adafactor": [3]}`` learned offsets;
            overrides the checkpoint's (PyLO weights: PyLO's μLO values).
        capturable: kept for torch.optim compatibility; every path here reads ``lr`` and the
            step count from tensors on the parameters' device.
        fused: None uses the fused kernel where the device has one and the reference
            otherwise (logged once); True requires the fused kernel; False uses the reference.
    """

    _ops = ("small_fc_lopt_step_",)
    _phase_ops = ("factored_gsq_sums", "factored_update_", "small_fc_lopt_feature_sums_", "small_fc_lopt_apply_")
    _profile_name = "small_fc_lopt"  # torch.profiler ranges: lo_ops.<name>.<phase>
    # What μLO (lo_ops.MuLO) changes: step_mult's default (None: the checkpoint's), extra
    # param-group defaults, gradients through nan_to_num (instead of skipping non-finite steps).
    _default_step_mult: float | None = None
    _group_defaults: dict[str, Any] = {}
    _nan_to_num = False

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0.0,
        *,
        pretrained: str | os.PathLike | nn.Module | None = None,
        step_mult: float | None = None,
        exp_mult: float | None = None,
        decay_offsets: dict | None = None,
        capturable: bool = False,
        fused: bool | None = None,
        revision: str | None = None,
    ):
        check_lr(lr, "lr")
        check_weight_decay(weight_decay, "weight_decay")
        constants = dict(pretrained=pretrained, step_mult=step_mult, exp_mult=exp_mult,
                         decay_offsets=decay_offsets, revision=revision)
        network, layout = load_small_fc_lopt_network(pretrained, revision=revision)
        self.network = network
        self.layout = layout
        if step_mult is None:
            step_mult = network.step_mult if self._default_step_mult is None else self._default_step_mult
        self.step_mult = float(step_mult)
        self.exp_mult = float(network.exp_mult if exp_mult is None else exp_mult)
        for name, value in (("step_mult", self.step_mult), ("exp_mult", self.exp_mult)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        offsets = network.decay_offsets if decay_offsets is None else decay_offsets
        self.decay_offsets = check_decay_offsets(offsets)
        self._meta_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
        defaults = dict(lr=lr, weight_decay=weight_decay, capturable=capturable, fused=fused,
                        **self._group_defaults)
        super().__init__(params, defaults, fused, constants)

    # -- param groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._meta(_distributed.local(p).device)  # created now, so that a compiled step finds it unchanged
            if p.requires_grad:
                self._ensure_state(p)

    def _meta(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._meta_cache:
            weights = self.network.packed_weights().to(device)
            decays = effective_decays(self.decay_offsets).to(device)
            self._meta_cache[device] = (weights, decays)
        return self._meta_cache[device]

    # -- state --------------------------------------------------------------------------------
    def _init_group(self, group, *lists):
        """Appends each parameter with a gradient, its gradient, state and step count to the
        ops' lists (``lists[:8]``: params, grads, momentum, rms, fac_row, fac_col, fac_diag,
        steps), or, when it is a DTensor, to the same lists in ``lists[8:]``. (Flat list
        arguments, as torch.compile traces ``_init_group`` of an optimizer.)"""
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "SmallFCLOpt does not support sparse gradients (parameter "
                    f"{i} of its param group, shape {tuple(p.shape)}); use a dense gradient"
                )
            state = self._ensure_state(p)
            dtensor = _distributed.is_dtensor(p)
            params, grads, momentum, rms, fac_row, fac_col, fac_diag, steps = lists[8:] if dtensor else lists[:8]
            params.append(p)
            grads.append(p.grad)
            momentum.append(state["momentum"])
            rms.append(state["rms"])
            steps.append(state["step"])
            if p.dim() >= 2:
                fac_row.append(state["fac_row"])
                fac_col.append(state["fac_col"])
            else:
                fac_diag.append(state["fac_diag"])

    def _ensure_state(self, p: Tensor) -> dict[str, Tensor]:
        """The state of ``p``, created when it has none (at construction for every parameter
        that requires grad, so that torch.distributed.checkpoint never has to take a step to
        create it). A step count moved off the device (ZeroRedundancyOptimizer.load_state_dict
        puts 0-d state on the CPU) is moved back."""
        state = self.state[p]
        device = _distributed.local(p).device
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state.update(accumulator_state(p))
        elif state["step"].device != device:
            state["step"] = state["step"].to(device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient. A step whose gradients hold a NaN or an
        infinity anywhere changes no parameter and no state and is not counted (as
        ``GradScaler`` skips one), decided on the device without a host sync: one fused op
        call checks its own gradients in its first read of them; a step of several calls
        (param groups, dtypes, devices, sharded parameters) checks all gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with phase(f"lo_ops.{self._profile_name}.step"):  # (after the closure: the model's time is not ours)
            with phase(f"lo_ops.{self._profile_name}.collect"):
                calls, sharded_groups = [], []
                for gi, group in enumerate(self.param_groups):
                    lists, sharded = [[] for _ in range(8)], [[] for _ in range(8)]
                    self._init_group(group, *lists, *sharded)
                    if sharded[0]:
                        sharded_groups.append((gi, sharded))
                    if lists[0]:
                        calls += [(group, device, bucket) for (device, _), bucket in split_buckets(lists).items()]
            skip = None
            if (len(calls) > 1 or (calls and sharded_groups)) and not self._nan_to_num:
                with phase(f"lo_ops.{self._profile_name}.nonfinite_check"):
                    skip = _phases.nonfinite_found([b[1] for _, _, b in calls])
            if sharded_groups:
                with phase(f"lo_ops.{self._profile_name}.sharded_update"):
                    skip = self._step_sharded(sharded_groups, skip)
            with phase(f"lo_ops.{self._profile_name}.update"):
                for group, device, bucket in calls:
                    weights, decays = self._meta(device)
                    lr = group_lr(group, device)
                    fn = torch.ops.lo_ops.small_fc_lopt_step_ if self._fused_for(device) else reference.small_fc_lopt_step_
                    fn(*bucket, lr, weights, decays, float(group["weight_decay"]), self.step_mult, self.exp_mult,
                       None if skip is None else skip.to(device, non_blocking=True), self._step_scale(group),
                       self._nan_to_num)
        return loss

    def _step_scale(self, group) -> float:
        """The multiplier of ``group``'s steps (μLO's s; 1 for small_fc_lopt itself)."""
        return 1.0

    def _step_sharded(self, sharded_groups, skip: Tensor | None) -> Tensor | None:
        """The DTensor parameters of every group (``(group index, lists)`` pairs): the phases
        on local shards (the fused phase ops where the device has them, else the reference),
        their sums across ranks in three rounds for all groups together. ``skip`` (the
        whole-tensor parameters' non-finite check) joins the shards' own; returns the step's
        decision (true: skipped)."""
        slots, steps, groups = [], [], []
        for gi, sharded in sharded_groups:
            new = self._local_slots(sharded[:7])
            slots += new
            steps += sharded[7]
            groups += [gi] * len(new)
        device = slots[0].p.device
        weights, decays = self._meta(device)
        lrs = [group_lr(group, device) for group in self.param_groups]
        wds = [float(group["weight_decay"]) for group in self.param_groups]
        scales = [self._step_scale(group) for group in self.param_groups]
        skip = None if skip is None else skip.to(device, non_blocking=True)
        if self._phased_fused_for(device):
            return _phases.small_fc_lopt_step(
                slots, steps, groups=groups, lrs=lrs, weight_decays=wds, weights=weights, decays=decays,
                step_mult=self.step_mult, exp_mult=self.exp_mult, reduce=_distributed.all_reduce_sums, skip=skip,
                step_scales=scales, nan_to_num=self._nan_to_num,
            )
        return reference.small_fc_lopt_slots(
            slots, steps, lr=[lrs[g] for g in groups], weights=[unpack_weights(weights)] * len(slots),
            decays=[decays] * len(slots), weight_decay=[wds[g] for g in groups],
            step_mult=self.step_mult, exp_mult=self.exp_mult, reduce=_distributed.all_reduce_sums, skip=skip,
            step_scale=[scales[g] for g in groups], nan_to_num=self._nan_to_num,
        )

    def _expected_state(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return {"step": ()} | state_shapes(p.shape)
