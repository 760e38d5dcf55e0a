"""Pure-PyTorch HyperV2 family (VeLO, spec section 3; Celo and Celo-Adam, section 5), written
for reading.

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

from .._layout import (
    VELO_DECAYS,
    VELO_GRAD_CLIP,
    VELO_LOSS_BUFFER,
    VELO_NUM_FEATURES,
    VELO_PARAM_INITS,
    VELO_TIME_OFFSETS,
    unpack_velo_mlp,
)
from .._reference import (
    Geometry,
    PartialSum,
    Reduce,
    Slot,
    apply_update,
    factored_phase,
    feature_phase,
    gsq_phase,
    keep_if,
    local_sums,
    mlp,
    normalise,
    slot_tensors,
    slots_of,
)

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


def time_features(iteration: Tensor, num_steps: float) -> Tensor:
    """``tanh(10 * (t/N - q))`` with ``t/N = float32(t) / float32(N)`` (a true division on
    every device)."""
    q = torch.tensor(VELO_TIME_OFFSETS, dtype=torch.float32, device=iteration.device)
    n = torch.full((), float(num_steps), dtype=torch.float32, device=iteration.device)
    return torch.tanh(10 * (iteration.float() / n - q))


def shared_lstm_inputs(iteration: Tensor, num_steps: float, loss_features: Tensor) -> Tensor:
    """The 18 LSTM inputs that are the same for every tensor: time features, then the loss
    features (VeLO's first 18; all of Celo's, spec 5.1)."""
    return torch.cat([time_features(iteration.reshape(()), num_steps), loss_features.float()])


def lstm_sums(p: Tensor, g: Tensor, momentum: Tensor, rms: Tensor, geo: Geometry) -> PartialSum:
    """The plain sums behind a tensor's LSTM input, float64 ``[6]``: sum p^2, sum m_k (3),
    sum v, and the number of non-finite gradient elements."""
    p64 = p.double().reshape(-1)
    return torch.cat([
        (p64 * p64).sum()[None], momentum.double().reshape(3, -1).sum(dim=1), rms.double().sum()[None],
        (~torch.isfinite(g)).sum().double()[None],
    ]), geo.all_groups()


def momentum_means(sums: Tensor, geo: Geometry) -> Tensor:
    """The momentum means ``[3]`` (float64) from the complete ``lstm_sums``."""
    return sums[1:4] / max(geo.numel, 1)


def lstm_spreads(momentum: Tensor, rms: Tensor, mu: Tensor, geo: Geometry) -> PartialSum:
    """Sums of squares about the tensor's momentum means ``mu``, float64 ``[6]``:
    sum (m_k - mu_k)^2 (3) and sum (v - mu_k)^2 (3)."""
    m = momentum.double().reshape(3, -1)
    v = rms.double().reshape(1, -1)
    return torch.cat([((m - mu[:, None]) ** 2).sum(dim=1), ((v - mu[:, None]) ** 2).sum(dim=1)]), geo.all_groups()


def lstm_row(shared: Tensor, sums: Tensor, spreads: Tensor, geo: Geometry) -> Tensor:
    """A tensor's 30 LSTM inputs: ``shared`` (time and loss features, [18]), then the ones
    from its complete sums. ``s = rsqrt(max(1e-9, mean p^2))`` scales m and v by s (their
    second moments by s^2). Over no elements the means are 0."""
    n = max(geo.numel, 1)
    s = torch.rsqrt(torch.clamp((sums[0] / n).float(), min=1e-9))
    onehot = torch.zeros(5, dtype=torch.float32, device=shared.device)
    dims = sum(1 for d in geo.shape if d > 1)
    if dims < 5:
        onehot[dims] = 1.0
    return torch.cat([
        shared, _cla((sums[4] / n).float() * s)[None], onehot,
        _cla((spreads[0:3] / n).float() * (s * s)), _cla((spreads[3:6] / n).float() * (s * s)),
    ])


def lstm_rows(shared: Tensor, sums: Tensor, spreads: Tensor, geos: list[Geometry]) -> Tensor:
    """``lstm_row`` of T tensors at once: ``sums`` and ``spreads`` are their complete
    ``lstm_sums`` and ``lstm_spreads`` stacked ([T, 6] each)."""
    T = len(geos)
    n = torch.tensor([max(geo.numel, 1) for geo in geos], dtype=torch.float64, device=shared.device)
    s = torch.rsqrt(torch.clamp((sums[:, 0] / n).float(), min=1e-9))
    onehot = torch.zeros(T, 5, dtype=torch.float32)
    for i, geo in enumerate(geos):
        dims = sum(1 for d in geo.shape if d > 1)
        if dims < 5:
            onehot[i, dims] = 1.0
    s2 = (s * s)[:, None]
    return torch.cat([
        shared.expand(T, -1), _cla((sums[:, 4] / n).float() * s)[:, None], onehot.to(shared.device),
        _cla((spreads[:, 0:3] / n[:, None]).float() * s2), _cla((spreads[:, 3:6] / n[:, None]).float() * s2),
    ], dim=1)


@torch.no_grad()
def velo_lstm_input(params, grads, momentum, rms, loss_features, iteration, num_steps):
    """Reference of ``lo_ops::velo_lstm_input``: ``(X [T, 30], all grads finite)``."""
    device = loss_features.device
    shared = shared_lstm_inputs(iteration, float(num_steps), loss_features)
    geos = [Geometry.of(p) for p in params]
    sums = [lstm_sums(p, g, m, v, geo)[0] for p, g, m, v, geo in zip(params, grads, momentum, rms, geos)]
    rows = []
    for m, v, total, geo in zip(momentum, rms, sums, geos):
        spreads = lstm_spreads(m, v, momentum_means(total, geo), geo)[0]
        rows.append(lstm_row(shared, total, spreads, geo))
    X = torch.stack(rows) if rows else torch.zeros(0, 30, device=device)
    nonfinite = sum((total[5] for total in sums), torch.zeros((), dtype=torch.float64, device=device))
    return X, nonfinite == 0


# -- the per-tensor network (spec 3.3, 3.4) -------------------------------------------------------
def per_tensor_network(X: Tensor, hidden: Tensor, cell: Tensor, net,
                       valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mixing, max-pool over tensors, LSTM cell and heads, batched over the T rows of ``X``.
    Rows whose ``valid`` is 0 (padding) are left out of the max-pool.

    Returns ``(hidden', cell', controls [T, sets], lr_mult [T])``: VeLO's raw heads; for Celo
    and Celo-Adam ``lr_mult = 0.1 * exp(h s + s0)`` and no controls (None: with one weight
    set their softmax is 1, spec 5.2).
    """
    u = torch.relu(torch.nn.functional.linear(X, net.mix_in.weight, net.mix_in.bias))
    if valid is not None:
        u = u * valid[:, None]  # u >= 0: zero rows never win the max over valid ones
    pooled = u.amax(dim=0, keepdim=True)
    x = torch.nn.functional.linear(X, net.mix_out.weight, net.mix_out.bias) + pooled
    gates = torch.nn.functional.linear(torch.cat([x, hidden], dim=1), net.lstm.weight, net.lstm.bias)
    i, g, f, o = gates.chunk(4, dim=1)
    new_cell = torch.sigmoid(f + 1) * cell + torch.sigmoid(i) * torch.tanh(g)
    new_hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    lr_mult = torch.nn.functional.linear(new_hidden, net.to_lr_mult.weight, net.to_lr_mult.bias)[:, 0]
    controls = None
    if net.config.param_inits > 1:
        controls = torch.nn.functional.linear(new_hidden, net.to_controls.weight, net.to_controls.bias)
    if net.config.exp_lr_mult:
        lr_mult = 0.1 * torch.exp(lr_mult)
    return new_hidden, new_cell, controls, lr_mult


