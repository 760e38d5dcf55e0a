"""Pure-PyTorch reference of small_fc_lopt (spec section 2), written for reading.

It has the same signature and state layout as ``torch.ops.lo_ops.small_fc_lopt_step_`` and is
the oracle of the test suite. The optimizer uses it for devices that have no fused kernel.
"""

from __future__ import annotations

import torch

from ._layout import TIME_SCALES, factored_axes, unpack_weights


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def _ema(state: torch.Tensor, value: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    return decay * state + (1 - decay) * value


def _channels(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [3] vector shaped to broadcast against [3, *S] with len(S) == ndim."""
    return x.view(3, *([1] * ndim))


def update_accumulators(g32, momentum, rms, fac_row, fac_col, fac_diag, decays, shape):
    """Spec 1.1: updates the accumulators in place with ``g32`` and returns the per-element
    inputs of the features, each broadcast to ``[3, *shape]`` or ``shape``: ``m``, ``v``,
    ``fac_g``, ``row``/``col`` (r, c broadcast back, or u), their ``row_rsqrt``/``col_rsqrt``
    (rsqrt(x + 1e-8)), and ``factor`` (row_factor * col_factor) or ``u`` (unfactored)."""
    nd = len(shape)
    mom_decay, rms_decay, fac_decay = decays[0:3], decays[3].clamp(0, 1), decays[4:7].clamp(0, 1)
    m = momentum.view(3, *shape)
    m.copy_(_ema(m, g32, _channels(mom_decay, nd)))
    v = rms.view(shape)
    v.copy_(_ema(v, g32 * g32, rms_decay))
    gsq = g32 * g32 + 1e-30
    out = {"m": m, "v": v}
    if fac_row is not None:
        d0, d1 = factored_axes(shape)
        r, c = fac_row, fac_col
        r.copy_(_ema(r, gsq.mean(dim=d0), _channels(fac_decay, nd - 1)))
        c.copy_(_ema(c, gsq.mean(dim=d1), _channels(fac_decay, nd - 1)))
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_factor = _safe_rsqrt(r / (r.mean(dim=1 + reduced_d1, keepdim=True) + 1e-9))
        col_factor = _safe_rsqrt(c)
        r_b = r.unsqueeze(1 + d0)  # broadcast back along d0
        c_b = c.unsqueeze(1 + d1)  # broadcast back along d1
        out["factor"] = row_factor.unsqueeze(1 + d0) * col_factor.unsqueeze(1 + d1)
        out["fac_g"] = g32 * out["factor"]
        out["row"], out["col"] = r_b.expand(3, *shape), c_b.expand(3, *shape)
        out["row_rsqrt"] = torch.rsqrt(r_b + 1e-8).expand(3, *shape)
        out["col_rsqrt"] = torch.rsqrt(c_b + 1e-8).expand(3, *shape)
    else:
        u = fac_diag.view(3, *shape)
        u.copy_(_ema(u, gsq, _channels(fac_decay, nd)))
        out["u"] = u
        out["fac_g"] = g32 * _safe_rsqrt(u + 1e-9)
        out["row"] = out["col"] = u
        out["row_rsqrt"] = out["col_rsqrt"] = torch.rsqrt(u + 1e-8)
    return out


@torch.no_grad()
def small_fc_lopt_update(
    p, g, momentum, rms, fac_row, fac_col, fac_diag, step, *, lr, weights, decays,
    weight_decay, step_mult, exp_mult,
):
    """One step for one tensor. fac_row/fac_col are None for ndim < 2, fac_diag otherwise."""
    t = step.detach().clone().float()  # steps already taken (before this one)
    step.add_(1)
    if p.numel() == 0:
        return
    w0, b0, w1, b1, w2, b2 = (w.float() for w in weights)
    shape = p.shape if p.dim() > 0 else torch.Size([1])  # a 0-d tensor is treated as [1]
    g32 = g.float().reshape(shape)
    p32 = p.float().reshape(shape)

    # 1. accumulators
    acc = update_accumulators(g32, momentum, rms, fac_row, fac_col, fac_diag, decays, shape)
    m, v = acc["m"], acc["v"]
    fac_mom = m * (acc["factor"] if p.dim() >= 2 else torch.rsqrt(acc["u"] + 1e-6))

    # 2. the 28 per-element features, channel order of the spec
    v_rsqrt = torch.rsqrt(v + 1e-6)
    feats = torch.cat(
        [g32[None], p32[None], m, v[None], m * v_rsqrt, v_rsqrt[None], acc["fac_g"],
         acc["row"], acc["col"], acc["row_rsqrt"], acc["col_rsqrt"], fac_mom]
    ).reshape(28, -1).T
    # 3. second-moment normalisation per channel
    feats = feats * torch.rsqrt(1e-5 + feats.square().mean(dim=0))
    # 4. time features
    scales = torch.tensor(TIME_SCALES, dtype=torch.float32, device=p.device)
    time = torch.tanh(t / scales - 1).expand(feats.shape[0], -1)
    x = torch.cat([feats, time], dim=1)
    # 5. MLP
    h = torch.relu(x @ w0.T + b0)
    h = torch.relu(h @ w1.T + b1)
    out = h @ w2.T + b2
    # 6. step and update
    direction, magnitude = out[:, 0], out[:, 1]
    update = direction * torch.exp(magnitude * exp_mult) * step_mult
    new_p = p32 - lr * update.view(shape)
    new_p = new_p - lr * weight_decay * new_p
    p.copy_(new_p.view(p.shape))


def factored_state(params, fac_row, fac_col, fac_diag):
    """Yields ``(i, p, fac_row, fac_col, fac_diag)`` per parameter from the ops' lists (the
    factored lists hold tensors with ndim >= 2 in order, fac_diag the others); the entries a
    parameter does not have are None."""
    fi = di = 0
    for i, p in enumerate(params):
        if p.dim() >= 2:
            yield i, p, fac_row[fi], fac_col[fi], None
            fi += 1
        else:
            yield i, p, None, None, fac_diag[di]
            di += 1


@torch.no_grad()
def small_fc_lopt_step_(
    params, grads, momentum, rms, fac_row, fac_col, fac_diag, state_steps, lr, meta_weights,
    decays, weight_decay, step_mult, exp_mult,
):
    """Reference of ``torch.ops.lo_ops.small_fc_lopt_step_`` (same arguments, same effect).

    ``meta_weights`` ([P]) and ``decays`` ([7]) serve every tensor, or hold one row per tensor
    ([T, P], [T, 7]).
    """
    lr = lr.float().reshape(())
    for i, p, row, col, diag in factored_state(params, fac_row, fac_col, fac_diag):
        small_fc_lopt_update(
            p, grads[i], momentum[i], rms[i], row, col, diag, state_steps[i], lr=lr,
            weights=unpack_weights(meta_weights[i] if meta_weights.dim() == 2 else meta_weights),
            decays=decays[i] if decays.dim() == 2 else decays, weight_decay=weight_decay,
            step_mult=step_mult, exp_mult=exp_mult,
        )
