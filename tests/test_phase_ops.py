"""The phase ops (the fused step of sharded parameters): on whole tensors they equal the
one-call ops bitwise; on shards (split here in one process, the sums added up across the
shards by hand) they equal the one-call op on the whole tensor; opcheck; bad input."""

import math

import pytest
import torch

import lo_ops  # noqa: F401
from lo_ops import _phases
from lo_ops import _reference as reference
from lo_ops._layout import VELO_DECAYS, VELO_GRAD_CLIP, VELO_MLP_NUMEL, effective_decays, factored_axes
from lo_ops.small_fc_lopt.network import normalised_adam_network

from helpers import SHAPES, make_params, make_state

ops = torch.ops.lo_ops
# Where the checks run: the CPU here; tests/test_cuda.py runs them on a GPU.
DEVICE = "cpu"
_ZERO_OFFSETS = {"momentum": [0.0] * 3, "rms": [0.0], "adafactor": [0.0] * 3}


def _network():
    gen = torch.Generator().manual_seed(3)
    net = normalised_adam_network()
    with torch.no_grad():  # a dense network, so that every input matters
        for layer in net.layers:
            layer.weight.normal_(0, 0.3, generator=gen)
            layer.bias.normal_(0, 0.1, generator=gen)
    return net.packed_weights().to(DEVICE)


def _t(value, **kw):
    return torch.tensor(value, device=DEVICE, **kw)


def _decays():
    return effective_decays(_ZERO_OFFSETS).to(DEVICE)