def blend_mlp_weights(controls: Tensor, mlp_sets: Tensor) -> Tensor:
    """Each tensor's VeLO MLP weights, ``100 * mean_k(controls[i, k] * set_k)``: ``[T, 159]``."""
    return (controls @ mlp_sets) * _MLP_BLEND_SCALE


def shared_mlp_weights(mlp_sets: Tensor, T: int) -> Tensor:
    """Celo's MLP weights of T tensors: the one set as is (``mean`` over one set of
    ``set * softmax(controls) = set * 1``, no factor 100; spec 5.2), ``[T, 159]``."""
    return mlp_sets[:1].expand(T, -1).contiguous()


# -- per-element features and update (spec 3.5) ----------------------------------------------------
def features(g32: Tensor, p32: Tensor, acc: dict[str, Tensor]) -> Tensor:
    """The 30 un-normalised features of spec 3.5, ``[n, 30]`` in channel order."""
    m, v = acc["m"], acc["v"]
    fac_mom = m * (acc["factor"] if "factor" in acc else torch.rsqrt(acc["u"]))  # no epsilon
    v_rsqrt = torch.rsqrt(v + 1e-6)
    return torch.cat([
        g32[None], torch.clamp(g32, -0.1, 0.1)[None], p32[None], m, v[None], m * v_rsqrt,
        v_rsqrt[None], acc["fac_g"], (g32 * v_rsqrt)[None],
        acc["row"], acc["col"], acc["row_rsqrt"], acc["col_rsqrt"], fac_mom,
    ]).reshape(VELO_NUM_FEATURES, -1).T


_P_CHANNEL = 2  # the p channel: its sum of squares is sum p^2


