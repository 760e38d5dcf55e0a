"""μLO (lo_ops.MuLO, spec 6): the original's trajectories on every path, its μP multiplier and
nan_to_num, weight decay, param groups, state dicts, and the μP helpers of lo_ops.mup."""

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import lo_ops
from conftest import EMULATED_CUDA_PATHS, FIXTURES, VECTORS, enter_path
from helpers import SHAPES, CountingBackend, clone_params, make_params, set_grads

STEP_RTOL = 1e-5
LR_PROBE = 2.0**24  # p - lr * s * step is dominated by lr * s * step: the step is read back exactly
PATHS = {"fused-avx512": (True, "avx512"), "fused-avx2": (True, "avx2"), "fused-base": (True, "base"),
         **{path: (True, None) for path in EMULATED_CUDA_PATHS}, "reference": (False, None)}


@pytest.fixture(scope="module")
def mulo_vectors():
    return load_mulo_vectors()


def load_mulo_vectors():
    """(meta, tensors) of ../shared/vectors/mulo_init; skips the test without them."""
    from safetensors.torch import load_file

    path = VECTORS / "mulo_init.json"
    if not path.exists():
        pytest.skip(f"no {path}")
    return json.loads(path.read_text()), load_file(str(VECTORS / "mulo_init.safetensors"))


def _network(vec):
    """The vectors' (random) meta-parameters as a SmallFCLOptNetwork (JAX [in, out] kernels)."""
    net = lo_ops.SmallFCLOptNetwork(decay_offsets={
        "momentum": vec["theta.momentum_decays"].tolist(), "rms": vec["theta.rms_decays"].tolist(),
        "adafactor": vec["theta.adafactor_decays"].tolist()}, step_mult=0.01, exp_mult=0.001)
    net.load_strict({f"layers.{i}.{kind}": vec[f"theta.nn.~.{'w' if kind == 'weight' else 'b'}{i}"].T.contiguous()
                     if kind == "weight" else vec[f"theta.nn.~.b{i}"]
                     for i in range(3) for kind in ("weight", "bias")}, "mulo_init vectors")
    return net


def _groups(meta, vec, params):
    return [{"params": [p], "mup_scale": float(vec[f"mup_lr_scale.{name}"])}
            for name, p in zip(meta["leaf_order"], params)]


def _jax_state(name, shape, value):
    return value.reshape(shape) if name == "rms" else value.movedim(-1, 0)


@pytest.mark.parametrize("path", list(PATHS))
def test_mulo_matches_original(path, mulo_vectors, monkeypatch, request):
    fused, isa = PATHS[path]
    if isa is not None:
        monkeypatch.setenv("LO_OPS_CPU_ISA", isa)
    enter_path(path, request)
    check_vectors(*mulo_vectors, fused=fused)


def check_vectors(meta, vec, fused, device="cpu"):
    """MuLO on ``device`` (fused or the reference) against the original's trajectory: each
    update's step read back exactly with a large lr, and the state."""
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(vec[f"params.step0.{k}"].clone().to(device)) for k in leaves]
    opt = lo_ops.MuLO(_groups(meta, vec, params), lr=LR_PROBE, pretrained=_network(vec), fused=fused)
    assert opt.step_mult == 0.01 and opt.exp_mult == 0.001
    for k in range(1, meta["n_updates"] + 1):
        with torch.no_grad():
            for name, p in zip(leaves, params):
                p.copy_(vec[f"params.step{k - 1}.{name}"])
                p.grad = vec[f"grads.step{k}.{name}"].clone().to(device)
        opt.step()
        for name, p in zip(leaves, params):
            prev = vec[f"params.step{k - 1}.{name}"].double()
            ours = (prev - p.detach().cpu().double()) / LR_PROBE
            ref = vec[f"steps.step{k}.{name}"].double()
            err = (ours - ref).norm() / ref.norm()
            assert err <= STEP_RTOL, f"update {k}, {name}: relative step error {err:.3g}"
            state, shape = opt.state[p], tuple(p.shape)
            names = {"mom": "momentum", "rms": "rms"} | (
                {"fac_v_row": "fac_row", "fac_v_col": "fac_col"} if len(shape) >= 2 else {"fac_v_diag": "fac_diag"})
            for jax_name, ours_name in names.items():
                expected = _jax_state(ours_name, shape, vec[f"state.step{k}.{jax_name}.{name}"])
                torch.testing.assert_close(state[ours_name].cpu(), expected, rtol=1e-5,
                                           atol=1e-6 * expected.abs().max().item(),
                                           msg=lambda m: f"update {k}, {name}, {ours_name}: {m}")
            assert state["step"].item() == k


