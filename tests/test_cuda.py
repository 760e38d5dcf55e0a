"""CUDA kernels against the CPU kernels and the reference vectors; opcheck, torch.compile and
CUDA-graph capture on CUDA. Skipped without a GPU (perf/gpu_check.sh runs them on one)."""

import math

import pytest
import torch

import lo_ops
from lo_ops.hyperv2 import reference as ref
from lo_ops._layout import VELO_MLP_NUMEL

from conftest import VELO_FIXTURES
from helpers import SHAPES, make_params, make_state, set_grads
from test_opcheck import _op_args

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not lo_ops.has_kernel("small_fc_lopt_step_", "cuda"),
    reason="needs a CUDA device and lo_ops built with its CUDA kernels",
)

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
STATE_TOL = dict(rtol=1e-5, atol=1e-7)


def _cuda(x):
    if isinstance(x, list):
        return [_cuda(t) for t in x]
    if isinstance(x, torch.Tensor):
        return x.detach().to("cuda", copy=True)
    return x


def _small_fc_args(shapes, dtype, seed=0):
    return list(_op_args(shapes, dtype, seed))


def _velo_args(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach() for p in make_params(shapes, dtype, seed=seed)]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    momentum, rms, fac_row, fac_col, fac_diag = make_state(params, gen)
    n = len(params)
    step = [params, grads, momentum, rms, fac_row, fac_col, fac_diag, torch.tensor(0.5),
            torch.randn(n, VELO_MLP_NUMEL, generator=gen) * 0.3, torch.rand(n, generator=gen),
            torch.tensor(False), 0.01, 0.001, 0.001]
    inputs = [params, grads, momentum, rms, torch.rand(9, generator=gen) - 0.5, torch.tensor(3.0), 20.0]
    return step, inputs