@torch.no_grad()
def velo_slots(slots: list[Slot], *, lr, mlp_weights: Tensor, lr_mult: Tensor, weight_decay, step_mult,
               exp_mult, reduce: Reduce = local_sums) -> None:
    """One VeLO per-element step of every slot, with slot i's blended MLP ``mlp_weights[i]``
    and ``lr_mult[i]`` (slots of no elements are left as they are)."""
    keep = [i for i, s in enumerate(slots) if s.geo.numel > 0]
    slots = [slots[i] for i in keep]
    if not slots:
        return
    decays = [torch.tensor(VELO_DECAYS, dtype=torch.float32, device=slots[0].p.device)] * len(slots)
    g32s = [s.g32(clip=VELO_GRAD_CLIP) for s in slots]
    p32s = [s.p32() for s in slots]
    feature_fn = lambda i, g32, acc: features(g32, p32s[i], acc)  # noqa: E731
    row_sums = reduce(factored_phase(slots, decays, reduce(gsq_phase(slots, g32s))))
    accs, partial = feature_phase(slots, g32s, decays, row_sums, feature_fn)
    for i, (s, acc, sums) in enumerate(zip(slots, accs, reduce(partial))):
        element_step(s, feature_fn(i, g32s[i], acc), p32s[i], sums, mlp_weights[keep[i]], lr_mult[keep[i]],
                     lr=lr, weight_decay=weight_decay, step_mult=step_mult, exp_mult=exp_mult)


def element_step(s: Slot, feats: Tensor, p32: Tensor, sums: Tensor, mlp_weights: Tensor, lr_mult: Tensor, *,
                 lr, weight_decay, step_mult, exp_mult) -> None:
    """The update of one slot from its features and their complete sums of squares."""
    out = mlp(normalise(feats, sums, s.geo), unpack_velo_mlp(mlp_weights))
    direction, magnitude = out[:, 0], out[:, 1]
    param_scale = torch.sqrt((sums[_P_CHANNEL] / s.geo.numel).float() + 1e-9)
    step = lr_mult * direction * param_scale * torch.exp(exp_mult * magnitude) * step_mult
    apply_update(s.p, p32, step, lr, weight_decay)


@torch.no_grad()
def velo_step_(params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr, mlp_weights,
               lr_mult, skip, weight_decay, step_mult, exp_mult):
    """Reference of ``torch.ops.lo_ops.velo_step_`` (same arguments, same effect).

    ``skip`` (bool, one element): when true nothing changes. Selected with ``torch.where``,
    so there is no host sync.
    """
    slots = slots_of(params, grads, momentum, rms, fac_row, fac_col, fac_diag)
    tensors = slot_tensors(slots)
    saved = [t.clone() for t in tensors]
    velo_slots(slots, lr=lr.float().reshape(()), mlp_weights=mlp_weights, lr_mult=lr_mult,
               weight_decay=weight_decay, step_mult=step_mult, exp_mult=exp_mult)
    keep_if(skip.reshape(()).bool(), tensors, saved)


# -- Celo-Adam's update (spec 5.3) ------------------------------------------------------------------
CELO_ADAM_BETAS = (0.9, 0.999)


def bias_correction(decay: float, tau: Tensor) -> Tensor:
    """``1 - decay**tau`` in float32, the power of the float32 ``decay`` evaluated in float64
    and rounded to float32 (what the original's float32 arithmetic gives)."""
    d = torch.tensor(decay, dtype=torch.float32).double()
    return 1 - torch.pow(d.to(tau.device), tau.double()).float()


@torch.no_grad()
def celo_adam_step_(params, grads, exp_avg, exp_avg_sq, lr, lr_mult, iteration, skip, weight_decay,
                    step_mult, epsilon):
    """Reference of ``torch.ops.lo_ops.celo_adam_step_`` (same arguments, same effect; ``skip``
    selected with ``torch.where``, no host sync)."""
    if not params:
        return
    skip = skip.reshape(()).bool()
    lr = lr.float().reshape(())
    tau = iteration.float().reshape(()) + 1
    bc1, bc2 = (bias_correction(b, tau) for b in CELO_ADAM_BETAS)
    b1, b2 = (torch.tensor(b, dtype=torch.float32, device=lr.device) for b in CELO_ADAM_BETAS)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        g32 = torch.clamp(g.float(), -VELO_GRAD_CLIP, VELO_GRAD_CLIP)
        new_m = b1 * m + (1 - b1) * g32
        new_v = b2 * v + (1 - b2) * g32 * g32
        lr_i = lr_mult[i] * torch.tensor(step_mult, dtype=torch.float32, device=lr.device)
        step = (new_m / bc1) * (lr_i / (epsilon + torch.sqrt(new_v / bc2 + 1e-10)))
        new_p = p.float() - lr * step
        new_p = new_p - lr * weight_decay * new_p
        m.copy_(torch.where(skip, m, new_m))
        v.copy_(torch.where(skip, v, new_v))
        p.copy_(torch.where(skip, p, new_p.to(p.dtype)))
