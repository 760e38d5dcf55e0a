"""state_dict round trip: bit-identical continuation; fp32 state of bf16 params stays fp32."""

import io

import pytest
import torch

from helpers import SHAPES, clone_params, make_opt, make_params, set_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_identical(dtype):
    params = make_params(SHAPES, dtype)
    opt = make_opt(params, lr=0.7, weight_decay=0.01)
    for k in range(10):
        set_grads([params], k)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    resumed_params = clone_params(params)
    resumed = make_opt(resumed_params, lr=0.1)  # lr comes from the state dict
    resumed.load_state_dict(loaded)
    for p in resumed_params:
        for key, value in resumed.state[p].items():
            assert value.dtype == torch.float32, key
    assert resumed.param_groups[0]["lr"].item() == pytest.approx(0.7)
    assert isinstance(resumed.param_groups[0]["lr"], torch.Tensor)

    for k in range(10, 20):
        set_grads([params, resumed_params], k)
        opt.step()
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], resumed.state[b][key])


def test_load_rejects_state_of_another_shape():
    opt = make_opt(make_params([(7, 5)], non_contiguous=False))
    set_grads([opt.param_groups[0]["params"]], 0)
    opt.step()
    sd = opt.state_dict()
    other = make_opt(make_params([(5, 7)], non_contiguous=False))
    with pytest.raises(ValueError, match=r"state\['momentum'\] of parameter 0 should be a tensor of shape \(3, 5, 7\)"):
        other.load_state_dict(sd)


def test_load_rejects_missing_state_keys():
    opt = make_opt(make_params([(5,)], non_contiguous=False))
    set_grads([opt.param_groups[0]["params"]], 0)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["fac_diag"]
    fresh = make_opt(make_params([(5,)], non_contiguous=False))
    with pytest.raises(ValueError, match="state of parameter 0 has keys"):
        fresh.load_state_dict(sd)


def test_param_groups_and_zero_grad():
    a, b = make_params([(7, 5), (5,)], non_contiguous=False)
    opt = make_opt([{"params": [a], "lr": 0.5}, {"params": [b], "weight_decay": 0.1}], lr=2.0)
    assert opt.param_groups[0]["lr"].item() == 0.5
    assert opt.param_groups[1]["lr"].item() == 2.0
    assert opt.param_groups[1]["weight_decay"] == 0.1
    set_grads([[a, b]], 0)
    opt.step()
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_step_with_closure_returns_loss():
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(8, 3)
    opt = make_opt([w])

    def closure():
        opt.zero_grad()
        loss = (x @ w.T).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.state[w]["step"].item() == 1


def test_failed_load_changes_nothing():
    opt = make_opt(make_params([(7, 5), (5,)], non_contiguous=False))
    set_grads([opt.param_groups[0]["params"]], 0)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    sd = opt.state_dict()
    sd["state"][1]["rms"] = torch.zeros(7)  # wrong shape for the [5] parameter
    sd["param_groups"][0]["lr"] = 0.25
    with pytest.raises(ValueError, match=r"state\['rms'\] of parameter 1"):
        opt.load_state_dict(sd)
    after = opt.state[opt.param_groups[0]["params"][0]]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.param_groups[0]["lr"].item() == 1.0