def _lists(shapes, dtype, seed=0):
    """params, grads, momentum, rms, fac_row, fac_col, fac_diag (plain, contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach() for p in make_params(shapes, dtype, seed=seed, non_contiguous=False)]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    return [[t.to(DEVICE) for t in ts] for ts in (params, grads, *make_state(params, gen))]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _velo_extra(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, VELO_MLP_NUMEL, generator=gen) * 0.3).to(DEVICE), torch.rand(n, generator=gen).to(DEVICE)


# -- whole tensors: the phases are the one-call op ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mulo", [False, True])
def test_small_fc_lopt_phases_equal_the_step_op_bitwise(dtype, mulo):
    """mulo: μLO's step multiplier and nan_to_num, with NaN and +-inf in the gradients (in bf16
    and fp16 too: +-inf becomes float32's FLT_MAX, which neither of them can hold)."""
    shapes = SHAPES + [(4100,), (64, 300)]
    weights, decays, lr = _network(), _decays(), _t(0.3)
    a = _lists(shapes, dtype)
    options = {}
    if mulo:
        options = {"step_scale": 1 / 37, "nan_to_num": True}
        grads = a[1]
        grads[0].view(-1)[0] = float("nan")
        grads[-1][5, 7], grads[-1][9, 1], grads[-1][20, 299] = float("inf"), -float("inf"), float("nan")
        grads[-2][4099] = float("nan")
    b = _clone(a)
    steps_a = [_t(4.0) for _ in shapes]
    steps_b = [_t(4.0) for _ in shapes]
    ops.small_fc_lopt_step_(*a, steps_a, lr, weights, decays, 0.01, 0.001, 0.5, None, **options)
    skip = _phases.small_fc_lopt_step(
        reference.slots_of(*b), steps_b, groups=[0] * len(shapes), lrs=[lr], weight_decays=[0.01], weights=weights,
        decays=decays, step_mult=0.001, exp_mult=0.5, reduce=reference.local_sums,
        step_scales=[options.get("step_scale", 1.0)], nan_to_num=mulo)
    assert (skip is None) if mulo else not skip.item()
    assert all(s.item() == 5.0 for s in steps_a)  # (taken, not skipped)
    for la, lb in zip(a + [steps_a], b + [steps_b]):
        for x, y in zip(la, lb):
            assert torch.equal(x, y) or (mulo and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
    if mulo:  # the NaN-free tensors stay finite; the one with infinities holds FLT_MAX momentum
        assert all(torch.isfinite(p).all() for p in a[0][:-1])
        assert a[2][-1][:, 5, 7].min() > 1e34


def _velo_phases(lists, mlp, lr_mult, skip, lr, loss_features, iteration, num_steps):
    """One VeLO step of whole tensors through the phase ops; returns X."""
    slots = reference.slots_of(*lists)
    b = _phases.buckets_of(slots)[0]
    m, v, fr, fc, fd = b.accumulators
    gsq = [t for t, _ in _phases.gsq_sums(b, VELO_GRAD_CLIP)]
    sums = ops.velo_lstm_moments(b.params, b.grads, m, v, None)
    n = _t([max(s.geo.numel, 1) for s in slots], dtype=torch.float64)
    spreads = ops.velo_lstm_moments(b.params, b.grads, m, v, (sums[:, 1:4] / n[:, None]).contiguous())
    X = ops.velo_lstm_rows(loss_features, iteration, num_steps, sums, spreads, [s.geo.numel for s in slots],
                           [sum(1 for d in s.geo.shape if d > 1) for s in slots])
    decays = _t(VELO_DECAYS)
    rows = [t for t, _ in _phases.factored_update(b, gsq, decays, skip)]
    features = ops.velo_feature_sums_(b.params, b.grads, m, v, fr, fc, fd, rows, skip, b.geometry)
    ops.velo_apply_(b.params, b.grads, m, v, fr, fc, fd, lr, mlp, lr_mult, skip, rows, features, b.geometry,
                    0.01, 0.001, 0.5)
    return X, sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip", [False, True])
def test_velo_phases_equal_the_step_ops_bitwise(dtype, skip):
    shapes = [s for s in SHAPES if math.prod(s) > 0] + [(4100,)]
    a = _lists(shapes, dtype)
    b = _clone(a)
    before = _clone(a)
    mlp, lr_mult = _velo_extra(len(shapes))
    lr, skip_t = _t(0.7), _t(skip)
    loss_features, iteration = (torch.rand(9) - 0.5).to(DEVICE), _t(3.0)
    X, finite = ops.velo_lstm_input(a[0], a[1], a[2], a[3], loss_features, iteration, 20.0)
    ops.velo_step_(*a, lr, mlp, lr_mult, skip_t, 0.01, 0.001, 0.5)
    X2, sums = _velo_phases(b, mlp, lr_mult, skip_t, lr, loss_features, iteration, 20.0)
    assert torch.equal(X, X2)
    assert bool(finite) and float(sums[:, 5].sum()) == 0
    for la, lb, lc in zip(a, b, before):
        for x, y, z in zip(la, lb, lc):
            assert torch.equal(x, y)
            if skip:
                assert torch.equal(x, z)


def test_shards_without_elements_add_nothing():
    """A shard with no elements (of a tensor that has some) returns zero sums and changes
    nothing, whatever its r and c hold."""
    lists = _lists([(0, 5), (5, 0), (0,)], torch.float32)
    for t in lists[4] + lists[5]:
        t.fill_(float("inf"))
    before = _clone(lists)
    geometry = [1, 0, 5, 3, 15, 0, 1, 5, 3, 15, -1, -1, 1, 1, 4]
    rows = [torch.zeros(3, dtype=torch.float64, device=DEVICE)] * 2
    for _ in range(3):
        sums = ops.small_fc_lopt_feature_sums_(*lists, rows, _decays(), None, geometry)
        assert torch.equal(sums, torch.zeros_like(sums))
        sums = ops.velo_feature_sums_(*lists, rows, _t(False), geometry)
        assert torch.equal(sums, torch.zeros_like(sums))
    for la, lb in zip(lists, before):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


def test_lstm_moments_count_non_finite_gradients():
    lists = _lists([(5000,), (3, 4)], torch.float32)
    lists[1][0][4500] = float("nan")
    sums = ops.velo_lstm_moments(*lists[:4], None)
    assert sums[:, 5].tolist() == [1.0, 0.0]


# -- shards in one process -------------------------------------------------------------------------
def _shard(lists, axis, count):
    """Each tensor split along ``axis`` (uneven, possibly empty parts) with its state; a
    tensor with fewer axes stays whole. Returns per shard the op lists and the slice."""
    params = lists[0]
    out = []
    for k in range(count):
        shard = [[] for _ in range(7)]
        fi = di = 0
        for i, p in enumerate(params):
            whole = p.dim() <= axis
            part = (lambda t, dim: t.tensor_split(count, dim=dim)[k].clone()) if not whole else \
                (lambda t, dim: t.clone())
            shard[0].append(part(p, axis))
            shard[1].append(part(lists[1][i], axis))
            shard[2].append(part(lists[2][i], axis + 1))
            shard[3].append(part(lists[3][i], axis))
            if p.dim() >= 2:
                d0, d1 = factored_axes(tuple(p.shape))
                # r drops d0 (replicated along it), c drops d1
                shard[4].append(lists[4][fi].clone() if axis == d0 else part(lists[4][fi], axis + 1 - (axis > d0)))
                shard[5].append(lists[5][fi].clone() if axis == d1 else part(lists[5][fi], axis + 1 - (axis > d1)))
                fi += 1
            else:
                shard[6].append(part(lists[6][di], axis + 1))
                di += 1
        out.append(shard)
    return out


def _geometries(params, axis):
    return [reference.Geometry(tuple(p.shape) if p.dim() else (1,),
                               tuple(("g",) if a == axis and p.dim() > axis else () for a in range(max(p.dim(), 1))))
            for p in params]


def _sum_across(per_shard):
    """Partial sums of every shard (each a list of (tensor, groups)): completed across shards
    where they cross the shard group, kept otherwise."""
    out = []
    for items in zip(*per_shard):
        if items[0][1]:
            total = sum(t for t, _ in items)
            out.append([total.clone() for _ in items])
        else:
            out.append([t for t, _ in items])
    return [list(x) for x in zip(*out)] if out else [[] for _ in per_shard]


def _sharded_small_fc_lopt(shards, geos, steps, weights, decays, lr):
    buckets = [_phases.Bucket(list(range(len(geos))), reference.slots_of(*s, geometries=geos)) for s in shards]
    gsq = _sum_across([_phases.gsq_sums(b, 0.0) for b in buckets])
    rows = _sum_across([_phases.factored_update(b, g, decays, None) for b, g in zip(buckets, gsq)])
    feats = _sum_across([_phases.per_tensor(ops.small_fc_lopt_feature_sums_(
        b.params, b.grads, *b.accumulators, r, decays, None, b.geometry), b) for b, r in zip(buckets, rows)])
    for b, r, f, st in zip(buckets, rows, feats, steps):
        ops.small_fc_lopt_apply_(b.params, b.grads, *b.accumulators, st, lr, weights, decays, None, r, torch.stack(f),
                                 b.geometry, 0.01, 0.001, 0.5)


def _unshard(shards, lists, axis):
    """The shards' tensors put back together along ``axis`` (state: its own axis)."""
    params = lists[0]
    out = [[] for _ in range(7)]
    fi = di = 0
    for i, p in enumerate(params):
        whole = p.dim() <= axis

        def cat(k, j, dim):
            return shards[0][k][j] if whole else torch.cat([s[k][j] for s in shards], dim=dim)

        for k, dim in ((0, axis), (1, axis), (2, axis + 1), (3, axis)):
            out[k].append(cat(k, i, dim))
        if p.dim() >= 2:
            d0, d1 = factored_axes(tuple(p.shape))
            out[4].append(shards[0][4][fi] if axis == d0 else cat(4, fi, axis + 1 - (axis > d0)))
            out[5].append(shards[0][5][fi] if axis == d1 else cat(5, fi, axis + 1 - (axis > d1)))
            fi += 1
        else:
            out[6].append(cat(6, di, axis + 1))
            di += 1
    return out


def _assert_matches_whole(got, expected, before):
    for k, (la, lb, lc) in enumerate(zip(got, expected, before)):
        for i, (x, y, z) in enumerate(zip(la, lb, lc)):
            if k in (2, 3, 6):  # element-wise state
                assert torch.equal(x, y), (k, i)
            elif k == 0:  # parameters: 1e-6 of the distance moved, plus a few ulps
                moved = (y.float() - z.float()).abs().max().item() if y.numel() else 0.0
                ulp = torch.finfo(y.dtype).eps * y.float().abs().max().item() if y.numel() else 0.0
                torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=1e-6 * moved + 4 * ulp)
            elif k != 1:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