def test_raw_step_is_small_fc_lopt_with_step_mult_001(mulo_vectors):
    """With mup_scale 1 everywhere, MuLO's step is small_fc_lopt's with step_mult 0.01 (the
    vectors' raw_steps, from the same state), and equals SmallFCLOpt's on finite gradients."""
    meta, vec = mulo_vectors
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(vec[f"params.step0.{k}"].clone()) for k in leaves]
    opt = lo_ops.MuLO(params, lr=LR_PROBE, pretrained=_network(vec))
    with torch.no_grad():
        for name, p in zip(leaves, params):
            p.grad = torch.nan_to_num(vec[f"grads.step1.{name}"])
    opt.step()
    for name, p in zip(leaves, params):
        ours = (vec[f"params.step0.{name}"].double() - p.detach().double()) / LR_PROBE
        ref = vec[f"raw_steps.step1.{name}"].double()
        assert (ours - ref).norm() / ref.norm() <= STEP_RTOL, name
    plain = make_params(SHAPES[:6], non_contiguous=False)
    mu = clone_params(plain)
    a = lo_ops.SmallFCLOpt(plain, pretrained=_network(vec), step_mult=0.01)
    b = lo_ops.MuLO(mu, pretrained=_network(vec))
    for k in range(3):
        set_grads([plain, mu], k)
        a.step()
        b.step()
    for x, y in zip(plain, mu):
        assert torch.equal(x, y)


def test_compiled_mulo_equals_eager_without_recompiles(mulo_vectors):
    meta, vec = mulo_vectors
    eager_params = make_params(SHAPES[:8], non_contiguous=False)
    comp_params = clone_params(eager_params)
    scales = [1.0, 1 / 7, 0.5, 2 / 3]

    def groups(ps):
        return [{"params": ps[i::4], "mup_scale": scales[i]} for i in range(4)]

    eager = lo_ops.MuLO(groups(eager_params), pretrained=_network(vec), weight_decay=0.01)
    comp = lo_ops.MuLO(groups(comp_params), pretrained=_network(vec), weight_decay=0.01)
    torch._dynamo.reset()
    counter = CountingBackend("aot_eager")
    step = torch.compile(comp.step, backend=counter, fullgraph=True)
    sched_e = torch.optim.lr_scheduler.StepLR(eager, step_size=1, gamma=0.7)
    sched_c = torch.optim.lr_scheduler.StepLR(comp, step_size=1, gamma=0.7)
    for k in range(5):
        set_grads([eager_params, comp_params], k)
        eager_params[3].grad[0] = float("nan")
        comp_params[3].grad[0] = float("nan")
        eager.step()
        step()
        sched_e.step()
        with warnings.catch_warnings():  # the compiled step bypasses the scheduler's step wrapper
            warnings.simplefilter("ignore", UserWarning)
            sched_c.step()
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.graphs == 1
    assert [g["mup_scale"] for g in comp.param_groups] == scales  # schedulers change lr only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_equals_reference_with_mixed_mup_scales(mulo_vectors, dtype):
    check_fused_against_reference(mulo_vectors[1], dtype)


