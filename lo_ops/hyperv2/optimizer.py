"""The HyperV2 engine as torch.optim.Optimizers: ``HyperV2Optimizer`` (what VeLO, Celo and
Celo-Adam share: loss buffer, step count, the LSTM network, skipping non-finite steps, param
groups, state dicts, data-parallel options) and ``lo_ops.VeLO``."""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any

import torch
from torch import Tensor

from .. import _distributed, _phases
from .. import _reference as reference
from .._layout import (
    VELO_DECAYS,
    VELO_GRAD_CLIP,
    VELO_LOSS_BUFFER,
    VELO_LSTM_HIDDEN,
    VELO_LSTM_INPUTS,
    VELO_RMIN_INIT,
    HyperV2Config,
    state_shapes,
)
from .._optim import (
    LearnedOptimizer,
    accumulator_state,
    check_lr,
    check_weight_decay,
    group_lr,
    loss_value,
    phase,
    split_buckets,
)
from . import reference as ref
from .network import _NAMES, HyperV2Network, load_hyperv2_network

logger = logging.getLogger(__name__)

_LOSS_STATE = {
    "iteration": (),
    "loss_means": (VELO_LOSS_BUFFER,),
    "loss_running_min": (VELO_LOSS_BUFFER,),
}


class HyperV2Optimizer(LearnedOptimizer):
    """What VeLO, Celo and Celo-Adam share (spec 3.1, 5.1, 5.4); ``architecture`` picks the
    configuration (``lo_ops._layout.HYPERV2_CONFIGS``) and the meta-weights it loads.

    A subclass sets ``architecture`` and implements ``_collect`` (the step's argument lists,
    from every param group) and ``_update`` (everything after the loss buffer; returns the
    finite flag). The global state (step count, loss buffer; for Celo* the one LSTM state) is
    ``global_state``; every parameter's state holds the very same tensors, so it travels
    wherever per-parameter state does (ZeroRedundancyOptimizer, distributed checkpoints).
    """

    architecture = "velo"
    reads_loss = True
    _profile_name = "velo"  # torch.profiler ranges: lo_ops.<name>.<phase>

    def __init__(
        self,
        params,
        num_steps: int,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0.0,
        *,
        pretrained=None,
        step_mult: float | None = None,
        exp_mult: float | None = None,
        capturable: bool = False,
        fused: bool | None = None,
        revision: str | None = None,
        all_reduce_loss=False,
        partitioned=False,
    ):
        name = type(self).__name__
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"{name}: num_steps (the training horizon) must be an int >= 1, got {num_steps!r}")
        check_lr(lr, "lr")
        check_weight_decay(weight_decay, "weight_decay")
        network, layout = load_hyperv2_network(pretrained, self.architecture, revision=revision)
        self.network = network
        self.config: HyperV2Config = network.config
        self.layout = layout
        self.num_steps = num_steps
        self.step_mult = float(network.step_mult if step_mult is None else step_mult)
        self.exp_mult = float(network.exp_mult if exp_mult is None else exp_mult)
        for key, value in (("step_mult", self.step_mult), ("exp_mult", self.exp_mult)):
            if not math.isfinite(value):
                raise ValueError(f"{name}: {key} must be finite, got {value}")
        if not (isinstance(all_reduce_loss, bool) or _distributed.is_process_group(all_reduce_loss)):
            raise ValueError(
                f"all_reduce_loss must be True, False or a torch.distributed ProcessGroup, got {all_reduce_loss!r}"
            )
        self.all_reduce_loss = all_reduce_loss
        if not (isinstance(partitioned, bool) or _distributed.is_process_group(partitioned)):
            raise ValueError(
                f"partitioned must be True, False or a torch.distributed ProcessGroup, got {partitioned!r}"
            )
        self._partition_group = None
        self._device: torch.device | None = None
        self._sharded = False
        self.global_state: dict[str, Tensor] = {}
        defaults = dict(lr=lr, weight_decay=weight_decay, capturable=capturable, fused=fused)
        constants = dict(num_steps=num_steps, pretrained=pretrained, step_mult=step_mult, exp_mult=exp_mult,
                         revision=revision, all_reduce_loss=all_reduce_loss, partitioned=partitioned)
        super().__init__(params, defaults, fused, constants)
        self._register_own_hooks()
        if partitioned is not False:
            self._partition_group = torch.distributed.group.WORLD if partitioned is True else partitioned
            if self._device is None:  # an empty partition still joins every step's collectives
                self._bind_device(_distributed.group_device(self._partition_group))
            self._partition_added()

    # -- hooks of the families -------------------------------------------------------------------
    def _global_shapes(self) -> dict[str, tuple[int, ...]]:
        """The global state's keys and shapes (all float32)."""
        return dict(_LOSS_STATE)

    def _init_global_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "iteration": torch.zeros((), dtype=torch.float32, device=device),
            "loss_means": torch.zeros(VELO_LOSS_BUFFER, dtype=torch.float32, device=device),
            "loss_running_min": torch.full((VELO_LOSS_BUFFER,), VELO_RMIN_INIT, dtype=torch.float32, device=device),
        }

    def _parameter_state(self, p: Tensor) -> dict[str, Tensor]:
        """A new parameter's own state (without the global state)."""
        raise NotImplementedError

    def _partition_added(self) -> None:
        """Partitioned (ZeRO): called once the partition's parameters (or a group) are added."""

    def _collect(self):
        """The step's work from every param group; None when no parameter has a gradient."""
        raise NotImplementedError

    def _update(self, work, loss_t: Tensor, loss_features: Tensor) -> Tensor:
        """Everything after the loss buffer: returns the step's finite flag (a bool tensor);
        where it is false, nothing (parameters, per-parameter state) may change."""
        raise NotImplementedError

    def _all_finite(self, finite: Tensor) -> Tensor:
        """Partitioned: ``finite`` on every rank of the partition (one all-reduce of one number)."""
        if self._partition_group is None:
            return finite
        import torch.distributed._functional_collectives as funcol

        bad = funcol.wait_tensor(funcol.all_reduce((~finite).float().reshape(1), "sum", self._partition_group))
        return bad[0] == 0

    # -- param groups and device ----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        if isinstance(param_group, dict) and param_group.get("num_steps", self.num_steps) != self.num_steps:
            raise ValueError(
                f"{name}: num_steps is the training horizon of the whole optimizer (its loss buffer "
                f"and step count are shared by all groups); pass it to {name}(...), not in a param group"
            )
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._bind_device(_distributed.local(p).device)
            # With DTensor parameters every step takes the phased path.
            self._sharded = self._sharded or _distributed.is_dtensor(p)
            if p.requires_grad and p.numel() > 0:
                self._ensure_state(p)
        if self._partition_group is not None:  # a group added later
            self._partition_added()

    def _bind_device(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
            # Everything the step reads is created now, so a compiled step finds it unchanged.
            self._net = copy.deepcopy(self.network).to(device).requires_grad_(False)
            self._mlp_sets = self._net.packed_mlp_sets()
            self._loss_decays = ref.loss_buffer_decays(self.num_steps).to(device)
            self._velo_decays = torch.tensor(VELO_DECAYS, dtype=torch.float32, device=device)
            self.global_state = self._init_global_state(device)
        elif device != self._device:
            raise ValueError(
                f"{type(self).__name__} keeps all its parameters on one device (its LSTM reads "
                f"all tensors); got parameters on {self._device} and on {device}"
            )

    # -- state ---------------------------------------------------------------------------------
    def _ensure_state(self, p: Tensor) -> dict[str, Tensor]:
        """The state of ``p``, created when it has none, holding the global state's tensors
        too. State replaced from outside (ZeroRedundancyOptimizer.load_state_dict) is
        adopted: its copy of the global state becomes the optimizer's."""
        state = self.state[p]
        if len(state) == 0:
            state.update(self._parameter_state(p))
            state.update(self.global_state)
        elif state.get("iteration") is not self.global_state["iteration"]:
            self._adopt_global_state(state)
        return state

    def _adopt_global_state(self, source: dict[str, Tensor]) -> None:
        """``source``'s global state (if it has one) becomes ``global_state``, which every
        parameter's state then shares again."""
        keys = self._global_shapes()
        if all(key in source for key in keys):
            for key in keys:
                self.global_state[key].copy_(source[key].to(dtype=torch.float32))
        for state in self.state.values():
            if state:
                state.update(self.global_state)

    def _loss_tensor(self, loss) -> Tensor:
        name = type(self).__name__
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and torch.compiler.is_compiling():
            # A Python number is a constant of the compiled graph: one recompile per value.
            raise TypeError(
                f"{name}: a compiled step needs the loss as a 0-d tensor (e.g. "
                "step(loss=loss.detach())), not a Python number, whose every value would "
                "compile a new graph"
            )
        return loss_value(loss, name).to(self._device)

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One step. The loss is ``loss`` if given, else the losses handed over by
        ``observe_loss`` since the last step (their mean, or sum), else what ``closure``
        (called with grad enabled) returns."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        observed = self._take_observed_loss()  # (after the closure, whose backward may observe)
        if loss is None:
            loss = observed if observed is not None else closure_loss
        if loss is None:
            raise ValueError(
                f"{type(self).__name__} needs the loss of every step (its LSTM reads the loss "
                "history): call opt.step(closure) with a closure that returns the loss, "
                "opt.step(loss=loss), or hand it over first with opt.observe_loss(loss) "
                "(lo_ops.integrations does that for the Hugging Face Trainer and Lightning)"
            )
        name = self._profile_name
        with phase(f"lo_ops.{name}.step"):  # (after the closure: the model's time is not ours)
            with phase(f"lo_ops.{name}.collect"):
                loss_t = self._loss_tensor(loss) if self._device is not None else None
                if loss_t is not None and self.all_reduce_loss is not False:
                    loss_t = _distributed.mean_over(loss_t, self.all_reduce_loss)
                work = self._collect()
            if work is None:
                return closure_loss
            gs = self.global_state
            with phase(f"lo_ops.{name}.loss_buffer"):
                means, running_min, loss_features = ref.loss_buffer_update(
                    gs["loss_means"], gs["loss_running_min"], gs["iteration"], loss_t, self._loss_decays
                )
            finite = self._update(work, loss_t, loss_features)
            with phase(f"lo_ops.{name}.commit"):
                skip = ~finite
                gs["loss_means"].copy_(torch.where(skip, gs["loss_means"], means))
                gs["loss_running_min"].copy_(torch.where(skip, gs["loss_running_min"], running_min))
                gs["iteration"].add_(finite.float())
        return closure_loss

    def _shared_lstm_inputs(self, loss_features: Tensor) -> Tensor:
        """The 18 LSTM inputs every tensor shares: time features, then loss features."""
        return ref.shared_lstm_inputs(self.global_state["iteration"], self.num_steps, loss_features)

    def _mlp_step_phased_fused(self, slots, loss_t, loss_features, old_hidden=None, old_cell=None):
        """The per-element MLP step (VeLO, Celo) of DTensor parameters with the phase ops
        (lo_ops._phases) on local shards, per (param group, dtype) bucket, in three rounds of
        sums across ranks. VeLO's per-tensor LSTM statistics ride in the first two rounds and
        every rank runs the per-tensor network on the same T rows (in the order of ``slots``);
        Celo's first round carries only each tensor's non-finite flag, and its one-row schedule
        needs no sums. Returns ``(finite, hidden', cell')``."""
        reduce = _distributed.all_reduce_sums
        shared = self.config.shared_lstm_input
        groups, slots = [g for g, _ in slots], [s for _, s in slots]
        buckets = _phases.buckets_of(slots, key=lambda i: id(groups[i]))
        lists = [b.accumulators for b in buckets]
        decays = self._velo_decays
        counts = [len(b.slots) for b in buckets]
        # Round 1: g^2 sums, and the plain LSTM sums (VeLO) or the non-finite flags (Celo).
        gsq = [x for b in buckets for x in _phases.gsq_sums(b, VELO_GRAD_CLIP)]
        n_gsq = [2 * len(b.factored) for b in buckets]
        if shared:
            stats = [x for b in buckets for x in _phases.per_tensor(_phases.nonfinite_flags(b.grads)[:, None], b)]
        else:
            stats = [x for b, (m, v, *_) in zip(buckets, lists) for x in
                     _phases.per_tensor(torch.ops.lo_ops.velo_lstm_moments(b.params, b.grads, m, v, None), b)]
        first = reduce(gsq + stats)
        gsq = _phases.split(first[:len(gsq)], n_gsq)
        sums = [torch.stack(x) for x in _phases.split(first[sum(n_gsq):], counts)]
        nonfinite = torch.cat([t[:, -1] for t in sums]).sum()  # the last column counts them
        finite = torch.isfinite(loss_t) & (nonfinite == 0)
        skip = ~finite
        # Round 2: r and c, their row sums, and (VeLO) the spreads about the momentum means.
        rows = [x for b, g in zip(buckets, gsq) for x in _phases.factored_update(b, g, decays, skip)]
        n_rows = [len(b.factored) for b in buckets]
        spreads = []
        if not shared:
            for b, (m, v, *_), total in zip(buckets, lists, sums):
                n = torch.tensor([max(s.geo.numel, 1) for s in b.slots], dtype=torch.float64, device=total.device)
                mu = (total[:, 1:4] / n[:, None]).contiguous()
                spreads += _phases.per_tensor(torch.ops.lo_ops.velo_lstm_moments(b.params, b.grads, m, v, mu), b)
        second = reduce(rows + spreads)
        rows = _phases.split(second[:len(rows)], n_rows)
        if shared:
            lr_mult, new_hidden, new_cell = self._schedule(loss_features)
            lr_mult = lr_mult.expand(len(slots))
            mlp_weights = ref.shared_mlp_weights(self._mlp_sets, len(slots))
        else:
            spreads = [torch.stack(x) for x in _phases.split(second[sum(n_rows):], counts)]
            # The LSTM rows in the order of `slots` (buckets group them by param group and dtype).
            sums, spreads = torch.cat(sums), torch.cat(spreads)
            order = [i for b in buckets for i in b.index]
            if order != sorted(order):
                position = [0] * len(order)
                for j, i in enumerate(order):
                    position[i] = j
                position = torch.tensor(position, device=sums.device)
                sums, spreads = sums[position], spreads[position]
            X = torch.ops.lo_ops.velo_lstm_rows(
                loss_features, self.global_state["iteration"], float(self.num_steps), sums, spreads,
                [s.geo.numel for s in slots], [sum(1 for d in s.geo.shape if d > 1) for s in slots])
            new_hidden, new_cell, controls, lr_mult = ref.per_tensor_network(X, old_hidden, old_cell, self._net)
            mlp_weights = ref.blend_mlp_weights(controls, self._mlp_sets)
        # Round 3: the feature sums; then each bucket's update.
        partial = []
        for b, (m, v, fr, fc, fd), r in zip(buckets, lists, rows):
            partial += _phases.per_tensor(torch.ops.lo_ops.velo_feature_sums_(
                b.params, b.grads, m, v, fr, fc, fd, r, skip, b.geometry), b)
        features = _phases.split(reduce(partial), [len(b.slots) for b in buckets])
        for b, acc, r, f in zip(buckets, lists, rows, features):
            group = groups[b.index[0]]
            index = torch.tensor(b.index, device=self._device)
            torch.ops.lo_ops.velo_apply_(
                b.params, b.grads, *acc, group_lr(group, self._device), mlp_weights[index].contiguous(),
                lr_mult[index].contiguous(), skip, r, torch.stack(f), b.geometry, float(group["weight_decay"]),
                self.step_mult, self.exp_mult)
        return finite, new_hidden, new_cell

    # -- state_dict ------------------------------------------------------------------------------
    def _register_own_hooks(self) -> None:
        self.register_state_dict_post_hook(HyperV2Optimizer._add_global_state, prepend=True)

    @staticmethod
    def _add_global_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state_dict post-hook, first of all: torch.optim's layout (per-parameter state,
        which holds the global state too) plus the architecture's entry ("velo", "celo",
        "celo_adam"): the global state once more and the horizon. Hooks registered by the
        user run after it and see (and may change) that entry."""
        state_dict[self.architecture] = {k: v.detach().clone() for k, v in self.global_state.items()}
        state_dict[self.architecture]["num_steps"] = self.num_steps
        return state_dict

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Takes this optimizer's state dicts, with or without the architecture's entry
        (distributed checkpoints keep only ``state`` and ``param_groups``; the global state is
        in every parameter's state too)."""
        name, key_ = type(self).__name__, self.architecture
        shapes = self._global_shapes()
        saved = state_dict.get(key_)
        per_param = [s for s in state_dict["state"].values() if all(k in s for k in shapes)]
        if saved is None and not per_param:
            raise ValueError(
                f"load_state_dict: this is not a {name} state dict (it has neither a {key_!r} entry "
                "nor per-parameter state with the loss buffer and step count)"
            )
        source = saved if saved is not None else per_param[0]
        where = f"state_dict[{key_!r}]" if saved is not None else "the per-parameter state"
        for key, shape in shapes.items():
            value = source.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise ValueError(
                    f"load_state_dict: {where}[{key!r}] should be a tensor of shape "
                    f"{shape}, got {getattr(value, 'shape', type(value))}"
                )
        if saved is not None and saved.get("num_steps") != self.num_steps:
            logger.warning(
                "%s.load_state_dict: the state was saved with num_steps=%s; continuing with "
                "this optimizer's num_steps=%s", name, saved.get("num_steps"), self.num_steps,
            )
        # State saved before the global state was kept per parameter gets it from the entry.
        state = {i: ({**{k: source[k] for k in shapes}, **s} if s else s)
                 for i, s in state_dict["state"].items()}
        super()._load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        if self._device is not None:
            self._adopt_global_state(source)

    def _expected_state(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return self._parameter_shapes(p) | self._global_shapes()

    def _parameter_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """The shapes of ``_parameter_state(p)``."""
        raise NotImplementedError


class VeLO(HyperV2Optimizer):
    """VeLO (``HyperV2``): a per-tensor LSTM sets the weights of a per-element 30-4-4-3 MLP.

    Each step (spec section 3): the loss buffer takes the step's loss; the 30 LSTM inputs of
    every tensor come from one fused reduction; the LSTM, its cross-tensor max-pool and the
    blending of the 256 MLP weight sets run batched over all tensors; then one fused op per
    (param group, dtype) updates the accumulators and parameters.

    Args:
        params: parameters or param groups (group keys: ``lr``, ``weight_decay``). All on one
            device: VeLO pools over all tensors.
        num_steps: the training horizon (total number of steps planned); VeLO's time features
            and loss buffer depend on it.
        lr: multiplies every step (``lr = 1`` reproduces the original); a 0-d tensor, so LR
            schedulers change it without recompiling a compiled ``step``.
        weight_decay: decoupled, ``p <- p - lr * weight_decay * p`` after the update (not
            scaled by VeLO's per-tensor ``lr_mult``).
        pretrained: the meta-weights (required; lo_ops does not ship VeLO's): Google's
            flax-msgpack checkpoint file, a directory with PyLO's ``VeLO_RNN/`` and
            ``VeLO_MLP/``, a pair of PyLO Hub repo ids ``(rnn, mlp)``, a directory or Hub repo
            in lo_ops' layout (see ``python -m lo_ops convert``), or a ``VeLONetwork``.
        step_mult, exp_mult: override the checkpoint's (0.001 each for VeLO).
        all_reduce_loss: in data-parallel training (DDP, FSDP2, ZeRO) every rank must give VeLO
            the same loss, the global mean; by default the caller passes it. ``True`` makes
            each step average the given (per-rank) loss over the default process group itself,
            a ``ProcessGroup`` over that group (one all-reduce of one number, no host sync).
        partitioned: this optimizer holds one rank's share of the model's parameters, as in
            ``ZeroRedundancyOptimizer(..., optimizer_class=lo_ops.VeLO, partitioned=True)``:
            each step gathers every rank's per-tensor LSTM inputs and LSTM state (one
            all-gather) and runs the per-tensor network on all tensors, as one process would.
            ``True``: the default process group; or the ``ProcessGroup`` ZeRO partitions over.
        capturable: kept for torch.optim compatibility; every path reads ``lr``, the loss and
            the step count from tensors on the parameters' device.
        fused: None uses the fused kernels where the device has them and the reference
            otherwise (logged once); True requires them; False uses the reference.

    ``step(closure=None, *, loss=None)`` needs the loss, from the closure or the keyword (a
    0-d tensor; a Python float works but a compiled step then recompiles per value).
    Parameters without ``.grad`` (and empty ones) are skipped: their state is unchanged and
    they are left out of the cross-tensor max-pool. If the loss or any gradient is not finite
    the whole step is skipped (parameters and all state unchanged, the step not counted),
    decided on the device without a host sync, as ``torch.amp.GradScaler`` does. Finite
    gradients are clipped to [-1000, 1000] as in the original.
    """

    _ops = ("velo_lstm_input", "velo_step_")
    _phase_ops = ("factored_gsq_sums", "factored_update_", "velo_lstm_moments", "velo_lstm_rows",
                  "velo_feature_sums_", "velo_apply_")


    @property
    def velo_state(self) -> dict[str, Tensor]:
        """The global state (step count, loss buffer); ``global_state`` by VeLO's name."""
        return self.global_state

    def _parameter_state(self, p: Tensor) -> dict[str, Tensor]:
        return accumulator_state(p) | {"lstm_hidden": self._net.init_hidden[0].clone(),
                                       "lstm_cell": self._net.init_cell[0].clone()}

    def _parameter_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return state_shapes(p.shape) | {"lstm_hidden": (VELO_LSTM_HIDDEN,), "lstm_cell": (VELO_LSTM_HIDDEN,)}

    def _partition_added(self) -> None:
        """The most tensors any rank's partition holds: the rows each rank adds to the gather."""
        rows = sum(1 for g in self.param_groups for p in g["params"] if p.numel() > 0)
        counts = [None] * torch.distributed.get_world_size(self._partition_group)
        torch.distributed.all_gather_object(counts, rows, group=self._partition_group)
        self._partition_rows = max(counts)

    def _init_group(self, group, params, grads, momentum, rms, fac_row, fac_col, fac_diag,
                    hidden, cell):
        for i, p in enumerate(group["params"]):
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "VeLO does not support sparse gradients (parameter "
                    f"{i} of its param group, shape {tuple(p.shape)}); use a dense gradient"
                )
            state = self._ensure_state(p)
            params.append(p)
            grads.append(p.grad)
            momentum.append(state["momentum"])
            rms.append(state["rms"])
            hidden.append(state["lstm_hidden"])
            cell.append(state["lstm_cell"])
            if p.dim() >= 2:
                fac_row.append(state["fac_row"])
                fac_col.append(state["fac_col"])
            else:
                fac_diag.append(state["fac_diag"])


    def _collect(self):
        phased = self._sharded
        buckets, hidden, cell, slots = [], [], [], []
        for group in self.param_groups:
            lists = [[] for _ in range(7)]
            self._init_group(group, *lists, hidden, cell)
            if phased:
                slots.extend((group, s) for s in self._local_slots(lists))
            else:
                buckets.extend((group, b) for b in split_buckets(lists).values())
        if not hidden and self._partition_group is None:
            return None
        return phased, buckets, slots, hidden, cell

    def _update(self, work, loss_t, loss_features):
        phased, buckets, slots, hidden, cell = work
        empty = self._net.init_hidden[:0]
        old_hidden = torch.stack(hidden) if hidden else empty
        old_cell = torch.stack(cell) if cell else empty
        if phased:
            with phase("lo_ops.velo.sharded_update"):
                finite, new_hidden, new_cell = self._step_phased(slots, loss_t, loss_features, old_hidden,
                                                                 old_cell)
        else:
            finite, new_hidden, new_cell = self._step_buckets(buckets, loss_t, loss_features, old_hidden,
                                                              old_cell)
        with phase("lo_ops.velo.lstm_commit"):
            skip = ~finite
            if hidden:  # (an empty ZeRO partition has none)
                torch._foreach_copy_(hidden, torch.where(skip, old_hidden, new_hidden).unbind(0))
                torch._foreach_copy_(cell, torch.where(skip, old_cell, new_cell).unbind(0))
        return finite

    def _step_buckets(self, buckets, loss_t, loss_features, old_hidden, old_cell):
        """Plain parameters: the fused ops (or their reference) per (param group, dtype)."""
        fused = self._fused_for(self._device)
        lstm_input = torch.ops.lo_ops.velo_lstm_input if fused else ref.velo_lstm_input
        velo_step = torch.ops.lo_ops.velo_step_ if fused else ref.velo_step_
        iteration = self.velo_state["iteration"]
        with phase("lo_ops.velo.lstm_input"):
            rows, finite = [], torch.isfinite(loss_t)
            for _, b in buckets:
                X, grads_finite = lstm_input(b[0], b[1], b[2], b[3], loss_features, iteration,
                                             float(self.num_steps))
                rows.append(X)
                finite = finite & grads_finite
            X = torch.cat(rows) if rows else loss_features.new_zeros(0, VELO_LSTM_INPUTS)
        with phase("lo_ops.velo.lstm"):  # the per-tensor LSTM and its heads
            if self._partition_group is None:
                new_hidden, new_cell, controls, lr_mult = ref.per_tensor_network(X, old_hidden, old_cell, self._net)
            else:
                new_hidden, new_cell, controls, lr_mult, finite = self._network_of_all_ranks(
                    X, old_hidden, old_cell, finite)
        with phase("lo_ops.velo.blend"):
            skip = ~finite
            mlp_weights = ref.blend_mlp_weights(controls, self._mlp_sets)
        with phase("lo_ops.velo.update"):
            start = 0
            for group, b in buckets:
                end = start + len(b[0])
                velo_step(b[0], b[1], b[2], b[3], b[4], b[5], b[6], group_lr(group, self._device),
                          mlp_weights[start:end], lr_mult[start:end], skip, float(group["weight_decay"]),
                          self.step_mult, self.exp_mult)
                start = end
        return finite, new_hidden, new_cell

    def _network_of_all_ranks(self, X, hidden, cell, finite):
        """Partitioned: the per-tensor network over every rank's tensors. Each rank adds its T
        rows ``[X | hidden | cell | 1]`` padded with zero rows to the partition size, and a
        row holding its finite flag; after one all-gather every rank runs the network on the
        same rows (padding masked out of the max-pool) and keeps its own."""
        import torch.distributed._functional_collectives as funcol

        group, n, T = self._partition_group, self._partition_rows, X.shape[0]
        rows = torch.cat([X, hidden, cell, X.new_ones(T, 1)], dim=1)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, n - T))
        flag = torch.nn.functional.pad(finite.float().reshape(1, 1), (0, rows.shape[1] - 1))
        world = torch.distributed.get_world_size(group)
        gathered = funcol.all_gather_tensor(torch.cat([rows, flag]), 0, group).view(world, n + 1, -1)
        every = gathered[:, :n].reshape(world * n, -1)
        valid = every[:, -1]
        finite = (gathered[:, n, 0] == 1).all() & (valid > 0).any()
        h = VELO_LSTM_HIDDEN
        x, hid, cel = every[:, :VELO_LSTM_INPUTS], every[:, VELO_LSTM_INPUTS:VELO_LSTM_INPUTS + h], \
            every[:, VELO_LSTM_INPUTS + h:VELO_LSTM_INPUTS + 2 * h]
        new_hidden, new_cell, controls, lr_mult = ref.per_tensor_network(x, hid, cel, self._net, valid=valid)
        own = slice(torch.distributed.get_rank(group) * n, torch.distributed.get_rank(group) * n + T)
        return new_hidden[own], new_cell[own], controls[own], lr_mult[own], finite

    def _step_phased(self, slots, loss_t, loss_features, old_hidden, old_cell):
        """With DTensor parameters: the phase ops on local shards where the device has them
        (``_mlp_step_phased_fused``), the reference's phases otherwise."""
        if self._phased_fused_for(self._device):
            return self._mlp_step_phased_fused(slots, loss_t, loss_features, old_hidden, old_cell)
        return self._step_phased_reference(slots, loss_t, loss_features, old_hidden, old_cell)

    def _step_phased_reference(self, slots, loss_t, loss_features, old_hidden, old_cell):
        """With DTensor parameters: the reference's phases on local shards, each phase's sums
        completed across ranks in one collective per process group (lo_ops._distributed).
        The LSTM input of every tensor comes from its global sums, so every rank runs the
        per-tensor network on the same T rows and gets the same controls."""
        reduce = _distributed.all_reduce_sums
        groups, slots = [g for g, _ in slots], [s for _, s in slots]
        tensors = reference.slot_tensors(slots)
        saved = [t.clone() for t in tensors]
        decays = [self._velo_decays] * len(slots)
        g32s = [s.g32(clip=VELO_GRAD_CLIP) for s in slots]
        p32s = [s.p32() for s in slots]
        n_gsq = 2 * sum(1 for s in slots if s.geo.factored)
        first = reduce(reference.gsq_phase(slots, g32s)
                       + [ref.lstm_sums(s.p, s.g, s.momentum, s.rms, s.geo) for s in slots])
        gsq, sums = first[:n_gsq], first[n_gsq:]
        n_rows = n_gsq // 2
        second = reduce(reference.factored_phase(slots, decays, gsq) + [
            ref.lstm_spreads(s.momentum, s.rms, ref.momentum_means(total, s.geo), s.geo)
            for s, total in zip(slots, sums)
        ])
        row_sums, spreads = second[:n_rows], second[n_rows:]
        X = ref.lstm_rows(self._shared_lstm_inputs(loss_features), torch.stack(sums), torch.stack(spreads),
                          [s.geo for s in slots])
        nonfinite = torch.stack([total[5] for total in sums]).sum()
        finite = torch.isfinite(loss_t) & (nonfinite == 0)
        new_hidden, new_cell, controls, lr_mult = ref.per_tensor_network(X, old_hidden, old_cell, self._net)
        mlp_weights = ref.blend_mlp_weights(controls, self._mlp_sets)
        feature_fn = lambda i, g32, acc: ref.features(g32, p32s[i], acc)  # noqa: E731
        accs, partial = reference.feature_phase(slots, g32s, decays, row_sums, feature_fn)
        for i, (s, acc, total) in enumerate(zip(slots, accs, reduce(partial))):
            group = groups[i]
            ref.element_step(s, feature_fn(i, g32s[i], acc), p32s[i], total, mlp_weights[i], lr_mult[i],
                             lr=group_lr(group, self._device), weight_decay=float(group["weight_decay"]),
                             step_mult=self.step_mult, exp_mult=self.exp_mult)
        reference.keep_if(~finite, tensors, saved)
        return finite, new_hidden, new_cell