SHARD_SHAPES = [(37, 5), (5, 37), (3, 20, 7), (7,), (), (1,), (4100,), (2, 9), (6, 6)]


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_fc_lopt_on_shards_equals_the_whole_tensor(axis, count, dtype):
    weights, decays, lr = _network(), _decays(), _t(0.3)
    whole = _lists(SHARD_SHAPES, dtype)
    before = _clone(whole)
    shards = _shard(whole, axis, count)
    geos = _geometries(whole[0], axis)
    for k in range(3):
        ops.small_fc_lopt_step_(*whole, [_t(float(k)) for _ in SHARD_SHAPES], lr, weights, decays,
                                0.01, 0.001, 0.5)
        steps = [[_t(float(k)) for _ in SHARD_SHAPES] for _ in shards]
        _sharded_small_fc_lopt(shards, geos, steps, weights, decays, lr)
    _assert_matches_whole(_unshard(shards, whole, axis), whole, before)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("count", [2, 3])
def test_velo_on_shards_equals_the_whole_tensor(axis, count):
    shapes = [s for s in SHARD_SHAPES if math.prod(s) > 0]
    whole = _lists(shapes, torch.float32)
    before = _clone(whole)
    shards = _shard(whole, axis, count)
    geos = _geometries(whole[0], axis)
    mlp, lr_mult = _velo_extra(len(shapes))
    lr, skip = _t(0.7), _t(False)
    loss_features, iteration = (torch.rand(9) - 0.5).to(DEVICE), _t(3.0)
    X, _ = ops.velo_lstm_input(*whole[:4], loss_features, iteration, 20.0)
    ops.velo_step_(*whole, lr, mlp, lr_mult, skip, 0.01, 0.001, 0.5)
    buckets = [_phases.Bucket(list(range(len(geos))), reference.slots_of(*s, geometries=geos)) for s in shards]
    sums = _sum_across([_phases.per_tensor(ops.velo_lstm_moments(b.params, b.grads, *b.accumulators[:2], None), b)
                        for b in buckets])[0]
    sums = torch.stack(sums)
    n = _t([g.numel for g in geos], dtype=torch.float64)
    mu = (sums[:, 1:4] / n[:, None]).contiguous()
    spreads = torch.stack(_sum_across([_phases.per_tensor(ops.velo_lstm_moments(
        b.params, b.grads, *b.accumulators[:2], mu), b) for b in buckets])[0])
    X2 = ops.velo_lstm_rows(loss_features, iteration, 20.0, sums, spreads, [g.numel for g in geos],
                            [sum(1 for d in g.shape if d > 1) for g in geos])
    torch.testing.assert_close(X2, X, rtol=1e-6, atol=1e-6)
    decays = _t(VELO_DECAYS)
    gsq = _sum_across([_phases.gsq_sums(b, VELO_GRAD_CLIP) for b in buckets])
    rows = _sum_across([_phases.factored_update(b, g, decays, skip) for b, g in zip(buckets, gsq)])
    feats = _sum_across([_phases.per_tensor(ops.velo_feature_sums_(
        b.params, b.grads, *b.accumulators, r, skip, b.geometry), b) for b, r in zip(buckets, rows)])
    for b, r, f in zip(buckets, rows, feats):
        ops.velo_apply_(b.params, b.grads, *b.accumulators, lr, mlp, lr_mult, skip, r, torch.stack(f), b.geometry,
                        0.01, 0.001, 0.5)
    _assert_matches_whole(_unshard(shards, whole, axis), whole, before)


