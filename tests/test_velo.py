"""lo_ops.VeLO: fused vs reference, opcheck, torch.compile, state_dict, skipping, errors."""

import math
import warnings

import pytest
import torch

import lo_ops
from lo_ops.hyperv2 import reference as ref
from lo_ops._layout import VELO_MLP_NUMEL

from conftest import VELO_FIXTURES
from helpers import SHAPES, CountingBackend, clone_params, make_params, make_state, set_grads

TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
STATE_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def net():
    return lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _loss(k):
    return torch.tensor(3.0 - 0.1 * k + 0.2 * math.sin(k))


def _run_both(net, shapes, dtype, steps, **kw):
    fused_params = make_params(shapes, dtype)
    ref_params = clone_params(fused_params)
    fused = lo_ops.VeLO(fused_params, num_steps=50, pretrained=net, fused=True, **kw)
    reference = lo_ops.VeLO(ref_params, num_steps=50, pretrained=net, fused=False, **kw)
    for k in range(steps):
        set_grads([fused_params, ref_params], k)
        fused.step(loss=_loss(k))
        reference.step(loss=_loss(k))
    return fused_params, ref_params, fused, reference


def _compare(fused_params, ref_params, fused, reference, dtype):
    for i, (a, b) in enumerate(zip(fused_params, ref_params)):
        assert a.dtype == dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
        sa, sb = fused.state[a], reference.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert sa[key].dtype == torch.float32
            torch.testing.assert_close(sa[key], sb[key], **STATE_TOL, msg=lambda m: f"param {i} {key}: {m}")
    for key in fused.velo_state:
        torch.testing.assert_close(fused.velo_state[key], reference.velo_state[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_reference_random_shapes_20_steps(net, dtype):
    out = _run_both(net, SHAPES, dtype, steps=20)
    _compare(*out, dtype)
    assert out[2].velo_state["iteration"].item() == 20


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_fused_matches_reference_on_narrower_instruction_sets(net, isa, monkeypatch):
    monkeypatch.setenv("LO_OPS_CPU_ISA", isa)
    _compare(*_run_both(net, SHAPES, torch.float32, steps=10), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_reference_300_small_tensors(net, dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [tuple(int(x) for x in torch.randint(1, 6, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen))
              for _ in range(300)]
    _compare(*_run_both(net, shapes, dtype, steps=20), dtype)


def test_weight_decay_lr_and_param_groups(net):
    def groups(params):
        return [{"params": params[:5], "lr": 0.5, "weight_decay": 0.1},
                {"params": params[5:], "weight_decay": 0.0}]

    fused_params = make_params(SHAPES, torch.float32)
    ref_params = clone_params(fused_params)
    fused = lo_ops.VeLO(groups(fused_params), num_steps=30, lr=2.0, pretrained=net, fused=True)
    reference = lo_ops.VeLO(groups(ref_params), num_steps=30, lr=2.0, pretrained=net, fused=False)
    for k in range(5):
        set_grads([fused_params, ref_params], k)
        fused.step(loss=_loss(k))
        reference.step(loss=_loss(k))
    _compare(fused_params, ref_params, fused, reference, torch.float32)


def test_weight_decay_is_not_scaled_by_lr_mult(net):
    """With weight decay wd the update is p' = u - lr * wd * u, u the update without decay."""
    shapes = [(7, 5), (5,)]
    plain = make_params(shapes, non_contiguous=False)
    decayed = clone_params(plain)
    a = lo_ops.VeLO(plain, num_steps=10, lr=0.5, pretrained=net)
    b = lo_ops.VeLO(decayed, num_steps=10, lr=0.5, weight_decay=0.2, pretrained=net)
    set_grads([plain, decayed], 0)
    a.step(loss=_loss(0))
    b.step(loss=_loss(0))
    for p, q in zip(plain, decayed):
        torch.testing.assert_close(q, p - 0.5 * 0.2 * p, rtol=1e-6, atol=1e-7)


def test_fp16_parameters(net):
    fused_params, ref_params, *_ = _run_both(net, [(7, 5), (5,)], torch.float16, steps=5)
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


# -- opcheck ------------------------------------------------------------------------------------
def _op_args(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach() for p in make_params(shapes, dtype, seed=seed)]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    momentum, rms, fac_row, fac_col, fac_diag = make_state(params, gen)
    n = len(params)
    mlp = torch.randn(n, VELO_MLP_NUMEL, generator=gen) * 0.3
    lr_mult = torch.rand(n, generator=gen)
    step_args = (params, grads, momentum, rms, fac_row, fac_col, fac_diag, torch.tensor(0.5), mlp,
                 lr_mult, torch.tensor(False), 0.01, 0.001, 0.001)
    input_args = (params, grads, momentum, rms, torch.rand(9, generator=gen) - 0.5,
                  torch.tensor(3.0), 20.0)
    return step_args, input_args


OP_CASES = {
    "mixed_fp32": (SHAPES, torch.float32),
    "mixed_bf16": (SHAPES, torch.bfloat16),
    "many_tensors": ([(3, 2)] * 40 + [(4,)] * 40, torch.float32),
    "scalar_only": ([()], torch.float32),
    "empty_list": ([], torch.float32),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_opcheck(case):
    step_args, input_args = _op_args(*OP_CASES[case])
    torch.library.opcheck(torch.ops.lo_ops.velo_step_.default, step_args)
    torch.library.opcheck(torch.ops.lo_ops.velo_lstm_input.default, input_args)


def test_ops_match_reference_directly():
    a_step, a_in = _op_args(SHAPES, torch.float32)
    b_step, b_in = _op_args(SHAPES, torch.float32)
    X, finite = torch.ops.lo_ops.velo_lstm_input(*a_in)
    X_ref, finite_ref = ref.velo_lstm_input(*b_in)
    torch.testing.assert_close(X, X_ref, rtol=1e-5, atol=1e-5)
    assert bool(finite) and bool(finite_ref)
    torch.ops.lo_ops.velo_step_(*a_step)
    ref.velo_step_(*b_step)
    for la, lb in zip(a_step[:7], b_step[:7]):
        for x, y in zip(la, lb):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


def test_lstm_input_of_large_mean_tensors():
    """Spreads about a large mean are computed without cancellation."""
    p = torch.randn(70000)
    m = (1000.0 + 0.001 * torch.randn(3, 70000)).contiguous()
    v = (1000.0 + 0.001 * torch.randn(70000)).contiguous()
    args = ([p], [torch.zeros_like(p)], [m], [v], torch.zeros(9), torch.tensor(0.0), 10.0)
    X, _ = torch.ops.lo_ops.velo_lstm_input(*args)
    s2 = 1.0 / (p.double() ** 2).mean()
    var = ((m.double() - m.double().mean(1, keepdim=True)) ** 2).mean(1) * s2
    expected = 0.5 * torch.clamp(torch.log(1e-8 + (10 * var).abs()), -5, 5)
    torch.testing.assert_close(X[0, 24:27].double(), expected, rtol=0, atol=1e-5)


# -- non-finite values, skipped parameters ---------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_non_finite_step_is_skipped(net, fused, poison):
    params = make_params([(7, 5), (5,), ()], non_contiguous=False)
    opt = lo_ops.VeLO(params, num_steps=20, pretrained=net, fused=fused)
    for k in range(3):
        set_grads([params], k)
        opt.step(loss=_loss(k))
    before_params = [p.detach().clone() for p in params]
    before_state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    before_global = {k: v.clone() for k, v in opt.velo_state.items()}
    set_grads([params], 3)
    loss = _loss(3)
    if poison == "nan_loss":
        loss = torch.tensor(float("nan"))
    elif poison == "inf_loss":
        loss = torch.tensor(float("inf"))
    else:
        params[0].grad[2, 3] = float("nan") if poison == "nan_grad" else float("-inf")
    opt.step(loss=loss)
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            assert torch.equal(v, before_state[i][k]), k
    for k, v in opt.velo_state.items():
        assert torch.equal(v, before_global[k]), k
    # and the optimizer goes on normally afterwards
    set_grads([params], 4)
    opt.step(loss=_loss(4))
    assert opt.velo_state["iteration"].item() == 4
    assert all(torch.isfinite(p).all() for p in params)


def test_parameters_without_grad_are_skipped_and_not_pooled(net):
    shapes = [(7, 5), (5,), (3, 4)]
    params = make_params(shapes, non_contiguous=False)
    alone = clone_params(params[:2])
    opt = lo_ops.VeLO(params, num_steps=20, pretrained=net)
    opt_alone = lo_ops.VeLO(alone, num_steps=20, pretrained=net)
    frozen = params[2].detach().clone()
    for k in range(4):
        set_grads([params[:2], alone], k)
        params[2].grad = None
        opt.step(loss=_loss(k))
        opt_alone.step(loss=_loss(k))
    assert torch.equal(params[2], frozen)
    state = opt.state[params[2]]  # created with the optimizer, and left as it was
    assert not state["momentum"].any() and torch.equal(state["lstm_hidden"], net.init_hidden[0])
    for a, b in zip(params[:2], alone):
        assert torch.equal(a, b)  # the frozen tensor takes no part in the max-pool


def test_zero_dim_and_empty_parameters(net):
    params = [torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.zeros(0, 4)),
              torch.nn.Parameter(torch.randn(3))]
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=net)
    for k in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (k + 1))
        opt.step(loss=_loss(k))
    assert params[0].shape == () and params[0].item() != 1.5
    assert len(opt.state[params[1]]) == 0


def test_step_with_closure_returns_its_loss(net):
    model = torch.nn.Linear(4, 2)
    opt = lo_ops.VeLO(model.parameters(), num_steps=10, pretrained=net)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert opt.velo_state["iteration"].item() == 5
    assert opt.step(closure, loss=torch.tensor(1.0)) is not None  # the keyword wins for VeLO


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_no_recompiles(net, backend):
    torch._dynamo.reset()
    shapes = [(), (5,), (7, 5), (6, 6), (3, 4, 6)]
    eager_params = make_params(shapes, non_contiguous=False)
    comp_params = clone_params(eager_params)
    eager = lo_ops.VeLO(eager_params, num_steps=20, lr=0.5, weight_decay=0.01, pretrained=net)
    comp = lo_ops.VeLO(comp_params, num_steps=20, lr=0.5, weight_decay=0.01, pretrained=net)
    counter = CountingBackend(backend)
    compiled_step = torch.compile(comp.step, backend=counter, fullgraph=True)
    eager_sched = torch.optim.lr_scheduler.CosineAnnealingLR(eager, T_max=10)
    comp_sched = torch.optim.lr_scheduler.CosineAnnealingLR(comp, T_max=10)
    for k in range(10):
        set_grads([eager_params, comp_params], k)
        eager.step(loss=_loss(k))
        compiled_step(loss=_loss(k))
        eager_sched.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            comp_sched.step()
    # The fused ops are the same calls; inductor generates its own code for the small batched
    # LSTM (sigmoid, tanh), which rounds differently in the last bits.
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "inductor" else dict(rtol=0, atol=0)
    state_tol = dict(rtol=1e-4, atol=1e-5) if backend == "inductor" else tol
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, **tol)
        for key in eager.state[a]:
            torch.testing.assert_close(eager.state[a][key], comp.state[b][key], **state_tol)
    for key in eager.velo_state:
        torch.testing.assert_close(eager.velo_state[key], comp.velo_state[key], **state_tol)
    assert counter.graphs == 1, f"{counter.graphs - 1} recompiles over 10 scheduled steps"


# -- state_dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_is_bit_identical(net, tmp_path, dtype):
    shapes = [(7, 5), (5,), (), (3, 4, 6)]
    params = make_params(shapes, dtype, non_contiguous=False)
    opt = lo_ops.VeLO(params, num_steps=30, pretrained=net)
    for k in range(5):
        set_grads([params], k)
        opt.step(loss=_loss(k))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_params = clone_params(params)
    resumed = lo_ops.VeLO(resumed_params, num_steps=30, pretrained=net)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p in resumed_params:
        assert all(v.dtype == torch.float32 for v in resumed.state[p].values())
        assert set(resumed.state[p]) >= {"lstm_hidden", "lstm_cell"}
    for k in range(5, 15):
        set_grads([params, resumed_params], k)
        opt.step(loss=_loss(k))
        resumed.step(loss=_loss(k))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for key in opt.velo_state:
        assert torch.equal(opt.velo_state[key], resumed.velo_state[key])


def test_load_state_dict_rejects_bad_state(net):
    params = make_params([(7, 5)], non_contiguous=False)
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=net)
    set_grads([params], 0)
    opt.step(loss=_loss(0))
    sd = opt.state_dict()
    bad = dict(sd, state={0: dict(sd["state"][0], lstm_hidden=torch.zeros(3))})
    with pytest.raises(ValueError, match="lstm_hidden"):
        opt.load_state_dict(bad)
    globals_ = ("iteration", "loss_means", "loss_running_min")
    stripped = {i: {k: v for k, v in s.items() if k not in globals_} for i, s in sd["state"].items()}
    with pytest.raises(ValueError, match="not a VeLO state dict"):
        opt.load_state_dict({"state": stripped, "param_groups": sd["param_groups"]})
    with pytest.raises(ValueError, match="loss_means"):
        opt.load_state_dict(dict(sd, velo=dict(sd["velo"], loss_means=torch.zeros(3))))