def _assert_lists_close(a, b, dtype):
    for la, lb in zip(a, b):
        if isinstance(la, list):
            for x, y in zip(la, lb):
                tol = TOL[dtype] if x.dtype == dtype else STATE_TOL
                torch.testing.assert_close(x.cpu(), y, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_small_fc_lopt_op_matches_cpu(dtype):
    cpu = _small_fc_args(SHAPES, dtype)
    gpu = _cuda(_small_fc_args(SHAPES, dtype))
    torch.ops.lo_ops.small_fc_lopt_step_(*cpu)
    torch.ops.lo_ops.small_fc_lopt_step_(*gpu)
    _assert_lists_close(gpu[:8], cpu[:8], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_velo_ops_match_cpu(dtype):
    cpu_step, cpu_in = _velo_args(SHAPES, dtype)
    gpu_step, gpu_in = (_cuda(a) for a in _velo_args(SHAPES, dtype))
    X, finite = torch.ops.lo_ops.velo_lstm_input(*cpu_in)
    Xg, finite_g = torch.ops.lo_ops.velo_lstm_input(*gpu_in)
    torch.testing.assert_close(Xg.cpu(), X, rtol=1e-5, atol=1e-5)
    assert bool(finite_g) == bool(finite)
    torch.ops.lo_ops.velo_step_(*cpu_step)
    torch.ops.lo_ops.velo_step_(*gpu_step)
    _assert_lists_close(gpu_step[:7], cpu_step[:7], dtype)


def test_row_and_column_scaled_gradients():
    """Gradients scaled by row and by column expose a wrong averaging axis of r or c."""
    shapes = [(64, 48), (48, 64), (6, 40, 9), (3, 5, 7, 11)]
    cpu = _small_fc_args(shapes, torch.float32)
    for g in cpu[1]:
        if g.dim() >= 2:
            rows = torch.logspace(-3, 3, g.shape[0]).view(-1, *([1] * (g.dim() - 1)))
            cols = torch.logspace(2, -2, g.shape[-1])
            g.mul_(rows * cols)
    gpu = _cuda(cpu)
    torch.ops.lo_ops.small_fc_lopt_step_(*cpu)
    torch.ops.lo_ops.small_fc_lopt_step_(*gpu)
    _assert_lists_close(gpu[:8], cpu[:8], torch.float32)


def test_non_finite_gradient_is_detected_and_skipped_on_cuda():
    step, inputs = (_cuda(a) for a in _velo_args([(7, 5), (5,)], torch.float32))
    inputs[1][0][2, 3] = float("nan")
    _, finite = torch.ops.lo_ops.velo_lstm_input(*inputs)
    assert not bool(finite)
    before = [t.clone() for lst in step[:7] for t in lst]
    step[10] = torch.tensor(True, device="cuda")
    torch.ops.lo_ops.velo_step_(*step)
    after = [t for lst in step[:7] for t in lst]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_opcheck_on_cuda(dtype):
    torch.library.opcheck(torch.ops.lo_ops.small_fc_lopt_step_.default, _cuda(_small_fc_args(SHAPES, dtype)))
    step, inputs = (_cuda(a) for a in _velo_args(SHAPES, dtype))
    torch.library.opcheck(torch.ops.lo_ops.velo_step_.default, step)
    torch.library.opcheck(torch.ops.lo_ops.velo_lstm_input.default, inputs)


def _velo_net():
    return lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _make(kind, params, **kw):
    if kind == "small_fc_lopt":
        return lo_ops.SmallFCLOpt(params, **kw)
    if kind == "celo":
        return lo_ops.Celo(params, num_steps=50, **kw)
    if kind == "celo_adam":
        return lo_ops.CeloAdam(params, num_steps=50, **kw)
    return lo_ops.VeLO(params, num_steps=50, pretrained=_velo_net(), **kw)


def _step(kind, opt, k):
    return opt.step() if kind == "small_fc_lopt" else opt.step(loss=torch.tensor(2.0 + math.sin(k), device="cuda"))


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo", "celo", "celo_adam"])
def test_optimizer_on_cuda_matches_cpu_over_20_steps(kind):
    cpu_params = make_params(SHAPES)
    gpu_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    cpu_opt, gpu_opt = _make(kind, cpu_params), _make(kind, gpu_params, fused=True)
    for k in range(20):
        set_grads([cpu_params], k)
        for p, q in zip(gpu_params, cpu_params):
            p.grad = q.grad.cuda()
        if kind == "small_fc_lopt":
            cpu_opt.step()
            gpu_opt.step()
        else:
            cpu_opt.step(loss=torch.tensor(2.0 + math.sin(k)))
            gpu_opt.step(loss=torch.tensor(2.0 + math.sin(k), device="cuda"))
    for p, q in zip(gpu_params, cpu_params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo", "celo", "celo_adam"])
def test_cuda_graph_capture_replays_like_eager(kind):
    shapes = [(), (5,), (7, 5), (6, 6), (3, 4, 6), (64, 48)]
    eager_params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes, non_contiguous=False)]
    graph_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager = _make(kind, eager_params, lr=0.5)
    graphed = _make(kind, graph_params, lr=0.5)
    loss = torch.zeros((), device="cuda")

    def graphed_step():
        return graphed.step() if kind == "small_fc_lopt" else graphed.step(loss=loss)

    # The first step runs eagerly on both (it creates the state); then one step is captured
    # (recorded, not run) and replayed for steps 1..10.
    gen = torch.Generator().manual_seed(1000)
    first = [(torch.randn(p.shape, generator=gen) * 0.1).cuda() for p in eager_params]
    for p, q, g in zip(eager_params, graph_params, first):
        p.grad = g.clone()
        q.grad = g.clone()
    loss.fill_(2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed_step()
    torch.cuda.current_stream().wait_stream(side)
    _step(kind, eager, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_step()
    for k in range(1, 11):
        gen = torch.Generator().manual_seed(1000 + k)
        new_grads = [(torch.randn(p.shape, generator=gen) * 0.1).cuda() for p in eager_params]
        lr = 0.5 * (1 + math.cos(math.pi * k / 10)) / 2
        for group in (eager.param_groups[0], graphed.param_groups[0]):
            group["lr"].fill_(lr)
        for p, q, g in zip(eager_params, graph_params, new_grads):
            p.grad = g.clone()
            q.grad.copy_(g)
        loss.fill_(2.0 + math.sin(k))
        _step(kind, eager, k)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo", "celo", "celo_adam"])
def test_compiled_reduce_overhead_equals_eager(kind):
    torch._dynamo.reset()
    shapes = [(), (5,), (7, 5), (6, 6), (3, 4, 6)]
    eager_params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes, non_contiguous=False)]
    comp_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager, comp = _make(kind, eager_params), _make(kind, comp_params)
    step = torch.compile(comp.step, fullgraph=True, mode="reduce-overhead")
    loss = torch.zeros((), device="cuda")
    for k in range(10):
        gen = torch.Generator().manual_seed(2000 + k)
        grads = [(torch.randn(p.shape, generator=gen) * 0.1).cuda() for p in eager_params]
        for p, q, g in zip(eager_params, comp_params, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        loss.fill_(2.0 + math.sin(k))
        if kind == "small_fc_lopt":
            eager.step()
            step()
        else:
            eager.step(loss=loss.clone())
            step(loss=loss)
    for p, q in zip(eager_params, comp_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_small_fc_lopt_vectors_on_cuda(small_fc_lopt_vectors, small_fc_lopt_fixture_dir,
                                       small_fc_lopt_fixture_offsets):
    meta, t = small_fc_lopt_vectors
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(t[f"params.step0.{leaf}"].clone().cuda()) for leaf in leaves]
    opt = lo_ops.SmallFCLOpt(params, lr=2.0**24, pretrained=small_fc_lopt_fixture_dir,
                             decay_offsets=small_fc_lopt_fixture_offsets, step_mult=0.001, fused=True)
    for k in range(1, meta["n_updates"] + 1):
        with torch.no_grad():
            for p, leaf in zip(params, leaves):
                p.copy_(t[f"params.step{k - 1}.{leaf}"])
        for p, leaf in zip(params, leaves):
            p.grad = t[f"grads.step{k}.{leaf}"].clone().cuda()
        opt.step()
        for p, leaf in zip(params, leaves):
            step = (t[f"params.step{k - 1}.{leaf}"].double() - p.detach().cpu().double()) / 2.0**24
            want = t[f"steps.step{k}.{leaf}"].double()
            assert (step - want).norm() / want.norm() <= 1e-5, (k, leaf)


def test_mulo_vectors_on_cuda():
    """MuLO's CUDA kernels (the μP multiplier, nan_to_num) against the original's trajectory."""
    import test_mulo

    test_mulo.check_vectors(*test_mulo.load_mulo_vectors(), fused=True, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mulo_fused_on_cuda_equals_the_reference(dtype):
    """Mixed mup_scale groups, weight decay, NaN and +inf gradients: CUDA against the reference."""
    import test_mulo

    test_mulo.check_fused_against_reference(test_mulo.load_mulo_vectors()[1], dtype, device="cuda")


def test_velo_vectors_on_cuda(velo_vectors):
    meta, t = velo_vectors
    leaves = meta["leaf_order"]
    pattern = meta["problem"]["loss_pattern"]
    params = [torch.nn.Parameter(t[f"params.step0.{leaf}"].clone().cuda()) for leaf in leaves]
    opt = lo_ops.VeLO(params, num_steps=meta["horizon_num_steps"], lr=2.0**24,
                      pretrained=VELO_FIXTURES["jax"](), fused=True)
    for k in range(1, meta["n_updates"] + 1):
        with torch.no_grad():
            for p, leaf in zip(params, leaves):
                p.copy_(t[f"params.step{k - 1}.{leaf}"])
        for p, leaf in zip(params, leaves):
            p.grad = t[f"grads.step{k}.{leaf}"].clone().cuda()
        loss = pattern[(k - 1) % 8] - 0.05 * ((k - 1) // 8)
        opt.step(loss=torch.tensor(loss, device="cuda"))
        for p, leaf in zip(params, leaves):
            step = (t[f"params.step{k - 1}.{leaf}"].double() - p.detach().cpu().double()) / 2.0**24
            want = t[f"steps.step{k}.{leaf}"].double()
            assert (step - want).norm() / want.norm() <= 1e-3, (k, leaf)


def test_reference_lstm_input_on_cuda_matches_op():
    _, inputs = _velo_args(SHAPES, torch.float32)
    gpu = _cuda(inputs)
    X, _ = torch.ops.lo_ops.velo_lstm_input(*gpu)
    X_ref, _ = ref.velo_lstm_input(*gpu)
    torch.testing.assert_close(X, X_ref, rtol=1e-5, atol=1e-5)


# -- the phase ops (sharded parameters) on the GPU ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase_ops_equal_the_one_call_ops_on_the_gpu(dtype, monkeypatch):
    """tests/test_phase_ops.py's checks with CUDA tensors: the phase kernels equal the one-call
    kernels bitwise on whole tensors, and on shards split in one process equal them on the whole
    tensor."""
    import test_phase_ops as phases

    monkeypatch.setattr(phases, "DEVICE", "cuda")
    for mulo in (False, True):
        phases.test_small_fc_lopt_phases_equal_the_step_op_bitwise(dtype, mulo)
    for skip in (False, True):
        phases.test_velo_phases_equal_the_step_ops_bitwise(dtype, skip)
    for axis, count in ((0, 3), (1, 2), (2, 5)):
        phases.test_small_fc_lopt_on_shards_equals_the_whole_tensor(axis, count, dtype)
    phases.test_velo_on_shards_equals_the_whole_tensor(0, 3)
    phases.test_velo_on_shards_equals_the_whole_tensor(1, 2)
    phases.test_shards_without_elements_add_nothing()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_celo_adam_step_on_the_gpu_matches_the_cpu(dtype):
    from test_celo_adam_op import _args, _clone

    a = _args(SHAPES + [(70000,)], dtype)
    b = [[x.cuda() for x in v] if isinstance(v, list) else (v.cuda() if isinstance(v, torch.Tensor) else v)
         for v in _clone(a)]
    for k in range(3):
        a[6].fill_(float(k))
        b[6].fill_(float(k))
        torch.ops.lo_ops.celo_adam_step_(*a)
        torch.ops.lo_ops.celo_adam_step_(*b)
    tol = dict(rtol=4e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for la, lb in zip(a[:4], b[:4]):
        for x, y in zip(la, lb):
            torch.testing.assert_close(y.cpu(), x, **tol)