# -- opcheck ---------------------------------------------------------------------------------------
def _phase_args(shapes, dtype):
    lists = _lists(shapes, dtype)
    slots = reference.slots_of(*lists)
    b = _phases.Bucket(list(range(len(shapes))), slots)
    geometry = b.geometry
    decays = effective_decays(_ZERO_OFFSETS)
    gsq = [t.clone() for t, _ in _phases.gsq_sums(b, 0.0)] if shapes else []
    rows = [t.clone() for t, _ in _phases.factored_update(b, gsq, decays, None)] if shapes else []
    features = ops.small_fc_lopt_feature_sums_(*lists, rows, decays, None, geometry) if shapes else \
        torch.zeros(0, 28, dtype=torch.float64)
    return lists, geometry, decays, gsq, rows, features


@pytest.mark.parametrize("case", ["mixed_fp32", "mixed_bf16", "empty_list"])
def test_opcheck(case):
    shapes = {"mixed_fp32": SHAPES, "mixed_bf16": SHAPES, "empty_list": []}[case]
    dtype = torch.bfloat16 if case == "mixed_bf16" else torch.float32
    lists, geometry, decays, gsq, rows, features = _phase_args(shapes, dtype)
    n = len(shapes)
    mlp, lr_mult = _velo_extra(n)
    skip, lr = torch.tensor(False), torch.tensor(0.5)
    if shapes:  # (with no tensor argument an op cannot be dispatched; the optimizers never call it so)
        torch.library.opcheck(ops.factored_gsq_sums.default, (lists[1], geometry, 0.0))
        torch.library.opcheck(ops.factored_gsq_sums.default, (lists[1], geometry, 0.0, True))  # μLO's
        torch.library.opcheck(ops.velo_lstm_moments.default, (*lists[:4], None))
    torch.library.opcheck(ops.factored_update_.default, (lists[0], lists[4], lists[5], gsq, decays, skip, geometry))
    torch.library.opcheck(ops.small_fc_lopt_feature_sums_.default, (*lists, rows, decays, skip, geometry))
    torch.library.opcheck(ops.small_fc_lopt_apply_.default,
                          (*lists, [torch.tensor(2.0) for _ in shapes], lr, _network(), decays, skip, rows, features,
                           geometry, 0.01, 0.001, 0.5))
    # μLO's: nan_to_num and the step multiplier
    torch.library.opcheck(ops.small_fc_lopt_feature_sums_.default, (*lists, rows, decays, skip, geometry, True))
    torch.library.opcheck(ops.small_fc_lopt_apply_.default,
                          (*lists, [torch.tensor(2.0) for _ in shapes], lr, _network(), decays, skip, rows, features,
                           geometry, 0.01, 0.001, 0.5, 0.125, True))
    velo_features = torch.rand(n, 30, dtype=torch.float64)
    torch.library.opcheck(ops.velo_feature_sums_.default, (*lists, rows, skip, geometry))
    torch.library.opcheck(ops.velo_apply_.default, (*lists, lr, mlp, lr_mult, skip, rows, velo_features, geometry,
                                                    0.01, 0.001, 0.5))
    sums = torch.rand(n, 6, dtype=torch.float64)
    torch.library.opcheck(ops.velo_lstm_moments.default, (*lists[:4], sums[:, :3].contiguous()))
    torch.library.opcheck(ops.velo_lstm_rows.default, (torch.rand(9), torch.tensor(2.0), 20.0, sums, sums,
                                                       [max(math.prod(s), 1) for s in shapes], [1] * n))