def check_fused_against_reference(vec, dtype, device="cpu"):
    """The fused kernels on ``device`` against the reference (on the CPU): the shape zoo in 5
    groups of mixed mup_scale, weight decay, NaN and +inf gradient elements, 5 steps."""
    runs = []
    for fused in (True, False):
        params = make_params(SHAPES, dtype)
        if fused:
            params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
        scales = [1.0, 1 / 7, 0.5, 2 / 3, 1 / 64]
        groups = [{"params": params[i::5], "mup_scale": scales[i]} for i in range(5)]
        opt = lo_ops.MuLO(groups, pretrained=_network(vec), fused=fused, weight_decay=0.05, lr=0.5)
        for k in range(5):
            set_grads([params], k)  # (the same values on every device)
            params[3].grad.view(-1)[0] = float("nan")
            params[4].grad.view(-1)[1] = float("inf")
            opt.step()
        runs.append((params, opt))
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    (fp, fo), (rp, ro) = runs
    for i, (a, b) in enumerate(zip(fp, rp)):
        torch.testing.assert_close(a.cpu(), b, **tol, equal_nan=True, msg=lambda m: f"param {i}: {m}")
        for key in fo.state[a]:
            x, y = fo.state[a][key].cpu(), ro.state[b][key]
            finite = x[torch.isfinite(x)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7 + 1e-5 * scale, equal_nan=True,
                                       msg=lambda m: f"param {i} {key}: {m}")


def test_multiplier_scales_the_step_not_the_weight_decay(mulo_vectors):
    meta, vec = mulo_vectors
    runs = {}
    for scale, wd in [(1.0, 0.0), (0.25, 0.0), (0.25, 0.1)]:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
        opt = lo_ops.MuLO([{"params": [p], "mup_scale": scale}], pretrained=_network(vec), weight_decay=wd, lr=0.5)
        p.grad = torch.linspace(0.3, -0.2, 12).reshape(4, 3)
        opt.step()
        runs[(scale, wd)] = p.detach().clone()
    p0 = torch.linspace(-1, 1, 12).reshape(4, 3)
    step = p0 - runs[(1.0, 0.0)]
    torch.testing.assert_close(p0 - runs[(0.25, 0.0)], 0.25 * step, rtol=1e-5, atol=2.5e-7)  # (p's rounding)
    # decoupled decay after the update, with lr but without s: p' = (p - lr s step)(1 - lr wd)
    torch.testing.assert_close(runs[(0.25, 0.1)], runs[(0.25, 0.0)] * (1 - 0.5 * 0.1), rtol=1e-6, atol=1e-8)


def test_nan_to_num_replaces_the_skip_rule(mulo_vectors):
    meta, vec = mulo_vectors
    a = make_params([(7, 5), (5,)], non_contiguous=False)
    b = clone_params(a)
    oa = lo_ops.MuLO(a, pretrained=_network(vec))
    ob = lo_ops.MuLO(b, pretrained=_network(vec))
    set_grads([a, b], 0)
    a[0].grad[1, 2] = float("nan")
    b[0].grad[1, 2] = 0.0  # NaN is 0 to μLO
    oa.step()
    ob.step()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert oa.state[a[0]]["step"].item() == 1  # counted: not skipped


def test_state_dict_round_trip_keeps_mup_scale(mulo_vectors):
    meta, vec = mulo_vectors
    params = make_params([(7, 5), (5,)], non_contiguous=False)
    opt = lo_ops.MuLO([{"params": [params[0]], "mup_scale": 1 / 7}, {"params": [params[1]]}],
                      pretrained=_network(vec))
    set_grads([params], 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert [g["mup_scale"] for g in sd["param_groups"]] == [1 / 7, 1.0]
    twin_params = clone_params(params)
    twin = lo_ops.MuLO([{"params": [twin_params[0]], "mup_scale": 1 / 7}, {"params": [twin_params[1]]}],
                       pretrained=_network(vec))
    twin.load_state_dict(sd)
    for k in range(1, 3):
        set_grads([params, twin_params], k)
        opt.step()
        twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_mulo_errors():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="MuLO needs its meta-weights, which lo_ops does not ship.*btherien/mulo"):
        lo_ops.MuLO([p])
    net = lo_ops.SmallFCLOptNetwork()
    for bad in (0.0, -1.0, float("inf"), torch.tensor(0.5), True, "0.5"):
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['mup_scale'\] must be a finite Python number > 0"):
            lo_ops.MuLO([{"params": [p], "mup_scale": bad}], pretrained=net)


