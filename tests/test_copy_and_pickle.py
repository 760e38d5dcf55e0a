"""A deep-copied or pickled lo_ops optimizer steps exactly like the original; numeric step
counts in a state dict load (torch.optim's contract)."""

import copy
import io
import math

import pytest
import torch

import lo_ops

from conftest import VELO_FIXTURES
from helpers import clone_params, make_params, set_grads

KINDS = ["small_fc_lopt", "velo", "celo", "celo_adam"]


def _make(kind, params):
    if kind == "small_fc_lopt":
        return lo_ops.SmallFCLOpt(params, lr=0.5, weight_decay=0.01)
    if kind == "velo":
        return lo_ops.VeLO(params, num_steps=20, pretrained=VELO_FIXTURES["pylo"]())
    cls = lo_ops.Celo if kind == "celo" else lo_ops.CeloAdam
    return cls(params, num_steps=20, weight_decay=0.01)


def _step(kind, opt, k):
    if kind == "small_fc_lopt":
        opt.step()
    else:
        opt.step(loss=torch.tensor(2.0 + math.sin(k)))


def _pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_steps_like_the_original(kind, how):
    params = make_params([(7, 5), (5,), (), (3, 4, 6)], non_contiguous=False)
    opt = _make(kind, params)
    for k in range(3):
        set_grads([params], k)
        _step(kind, opt, k)
    # Copy the optimizer with its parameters, as a checkpoint of the whole training state would.
    twin_params, twin = copy.deepcopy((params, opt)) if how == "deepcopy" else _pickled((params, opt))
    assert twin is not opt and twin_params[0] is not params[0]
    assert twin.param_groups[0]["params"][0] is twin_params[0]
    if kind != "small_fc_lopt":  # the global state is still shared by every parameter's state
        for p in twin_params:
            if twin.state[p]:
                assert twin.state[p]["iteration"] is twin.global_state["iteration"]
    for k in range(3, 7):
        set_grads([params, twin_params], k)
        _step(kind, opt, k)
        _step(kind, twin, k)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_numeric_step_counts_load():
    params = make_params([(7, 5), (5,)], non_contiguous=False)
    opt = lo_ops.SmallFCLOpt(params)
    for k in range(2):
        set_grads([params], k)
        opt.step()
    sd = opt.state_dict()
    sd = dict(sd, state={i: dict(s) for i, s in sd["state"].items()})  # (its dicts are the live state)
    for s in sd["state"].values():
        s["step"] = int(s["step"].item())  # as some checkpoints store it
    resumed_params = clone_params(params)
    resumed = lo_ops.SmallFCLOpt(resumed_params)
    resumed.load_state_dict(sd)
    for p in resumed_params:
        step = resumed.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.item() == 2
    set_grads([params, resumed_params], 2)
    opt.step()
    resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["velo", "celo", "celo_adam"])
def test_state_dict_hooks_see_and_may_change_the_global_state(kind):
    params = make_params([(7, 5), (5,)], non_contiguous=False)
    opt = _make(kind, params)
    for k in range(2):
        set_grads([params], k)
        _step(kind, opt, k)
    seen = {}

    def post_hook(optimizer, state_dict):
        seen["entry"] = dict(state_dict[kind])

    opt.register_state_dict_post_hook(post_hook)
    sd = opt.state_dict()
    assert seen["entry"]["num_steps"] == 20 and seen["entry"]["iteration"].item() == 2

    def pre_hook(optimizer, state_dict):  # a pre-hook may repair the state dict before it is checked
        entry = dict(state_dict[kind], iteration=torch.tensor(7.0))
        return dict(state_dict, **{kind: entry, "state": {i: {k: v for k, v in s.items() if k != "iteration"}
                                                          for i, s in state_dict["state"].items()}})

    resumed = _make(kind, clone_params(params))
    resumed.register_load_state_dict_pre_hook(pre_hook)
    resumed.load_state_dict(sd)
    assert resumed.global_state["iteration"].item() == 7
    # and a copy keeps the optimizer's own hook (its state dict has the entry)
    assert kind in copy.deepcopy(opt).state_dict()
