"""lo_ops.Celo and lo_ops.CeloAdam: fused vs reference, torch.compile, state_dict, skipping,
param groups, loading and errors (the published weights shipped in the package)."""

import math
import warnings

import pytest
import torch

import lo_ops
from lo_ops.hyperv2 import reference as ref

from helpers import SHAPES, CountingBackend, clone_params, make_params, set_grads

OPTIMIZERS = {"celo": lo_ops.Celo, "celo_adam": lo_ops.CeloAdam}
TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
STATE_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(params=sorted(OPTIMIZERS))
def cls(request):
    return OPTIMIZERS[request.param]


def _loss(k):
    return torch.tensor(3.0 - 0.1 * k + 0.2 * math.sin(k))


def _run_both(cls, shapes, dtype, steps, **kw):
    fused_params = make_params(shapes, dtype)
    ref_params = clone_params(fused_params)
    fused = cls(fused_params, num_steps=50, fused=True, **kw)
    reference = cls(ref_params, num_steps=50, fused=False, **kw)
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
    for key in fused.global_state:
        torch.testing.assert_close(fused.global_state[key], reference.global_state[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_reference_shape_zoo_20_steps(cls, dtype):
    _compare(*_run_both(cls, SHAPES, dtype, steps=20), dtype)


def test_param_groups_lr_and_weight_decay(cls):
    shapes = [(7, 5), (5,), (3, 4, 6)]
    params = make_params(shapes, non_contiguous=False)
    ref_params = clone_params(params)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5, "weight_decay": 0.1}]
    ref_groups = [{"params": ref_params[:2]}, {"params": ref_params[2:], "lr": 0.5, "weight_decay": 0.1}]
    opt = cls(groups, num_steps=30, weight_decay=0.01)
    reference = cls(ref_groups, num_steps=30, weight_decay=0.01, fused=False)
    for k in range(5):
        set_grads([params, ref_params], k)
        opt.step(loss=_loss(k))
        reference.step(loss=_loss(k))
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    # One schedule for every group: the same lr_mult, one step count.
    assert opt.global_state["iteration"].item() == 5


def test_lr_and_weight_decay_scale_the_step(cls):
    """lr multiplies the step; weight decay is decoupled and scaled by lr only."""
    base = make_params([(6, 4)], non_contiguous=False)
    runs = {}
    for lr, wd in ((1.0, 0.0), (0.5, 0.0), (1.0, 0.1)):
        params = clone_params(base)
        opt = cls(params, num_steps=20, lr=lr, weight_decay=wd)
        set_grads([params], 0)
        opt.step(loss=_loss(0))
        runs[(lr, wd)] = params[0].detach().clone()
    p0 = base[0].detach()
    step = p0 - runs[(1.0, 0.0)]
    torch.testing.assert_close(p0 - runs[(0.5, 0.0)], 0.5 * step, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(runs[(1.0, 0.1)], (p0 - step) * (1 - 0.1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_grad", "inf_grad", "bf16_nan_grad"])
def test_non_finite_step_is_skipped(cls, fused, poison):
    params = make_params([(7, 5), (5,), ()], non_contiguous=False)
    params.append(torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16)))
    opt = cls(params, num_steps=20, fused=fused)
    for k in range(3):
        set_grads([params], k)
        opt.step(loss=_loss(k))
    before_params = [p.detach().clone() for p in params]
    before_state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    set_grads([params], 3)
    loss = _loss(3)
    if poison == "nan_loss":
        loss = torch.tensor(float("nan"))
    elif poison == "inf_loss":
        loss = torch.tensor(float("inf"))
    elif poison == "bf16_nan_grad":
        params[3].grad[1, 2] = float("nan")
    else:
        params[0].grad[2, 3] = float("nan") if poison == "nan_grad" else float("-inf")
    opt.step(loss=loss)
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            assert torch.equal(v, before_state[i][k]), k
    set_grads([params], 4)
    opt.step(loss=_loss(4))
    assert opt.global_state["iteration"].item() == 4
    assert all(torch.isfinite(p).all() for p in params)


def test_one_schedule_for_any_set_of_tensors(cls):
    """Celo's LSTM input does not depend on the tensors: a parameter without a gradient
    changes nothing for the others (and is left as it is)."""
    params = make_params([(7, 5), (5,), (3, 4)], non_contiguous=False)
    alone = clone_params(params[:2])
    opt, opt_alone = cls(params, num_steps=20), cls(alone, num_steps=20)
    frozen = params[2].detach().clone()
    for k in range(4):
        set_grads([params[:2], alone], k)
        params[2].grad = None
        opt.step(loss=_loss(k))
        opt_alone.step(loss=_loss(k))
    assert torch.equal(params[2], frozen)
    assert not any(v.any() for key, v in opt.state[params[2]].items() if key not in opt.global_state)
    for a, b in zip(params[:2], alone):
        assert torch.equal(a, b)
    for key in opt.global_state:
        assert torch.equal(opt.global_state[key], opt_alone.global_state[key])


def test_zero_dim_and_empty_parameters(cls):
    params = [torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.zeros(0, 4)),
              torch.nn.Parameter(torch.randn(3))]
    opt = cls(params, num_steps=10)
    for k in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (k + 1))
        opt.step(loss=_loss(k))
    assert params[0].shape == () and params[0].item() != 1.5
    assert len(opt.state[params[1]]) == 0