def test_opcheck_with_step_scale_and_nan_to_num():
    from helpers import make_state

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads[0][1, 1] = float("nan")
    momentum, rms, fac_row, fac_col, fac_diag = make_state(params, gen)
    weights, decays = lo_ops.SmallFCLOpt([torch.nn.Parameter(params[0].clone())])._meta(torch.device("cpu"))
    args = (params, grads, momentum, rms, fac_row, fac_col, fac_diag, [torch.zeros(()), torch.zeros(())],
            torch.tensor(0.5), weights, decays, 0.01, 0.01, 0.001, None, 1 / 7, True)
    torch.library.opcheck(torch.ops.lo_ops.small_fc_lopt_step_.default, args)


# -- lo_ops.mup -------------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, width=64, d_in=20, classes=10):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, width)
        self.h1 = torch.nn.Linear(width, width)
        self.h2 = torch.nn.Linear(width, width)
        self.out = lo_ops.mup.MuReadout(width, classes)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.h1(x))
        x = torch.relu(self.h2(x))
        return self.out(x)


class _Block(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], dim=-1)  # μP: 1/d_head
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class _Transformer(torch.nn.Module):
    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(16, d))
        self.blocks = torch.nn.ModuleList([_Block(d), _Block(d)])
        self.head = lo_ops.mup.MuReadout(d, vocab)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def _scales(groups):
    return {n: g["mup_scale"] for g in groups for n in g["names"]}


def test_param_groups_of_an_mlp():
    model = _MLP()
    scales = _scales(lo_ops.mup.param_groups(model))
    assert scales["h1.weight"] == scales["h2.weight"] == 1 / 64
    for name in ("inp.weight", "inp.bias", "h1.bias", "out.weight", "out.bias"):
        assert scales[name] == 1.0, name
    doubled = _scales(lo_ops.mup.param_groups(model, hidden_lr_mult=2.0))
    assert doubled["h1.weight"] == 2 / 64
    groups = lo_ops.mup.param_groups(model, weight_decay=0.1)
    assert len(groups) == 2 and all(g["weight_decay"] == 0.1 for g in groups)


def test_param_groups_of_a_transformer():
    scales = _scales(lo_ops.mup.param_groups(_Transformer()))
    for i in range(2):
        for name in ("q", "k", "v", "o", "up"):
            assert scales[f"blocks.{i}.{name}.weight"] == 1 / 32, name
        assert scales[f"blocks.{i}.down.weight"] == 1 / 128
        for name in ("q.bias", "up.bias", "norm1.weight", "norm2.bias"):
            assert scales[f"blocks.{i}.{name}"] == 1.0
    for name in ("embed.weight", "pos", "head.weight", "head.bias"):
        assert scales[name] == 1.0


def test_param_groups_of_a_convolutional_model():
    """Conv kernels whose in and out channels both grow with the width are hidden, with fan_in
    = in-channels (lo_ops' choice; the original defines none); the patch embedding (3 input
    channels), norms and the readout are not."""
    c = 48
    model = torch.nn.Sequential(torch.nn.Conv2d(3, c, 4, stride=4), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv1d(c, c, 1), torch.nn.Flatten(),
                                lo_ops.mup.MuReadout(c * 4, 10))
    scales = _scales(lo_ops.mup.param_groups(model))
    assert scales["3.weight"] == 1 / c and scales["5.weight"] == 1 / c
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.bias", "5.bias", "7.weight", "7.bias"):
        assert scales[name] == 1.0, name
    assert lo_ops.mup.hidden_matrices(model) == {"3.weight": c, "5.weight": c}


