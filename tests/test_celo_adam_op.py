"""lo_ops::celo_adam_step_ (Celo-Adam's update, spec 5.3): the recorded steps of the original
(../shared/vectors/celo_adam_real, given its recorded lr_mult) on every path, the fused kernel
against the reference, exact float32 bias correction, skip, opcheck and bad input."""

import json
import math

import numpy as np
import pytest
import torch

import lo_ops  # noqa: F401
from lo_ops.hyperv2 import reference as ref

from conftest import EMULATED_CUDA_PATHS, VECTORS, _need, enter_path
from helpers import SHAPES, make_params

ops = torch.ops.lo_ops
PATHS = ["fused", *EMULATED_CUDA_PATHS, "reference"]
STEP_MULT, EPSILON = 0.001, 1e-8


def _op(path, request):
    enter_path(path, request)
    return ref.celo_adam_step_ if path == "reference" else ops.celo_adam_step_


@pytest.fixture(scope="module")
def celo_adam_vectors():
    from safetensors.torch import load_file

    meta = json.loads(_need(VECTORS / "celo_adam_real.json").read_text())
    return meta, load_file(str(_need(VECTORS / "celo_adam_real.safetensors")))


@pytest.mark.parametrize("path", PATHS)
def test_recorded_steps_given_the_recorded_lr_mult(celo_adam_vectors, path, request):
    """Each update k of the original from its recorded inputs (parameters, gradients,
    accumulators after update k - 1, lr_mult): the step (evaluated at p = 0, lr = 1, as the
    vectors record it) within 1e-5 relative, the accumulators within 1e-6."""
    meta, t = celo_adam_vectors
    leaves = meta["leaf_order"]
    op = _op(path, request)
    worst = 0.0
    for k in range(1, meta["n_updates"] + 1):
        zeros = [torch.zeros_like(t[f"params.step0.{leaf}"]) for leaf in leaves]
        params = [z.clone() for z in zeros]  # p = 0: the new parameter is -step
        grads = [t[f"grads.step{k}.{leaf}"] for leaf in leaves]
        if k == 1:
            m, v = [z.clone() for z in zeros], [z.clone() for z in zeros]
        else:
            m = [t[f"state.step{k - 1}.mom.{leaf}"][..., 0].clone() for leaf in leaves]
            v = [t[f"state.step{k - 1}.rms.{leaf}"][..., 0].clone() for leaf in leaves]
        lr_mult = t[f"probe.step{k}.lr_mult"].float().contiguous()
        op(params, grads, m, v, torch.tensor(1.0), lr_mult, torch.tensor(float(k - 1)), torch.tensor(False),
           0.0, STEP_MULT, EPSILON)
        for i, leaf in enumerate(leaves):
            want = t[f"steps.step{k}.{leaf}"].double()
            got = -params[i].double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, err)
            assert err <= 1e-5, f"{path} update {k} {leaf}: relative step error {err:.2e}"
            torch.testing.assert_close(m[i], t[f"state.step{k}.mom.{leaf}"][..., 0], rtol=5e-6, atol=1e-12)  # a few ulps
            torch.testing.assert_close(v[i], t[f"state.step{k}.rms.{leaf}"][..., 0], rtol=5e-6, atol=1e-12)  # a few ulps
    print(f"{path}: worst relative step error {worst:.2e}")


@pytest.mark.parametrize("tau", [1, 2, 9, 100, 1000, 4097, 12345, 100000])
def test_bias_correction_is_the_float32_of_the_exact_power(tau):
    """1 - pow(float32(b), tau) with the power correctly rounded to float32: the kernel's
    (through a one-element step) and the reference's, against an exact rational power."""
    from fractions import Fraction

    for beta in (0.9, 0.999):
        b = Fraction(float(np.float32(beta)))
        exact = float(np.float32(float(b ** tau)))  # Fraction power: exact, then rounded
        want = np.float32(1) - np.float32(exact)
        got = ref.bias_correction(beta, torch.tensor(float(tau)))
        assert got.item() == float(want), (beta, tau, got.item(), float(want))
    # The kernel: with g = 1 from zero state, m = 0.1 and m_hat = 0.1 / bc1 exactly as computed.
    for path_op in (ops.celo_adam_step_, ref.celo_adam_step_):
        p, m, v = torch.zeros(1), torch.zeros(1), torch.zeros(1)
        path_op([p], [torch.ones(1)], [m], [v], torch.tensor(1.0), torch.ones(1), torch.tensor(float(tau - 1)),
                torch.tensor(False), 0.0, 1.0, 0.0)
        bc1 = np.float32(1) - np.float32(float(Fraction(float(np.float32(0.9))) ** tau))
        bc2 = np.float32(1) - np.float32(float(Fraction(float(np.float32(0.999))) ** tau))
        m_hat = np.float32(np.float32(m.item()) / bc1)
        v_hat = np.float32(np.float32(v.item()) / bc2)
        step = m_hat * (np.float32(1.0) / (np.float32(0) + np.sqrt(np.float32(v_hat + np.float32(1e-10)))))
        assert -p.item() == float(np.float32(step)), (tau, -p.item(), float(step))


