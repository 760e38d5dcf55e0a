"""Pure-PyTorch VeLO (spec section 3), written for reading.

- ``loss_buffer_update``, ``per_tensor_network`` and ``blend_mlp_weights`` work on all tensors
  at once (a few small tensor ops, no Python loop over parameters); the optimizer uses them as
  they are, on every device.
- ``velo_lstm_input`` and ``velo_step_`` have the signatures of ``torch.ops.lo_ops.velo_lstm_input``
  and ``torch.ops.lo_ops.velo_step_``; they are the oracle of the tests, and the optimizer's
  path for devices without a fused kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._layout import (
    VELO_DECAYS,
    VELO_LOSS_BUFFER,
    VELO_NUM_FEATURES,
    VELO_PARAM_INITS,
    VELO_TIME_OFFSETS,
    unpack_velo_mlp,
)
from .reference import factored_state, update_accumulators

_MLP_BLEND_SCALE = 100.0 / VELO_PARAM_INITS  # 100 * mean over the weight sets


# -- loss buffer (spec 3.1) -----------------------------------------------------------------------
def loss_buffer_decays(num_steps: int) -> Tensor:
    """``exp(-1 / h)`` with ``h = 10 ** linspace(1, log10(num_steps), 10)``, float32."""
    h = 10.0 ** torch.linspace(1.0, math.log10(num_steps), VELO_LOSS_BUFFER, dtype=torch.float64)
    return torch.exp(-1.0 / h).float()


def loss_buffer_update(means: Tensor, rmin: Tensor, iteration: Tensor, loss: Tensor,
                       decays: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One update of the loss buffer; returns ``(means, running_min, features[9])``, new tensors.

    ``iteration`` counts the updates before this one (a float32 0-d tensor); ``loss`` is a
    float32 0-d tensor.
    """
    it1 = iteration + 1
    debias = 1 - decays ** it1
    cor = means / debias
    a = torch.where(iteration == 0, loss, cor.max())
    clipped = torch.minimum(2 * a.abs(), loss)
    new_means = decays * means + (1 - decays) * clipped
    new_cor = new_means / debias
    new_rmin = torch.minimum(rmin, new_cor)
    ratio = (new_cor[:-1] - new_rmin[:-1]) / torch.clamp(new_cor[1:] - new_rmin[:-1], min=1e-8)
    features = torch.clamp(ratio - 1, -1, 1)
    features = torch.where(it1 <= 2, torch.zeros_like(features), features)
    return new_means, new_rmin, features


# -- per-tensor LSTM input (spec 3.2) -------------------------------------------------------------
def _cla(x: Tensor) -> Tensor:
    return 0.5 * torch.clamp(torch.log(1e-8 + (10 * x).abs()), -5, 5)


def _mean(x: Tensor, dim=None) -> Tensor:
    """Mean that is 0 over no elements (an empty parameter)."""
    n = x.numel() if dim is None else x.shape[dim]
    return (x.sum() if dim is None else x.sum(dim=dim)) / max(n, 1)


def time_features(iteration: Tensor, num_steps: float) -> Tensor:
    q = torch.tensor(VELO_TIME_OFFSETS, dtype=torch.float32, device=iteration.device)
    return torch.tanh(10 * (iteration.float() / num_steps - q))