def test_param_groups_said_explicitly():
    model = _MLP(width=20)  # the input size equals the width: inferred roles would mark inp as hidden
    assert _scales(lo_ops.mup.param_groups(model))["inp.weight"] == 1 / 20
    scales = _scales(lo_ops.mup.param_groups(model, hidden=["h1.weight", "h2.weight"]))
    assert scales["inp.weight"] == 1.0 and scales["h1.weight"] == 1 / 20
    with pytest.raises(ValueError, match=r"parameters the model does not have: \['nope'\]"):
        lo_ops.mup.param_groups(model, hidden=["nope"])
    with pytest.raises(ValueError, match="h1.bias has shape"):
        lo_ops.mup.param_groups(model, hidden=["h1.bias"])


def test_param_groups_of_a_model_prepared_with_mup():
    mup = pytest.importorskip("mup")

    def make(width):
        m = torch.nn.Sequential(torch.nn.Linear(20, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), mup.MuReadout(width, 10))
        return m

    model = make(64)
    mup.set_base_shapes(model, make(8), delta=make(16))
    scales = _scales(lo_ops.mup.param_groups(model))
    assert scales["2.weight"] == 1 / 64  # the raw fan_in, not mup's width_mult (64 / 8)
    for name in ("0.weight", "0.bias", "2.bias", "4.weight", "4.bias"):
        assert scales[name] == 1.0, name


def test_mu_readout_and_init():
    torch.manual_seed(0)
    r = lo_ops.mup.MuReadout(64, 3, output_mult=2.0)
    assert torch.count_nonzero(r.weight) == 0
    with torch.no_grad():
        r.weight.normal_()
    x = torch.randn(5, 64)
    torch.testing.assert_close(r(x), (x @ r.weight.T + r.bias) * 2.0 / 64)  # after the bias
    model = lo_ops.mup.init_(_MLP(width=512, d_in=256))
    assert torch.count_nonzero(model.out.weight) == 0
    w = model.h1.weight
    assert w.abs().max() <= 2 / math.sqrt(512) + 1e-7
    assert abs(w.std().item() * math.sqrt(512) - 0.88) < 0.02  # truncated at 2 sigma, uncorrected
    assert abs(model.h1.bias.std().item() - 1.0) < 0.1


def test_mup_mlp_trains_with_mulo_and_the_pylo_layout_weights():
    pylo = FIXTURES / "small_fc_lopt_init" / "pylo_hub" / "MetaMLP"
    if not pylo.exists():
        pytest.skip(f"no {pylo}")
    torch.manual_seed(0)
    model = lo_ops.mup.init_(_MLP(width=64))
    opt = lo_ops.MuLO(lo_ops.mup.param_groups(model), pretrained=str(pylo))
    x, y = torch.randn(256, 20), torch.randint(0, 10, (256,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)  # (the fixture's meta-weights are random: no descent promised)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.state[model.h1.weight]["step"].item() == 30


def test_readme_example_and_examples_script_run():
    """README's μLO example (its code block, the Hub id swapped for the test weights) and
    examples/mup_mlp_mulo.py."""
    import re
    import subprocess
    import sys

    pylo = FIXTURES / "small_fc_lopt_init" / "pylo_hub" / "MetaMLP"
    if not pylo.exists():
        pytest.skip(f"no {pylo}")
    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    (code,) = [b for b in blocks if "class MuMLP" in b]
    torch.manual_seed(0)
    batches = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    scope = {"torch": torch, "nn": torch.nn, "lo_ops": lo_ops, "batches": batches}
    exec(compile(code.replace('"btherien/mulo"', repr(str(pylo))), "README.md", "exec"), scope)
    opt, model = scope["opt"], scope["model"]
    assert {g["mup_scale"] for g in opt.param_groups} == {1.0, 1 / 1024}
    assert opt.state[model.h1.weight]["step"].item() == 3
    out = subprocess.run([sys.executable, str(root / "examples" / "mup_mlp_mulo.py"), "--weights", str(pylo),
                          "--steps", "4", "--width", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mup_scale 0.015625: h1.weight, h2.weight" in out.stdout
    losses = [float(v) for v in re.findall(r"train loss (\S+)", out.stdout)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert re.search(r"test accuracy \d\.\d{3}", out.stdout)
