"""Fake (meta) kernels of the lo_ops ops, for torch.compile, FakeTensor and the meta device.

Installed as ``lo_ops.meta_kernels``; importing ``lo_ops`` registers them. They validate the
arguments the way the real kernels do and return nothing (every op here mutates in place).
"""

from __future__ import annotations

import torch

from lo_ops._layout import (
    NUM_DECAYS,
    PACKED_NUMEL,
    VELO_LOSS_FEATURES,
    VELO_LSTM_INPUTS,
    VELO_MLP_NUMEL,
    state_shapes,
)

__all__ = ["small_fc_lopt_step_fake", "velo_lstm_input_fake", "velo_step_fake"]


def _check_state(t, name, i, p, expected, op="small_fc_lopt_step_"):
    torch._check(
        t.device == p.device,
        lambda: f"{op}: {name}[{i}] is on {t.device} but its parameter is on {p.device}",
    )
    torch._check(
        t.dtype == torch.float32,
        lambda: f"{op}: {name}[{i}] must be float32, got {t.dtype}",
    )
    torch._check(
        tuple(t.shape) == tuple(expected),
        lambda: f"{op}: {name}[{i}] has shape {tuple(t.shape)}, expected {tuple(expected)}",
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
        meta_weights.dtype == torch.float32 and meta_weights.device == device
        and meta_weights.shape in ((PACKED_NUMEL,), (n, PACKED_NUMEL)),
        lambda: f"small_fc_lopt_step_: meta_weights must be float32 [{PACKED_NUMEL}] or [{n}, {PACKED_NUMEL}] on {device}",
    )
    torch._check(
        decays.dtype == torch.float32 and decays.device == device
        and decays.shape in ((NUM_DECAYS,), (n, NUM_DECAYS)),
        lambda: f"small_fc_lopt_step_: decays must be float32 [{NUM_DECAYS}] or [{n}, {NUM_DECAYS}] on {device}",
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


def _check_accumulators(op, params, grads, momentum, rms):
    n = len(params)
    torch._check(
        len(grads) == n and len(momentum) == n and len(rms) == n,
        lambda: f"{op}: params, grads, momentum and rms must have the same length",
    )
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(p.is_floating_point(), lambda: f"{op}: params[{i}] must be floating point")
        torch._check(
            g.shape == p.shape and g.dtype == p.dtype and g.device == p.device,
            lambda: f"{op}: grads[{i}] must match its parameter's shape, dtype and device",
        )
        shapes = state_shapes(p.shape)
        _check_state(momentum[i], "momentum", i, p, shapes["momentum"], op)
        _check_state(rms[i], "rms", i, p, shapes["rms"], op)


@torch.library.register_fake("lo_ops::velo_lstm_input")
def velo_lstm_input_fake(params, grads, momentum, rms, loss_features, iteration, num_steps):
    op = "velo_lstm_input"
    _check_accumulators(op, params, grads, momentum, rms)
    torch._check(
        loss_features.dtype == torch.float32 and loss_features.shape == (VELO_LOSS_FEATURES,),
        lambda: f"{op}: loss_features must be float32 [{VELO_LOSS_FEATURES}]",
    )
    torch._check(
        iteration.numel() == 1 and iteration.dtype == torch.float32,
        lambda: f"{op}: iteration must be a float32 tensor with one element",
    )
    torch._check(num_steps > 0, lambda: f"{op}: num_steps must be > 0")
    X = loss_features.new_empty((len(params), VELO_LSTM_INPUTS))
    finite = loss_features.new_empty((), dtype=torch.bool)
    return X, finite


@torch.library.register_fake("lo_ops::velo_step_")
def velo_step_fake(params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr, mlp_weights,
                   lr_mult, skip, weight_decay, step_mult, exp_mult):
    op = "velo_step_"
    _check_accumulators(op, params, grads, momentum, rms)
    n = len(params)
    n_factored = sum(1 for p in params if p.dim() >= 2)
    torch._check(
        len(fac_row) == n_factored and len(fac_col) == n_factored and len(fac_diag) == n - n_factored,
        lambda: f"{op}: fac_row/fac_col need {n_factored} entries and fac_diag {n - n_factored}",
    )
    torch._check(lr.numel() == 1, lambda: f"{op}: lr must have one element")
    torch._check(
        mlp_weights.dtype == torch.float32 and mlp_weights.shape == (n, VELO_MLP_NUMEL),
        lambda: f"{op}: mlp_weights must be float32 [{n}, {VELO_MLP_NUMEL}]",
    )
    torch._check(
        lr_mult.dtype == torch.float32 and lr_mult.shape == (n,),
        lambda: f"{op}: lr_mult must be float32 [{n}]",
    )
    torch._check(
        skip.dtype == torch.bool and skip.numel() == 1,
        lambda: f"{op}: skip must be a bool tensor with one element",
    )
    fi = di = 0
    for i, p in enumerate(params):
        shapes = state_shapes(p.shape)
        if p.dim() >= 2:
            _check_state(fac_row[fi], "fac_row", fi, p, shapes["fac_row"], op)
            _check_state(fac_col[fi], "fac_col", fi, p, shapes["fac_col"], op)
            fi += 1
        else:
            _check_state(fac_diag[di], "fac_diag", di, p, shapes["fac_diag"], op)
            di += 1
