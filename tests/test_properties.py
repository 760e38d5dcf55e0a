"""Property-based tests (hypothesis): the fused CPU kernels against the pure-PyTorch references
for random parameter sets: ranks 0-5, sizes 1-70 with size-1 axes, non-contiguous views,
float32 / bfloat16, gradients from 1e-30 to 1e30 in magnitude, all-zero and mostly-zero
gradients, random lr and weight decay, one to three steps.

Examples are bounded (``MAX_EXAMPLES`` per optimizer, derandomized so that CI runs the same ones;
``LO_OPS_HYPOTHESIS_EXAMPLES`` raises the bound for a longer search), and every failure the
search found is kept as an explicit ``@example``. It found (600 examples each): accumulators
compared element-wise with an absolute tolerance of 1e-7 fail where gradients of magnitude 100
cancel in an EMA (momentum 0.018 from gradients near 100: the fused kernel's FMA and the
reference's multiply-add differ in the last bits, 3e-7); the comparison now scales the absolute
tolerance with the accumulator's magnitude. No kernel defect; 3000 examples each then pass."""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lo_ops  # noqa: E402
from conftest import VELO_FIXTURES  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("LO_OPS_HYPOTHESIS_EXAMPLES", "100"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_NUMEL = 3000  # per tensor, to keep an example fast

TOLERANCES = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
STATE_TOL = dict(rtol=1e-5, atol=1e-7)


@st.composite
def shapes(draw):
    rank = draw(st.integers(0, 5))
    dims = []
    for _ in range(rank):
        dims.append(draw(st.one_of(st.just(1), st.integers(1, 70))))
    while math.prod(dims) > MAX_NUMEL:
        dims[dims.index(max(dims))] //= 2
    return tuple(max(d, 1) for d in dims)


@st.composite
def tensor_specs(draw):
    """(shape, non_contiguous, gradient kind, log10 of the gradient's magnitude)."""
    shape = draw(shapes())
    non_contiguous = draw(st.booleans()) and len(shape) >= 2
    kind = draw(st.sampled_from(["dense", "dense", "zeros", "sparse"]))
    scale = draw(st.integers(-30, 30))
    return shape, non_contiguous, kind, scale


@st.composite
def cases(draw):
    return dict(
        tensors=draw(st.lists(tensor_specs(), min_size=1, max_size=4)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        lr=draw(st.sampled_from([1.0, 0.5, 0.05, 2.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.3])),
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _parameter(shape, non_contiguous, dtype, gen):
    if non_contiguous:  # a transposed view of a larger buffer
        base = torch.randn(*shape[:-2], shape[-1], shape[-2] + 1, generator=gen).to(dtype)
        t = base[..., : shape[-2]].transpose(-1, -2)
        assert tuple(t.shape) == shape  # (non-contiguous unless its last two axes have size 1)
        return torch.nn.Parameter(t)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


def _gradient(shape, kind, scale, dtype, gen):
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** scale
    if kind == "sparse":
        g = g * (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.1)
    return g.to(dtype)


def _run(case, make, step):
    """The same steps through the fused kernel and the reference: (params, opt) of each."""
    runs = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(case["seed"])
        params = [_parameter(s, nc, case["dtype"], gen) for s, nc, _, _ in case["tensors"]]
        opt = make(params, fused, case)
        for k in range(case["steps"]):
            gen = torch.Generator().manual_seed(case["seed"] + 1 + k)
            for p, (s, _, kind, scale) in zip(params, case["tensors"]):
                p.grad = _gradient(s, kind, scale, case["dtype"], gen)
            step(opt, k)
        runs.append((params, opt))
    return runs


def _close(a, b, rtol, atol, msg):
    """Element-wise within rtol, and atol plus rtol of the tensor's largest finite magnitude
    (an accumulator is an EMA of gradients up to 1e30: where consecutive gradients cancel, an
    element's last bits depend on whether its update was contracted into an FMA)."""
    finite = a[torch.isfinite(a)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol + rtol * scale, equal_nan=True, msg=msg)


def _compare(runs, dtype):
    (fp, fo), (rp, ro) = runs
    for i, (a, b) in enumerate(zip(fp, rp)):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], equal_nan=True,
                                   msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
        for key, value in fo.state[a].items():
            if key in ("iteration", "loss_means", "loss_running_min", "lstm_hidden", "lstm_cell"):
                continue  # global state, compared once below
            _close(value, ro.state[b][key], **STATE_TOL, msg=lambda m: f"param {i} {key}: {m}")
    for key, value in getattr(fo, "global_state", {}).items():
        _close(value, ro.global_state[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def _small_fc_lopt(params, fused, case):
    return lo_ops.SmallFCLOpt(params, lr=case["lr"], weight_decay=case["weight_decay"], fused=fused)


@pytest.fixture(scope="module")
def velo_net():
    return lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _loss(k):
    return torch.tensor(2.0 - 0.1 * k)


@SETTINGS
@given(case=cases())
@example(case=dict(tensors=[((39,), False, "dense", 2)], dtype=torch.bfloat16, lr=1.0, weight_decay=0.0,
                   steps=2, seed=1247))
def test_small_fc_lopt_fused_equals_reference(case):
    _compare(_run(case, _small_fc_lopt, lambda opt, k: opt.step()), case["dtype"])


@SETTINGS
@given(case=cases())
@example(case=dict(tensors=[((21,), False, "dense", 2)], dtype=torch.bfloat16, lr=1.0, weight_decay=0.0,
                   steps=2, seed=0))
def test_velo_fused_equals_reference(velo_net, case):
    def make(params, fused, case):
        return lo_ops.VeLO(params, num_steps=10, lr=case["lr"], weight_decay=case["weight_decay"],
                           pretrained=velo_net, fused=fused)

    _compare(_run(case, make, lambda opt, k: opt.step(loss=_loss(k))), case["dtype"])


@SETTINGS
@given(case=cases())
@example(case=dict(tensors=[((), False, "dense", 0)] * 3 + [((69,), False, "dense", 2)], dtype=torch.float32,
                   lr=1.0, weight_decay=0.0, steps=2, seed=0))
def test_celo_adam_fused_equals_reference(case):
    def make(params, fused, case):
        return lo_ops.CeloAdam(params, num_steps=10, lr=case["lr"], weight_decay=case["weight_decay"], fused=fused)

    _compare(_run(case, make, lambda opt, k: opt.step(loss=_loss(k))), case["dtype"])
