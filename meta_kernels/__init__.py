"""Fake (meta) kernels of the lo_ops ops, for torch.compile, FakeTensor and the meta device.

Installed as ``lo_ops.meta_kernels``; importing ``lo_ops`` registers them. They validate the
arguments the way the real kernels do and return nothing (every op here mutates in place).
"""

from __future__ import annotations

import torch

from lo_ops._layout import NUM_DECAYS, PACKED_NUMEL, state_shapes

__all__ = ["small_fc_lopt_step_fake"]


def _check_state(t, name, i, p, expected):
    torch._check(
        t.device == p.device,
        lambda: f"small_fc_lopt_step_: {name}[{i}] is on {t.device} but its parameter is on {p.device}",
    )
    torch._check(
        t.dtype == torch.float32,
        lambda: f"small_fc_lopt_step_: {name}[{i}] must be float32, got {t.dtype}",
    )
    torch._check(
        tuple(t.shape) == tuple(expected),
        lambda: f"small_fc_lopt_step_: {name}[{i}] has shape {tuple(t.shape)}, expected {tuple(expected)}",
    )


@torch.library.register_fake("lo_ops::small_fc_lopt_step_")
def small_fc_lopt_step_fake(
    params, grads, momentum, rms, fac_row, fac_col, fac_diag, state_steps, lr, meta_weights,
    decays, weight_decay, step_mult, exp_mult,
):
    n = len(params)
    torch._check(
        len(grads) == n and len(momentum) == n and len(rms) == n and len(state_steps) == n,
        lambda: "small_fc_lopt_step_: params, grads, momentum, rms and state_steps must have the same length",
    )
    n_factored = sum(1 for p in params if p.dim() >= 2)
    torch._check(
        len(fac_row) == n_factored and len(fac_col) == n_factored,
        lambda: f"small_fc_lopt_step_: fac_row/fac_col need {n_factored} entries (tensors with ndim >= 2)",
    )
    torch._check(
        len(fac_diag) == n - n_factored,
        lambda: f"small_fc_lopt_step_: fac_diag needs {n - n_factored} entries (tensors with ndim < 2)",
    )
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    torch._check(lr.numel() == 1, lambda: "small_fc_lopt_step_: lr must have one element")
    torch._check(lr.device == device, lambda: f"small_fc_lopt_step_: lr is on {lr.device}, params on {device}")
    torch._check(
        meta_weights.dtype == torch.float32 and meta_weights.shape == (PACKED_NUMEL,)
        and meta_weights.device == device,
        lambda: f"small_fc_lopt_step_: meta_weights must be float32 [{PACKED_NUMEL}] on {device}",
    )
    torch._check(
        decays.dtype == torch.float32 and decays.shape == (NUM_DECAYS,) and decays.device == device,
        lambda: f"small_fc_lopt_step_: decays must be float32 [{NUM_DECAYS}] on {device}",
    )
    fi = di = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(
            p.device == device,
            lambda: f"small_fc_lopt_step_: params[{i}] is on {p.device} but params[0] is on {device}",
        )
        torch._check(
            p.dtype == dtype and p.is_floating_point(),
            lambda: f"small_fc_lopt_step_: params[{i}] is {p.dtype}, expected {dtype}",
        )
        torch._check(
            g.device == device and g.dtype == dtype,
            lambda: f"small_fc_lopt_step_: grads[{i}] must be {dtype} on {device}",
        )
        torch._check(
            g.shape == p.shape,
            lambda: f"small_fc_lopt_step_: grads[{i}] has shape {tuple(g.shape)} but its parameter has shape {tuple(p.shape)}",
        )
        shapes = state_shapes(p.shape)
        _check_state(momentum[i], "momentum", i, p, shapes["momentum"])
        _check_state(rms[i], "rms", i, p, shapes["rms"])
        torch._check(
            state_steps[i].numel() == 1 and state_steps[i].dtype == torch.float32
            and state_steps[i].device == device,
            lambda: f"small_fc_lopt_step_: state_steps[{i}] must be a float32 one-element tensor on {device}",
        )
        if p.dim() >= 2:
            _check_state(fac_row[fi], "fac_row", fi, p, shapes["fac_row"])
            _check_state(fac_col[fi], "fac_col", fi, p, shapes["fac_col"])
            fi += 1
        else:
            _check_state(fac_diag[di], "fac_diag", di, p, shapes["fac_diag"])
            di += 1