# -- errors --------------------------------------------------------------------------------------
def test_without_pretrained_weights_explains_where_they_come_from():
    with pytest.raises(ValueError, match="python -m lo_ops convert"):
        lo_ops.VeLO([torch.nn.Parameter(torch.zeros(3))], num_steps=10)


def test_step_needs_the_loss(net):
    params = make_params([(3,)], non_contiguous=False)
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=net)
    set_grads([params], 0)
    with pytest.raises(ValueError, match="VeLO needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss="1.0")


@pytest.mark.parametrize("kw, match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(num_steps=10, lr=-1.0), "lr"),
    (dict(num_steps=10, weight_decay=float("nan")), "weight_decay"),
])
def test_bad_hyperparameters(net, kw, match):
    with pytest.raises(ValueError, match=match):
        lo_ops.VeLO([torch.nn.Parameter(torch.zeros(3))], pretrained=net, **kw)


def test_num_steps_belongs_to_the_optimizer(net):
    with pytest.raises(ValueError, match="num_steps is the training horizon"):
        lo_ops.VeLO([{"params": [torch.nn.Parameter(torch.zeros(3))], "num_steps": 5}],
                    num_steps=10, pretrained=net)


def test_parameters_on_two_devices(net):
    with pytest.raises(ValueError, match="one device"):
        lo_ops.VeLO([torch.nn.Parameter(torch.zeros(3)),
                     torch.nn.Parameter(torch.zeros(3, device="meta"))], num_steps=10, pretrained=net)


