"""``lo_ops.MuLO``: μLO, small_fc_lopt under the maximal-update parameterization (spec 6)."""

from __future__ import annotations

import math
import os
from typing import Any

from torch import Tensor, nn

from .optimizer import SmallFCLOpt

NO_WEIGHTS = (
    "MuLO needs its meta-weights, which lo_ops does not ship. Pass pretrained= the published "
    "μLO weights by Hugging Face repo id (PyLO's 'btherien/mulo'), a local directory in PyLO's "
    "MetaMLP layout or lo_ops' own, or a SmallFCLOptNetwork"
)


class MuLO(SmallFCLOpt):
    """μLO (Thérien et al. 2024): small_fc_lopt meta-trained on μP models, exact to the
    original ``MuAdafacMLPLOpt`` (spec 6).

    The step is small_fc_lopt's (same fused op, same state) with three differences, all
    inside the kernels: every gradient element goes through ``nan_to_num`` first (NaN -> 0,
    +-inf -> +-FLT_MAX), ``step_mult`` defaults to 0.01, and each step is multiplied by the
    tensor's μP multiplier ``s``: ``p <- p - lr * s * step``.

    ``s`` is the param-group key ``mup_scale`` (a Python number > 0, default 1.0): the original's
    ``hidden_lr_mult / fan_in`` for hidden matrices (both dimensions grow with the width; raw
    ``fan_in``, not relative to a base model) and 1 for everything else.
    ``lo_ops.mup.param_groups(model)`` builds the groups. LR schedulers change ``lr`` only.

    Args:
        params: parameters or param groups (group keys: ``lr``, ``weight_decay``, ``mup_scale``).
        lr: multiplies every step (``lr = 1`` reproduces the original); a 0-d tensor, as for
            SmallFCLOpt.
        weight_decay: decoupled, ``p <- p - lr * weight_decay * p``, NOT multiplied by ``s``
            (so the decay per step does not depend on the width, as μP's MuAdam intends;
            PyLO's MuLO multiplies it by ``s``). The original has none.
        pretrained: required: a Hugging Face repo id (``"btherien/mulo"``), a local directory
            in PyLO's MetaMLP layout (PyLO's μLO decay offsets) or lo_ops' layout, or a
            ``SmallFCLOptNetwork``.
        step_mult: default 0.01 (the original's ``--adafac_step_mult``), whatever the checkpoint.
        exp_mult, decay_offsets, capturable, fused, revision: as for SmallFCLOpt.

    Non-finite gradients: μLO follows its original, whose ``nan_to_num`` makes every gradient
    finite; that takes the place of lo_ops' skip-the-step rule for this optimizer (a step is
    never skipped; an infinite gradient becomes FLT_MAX, whose square overflows the
    accumulators as it does in the original).
    """

    _profile_name = "mulo"
    _default_step_mult = 0.01
    _group_defaults = {"mup_scale": 1.0}
    _nan_to_num = True

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
        if pretrained is None:
            raise ValueError(NO_WEIGHTS)
        super().__init__(params, lr, weight_decay, pretrained=pretrained, step_mult=step_mult,
                         exp_mult=exp_mult, decay_offsets=decay_offsets, capturable=capturable,
                         fused=fused, revision=revision)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "mup_scale" in param_group:
            check_mup_scale(param_group["mup_scale"], f"param_groups[{len(self.param_groups)}]['mup_scale']")
        super().add_param_group(param_group)

    def _step_scale(self, group) -> float:
        return float(group["mup_scale"])


def check_mup_scale(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a finite Python number > 0 (the tensor's μP multiplier s: "
            f"hidden_lr_mult / fan_in for hidden matrices, 1 otherwise), got {value!r}"
        )
