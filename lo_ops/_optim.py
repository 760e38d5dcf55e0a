"""What the lo_ops optimizers share: argument checks, ``lr`` as a tensor, fused-kernel choice."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _distributed
from ._layout import dropped_axis, state_shapes
from ._reference import Geometry, Slot

logger = logging.getLogger(__name__)


class LearnedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose step runs lo_ops' fused ops (or their reference).

    Subclasses set ``_ops`` (the op names the step needs), ``_phase_ops`` (those the step of
    sharded parameters needs) and may extend ``add_param_group``.
    """

    _ops: tuple[str, ...] = ()
    _phase_ops: tuple[str, ...] = ()  # the ops of the step of sharded (DTensor) parameters
    #: Whether ``step`` reads the loss (VeLO, Celo, Celo-Adam); ``observe_loss`` hands it over.
    reads_loss: bool = False
    # The losses observed since the last step: (sum as a float32 0-d tensor, count, reduction),
    # and the loss they give the step (the step reads only this tensor, so a compiled step
    # does not depend on the count).
    _observed: tuple[Tensor, int, str] | None = None
    _observed_loss: Tensor | None = None

    def __init__(self, params, defaults: dict[str, Any], fused: bool | None,
                 constants: dict[str, Any] | None = None):
        # Constructor arguments that hold for the whole optimizer. ZeroRedundancyOptimizer
        # copies its keyword arguments into every param group: equal values there are dropped.
        self._constants = dict(constants or {})
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self._use_fused: dict[str, bool] = {}
        self._use_phased: dict[str, bool] = {}
        self._geometry: dict[Tensor, Geometry] = {}  # per parameter, from its global shape
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        for key, value in self._constants.items():
            if isinstance(param_group, dict) and key in param_group:
                given = param_group.pop(key)
                if given is not value and given != value:
                    raise ValueError(
                        f"{name}: {key} holds for the whole optimizer; pass it to {name}(...), not "
                        f"in a param group (got {given!r} there and {value!r} for the optimizer)"
                    )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        check_lr(group["lr"], f"param_groups[{gi}]['lr']")
        check_weight_decay(group["weight_decay"], f"param_groups[{gi}]['weight_decay']")
        if isinstance(group["weight_decay"], Tensor):  # the ops take it as a number
            group["weight_decay"] = float(group["weight_decay"].item())
        if isinstance(group["lr"], Tensor):  # a private copy: groups' schedulers must not alias
            group["lr"] = group["lr"].detach().clone()
        for pi, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{name} does not support complex parameters (param_groups[{gi}], "
                    f"parameter {pi}, dtype {p.dtype}); view them as real with torch.view_as_real"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"{name} needs floating-point parameters (param_groups[{gi}], "
                    f"parameter {pi}, dtype {p.dtype})"
                )
            if _distributed.is_dtensor(p):
                self._geometry[p] = _distributed.geometry(p, f"param_groups[{gi}] parameter {pi}")
                self._phased_fused_for(_distributed.local(p).device)
            else:
                self._geometry[p] = Geometry.of(p)
            self._fused_for(_distributed.local(p).device)
        place_lr(group)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hooks (which torch.optim leaves out too). torch.optim keeps only
        ``defaults``, ``state`` and ``param_groups``; a learned optimizer also needs its network,
        constants, kernel choices and global state, so a ``copy.deepcopy`` or a pickled copy
        steps exactly like the original."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_own_hooks()  # the copy starts without hooks, as in torch.optim

    # -- the loss of a step, handed over before it --------------------------------------------
    def observe_loss(self, loss, *, reduction: str = "mean", scaler=None) -> None:
        """Hands over the loss of one forward/backward pass, for training loops that call
        ``step()`` with neither a closure nor ``loss=`` (the Hugging Face Trainer, Lightning
        with a ``GradScaler``, gradient accumulation). The next ``step()`` reads the losses
        observed since the previous one: their mean (``reduction="mean"``, for the plain loss
        of each micro-batch) or their sum (``"sum"``, for losses already divided by the number
        of micro-batches, as the Trainer and Lightning divide them).

        The loss is detached and kept on its device: no host sync, no graph kept alive. With
        ``scaler`` (a ``torch.amp.GradScaler``), ``loss`` is the scaled loss and is divided by
        the scaler's current scale (on the device). ``zero_grad()`` and
        ``discard_observed_loss()`` drop losses observed but not yet stepped on (a step a
        ``GradScaler`` skipped never reads them). A ``loss=`` given to ``step`` takes the
        place of observed losses. Optimizers that do not read the loss (``reads_loss`` false:
        SmallFCLOpt) check the argument and ignore it.
        """
        name = type(self).__name__
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{name}.observe_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
        value = loss_value(loss, f"{name}.observe_loss")
        if scaler is not None and scaler.is_enabled():
            scale = scaler._get_scale_async()  # the scale tensor, read on the device
            if scale is not None:
                value = value / scale.to(value.device, torch.float32)
        if not self.reads_loss:
            return
        total, count = value, 1
        if self._observed is not None:
            total, count, given = self._observed
            if given != reduction:
                raise ValueError(
                    f"{name}.observe_loss: this step's losses were observed with reduction={given!r}, "
                    f"not {reduction!r}; use one reduction per step"
                )
            total, count = total + value.to(total.device), count + 1
        self._observed = (total, count, reduction)
        self._observed_loss = total / count if reduction == "mean" and count > 1 else total

    def discard_observed_loss(self) -> None:
        """Drops the losses observed since the last step (see ``observe_loss``)."""
        self._observed = self._observed_loss = None

    def _take_observed_loss(self) -> Tensor | None:
        """The loss the observed losses give this step (None if none), and forgets them."""
        loss = self._observed_loss
        self._observed = self._observed_loss = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's; also drops losses observed but not stepped on (``observe_loss``)."""
        self._observed = self._observed_loss = None
        super().zero_grad(set_to_none)

    def _register_own_hooks(self) -> None:
        """Registers the hooks the optimizer itself needs (at construction and on copies)."""

    def _local_slots(self, lists: list[list[Tensor]]) -> list[Slot]:
        """Reference slots of the local parts of the ops' lists (see _distributed.local_slots)."""
        return _distributed.local_slots(lists, [self._geometry[p] for p in lists[0]])

    def _expected_state(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """The state keys of parameter ``p`` and their shapes (all float32)."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, with the load_state_dict pre-hooks run first, so that they see (and
        may repair) the state dict before lo_ops checks it; then ``_load_state_dict``."""
        hooks = self._optimizer_load_state_dict_pre_hooks
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # run above, once
        try:
            self._load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts floating state to the parameter dtype; ours stays float32. The
        # saved state is checked before anything is replaced, so a bad state dict changes nothing.
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            super().load_state_dict(state_dict)  # raises torch.optim's error for this mismatch
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        restored = {}
        for pid, p in zip(saved_ids, params):
            if pid not in state_dict["state"]:
                continue
            got = state_dict["state"][pid]
            expected = self._expected_state(p)
            if set(got) != set(expected):
                raise ValueError(
                    f"load_state_dict: state of parameter {pid} has keys {sorted(got)}, but a "
                    f"parameter of shape {tuple(p.shape)} needs {sorted(expected)}"
                )
            # A scalar entry (a step count) may be a Python number, as torch.optim accepts.
            got = {key: (torch.tensor(float(v)) if expected.get(key) == () and isinstance(v, (int, float))
                         and not isinstance(v, bool) else v) for key, v in got.items()}
            for key, shape in expected.items():
                check_state_tensor(got[key], shape, f"state[{key!r}] of parameter {pid}")
            restored[p] = {
                key: got[key].detach().to(device=p.device, dtype=torch.float32, copy=True)
                for key in expected
            }
        super().load_state_dict(state_dict)
        for p, state in restored.items():
            self.state[p] = state
        for group in self.param_groups:
            place_lr(group)

    def _fused_for(self, device: torch.device) -> bool:
        """Whether the fused kernels serve ``device`` (decided once per device type)."""
        return self._kernels_for(device, self._ops, self._use_fused, "",
                                 "the (slower) pure-PyTorch reference")

    def _phased_fused_for(self, device: torch.device) -> bool:
        """Whether DTensor parameters on ``device`` take the fused phase ops (lo_ops._phases)
        rather than the phased reference (decided once per device type)."""
        return self._kernels_for(device, self._phase_ops, self._use_phased, ", which sharded (DTensor) parameters need",
                                 "the (slower) phased pure-PyTorch reference for DTensor parameters")

    def _kernels_for(self, device: torch.device, ops: tuple[str, ...], decided: dict[str, bool], need: str,
                     fallback: str) -> bool:
        """Whether every op of ``ops`` has a kernel for ``device``'s type, as ``self.fused``
        allows: ``True`` raises without one, ``None`` falls back to ``fallback`` (logged
        once). Decided once per device type and kept in ``decided``."""
        key = device.type
        if key not in decided:
            from . import has_kernel

            name = type(self).__name__
            missing = [op for op in ops if not has_kernel(op, key)]
            if self.fused is True and missing:
                raise RuntimeError(
                    f"{name}(fused=True): lo_ops was built without a {key} kernel for "
                    f"{', '.join(missing)}{need}; use fused=None to fall back to {fallback}"
                )
            use = not missing and self.fused is not False
            if not use and self.fused is None:
                logger.warning("%s: no fused %s kernel%s in this build; %s parameters use %s",
                               name, key, "s" if len(missing) > 1 else "", key, fallback)
            decided[key] = use
        return decided[key]

def split_buckets(lists: list[list[Tensor]]) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Splits the ops' argument lists of one group by the (device, dtype) of the parameters.

    ``lists`` is ``[params, grads, momentum, rms, fac_row, fac_col, fac_diag, *per_parameter]``:
    the first four and any further lists hold one entry per parameter, fac_row/fac_col one per
    parameter with ndim >= 2 and fac_diag one per other parameter, and each bucket keeps them
    aligned the same way.
    """
    params, fac_row, fac_col, fac_diag = lists[0], lists[4], lists[5], lists[6]
    per_parameter = [k for k in range(len(lists)) if k not in (4, 5, 6)]
    out: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    fi = di = 0
    for i, p in enumerate(params):
        b = out.setdefault((p.device, p.dtype), [[] for _ in lists])
        for k in per_parameter:
            b[k].append(lists[k][i])
        if p.dim() >= 2:
            b[4].append(fac_row[fi])
            b[5].append(fac_col[fi])
            fi += 1
        else:
            b[6].append(fac_diag[di])
            di += 1
    return out


_NO_RANGE = contextlib.nullcontext()


def phase(name: str):
    """A ``torch.profiler`` range called ``name`` (``lo_ops.<optimizer>.<phase>``) while a
    profiler or ``torch.autograd.profiler.emit_nvtx`` (NVTX ranges) is on; otherwise, and in a
    compiled step (where Dynamo would drop it with a warning), a shared null context, which
    costs one C++ flag check."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return _NO_RANGE
    return torch.autograd.profiler.record_function(name)


def loss_value(loss, what: str) -> Tensor:
    """A loss as a detached float32 0-d tensor on its own device (a Python number on the CPU)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{what}: the loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}")
        if loss.is_complex():
            raise ValueError(f"{what}: the loss must be real, got {loss.dtype}")
        return loss.detach().reshape(()).to(torch.float32)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=torch.float32)
    raise TypeError(f"{what}: the loss must be a scalar tensor or a number, got {type(loss).__name__}")


def group_lr(group: dict[str, Any], device: torch.device) -> Tensor:
    """The group's lr tensor on ``device``."""
    lr = group["lr"]
    return lr if lr.device == device else lr.to(device)


def accumulator_state(p: Tensor) -> dict[str, Tensor]:
    """Zero float32 accumulators of parameter ``p`` (``state_shapes``), as DTensors on its mesh
    when ``p`` is one (see ``_distributed.zeros_state``)."""
    if _distributed.is_dtensor(p):
        return {key: _distributed.zeros_state(p, shape, dropped=dropped_axis(p.shape, key))
                for key, shape in state_shapes(p.shape).items()}
    return {key: torch.zeros(shape, dtype=torch.float32, device=p.device)
            for key, shape in state_shapes(p.shape).items()}


def place_lr(group: dict[str, Any]) -> None:
    """Makes group["lr"] a float32 0-d tensor, on the parameters' device when they share one."""
    lr = group["lr"]
    lr = lr.detach().reshape(()).float() if isinstance(lr, Tensor) else torch.tensor(float(lr))
    devices = {_distributed.local(p).device for p in group["params"]}
    if len(devices) == 1:
        lr = lr.to(next(iter(devices)))
    group["lr"] = lr


def check_lr(lr, name):
    value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {lr!r}")


def check_weight_decay(wd, name):
    """A finite number >= 0, or a one-element real tensor holding one (kept as a Python number)."""
    if isinstance(wd, Tensor):
        if wd.numel() != 1 or wd.is_complex() or wd.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got {wd!r}")
        wd = wd.item()
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {wd!r}")


def check_state_tensor(value, expected_shape, what: str) -> None:
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"load_state_dict: {what} should be a tensor of shape {tuple(expected_shape)}, "
            f"got {getattr(value, 'shape', type(value))}"
        )
