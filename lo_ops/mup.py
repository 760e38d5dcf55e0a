"""μP helpers for ``lo_ops.MuLO`` (spec 6.2, 6.3), with no need for a patched ``mup`` package.

- ``param_groups(model)``: MuLO's param groups, each tensor's μP multiplier as the group key
  ``mup_scale``: ``hidden_lr_mult / fan_in`` for hidden matrices, 1 for everything else.
- ``hidden_matrices(model)``: which weights are hidden, and their ``fan_in``.
- ``MuReadout``: the readout layer of the μLO tasks, ``(x W^T + b) * output_mult / fan_in``
  with a zero-initialised weight.
- ``init_(model)``: the μLO tasks' initialisation.

Which weights are hidden (both dimensions grow with the width):

1. When the model was prepared with ``mup.set_base_shapes``, each parameter's ``infshape`` says
   it: a weight with two infinite dimensions is hidden. Only the role is read from ``mup``; the
   multiplier stays the original's raw ``1 / fan_in`` (``weight.shape[1]``), never mup's
   base-relative ``1 / width_mult``.
2. Otherwise, from the model's layers: a width is a size that is both some layer's output and
   some layer's input (e.g. an MLP's hidden width, a transformer's ``d_model`` and MLP width;
   not the data's input size, nor the number of classes or the vocabulary, which are only
   one or the other). A ``nn.Linear`` weight whose out and in features are both widths is hidden
   (MLP hidden layers, attention q/k/v/out, transformer MLPs), and so is, as lo_ops' choice
   since the original defines no hidden convolution, a ``nn.Conv*d`` kernel whose out and in
   channels are both widths, with ``fan_in`` its in-channels (as PyLO). Embeddings, norms,
   biases, ``MuReadout`` and a patch-embedding conv (in-channels 3) are not hidden.
   A model whose input size equals its width (a 128-128-128-10 MLP) makes its input layer look
   hidden: pass ``hidden=`` (names) to say exactly which weights are hidden.

No ``mup`` import is needed; a model prepared with ``mup`` works as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MuReadout", "hidden_matrices", "init_", "param_groups"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MuReadout(nn.Linear):
    """The μLO tasks' readout (spec 6.3): ``logits = (x W^T + b) * output_mult / in_features``,
    the multiplier applied after the bias (``mup`` 1.0.0's ``MuReadout`` applies it to the input,
    leaving the bias unscaled); the weight starts at zero and the bias ~ N(0, 1). MuLO gives the
    readout ``mup_scale = 1``: its μP lives here."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, output_mult: float = 1.0,
                 device=None, dtype=None):
        self.output_mult = float(output_mult)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * (self.output_mult / self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", output_mult={self.output_mult}"


def _fan_in(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _widths(model: nn.Module) -> set[int]:
    outs, ins = set(), set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            outs.add(m.out_features)
            ins.add(m.in_features)
        elif isinstance(m, _LAYERS):
            outs.add(m.out_channels)
            ins.add(m.in_channels)
    return outs & ins


def hidden_matrices(model: nn.Module, hidden: Iterable[str] | Callable[[str, Tensor], bool] | None = None
                    ) -> dict[str, int]:
    """``{parameter name: fan_in}`` of the model's hidden weights (see the module docstring).

    ``hidden``: names of the hidden weights (or a predicate ``(name, parameter) -> bool``), to
    say it instead of inferring it; their ``fan_in`` is ``shape[1]`` (a PyTorch ``[out, in,
    ...]`` weight)."""
    named = dict(model.named_parameters())
    if hidden is not None:
        chosen = [n for n, p in named.items() if hidden(n, p)] if callable(hidden) else list(hidden)
        unknown = sorted(set(chosen) - set(named))
        if unknown:
            raise ValueError(f"hidden names parameters the model does not have: {unknown}")
        for n in chosen:
            if named[n].dim() < 2:
                raise ValueError(f"hidden: {n} has shape {tuple(named[n].shape)}; a hidden weight has >= 2 dims")
        return {n: int(named[n].shape[1]) for n in chosen}
    infshapes = {n: getattr(p, "infshape", None) for n, p in named.items()}
    if any(s is not None for s in infshapes.values()):  # prepared with mup.set_base_shapes
        return {n: int(named[n].shape[1]) for n, s in infshapes.items()
                if s is not None and s.ninf() == 2 and named[n].dim() >= 2}
    widths = _widths(model)
    out: dict[str, int] = {}
    for prefix, m in model.named_modules():
        if isinstance(m, MuReadout) or not isinstance(m, _LAYERS) or m.weight is None:
            continue
        out_size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if out_size in widths and _fan_in(m) in widths:
            out[f"{prefix}.weight" if prefix else "weight"] = _fan_in(m)
    return out


def param_groups(model: nn.Module, *, hidden_lr_mult: float = 1.0,
                 hidden: Iterable[str] | Callable[[str, Tensor], bool] | None = None,
                 **group_options: Any) -> list[dict[str, Any]]:
    """MuLO's param groups for ``model``: one group per distinct multiplier, ``mup_scale`` =
    ``hidden_lr_mult / fan_in`` (computed in double; MuLO rounds it to float32 once) for hidden
    weights and 1 for every other parameter that requires grad. Each group also carries the
    names of its parameters (``"names"``) and ``group_options`` (e.g. ``weight_decay``)::

        opt = lo_ops.MuLO(lo_ops.mup.param_groups(model), pretrained="btherien/mulo")
    """
    if isinstance(hidden_lr_mult, bool) or not isinstance(hidden_lr_mult, (int, float)) \
            or not math.isfinite(hidden_lr_mult) or hidden_lr_mult <= 0:
        raise ValueError(f"hidden_lr_mult must be a finite number > 0, got {hidden_lr_mult!r}")
    fan_ins = hidden_matrices(model, hidden)
    groups: dict[float, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = float(hidden_lr_mult) / fan_ins[name] if name in fan_ins else 1.0
        group = groups.setdefault(scale, {"params": [], "names": [], "mup_scale": scale, **group_options})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


@torch.no_grad()
def init_(model: nn.Module) -> nn.Module:
    """The μLO tasks' initialisation (spec 6.3), in place: every ``nn.Linear`` / ``nn.Conv*d``
    weight but the readout ~ a normal of std ``1/sqrt(fan_in)`` truncated at two standard
    deviations without the usual std correction (so about ``0.88/sqrt(fan_in)``; ``fan_in`` =
    in features, or in-channels times kernel size), every bias ~ N(0, 1), ``MuReadout``
    weights 0. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, MuReadout):
            m.reset_parameters()
        elif isinstance(m, _LAYERS):
            fan_in = m.weight[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 1.0)
    return model