def _args(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach() for p in make_params(shapes, dtype, seed=seed)]
    grads = [(torch.randn(p.shape, generator=gen) * 3).to(dtype) for p in params]
    if params and params[0].numel():
        grads[0].view(-1)[0] = 5000.0  # clipped to 1000
    m = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    v = [torch.rand(p.shape, generator=gen) for p in params]
    lr_mult = torch.rand(len(params), generator=gen) * 2
    return [params, grads, m, v, torch.tensor(0.7), lr_mult, torch.tensor(6.0), torch.tensor(False),
            0.01, STEP_MULT, EPSILON]


def _clone(args):
    return [[x.clone() for x in a] if isinstance(a, list) else (a.clone() if isinstance(a, torch.Tensor) else a)
            for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_matches_reference(dtype):
    """The shape zoo (0-d, [1], empty, non-contiguous), a clipped gradient, 5 steps."""
    a = _args(SHAPES, dtype)
    b = _clone(a)
    for k in range(5):
        a[6].fill_(float(k))
        b[6].fill_(float(k))
        ops.celo_adam_step_(*a)
        ref.celo_adam_step_(*b)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-3)
    for la, lb in zip(a[:4], b[:4]):
        for x, y in zip(la, lb):
            torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("op", [ops.celo_adam_step_, ref.celo_adam_step_])
def test_skip_changes_nothing(op):
    a = _args(SHAPES, torch.float32)
    before = _clone(a)
    a[7] = torch.tensor(True)
    op(*a)
    for la, lb in zip(a[:4], before[:4]):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


def test_under_the_cuda_emulator_matches_the_cpu_kernel():
    from lo_ops.testing import cuda_emulation

    a = _args(SHAPES + [(5000,)], torch.float32)
    b = _clone(a)
    ops.celo_adam_step_(*a)
    with cuda_emulation("adversarial", seed=2):
        ops.celo_adam_step_(*b)
    for la, lb in zip(a[:4], b[:4]):
        for x, y in zip(la, lb):  # (fused multiply-adds on one side: a few ulps)
            torch.testing.assert_close(x, y, rtol=4e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["mixed_fp32", "mixed_bf16", "empty_list"])
def test_opcheck(case):
    shapes = [] if case == "empty_list" else SHAPES
    args = _args(shapes, torch.bfloat16 if case == "mixed_bf16" else torch.float32)
    torch.library.opcheck(ops.celo_adam_step_.default, tuple(args))


def test_bad_input_is_refused():
    a = _args([(3, 4), (5,)], torch.float32)  # (and a non-contiguous [4, 9])
    cases = [
        (5, torch.ones(2), "lr_mult must be a contiguous float32 tensor of shape \\[3\\]"),
        (6, torch.zeros(2), "iteration must be a float32 tensor with one element"),
        (7, torch.tensor(0), "skip must be a bool tensor with one element"),
        (2, [torch.zeros(3, 4), torch.zeros(4), torch.zeros(4, 9)],
         "exp_avg\\[1\\] has shape \\[4\\] but a parameter of shape \\[5\\]"),
        (9, math.inf, "step_mult must be finite"),
    ]
    for index, value, match in cases:
        bad = _clone(a)
        bad[index] = value
        with pytest.raises(RuntimeError, match=f"celo_adam_step_: {match}"):
            ops.celo_adam_step_(*bad)