@torch.no_grad()
def velo_lstm_input(params, grads, momentum, rms, loss_features, iteration, num_steps):
    """Reference of ``lo_ops::velo_lstm_input``: ``(X [T, 30], all grads finite)``."""
    time = time_features(iteration.reshape(()), float(num_steps))
    rows = []
    for p, m, v in zip(params, momentum, rms):
        p32 = p.float().reshape(-1)
        s = torch.rsqrt(torch.clamp(_mean(p32 * p32), min=1e-9))
        ms = m.reshape(3, -1) * s
        vs = v.reshape(-1) * s
        onehot = torch.zeros(5, dtype=torch.float32, device=p.device)
        dims = sum(1 for d in p.shape if d > 1)
        if dims < 5:
            onehot[dims] = 1.0
        m_mean = _mean(ms, dim=1)
        rows.append(torch.cat([
            time, loss_features.float(), _cla(_mean(vs))[None], onehot,
            _cla(_mean((ms - m_mean[:, None]) ** 2, dim=1)),
            _cla(_mean((vs[None] - m_mean[:, None]) ** 2, dim=1)),
        ]))
    device = loss_features.device
    X = torch.stack(rows) if rows else torch.zeros(0, 30, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for g in grads:
        finite = finite & torch.isfinite(g).all()
    return X, finite


# -- the per-tensor network (spec 3.3, 3.4) -------------------------------------------------------
def per_tensor_network(X: Tensor, hidden: Tensor, cell: Tensor, net) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mixing, max-pool over tensors, LSTM cell and heads, batched over the T rows of ``X``.

    Returns ``(hidden', cell', controls [T, 256], lr_mult [T])``.
    """
    u = torch.relu(torch.nn.functional.linear(X, net.mix_in.weight, net.mix_in.bias))
    pooled = u.amax(dim=0, keepdim=True)
    x = torch.nn.functional.linear(X, net.mix_out.weight, net.mix_out.bias) + pooled
    gates = torch.nn.functional.linear(torch.cat([x, hidden], dim=1), net.lstm.weight, net.lstm.bias)
    i, g, f, o = gates.chunk(4, dim=1)
    new_cell = torch.sigmoid(f + 1) * cell + torch.sigmoid(i) * torch.tanh(g)
    new_hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    controls = torch.nn.functional.linear(new_hidden, net.to_controls.weight, net.to_controls.bias)
    lr_mult = torch.nn.functional.linear(new_hidden, net.to_lr_mult.weight, net.to_lr_mult.bias)[:, 0]
    return new_hidden, new_cell, controls, lr_mult


def blend_mlp_weights(controls: Tensor, mlp_sets: Tensor) -> Tensor:
    """Each tensor's MLP weights, ``100 * mean_k(controls[i, k] * set_k)``: ``[T, 159]``."""
    return (controls @ mlp_sets) * _MLP_BLEND_SCALE


# -- per-element features and update (spec 3.5) ----------------------------------------------------
@torch.no_grad()
def velo_update(p, g, momentum, rms, fac_row, fac_col, fac_diag, *, lr, mlp, lr_mult,
                weight_decay, step_mult, exp_mult):
    """One VeLO step for one tensor with its blended MLP ``mlp`` ([159]) and ``lr_mult`` (0-d)."""
    if p.numel() == 0:
        return
    shape = p.shape if p.dim() > 0 else torch.Size([1])
    g32 = torch.clamp(g.float().reshape(shape), -1000, 1000)
    p32 = p.float().reshape(shape)
    param_scale = torch.sqrt((p32 * p32).mean() + 1e-9)
    decays = torch.tensor(VELO_DECAYS, dtype=torch.float32, device=p.device)
    acc = update_accumulators(g32, momentum, rms, fac_row, fac_col, fac_diag, decays, shape)
    m, v = acc["m"], acc["v"]
    fac_mom = m * (acc["factor"] if p.dim() >= 2 else torch.rsqrt(acc["u"]))  # no epsilon
    v_rsqrt = torch.rsqrt(v + 1e-6)
    feats = torch.cat([
        g32[None], torch.clamp(g32, -0.1, 0.1)[None], p32[None], m, v[None], m * v_rsqrt,
        v_rsqrt[None], acc["fac_g"], (g32 * v_rsqrt)[None],
        acc["row"], acc["col"], acc["row_rsqrt"], acc["col_rsqrt"], fac_mom,
    ]).reshape(VELO_NUM_FEATURES, -1).T
    feats = feats * torch.rsqrt(1e-5 + feats.square().mean(dim=0))
    w0, b0, w1, b1, w2, b2 = unpack_velo_mlp(mlp)
    h = torch.relu(feats @ w0.T + b0)
    h = torch.relu(h @ w1.T + b1)
    out = h @ w2.T + b2
    direction, magnitude = out[:, 0], out[:, 1]
    step = lr_mult * direction * param_scale * torch.exp(exp_mult * magnitude) * step_mult
    new_p = p32 - lr * step.view(shape)
    new_p = new_p - lr * weight_decay * new_p
    p.copy_(new_p.view(p.shape))


@torch.no_grad()
def velo_step_(params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr, mlp_weights,
               lr_mult, skip, weight_decay, step_mult, exp_mult):
    """Reference of ``torch.ops.lo_ops.velo_step_`` (same arguments, same effect).

    ``skip`` (bool, one element): when true nothing changes. Selected with ``torch.where``,
    so there is no host sync.
    """
    lr = lr.float().reshape(())
    keep = skip.reshape(()).bool()
    for i, p, row, col, diag in factored_state(params, fac_row, fac_col, fac_diag):
        tensors = [t for t in (p, momentum[i], rms[i], row, col, diag) if t is not None]
        saved = [t.clone() for t in tensors]
        velo_update(p, grads[i], momentum[i], rms[i], row, col, diag, lr=lr, mlp=mlp_weights[i],
                    lr_mult=lr_mult[i], weight_decay=weight_decay, step_mult=step_mult,
                    exp_mult=exp_mult)
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(keep, old, t))