def test_ops_reject_bad_arguments():
    step_args, input_args = _op_args([(7, 5), (5,)], torch.float32)
    bad = list(step_args)
    bad[8] = torch.zeros(2, 100)
    with pytest.raises(RuntimeError, match="velo_step_: mlp_weights must be"):
        torch.ops.lo_ops.velo_step_(*bad)
    bad = list(step_args)
    bad[10] = torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="velo_step_: skip must be a bool"):
        torch.ops.lo_ops.velo_step_(*bad)
    bad = list(input_args)
    bad[1] = [torch.zeros(7, 4)] + bad[1][1:]
    with pytest.raises(RuntimeError, match=r"velo_lstm_input: grads\[0\]"):
        torch.ops.lo_ops.velo_lstm_input(*bad)
    bad = list(input_args)
    bad[3] = [bad[3][0], torch.zeros(4)] + bad[3][2:]
    with pytest.raises(RuntimeError, match=r"velo_lstm_input: rms\[1\]"):
        torch.ops.lo_ops.velo_lstm_input(*bad)


def test_ops_do_not_depend_on_thread_count():
    """The fused ops' results are bit-identical with 1 and with several threads."""
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            step_args, input_args = _op_args([(300, 70), (5,), (9000,), (40, 50, 32)], torch.float32)
            X, finite = torch.ops.lo_ops.velo_lstm_input(*input_args)
            torch.ops.lo_ops.velo_step_(*step_args)
            outs.append([X] + [t for lst in step_args[:7] for t in lst])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_mixed_dtypes_share_one_lstm_and_one_skip_decision(net, fused):
    """fp32 and bf16 parameters go to separate per-element calls, but the LSTM pools over all
    of them, and a NaN among the bf16 gradients skips the fp32 tensors too."""
    fp32 = make_params([(7, 5), (5,)], non_contiguous=False)
    bf16 = make_params([(4, 6), (3,)], torch.bfloat16, seed=1, non_contiguous=False)
    params = fp32 + bf16
    twin = clone_params(params)
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=net, fused=fused)
    other = lo_ops.VeLO(twin, num_steps=10, pretrained=net, fused=not fused)
    for k in range(3):
        set_grads([params, twin], k)
        opt.step(loss=_loss(k))
        other.step(loss=_loss(k))
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, **TOLERANCES[a.dtype])
    before = [p.detach().clone() for p in params]
    set_grads([params], 3)
    params[3].grad[1] = float("nan")
    opt.step(loss=_loss(3))
    for p, b in zip(params, before):
        assert torch.equal(p, b)