# -- bad input -------------------------------------------------------------------------------------
def test_bad_global_geometry_is_refused():
    lists = _lists([(6, 4), (5,)], torch.float32)
    ok = [0, 1, 6, 4, 24, -1, -1, 1, 1, 5]
    ops.factored_gsq_sums(lists[1], ok, 0.0)
    cases = {
        "global_geometry must hold 5 integers per tensor \\(10\\), got 9": ok[:-1],
        "global_geometry of grads\\[0\\] has axes d0 = 0, d1 = 0": [0, 0, 6, 4, 24] + ok[5:],
        "global_geometry of grads\\[0\\] gives sizes 3 and 4 to axes 0 and 1, smaller than its shard's \\[6, 4\\]":
            [0, 1, 3, 4, 24] + ok[5:],
        "global_geometry of grads\\[1\\] gives 4 elements, fewer than its shard's 5": ok[:5] + [-1, -1, 1, 1, 4],
        "global_geometry of grads\\[1\\] \\(ndim 1 < 2\\) must have d0 = d1 = -1": ok[:5] + [0, -1, 1, 1, 5],
    }
    for match, geometry in cases.items():
        with pytest.raises(RuntimeError, match=f"factored_gsq_sums: {match}"):
            ops.factored_gsq_sums(lists[1], geometry, 0.0)
    decays = effective_decays(_ZERO_OFFSETS)
    with pytest.raises(RuntimeError, match="small_fc_lopt_feature_sums_: row_sums\\[0\\] must be a contiguous "
                                           "float64 tensor of shape \\[3\\]"):
        ops.small_fc_lopt_feature_sums_(*lists, [torch.zeros(3)], decays, None, ok)
    with pytest.raises(RuntimeError, match="factored_update_: gsq_sums needs 2 entries per tensor"):
        ops.factored_update_(lists[0], lists[4], lists[5], [], decays, None, ok)
    with pytest.raises(RuntimeError, match="velo_lstm_moments: momentum_means must be a contiguous float64"):
        ops.velo_lstm_moments(*lists[:4], torch.zeros(2, 3))
