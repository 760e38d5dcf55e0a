"""torch.library.opcheck on lo_ops::small_fc_lopt_step_ (schema, fake kernel, aot dispatch)."""

import pytest
import torch

import lo_ops  # noqa: F401
from lo_ops._layout import effective_decays
from lo_ops.small_fc_lopt.network import normalised_adam_network

from helpers import SHAPES, make_params, make_state


def _op_args(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach() for p in make_params(shapes, dtype, seed=seed)]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    momentum, rms, fac_row, fac_col, fac_diag = make_state(params, gen)
    steps = [torch.tensor(3.0) for _ in params]
    net = normalised_adam_network()
    with torch.no_grad():  # a dense network so that every weight matters
        for layer in net.layers:
            layer.weight.normal_(0, 0.3, generator=gen)
            layer.bias.normal_(0, 0.1, generator=gen)
    zero = {"momentum": [0.0] * 3, "rms": [0.0], "adafactor": [0.0] * 3}
    return (params, grads, momentum, rms, fac_row, fac_col, fac_diag, steps, torch.tensor(0.5),
            net.packed_weights(), effective_decays(zero), 0.01, 0.001, 0.001)


CASES = {
    "mixed_fp32": (SHAPES, torch.float32),
    "mixed_bf16": (SHAPES, torch.bfloat16),
    "mixed_fp16": ([(7, 5), (5,)], torch.float16),
    "many_tensors": ([(3, 2)] * 40 + [(4,)] * 40, torch.float32),
    "scalar_only": ([()], torch.float32),
    "empty_list": ([], torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    shapes, dtype = CASES[case]
    args = _op_args(shapes, dtype)
    if case == "empty_list":
        args = ([], [], [], [], [], [], [], []) + args[8:]
    torch.library.opcheck(torch.ops.lo_ops.small_fc_lopt_step_.default, args)


def test_op_matches_reference_directly():
    from lo_ops.small_fc_lopt import reference

    a = _op_args(SHAPES, torch.float32)
    b = _op_args(SHAPES, torch.float32)
    torch.ops.lo_ops.small_fc_lopt_step_(*a)
    reference.small_fc_lopt_step_(*b)
    for la, lb in zip(a[:8], b[:8]):
        for x, y in zip(la, lb):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


def test_per_tensor_meta_weights_and_decays():
    """[T, P] weights and [T, 7] decays: each tensor steps as with its own row alone."""
    from lo_ops.small_fc_lopt import reference

    shapes = [(7, 5), (5,), (3, 4, 6), ()]
    gen = torch.Generator().manual_seed(7)
    base = _op_args(shapes, torch.float32)
    n = len(base[0])
    weights = base[9] + 0.05 * torch.randn(n, base[9].numel(), generator=gen)
    decays = (base[10] - 0.02 * torch.rand(n, base[10].numel(), generator=gen)).contiguous()
    batched = _op_args(shapes, torch.float32)
    torch.ops.lo_ops.small_fc_lopt_step_(*batched[:9], weights, decays, *batched[11:])
    ref_batched = _op_args(shapes, torch.float32)
    reference.small_fc_lopt_step_(*ref_batched[:9], weights, decays, *ref_batched[11:])
    singles = _op_args(shapes, torch.float32)
    for i, p in enumerate(singles[0]):
        fac = p.dim() >= 2
        fi = sum(1 for q in singles[0][:i] if q.dim() >= 2)
        di = i - fi
        one = ([p], [singles[1][i]], [singles[2][i]], [singles[3][i]],
               [singles[4][fi]] if fac else [], [singles[5][fi]] if fac else [],
               [] if fac else [singles[6][di]], [singles[7][i]])
        torch.ops.lo_ops.small_fc_lopt_step_(*one, singles[8], weights[i].contiguous(), decays[i].contiguous(),
                                             *singles[11:])
    for la, lb, lc in zip(batched[:8], singles[:8], ref_batched[:8]):
        for x, y, z in zip(la, lb, lc):
            assert torch.equal(x, y)
            torch.testing.assert_close(x, z, rtol=2e-5, atol=2e-6)
    torch.library.opcheck(torch.ops.lo_ops.small_fc_lopt_step_.default,
                          (*_op_args(shapes, torch.float32)[:9], weights, decays, 0.01, 0.001, 0.001))
    bad = _op_args(shapes, torch.float32)
    with pytest.raises(RuntimeError, match="meta_weights must be a contiguous float32 tensor of shape"):
        torch.ops.lo_ops.small_fc_lopt_step_(*bad[:9], weights[:2].contiguous(), decays, *bad[11:])
