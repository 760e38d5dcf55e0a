"""The non-finite policy, the same for every optimizer on every path: a step whose gradients
(or loss, where the optimizer reads one) hold a NaN or an infinity changes no parameter and no
state and is not counted; the next finite step goes on as if it had never been tried."""

import math

import pytest
import torch

import lo_ops
from conftest import EMULATED_CUDA_PATHS, VELO_FIXTURES, enter_path
from helpers import make_params, set_grads

OPTIMIZERS = ["SmallFCLOpt", "VeLO", "Celo", "CeloAdam"]
PATHS = ["reference", "fused", "compiled", *EMULATED_CUDA_PATHS]
# Many tensors: factored, unfactored, 0-d, one with many chunks, one in bfloat16.
SHAPES = [(7, 5), (5,), (), (3, 4, 6), (9000,), (64, 70)]
POISONS = {  # parameter index, element, value (index 6: make_params' non-contiguous tensor)
    "nan_one_element": (3, (2, 3, 1), float("nan")),
    "neg_inf_large_tensor": (4, (8999,), float("-inf")),
    "inf_unfactored": (1, (4,), float("inf")),
    "nan_0d": (2, (), float("nan")),
    "inf_non_contiguous": (6, (3, 8), float("inf")),
    "bf16_inf": (7, (1, 2), float("inf")),
    "bf16_nan": (7, (3, 0), float("nan")),
}
# The CUDA kernels' checks: one element among many blocks, an unfactored tensor's, bfloat16.
EMULATED_POISONS = ("nan_one_element", "neg_inf_large_tensor", "inf_unfactored", "bf16_inf")


@pytest.fixture(scope="module")
def velo_net():
    return lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _loss(k):
    return torch.tensor(3.0 - 0.1 * k + 0.2 * math.sin(k))


def _make(name, params, fused, velo_net):
    if name == "SmallFCLOpt":
        return lo_ops.SmallFCLOpt(params, fused=fused)
    if name == "VeLO":
        return lo_ops.VeLO(params, num_steps=20, pretrained=velo_net, fused=fused)
    return getattr(lo_ops, name)(params, num_steps=20, fused=fused)


def _snapshot(opt, params):
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, snapshot):
    before_params, before_state = snapshot
    for i, (p, b) in enumerate(zip(params, before_params)):
        assert torch.equal(p, b), f"parameter {i} changed"
    for i, p in enumerate(params):
        for k, v in before_state[i].items():
            assert torch.equal(opt.state[p][k], v), f"state {k!r} of parameter {i} changed"


def _steps_taken(opt, params):
    if hasattr(opt, "global_state"):
        return int(opt.global_state["iteration"].item())
    counts = {int(opt.state[p]["step"].item()) for p in params}
    assert len(counts) == 1
    return counts.pop()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("poison", [*POISONS, "nan_loss", "inf_loss"])
def test_non_finite_step_changes_nothing(name, path, poison, velo_net, request):
    if poison.endswith("_loss") and name == "SmallFCLOpt":
        pytest.skip("SmallFCLOpt does not read the loss")
    if path in EMULATED_CUDA_PATHS and poison not in EMULATED_POISONS:
        pytest.skip("covered on the other paths (the emulator is slow)")
    enter_path(path, request)
    params = make_params(SHAPES, non_contiguous=True)
    params.append(torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16)))
    opt = _make(name, params, fused=path != "reference", velo_net=velo_net)
    needs_loss = name != "SmallFCLOpt"

    def step(loss):
        return opt.step(loss=loss) if needs_loss else opt.step()

    if path == "compiled":
        torch._dynamo.reset()
        step = torch.compile(step, backend="aot_eager", fullgraph=True)
    for k in range(2):
        set_grads([params], k)
        step(_loss(k))
    snapshot = _snapshot(opt, params)
    set_grads([params], 2)
    loss = _loss(2)
    if poison == "nan_loss":
        loss = torch.tensor(float("nan"))
    elif poison == "inf_loss":
        loss = torch.tensor(float("inf"))
    else:
        index, element, value = POISONS[poison]
        params[index].grad[element] = value
    step(loss)
    _assert_unchanged(opt, params, snapshot)
    assert _steps_taken(opt, params) == 2
    # The next finite step is the one that would have followed the last finite one.
    set_grads([params], 3)
    step(_loss(3))
    assert _steps_taken(opt, params) == 3
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skipped_step_leaves_the_trajectory_as_without_it(name, velo_net):
    """Finite steps 0, 1, (poisoned), 2 end exactly where finite steps 0, 1, 2 end."""
    runs = []
    for poisoned in (False, True):
        params = make_params(SHAPES[:4], non_contiguous=False)
        opt = _make(name, params, fused=True, velo_net=velo_net)
        for k in range(3):
            if poisoned and k == 2:
                set_grads([params], 99)
                params[0].grad[0, 0] = float("nan")
                opt.step(loss=_loss(99)) if name != "SmallFCLOpt" else opt.step()
            set_grads([params], k)
            opt.step(loss=_loss(k)) if name != "SmallFCLOpt" else opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