def test_nothing_to_do_takes_no_step(cls):
    params = make_params([(3,)], non_contiguous=False)
    opt = cls(params, num_steps=10)
    opt.step(loss=_loss(0))  # no gradients
    assert opt.global_state["iteration"].item() == 0


def test_trains_a_model_with_a_closure(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = cls(model.parameters(), num_steps=100)
    x, y = torch.randn(64, 8), torch.randn(64, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(99):
        last = opt.step(closure).item()
    assert last < 0.7 * first


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_no_recompiles(cls, backend):
    torch._dynamo.reset()
    shapes = [(), (5,), (7, 5), (6, 6), (3, 4, 6)]
    eager_params = make_params(shapes, non_contiguous=False)
    comp_params = clone_params(eager_params)
    eager = cls(eager_params, num_steps=20, lr=0.5, weight_decay=0.01)
    comp = cls(comp_params, num_steps=20, lr=0.5, weight_decay=0.01)
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
    # inductor generates its own code for the LSTM (sigmoid, tanh, exp): last-bit differences.
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "inductor" else dict(rtol=0, atol=0)
    state_tol = dict(rtol=1e-4, atol=1e-5) if backend == "inductor" else tol
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, **tol)
        for key in eager.state[a]:
            torch.testing.assert_close(eager.state[a][key], comp.state[b][key], **state_tol)
    assert counter.graphs == 1, f"{counter.graphs - 1} recompiles over 10 scheduled steps"


# -- state_dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_is_bit_identical(cls, tmp_path, dtype):
    shapes = [(7, 5), (5,), (), (3, 4, 6)]
    params = make_params(shapes, dtype, non_contiguous=False)
    opt = cls(params, num_steps=30)
    for k in range(5):
        set_grads([params], k)
        opt.step(loss=_loss(k))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_params = clone_params(params)
    resumed = cls(resumed_params, num_steps=30)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p in resumed_params:
        assert all(v.dtype == torch.float32 for v in resumed.state[p].values())
        assert resumed.state[p]["lstm_hidden"] is resumed.global_state["lstm_hidden"]
    for k in range(5, 15):
        set_grads([params, resumed_params], k)
        opt.step(loss=_loss(k))
        resumed.step(loss=_loss(k))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for key in opt.global_state:
        assert torch.equal(opt.global_state[key], resumed.global_state[key])


def test_load_state_dict_rejects_bad_state(cls):
    params = make_params([(7, 5)], non_contiguous=False)
    opt = cls(params, num_steps=10)
    set_grads([params], 0)
    opt.step(loss=_loss(0))
    sd = opt.state_dict()
    key = cls.architecture
    with pytest.raises(ValueError, match="lstm_hidden"):
        opt.load_state_dict(dict(sd, **{key: dict(sd[key], lstm_hidden=torch.zeros(3))}))
    globals_ = set(opt.global_state)
    stripped = {i: {k: v for k, v in s.items() if k not in globals_} for i, s in sd["state"].items()}
    with pytest.raises(ValueError, match=f"not a {cls.__name__} state dict"):
        opt.load_state_dict({"state": stripped, "param_groups": sd["param_groups"]})
    first = next(iter(sd["state"]))
    wrong = {first: {k: (torch.zeros(2) if k not in globals_ else v) for k, v in sd["state"][first].items()}}
    with pytest.raises(ValueError, match="should be a tensor of shape"):
        opt.load_state_dict(dict(sd, state=wrong))


# -- loading and errors ----------------------------------------------------------------------------
def test_weights_from_a_directory_and_a_network(cls, tmp_path):
    net = lo_ops.load_hyperv2_network(None, cls.architecture)[0]
    out = lo_ops.convert_hyperv2(None, tmp_path / "w", cls.architecture)
    base = make_params([(7, 5), (5,)], non_contiguous=False)
    runs = []
    for pretrained in (None, out, net):
        params = clone_params(base)
        opt = cls(params, num_steps=10, pretrained=pretrained)
        for k in range(3):
            set_grads([params], k)
            opt.step(loss=_loss(k))
        runs.append(params)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_convert_command_line(tmp_path, capsys):
    from lo_ops.__main__ import main

    from test_celo_vectors import _theta

    assert main(["convert", str(_theta("celo")), "--out", str(tmp_path / "c")]) == 0
    assert "Celo" in capsys.readouterr().out
    net = lo_ops.load_celo_network(tmp_path / "c")[0]
    shipped = lo_ops.load_celo_network()[0]
    for key, value in shipped.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    assert main(["convert", str(tmp_path / "missing.state"), "--out", str(tmp_path / "x")]) == 2


def test_bad_arguments(cls):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="num_steps"):
        cls(p, num_steps=0)
    with pytest.raises(ValueError, match="lr"):
        cls(p, num_steps=10, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        cls(p, num_steps=10, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="num_steps is the training horizon"):
        cls([{"params": p, "num_steps": 5}], num_steps=10)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        cls(p, num_steps=10, pretrained="./no/such/file")
    with pytest.raises(TypeError, match="pretrained must be"):
        cls(p, num_steps=10, pretrained=3)
    opt = cls(p, num_steps=10)
    p[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    p[0].grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)


def test_schedule_is_computed_once_for_all_tensors(cls):
    """lr_mult of the one LSTM row equals what the original's T rows give (every row alike)."""
    net = lo_ops.load_hyperv2_network(None, cls.architecture)[0]
    X = torch.randn(1, 18).expand(5, 18)
    h, c = net.init_hidden.expand(5, -1), net.init_cell.expand(5, -1)
    h5, c5, _, m5 = ref.per_tensor_network(X, h, c, net)
    h1, c1, _, m1 = ref.per_tensor_network(X[:1], h[:1], c[:1], net)
    torch.testing.assert_close(m5, m1.expand(5), rtol=1e-6, atol=0)
    torch.testing.assert_close(h5, h1.expand(5, -1), rtol=0, atol=1e-6)
    assert (m1 > 0).all()  # 0.1 * exp(...)


def test_shipped_weights_and_licence_are_package_data():
    """Every file of lo_ops/weights/celo* goes into the wheel (pyproject's package-data)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(lo_ops.__file__).resolve().parent
    config = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lo_ops"]
    assert "lo_ops.hyperv2" in config["tool"]["setuptools"]["packages"]
    for name in ("celo", "celo_adam"):
        files = sorted(p.relative_to(root).as_posix() for p in (root / "weights" / name).iterdir())
        assert {Path(f).name for f in files} >= {"config.json", "model.safetensors", "LICENSE-celo", "README.md"}
        for f in files:
            assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f


@pytest.mark.parametrize("name", ["velo", "celo", "celo_adam"])
def test_compiled_step_with_a_python_number_loss_fails_at_once(name):
    from conftest import VELO_FIXTURES

    params = make_params([(4, 3)], non_contiguous=False)
    if name == "velo":
        opt = lo_ops.VeLO(params, num_steps=10, pretrained=VELO_FIXTURES["pylo"]())
    else:
        opt = OPTIMIZERS[name](params, num_steps=10)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True)
    set_grads([params], 0)
    with pytest.raises(Exception, match="needs the loss as a 0-d tensor"):
        step(loss=1.5)
    step(loss=torch.tensor(1.5))  # a tensor loss compiles once
    assert opt.global_state["iteration"].item() == 1
    opt.step(loss=2.5)  # eager: a number is fine
    assert opt.global_state["iteration"].item() == 2


@pytest.mark.parametrize("make", [
    lambda ps, wd: lo_ops.SmallFCLOpt(ps, weight_decay=wd),
    lambda ps, wd: lo_ops.CeloAdam(ps, num_steps=10, weight_decay=wd),
], ids=["small_fc_lopt", "celo_adam"])
def test_weight_decay_as_a_0d_tensor(make):
    base = make_params([(6, 4)], non_contiguous=False)
    a, b = clone_params(base), clone_params(base)
    opt_a, opt_b = make(a, 0.1), make(b, torch.tensor(0.1))
    assert isinstance(opt_b.param_groups[0]["weight_decay"], float)
    for k in range(2):
        set_grads([a, b], k)
        for opt in (opt_a, opt_b):
            if isinstance(opt, lo_ops.CeloAdam):
                opt.step(loss=_loss(k))
            else:
                opt.step()
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="one-element real tensor"):
        make(clone_params(base), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite number >= 0"):
        make(clone_params(base), torch.tensor(-1.0))


def test_saved_weights_are_readable_like_the_other_files(tmp_path):
    import os
    import stat

    out = lo_ops.convert_hyperv2(None, tmp_path / "c", "celo")
    modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    lo_ops.load_small_fc_lopt_network(None)[0].save_pretrained(tmp_path / "s")
    modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in (tmp_path / "s").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
