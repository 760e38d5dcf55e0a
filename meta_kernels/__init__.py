"""Fake (meta) kernels of the lo_ops ops, for torch.compile, FakeTensor and the meta device.

Installed as ``lo_ops.meta_kernels``; importing ``lo_ops`` registers them. They validate the
arguments the way the real kernels do and return empty tensors of the shapes the kernels return.
"""

from __future__ import annotations

import math

import torch

from lo_ops._layout import (
    NUM_DECAYS,
    NUM_FEATURES as SMALL_FC_LOPT_FEATURES,
    PACKED_NUMEL,
    VELO_LOSS_FEATURES,
    VELO_LSTM_INPUTS,
    VELO_MLP_NUMEL,
    VELO_NUM_FEATURES,
    state_shapes,
)

__all__ = [
    "celo_adam_step_fake",
    "factored_gsq_sums_fake",
    "factored_update_fake",
    "small_fc_lopt_apply_fake",
    "small_fc_lopt_feature_sums_fake",
    "small_fc_lopt_step_fake",
    "velo_apply_fake",
    "velo_feature_sums_fake",
    "velo_lstm_input_fake",
    "velo_lstm_moments_fake",
    "velo_lstm_rows_fake",
    "velo_step_fake",
]


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
    decays, weight_decay, step_mult, exp_mult, skip=None, step_scale=1.0, nan_to_num=False,
):
    _check_skip("small_fc_lopt_step_", skip)
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
    _check_skip(op, skip)
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


# -- phase ops (parameters that may be shards; see lo_ops.cpp) ------------------------------------
_GEOMETRY_WIDTH = 5


def _phase_axes(op, tensors, global_geometry):
    """(d0, d1) of each tensor from ``global_geometry``, checked as the kernels check it."""
    torch._check(
        len(global_geometry) == _GEOMETRY_WIDTH * len(tensors),
        lambda: f"{op}: global_geometry must hold {_GEOMETRY_WIDTH} integers per tensor "
        f"({_GEOMETRY_WIDTH * len(tensors)}), got {len(global_geometry)}",
    )
    axes = []
    for i, t in enumerate(tensors):
        d0, d1 = global_geometry[_GEOMETRY_WIDTH * i], global_geometry[_GEOMETRY_WIDTH * i + 1]
        if t.dim() >= 2:
            torch._check(
                0 <= d0 < t.dim() and 0 <= d1 < t.dim() and d0 != d1,
                lambda: f"{op}: global_geometry of tensor {i} has axes d0 = {d0}, d1 = {d1}; they must "
                f"be two different axes of its {t.dim()} dimensions",
            )
        else:
            torch._check(d0 == -1 and d1 == -1, lambda: f"{op}: global_geometry of tensor {i} must have d0 = d1 = -1")
        axes.append((d0, d1))
    return axes


def _without(shape, *axes):
    return [s for a, s in enumerate(shape) if a not in axes]


def _row_sum_shapes(params, axes):
    return [[3, *_without(p.shape, *ax)] for p, ax in zip(params, axes) if p.dim() >= 2]


def _check_phase_state(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag, axes):
    _check_accumulators(op, params, grads, momentum, rms)
    n_factored = sum(1 for p in params if p.dim() >= 2)
    torch._check(
        len(fac_row) == n_factored and len(fac_col) == n_factored and len(fac_diag) == len(params) - n_factored,
        lambda: f"{op}: fac_row/fac_col need {n_factored} entries and fac_diag {len(params) - n_factored}",
    )
    fi = di = 0
    for p, (d0, d1) in zip(params, axes):
        if p.dim() >= 2:
            _check_state(fac_row[fi], "fac_row", fi, p, [3, *_without(p.shape, d0)], op)
            _check_state(fac_col[fi], "fac_col", fi, p, [3, *_without(p.shape, d1)], op)
            fi += 1
        else:
            _check_state(fac_diag[di], "fac_diag", di, p, [3, *p.shape], op)
            di += 1


def _check_row_sums(op, row_sums, params, axes):
    shapes = _row_sum_shapes(params, axes)
    torch._check(len(row_sums) == len(shapes), lambda: f"{op}: row_sums needs {len(shapes)} entries")
    for k, (t, shape) in enumerate(zip(row_sums, shapes)):
        torch._check(
            t.dtype == torch.float64 and list(t.shape) == shape,
            lambda: f"{op}: row_sums[{k}] must be float64 of shape {shape}, got {t.dtype} {tuple(t.shape)}",
        )


