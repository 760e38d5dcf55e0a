"""Pure-PyTorch reference of small_fc_lopt (spec section 2), written for reading.

``small_fc_lopt_step_`` has the same signature and state layout as
``torch.ops.lo_ops.small_fc_lopt_step_`` and is the oracle of the test suite. The optimizer
uses it for devices that have no fused kernel. The accumulators and the phases of a step are
lo_ops._reference's, which VeLO and Celo share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import TIME_SCALES, unpack_weights

FLOAT32_MAX = 3.4028234663852886e38
from .._reference import (
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

def features(g32: Tensor, p32: Tensor, acc: dict[str, Tensor]) -> Tensor:
    """The 28 un-normalised features of spec section 2, ``[n, 28]`` in channel order."""
    m, v = acc["m"], acc["v"]
    fac_mom = m * (acc["factor"] if "factor" in acc else torch.rsqrt(acc["u"] + 1e-6))
    v_rsqrt = torch.rsqrt(v + 1e-6)
    return torch.cat(
        [g32[None], p32[None], m, v[None], m * v_rsqrt, v_rsqrt[None], acc["fac_g"],
         acc["row"], acc["col"], acc["row_rsqrt"], acc["col_rsqrt"], fac_mom]
    ).reshape(28, -1).T



@torch.no_grad()
def small_fc_lopt_slots(slots: list[Slot], steps: list[Tensor], *, lr, weights: list, decays: list,
                        weight_decay, step_mult, exp_mult, reduce: Reduce = local_sums,
                        skip: Tensor | None = None, step_scale=1.0, nan_to_num: bool = False) -> Tensor:
    """One small_fc_lopt step of every slot (``weights``/``decays`` per slot, ``steps`` the
    float32 step counts, incremented; ``lr``, ``weight_decay`` and ``step_scale`` for all
    slots, or lists with one per slot). A NaN or an infinity in any gradient, or ``skip`` true
    (a bool scalar), leaves everything unchanged and the steps uncounted, decided on the
    device: the step is computed, then undone. Returns that decision (true: skipped).

    μLO (spec 6.1): ``nan_to_num`` maps every gradient element through nan_to_num first (then
    no gradient is non-finite), and ``step_scale`` (its s) multiplies the float32 step."""
    ts = [step.detach().clone().float() for step in steps]  # steps already taken
    tensors = slot_tensors(slots)
    saved = [t.clone() for t in tensors]
    found = torch.zeros((), dtype=torch.bool, device=slots[0].p.device if slots else None)
    if not nan_to_num:
        bad = reduce([((~torch.isfinite(s.g)).sum().double()[None], s.geo.all_groups()) for s in slots])
        found = torch.cat(bad).sum() > 0 if bad else found
    skip = found if skip is None else found | skip.reshape(()).to(found.device)
    for step in steps:
        step.add_((~skip).to(step.dtype))
    n = len(slots)
    lrs = lr if isinstance(lr, list) else [lr] * n
    wds = weight_decay if isinstance(weight_decay, list) else [weight_decay] * n
    step_scales = step_scale if isinstance(step_scale, list) else [step_scale] * n
    keep = [i for i, s in enumerate(slots) if s.geo.numel > 0]
    slots, ts = [slots[i] for i in keep], [ts[i] for i in keep]
    weights, decays = [weights[i] for i in keep], [decays[i] for i in keep]
    lrs, wds = [lrs[i] for i in keep], [wds[i] for i in keep]
    step_scales = [step_scales[i] for i in keep]
    g32s = [s.g32() for s in slots]
    if nan_to_num:
        g32s = [torch.nan_to_num(g, nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX) for g in g32s]
    p32s = [s.p32() for s in slots]
    feature_fn = lambda i, g32, acc: features(g32, p32s[i], acc)  # noqa: E731
    row_sums = reduce(factored_phase(slots, decays, reduce(gsq_phase(slots, g32s))))
    accs, partial = feature_phase(slots, g32s, decays, row_sums, feature_fn)
    for i, (s, acc, sums) in enumerate(zip(slots, accs, reduce(partial))):
        feats = normalise(feature_fn(i, g32s[i], acc), sums, s.geo)
        scales = torch.tensor(TIME_SCALES, dtype=torch.float32, device=s.p.device)
        time = torch.tanh(ts[i] / scales - 1).expand(feats.shape[0], -1)
        out = mlp(torch.cat([feats, time], dim=1), [w.float() for w in weights[i]])
        direction, magnitude = out[:, 0], out[:, 1]
        step = direction * torch.exp(magnitude * exp_mult) * step_mult
        if step_scales[i] != 1.0:  # μLO: the float32 step times the float32 s
            step = step * torch.tensor(step_scales[i], dtype=torch.float32)
        apply_update(s.p, p32s[i], step, lrs[i], wds[i])
    keep_if(skip, tensors, saved)
    return skip


@torch.no_grad()
def small_fc_lopt_step_(
    params, grads, momentum, rms, fac_row, fac_col, fac_diag, state_steps, lr, meta_weights,
    decays, weight_decay, step_mult, exp_mult, skip=None, step_scale=1.0, nan_to_num=False,
):
    """Reference of ``torch.ops.lo_ops.small_fc_lopt_step_`` (same arguments, same effect).

    ``meta_weights`` ([P]) and ``decays`` ([7]) serve every tensor, or hold one row per tensor
    ([T, P], [T, 7]).
    """
    slots = slots_of(params, grads, momentum, rms, fac_row, fac_col, fac_diag)
    n = len(params)
    weights = [unpack_weights(meta_weights[i] if meta_weights.dim() == 2 else meta_weights) for i in range(n)]
    per_decays = [decays[i] if decays.dim() == 2 else decays for i in range(n)]
    small_fc_lopt_slots(
        slots, list(state_steps), lr=lr.float().reshape(()), weights=weights, decays=per_decays,
        weight_decay=weight_decay, step_mult=step_mult, exp_mult=exp_mult, skip=skip,
        step_scale=float(step_scale), nan_to_num=nan_to_num,
    )