@torch.library.register_fake("lo_ops::factored_gsq_sums")
def factored_gsq_sums_fake(grads, global_geometry, grad_clip, nan_to_num=False):
    axes = _phase_axes("factored_gsq_sums", grads, global_geometry)
    return [g.new_empty(_without(g.shape, axis), dtype=torch.float64)
            for g, ax in zip(grads, axes) if g.dim() >= 2 for axis in ax]


@torch.library.register_fake("lo_ops::factored_update_")
def factored_update_fake(params, fac_row, fac_col, gsq_sums, decays, skip, global_geometry):
    op = "factored_update_"
    axes = _phase_axes(op, params, global_geometry)
    factored = [(p, ax) for p, ax in zip(params, axes) if p.dim() >= 2]
    torch._check(
        len(fac_row) == len(factored) and len(fac_col) == len(factored) and len(gsq_sums) == 2 * len(factored),
        lambda: f"{op}: fac_row/fac_col need {len(factored)} entries and gsq_sums {2 * len(factored)}",
    )
    for k, (p, (d0, d1)) in enumerate(factored):
        _check_state(fac_row[k], "fac_row", k, p, [3, *_without(p.shape, d0)], op)
        _check_state(fac_col[k], "fac_col", k, p, [3, *_without(p.shape, d1)], op)
    torch._check(
        decays.dtype == torch.float32 and decays.shape in ((NUM_DECAYS,), (len(params), NUM_DECAYS)),
        lambda: f"{op}: decays must be float32 [{NUM_DECAYS}] or [{len(params)}, {NUM_DECAYS}]",
    )
    total = sum(math.prod(shape) for shape in _row_sum_shapes(params, axes))
    return decays.new_empty((total,), dtype=torch.float64)


def _feature_sums_fake(op, features, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums,
                       global_geometry):
    axes = _phase_axes(op, params, global_geometry)
    _check_phase_state(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag, axes)
    _check_row_sums(op, row_sums, params, axes)
    return momentum[0].new_empty((len(params), features), dtype=torch.float64) if params else None


@torch.library.register_fake("lo_ops::small_fc_lopt_feature_sums_")
def small_fc_lopt_feature_sums_fake(params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums, decays,
                                    skip, global_geometry, nan_to_num=False):
    _check_skip("small_fc_lopt_feature_sums_", skip)
    out = _feature_sums_fake("small_fc_lopt_feature_sums_", SMALL_FC_LOPT_FEATURES, params, grads, momentum,
                             rms, fac_row, fac_col, fac_diag, row_sums, global_geometry)
    return out if out is not None else decays.new_empty((0, SMALL_FC_LOPT_FEATURES), dtype=torch.float64)


@torch.library.register_fake("lo_ops::velo_feature_sums_")
def velo_feature_sums_fake(params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums, skip,
                           global_geometry):
    _check_skip("velo_feature_sums_", skip)
    out = _feature_sums_fake("velo_feature_sums_", VELO_NUM_FEATURES, params, grads, momentum, rms, fac_row,
                             fac_col, fac_diag, row_sums, global_geometry)
    return out if out is not None else skip.new_empty((0, VELO_NUM_FEATURES), dtype=torch.float64)


def _check_skip(op, skip):
    if skip is not None:
        torch._check(skip.dtype == torch.bool and skip.numel() == 1,
                     lambda: f"{op}: skip must be a bool tensor with one element")


def _check_feature_sums(op, feature_sums, n, features):
    torch._check(
        feature_sums.dtype == torch.float64 and tuple(feature_sums.shape) == (n, features),
        lambda: f"{op}: feature_sums must be float64 [{n}, {features}], got {feature_sums.dtype} "
        f"{tuple(feature_sums.shape)}",
    )


@torch.library.register_fake("lo_ops::small_fc_lopt_apply_")
def small_fc_lopt_apply_fake(params, grads, momentum, rms, fac_row, fac_col, fac_diag, state_steps, lr,
                             meta_weights, decays, skip, row_sums, feature_sums, global_geometry,
                             weight_decay, step_mult, exp_mult, step_scale=1.0, nan_to_num=False):
    op = "small_fc_lopt_apply_"
    _check_skip(op, skip)
    axes = _phase_axes(op, params, global_geometry)
    _check_phase_state(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag, axes)
    torch._check(len(state_steps) == len(params), lambda: f"{op}: state_steps needs one entry per parameter")
    _check_row_sums(op, row_sums, params, axes)
    _check_feature_sums(op, feature_sums, len(params), SMALL_FC_LOPT_FEATURES)


@torch.library.register_fake("lo_ops::velo_apply_")
def velo_apply_fake(params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr, mlp_weights, lr_mult, skip,
                    row_sums, feature_sums, global_geometry, weight_decay, step_mult, exp_mult):
    op = "velo_apply_"
    axes = _phase_axes(op, params, global_geometry)
    _check_phase_state(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag, axes)
    n = len(params)
    torch._check(
        mlp_weights.dtype == torch.float32 and mlp_weights.shape == (n, VELO_MLP_NUMEL),
        lambda: f"{op}: mlp_weights must be float32 [{n}, {VELO_MLP_NUMEL}]",
    )
    torch._check(lr_mult.dtype == torch.float32 and lr_mult.shape == (n,), lambda: f"{op}: lr_mult must be float32 [{n}]")
    _check_skip(op, skip)
    _check_row_sums(op, row_sums, params, axes)
    _check_feature_sums(op, feature_sums, n, VELO_NUM_FEATURES)


@torch.library.register_fake("lo_ops::velo_lstm_moments")
def velo_lstm_moments_fake(params, grads, momentum, rms, momentum_means):
    op = "velo_lstm_moments"
    _check_accumulators(op, params, grads, momentum, rms)
    if momentum_means is not None:
        torch._check(
            momentum_means.dtype == torch.float64 and tuple(momentum_means.shape) == (len(params), 3),
            lambda: f"{op}: momentum_means must be float64 [{len(params)}, 3]",
        )
    if params:
        return params[0].new_empty((len(params), 6), dtype=torch.float64)
    if momentum_means is not None:
        return momentum_means.new_empty((0, 6))
    return torch.empty((0, 6), dtype=torch.float64)


@torch.library.register_fake("lo_ops::velo_lstm_rows")
def velo_lstm_rows_fake(loss_features, iteration, num_steps, sums, spreads, numels, dims):
    op = "velo_lstm_rows"
    T = len(numels)
    torch._check(len(dims) == T, lambda: f"{op}: numels and dims must have the same length")
    torch._check(num_steps > 0, lambda: f"{op}: num_steps must be > 0")
    for name, t in (("sums", sums), ("spreads", spreads)):
        torch._check(
            t.dtype == torch.float64 and tuple(t.shape) == (T, 6),
            lambda: f"{op}: {name} must be float64 [{T}, 6], got {t.dtype} {tuple(t.shape)}",
        )
    return loss_features.new_empty((T, VELO_LSTM_INPUTS))


@torch.library.register_fake("lo_ops::celo_adam_step_")
def celo_adam_step_fake(params, grads, exp_avg, exp_avg_sq, lr, lr_mult, iteration, skip, weight_decay,
                        step_mult, epsilon):
    op = "celo_adam_step_"
    n = len(params)
    torch._check(
        len(grads) == n and len(exp_avg) == n and len(exp_avg_sq) == n,
        lambda: f"{op}: params, grads, exp_avg and exp_avg_sq must have the same length",
    )
    torch._check(lr.numel() == 1, lambda: f"{op}: lr must have one element")
    torch._check(lr_mult.dtype == torch.float32 and lr_mult.shape == (n,), lambda: f"{op}: lr_mult must be float32 [{n}]")
    torch._check(iteration.numel() == 1 and iteration.dtype == torch.float32,
                 lambda: f"{op}: iteration must be a float32 tensor with one element")
    _check_skip(op, skip)
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(p.is_floating_point() and p.dtype == params[0].dtype,
                     lambda: f"{op}: params[{i}] must be {params[0].dtype}")
        torch._check(g.shape == p.shape and g.dtype == p.dtype and g.device == p.device,
                     lambda: f"{op}: grads[{i}] must match its parameter's shape, dtype and device")
        _check_state(exp_avg[i], "exp_avg", i, p, p.shape, op)
        _check_state(exp_avg_sq[i], "exp_avg_sq", i, p, p.shape, op)
