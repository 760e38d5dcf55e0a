"""The CUDA kernels' device code executed on the CPU by the CUDA emulator (lo_ops.testing).

First the emulator itself, on its probe kernels: CUDA's barrier, shuffle and index semantics,
poisoned shared memory, and the misuse it must report. Then every CUDA op under the emulator
against the CPU op and the pure-PyTorch references on the shape zoo, in fp32, bf16, fp16 and
fp64, under both schedules; tensor tables that chunk; per-tensor meta-weights; optimizer steps.
(The ../shared/vectors cases run through the emulated kernels in test_vectors.py and
test_velo_vectors.py.)
"""

import math
import os

import pytest
import torch

import lo_ops
from lo_ops import testing
from lo_ops.small_fc_lopt import reference
from lo_ops.hyperv2 import reference as vref

from conftest import VELO_FIXTURES
from helpers import SHAPES, CountingBackend, make_params, set_grads
from test_cuda import _small_fc_args, _velo_args

SCHEDULES = list(testing.SCHEDULES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Parameters against the CPU kernel: the same tolerances as the GPU tests (test_cuda.py).
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
STATE_TOL = dict(rtol=1e-5, atol=1e-7)

# The shape zoo: helpers.SHAPES (0-d, [1], odd, square, 3-d, 4-d, empty, size-1 axes, rank 5,
# d0/d1 ahead of a long innermost axis) and a non-contiguous [4, 9] (make_params), plus d0/d1 in
# every position of 4-d tensors, (1, N), (N, 1), tails just past a chunk of 2048 elements, rank 5.
ZOO = SHAPES + [(64, 64, 3, 3), (3, 3, 64, 64), (5, 64, 3, 48), (1, 300), (300, 1), (2049,),
                (4097,), (3, 683), (683, 3), (2, 1, 3, 1, 5), (1, 1, 1), (33, 65, 2)]


@pytest.fixture(scope="module", autouse=True)
def emulator():
    testing.load_cuda_emulator()


def _probe(name, blocks=2, threads=64, schedule="lockstep", seed=0):
    torch.ops.lo_ops_cuda_emulator.configure(schedule, seed)
    return torch.ops.lo_ops_cuda_emulator.probe(name, blocks, threads)


def _capacity():
    """Tensors per table of the per-element kernels and of the statistics kernel."""
    return torch.ops.lo_ops_cuda_emulator.table_capacity()


# -- the emulator on its probes ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory_starts_as_nan(schedule):
    assert torch.isnan(_probe("uninitialised_shared", 3, 128, schedule)).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_orders_shared_memory(schedule):
    out = _probe("neighbour_exchange", 2, 256, schedule).view(2, 256)
    assert torch.equal(out, ((torch.arange(256) + 33) % 256).float().expand(2, 256))
    # Without the barrier, reads of entries not yet written show as NaN under both schedules.
    assert torch.isnan(_probe("neighbour_exchange_without_barrier", 2, 256, schedule)).any()


def test_adversarial_schedule_finds_a_race_that_lockstep_hides():
    """Reusing a block-sum scratch array without a barrier: in lock-step order every warp reads
    before any writes again, so only the adversarial schedule shows the race."""
    want = float(sum(range(256)) + sum(range(1, 257)))
    for schedule in SCHEDULES:
        good = _probe("two_block_sums", 8, 256, schedule).view(8, 256)[:, 0]
        assert torch.equal(good, torch.full((8,), want))
    hidden = _probe("two_block_sums_without_reuse_barrier", 8, 256, "lockstep").view(8, 256)[:, 0]
    assert torch.equal(hidden, torch.full((8,), want))
    found = _probe("two_block_sums_without_reuse_barrier", 8, 256, "adversarial", seed=1).view(8, 256)[:, 0]
    assert not torch.equal(found, torch.full((8,), want))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shuffle_semantics(schedule):
    out = _probe("shuffles", 2, 64, schedule)
    lane = torch.arange(32)

    def seg(width, src):
        return torch.where(src // width == lane // width, src, lane)

    down = torch.where(lane + 3 < 32, lane + 3, lane)
    up = torch.where(lane % 16 >= 5, lane - 5, lane)
    xor = seg(32, lane ^ 6)
    idx = (lane // 8) * 8 + 7
    d = torch.where(lane + 1 < 32, lane + 1, lane).double() + 0.5
    want = (down.float() + 100 * up.float() + 1e4 * xor.float() + 1e6 * idx.float() + (1e-3 * d).float())
    torch.testing.assert_close(out, want.repeat(4), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_predicates(schedule):
    out = _probe("predicates", 2, 96, schedule)
    count = sum(1 for t in range(96) if t % 3 == 0)
    assert torch.equal(out, torch.full((192,), float(0 + 10 * 1 + 100 * count)))


def test_thread_and_block_indices():
    out = _probe("indices", 3, 4)  # grid [3, 2] of blocks [4, 2, 2]
    want = []
    for by in range(2):
        for bx in range(3):
            for tz in range(2):
                for ty in range(2):
                    for tx in range(4):
                        want.append((tx + 8 * ty + 64 * tz) * 1000 + (bx + 4 * by) + 100 * (4 + 3))
    assert torch.equal(out, torch.tensor(want, dtype=torch.float32))


MISUSE = {
    "exit_before_barrier": "exits while .* wait at __syncthreads .*a barrier that some threads never reach",
    "exit_while_others_wait": "exits while 32 threads of its block wait at __syncthreads",
    "mixed_barriers": "mixed barrier kinds",
    "divergent_barriers": "divergent barriers",
    "shuffle_after_lane_exit": r"\(lane 3\) exits while lanes .* wait for it at __shfl_down_sync",
    "shuffle_mask_without_self": "with mask 0xfffffffe, which omits its own lane 0",
    "shuffle_reads_outside_mask": "reads lane 16 at __shfl_down_sync .*not in mask 0xffff",
    # lane 0 waits at the barrier for lanes that wait at the shuffle for lane 0
    "shuffle_and_barrier_deadlock": ("(naming lane 0, which waits at __syncthreads"
                                     "|reaches __syncthreads .* wait for it at __shfl_down_sync)"),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("probe", list(MISUSE))
def test_misuse_is_an_error(probe, schedule):
    with pytest.raises(RuntimeError, match=f"lo_ops::cuda::probes::{probe}.*{MISUSE[probe]}"):
        _probe(probe, 2, 64, schedule)
    # The emulator is usable again after an error.
    assert torch.isnan(_probe("uninitialised_shared", 1, 32)).all()


def test_bad_schedule_and_unknown_probe():
    with pytest.raises(ValueError, match="schedule must be one of"):
        with testing.cuda_emulation("random"):
            pass
    with pytest.raises(RuntimeError, match="no probe named 'nope'"):
        _probe("nope")


def test_cuda_emulation_restores_the_cpu_kernels():
    args = _small_fc_args([(7, 5)], torch.float32)
    before = testing.emulator_stats()["launches"]
    with testing.cuda_emulation():
        torch.ops.lo_ops.small_fc_lopt_step_(*args)
    during = testing.emulator_stats()["launches"]
    torch.ops.lo_ops.small_fc_lopt_step_(*args)
    assert during > before
    assert testing.emulator_stats()["launches"] == during


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_and_bfloat16_conversions_match_torch(dtype):
    """The emulator's __float2half_rn / __float2bfloat16_rn and back, bit for bit against torch's
    conversions: every float32 exponent with random mantissas, values at rounding ties,
    subnormals of both formats, the overflow boundary, infinities, zeros and NaN."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.arange(-149, 128, dtype=torch.float64)
    mantissas = 1 + torch.rand(len(exponents), 64, generator=gen, dtype=torch.float64)
    values = (mantissas * torch.exp2(exponents)[:, None]).float().flatten()
    one_ulp = torch.tensor([2.0**-10 if dtype == "float16" else 2.0**-7])
    ties = (1 + (torch.arange(1, 200) - 0.5) * one_ulp).float()  # halfway between neighbours
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 65536.0,
                            2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 2.0**-14 * (1 - 2.0**-11),
                            3.3895e38, 3.40282347e38, 1.1754944e-38, 1e-45])
    x = torch.cat([values, -values, ties, -ties, special, -special])
    got = torch.ops.lo_ops_cuda_emulator.round_trip(x, dtype)
    want = x.to(getattr(torch, dtype)).float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.isnan(torch.ops.lo_ops_cuda_emulator.round_trip(torch.tensor([float("nan")]), dtype)).all()


# -- the CUDA ops under the emulator -------------------------------------------------------------


def _assert_lists_close(got, want, dtype, what):
    for i, (la, lb) in enumerate(zip(got, want)):
        for j, (x, y) in enumerate(zip(la, lb)):
            tol = TOL[dtype] if x.dtype == dtype else STATE_TOL
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{what}: argument {i}, tensor {j}: {m}")


def _run_small_fc(args, schedule=None, seed=0, op=None):
    op = op or torch.ops.lo_ops.small_fc_lopt_step_
    if schedule is None:
        op(*args)
    else:
        with testing.cuda_emulation(schedule, seed):
            op(*args)
    return args


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_small_fc_lopt_step_matches_cpu_and_reference(dtype, schedule):
    dtype = DTYPES[dtype]
    emulated = _run_small_fc(_small_fc_args(ZOO, dtype), schedule, seed=11)
    cpu = _run_small_fc(_small_fc_args(ZOO, dtype))
    _assert_lists_close(emulated[:8], cpu[:8], dtype, "emulated CUDA vs CPU")
    if dtype in (torch.float32, torch.float64):
        ref = _run_small_fc(_small_fc_args(ZOO, dtype), op=reference.small_fc_lopt_step_)
        _assert_lists_close(emulated[:8], ref[:8], dtype, "emulated CUDA vs reference")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_small_fc_lopt_per_tensor_meta_weights_and_tables_that_chunk(schedule):
    """More tensors than one table holds (so the launches chunk), each with its own network row
    and decays."""
    n = _capacity()[0] + 3
    shapes = [(3, 2), (4,), (2, 3, 2)] * (n // 3 + 1)
    gen = torch.Generator().manual_seed(5)
    base = _small_fc_args(shapes, torch.float32)
    T = len(base[0])
    weights = base[9] + 0.05 * torch.randn(T, base[9].numel(), generator=gen)
    decays = (base[10] - 0.02 * torch.rand(T, base[10].numel(), generator=gen)).contiguous()
    runs = []
    for run in (dict(schedule=schedule, seed=2), dict(), dict(op=reference.small_fc_lopt_step_)):
        args = _small_fc_args(shapes, torch.float32)
        args = [*args[:9], weights, decays, *args[11:]]
        runs.append(_run_small_fc(args, **run))
    _assert_lists_close(runs[0][:8], runs[1][:8], torch.float32, "emulated CUDA vs CPU")
    _assert_lists_close(runs[0][:8], runs[2][:8], torch.float32, "emulated CUDA vs reference")


def test_row_and_column_scaled_gradients():
    """Gradients scaled by row and by column expose a wrong averaging axis of r or c."""
    shapes = [(64, 48), (48, 64), (6, 40, 9), (3, 5, 7, 11), (64, 64, 3, 3)]

    def scaled():
        args = _small_fc_args(shapes, torch.float32)
        for g in args[1]:
            if g.dim() >= 2:
                rows = torch.logspace(-3, 3, g.shape[0]).view(-1, *([1] * (g.dim() - 1)))
                g.mul_(rows * torch.logspace(2, -2, g.shape[-1]))
        return args

    emulated = _run_small_fc(scaled(), "adversarial", seed=4)
    cpu = _run_small_fc(scaled())
    _assert_lists_close(emulated[:8], cpu[:8], torch.float32, "emulated CUDA vs CPU")


def _run_velo(step, inputs, schedule=None, seed=0, ops=None):
    lstm_input, velo_step = ops or (torch.ops.lo_ops.velo_lstm_input, torch.ops.lo_ops.velo_step_)
    if schedule is None:
        X, finite = lstm_input(*inputs)
        velo_step(*step)
    else:
        with testing.cuda_emulation(schedule, seed):
            X, finite = lstm_input(*inputs)
            velo_step(*step)
    return X, finite, step


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_velo_ops_match_cpu_and_reference(dtype, schedule):
    dtype = DTYPES[dtype]
    Xe, fe, emulated = _run_velo(*_velo_args(ZOO, dtype), schedule, seed=7)
    Xc, fc, cpu = _run_velo(*_velo_args(ZOO, dtype))
    torch.testing.assert_close(Xe, Xc, rtol=1e-5, atol=1e-5)
    assert bool(fe) and bool(fc)
    _assert_lists_close(emulated[:7], cpu[:7], dtype, "emulated CUDA vs CPU")
    if dtype in (torch.float32, torch.float64):
        Xr, _, ref = _run_velo(*_velo_args(ZOO, dtype), ops=(vref.velo_lstm_input, vref.velo_step_))
        torch.testing.assert_close(Xe, Xr, rtol=1e-5, atol=1e-5)
        _assert_lists_close(emulated[:7], ref[:7], dtype, "emulated CUDA vs reference")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_velo_lstm_input_tables_that_chunk(schedule):
    n = _capacity()[1] + 5
    shapes = [(3, 2), (4,), (), (2, 3, 2)] * (n // 4 + 1)
    _, inputs = _velo_args(shapes, torch.float32)
    Xc, _ = torch.ops.lo_ops.velo_lstm_input(*inputs)
    with testing.cuda_emulation(schedule, 3):
        Xe, _ = torch.ops.lo_ops.velo_lstm_input(*inputs)
    assert Xe.shape[0] > n
    torch.testing.assert_close(Xe, Xc, rtol=1e-5, atol=1e-5)


def test_velo_non_finite_gradient_is_detected_and_skipped():
    step, inputs = _velo_args([(7, 5), (5,), (3, 4, 6)], torch.float32)
    inputs[1][2][1, 2, 3] = float("inf")
    before = [t.clone() for lst in step[:7] for t in lst]
    step[10] = torch.tensor(True)
    with testing.cuda_emulation("adversarial", 1):
        _, finite = torch.ops.lo_ops.velo_lstm_input(*inputs)
        torch.ops.lo_ops.velo_step_(*step)
    assert not bool(finite)
    assert all(torch.equal(a, b) for a, b in zip([t for lst in step[:7] for t in lst], before))


def _make(kind, params, **kw):
    if kind == "small_fc_lopt":
        return lo_ops.SmallFCLOpt(params, **kw)
    net = lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]
    return lo_ops.VeLO(params, num_steps=50, pretrained=net, **kw)


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo"])
def test_optimizer_steps_through_the_emulated_kernels(kind):
    """`with cuda_emulation(): opt.step()` runs the CUDA path of an optimizer end to end."""
    shapes = [(), (5,), (7, 5), (6, 6), (3, 4, 6), (64, 48)]
    emulated_params, cpu_params = make_params(shapes), make_params(shapes)
    emulated, cpu = _make(kind, emulated_params, lr=0.5), _make(kind, cpu_params, lr=0.5)
    for k in range(6):
        set_grads([emulated_params, cpu_params], k)
        loss = {} if kind == "small_fc_lopt" else {"loss": torch.tensor(2.0 + math.sin(k))}
        with testing.cuda_emulation("adversarial", k):
            emulated.step(**loss)
        cpu.step(**loss)
    for p, q in zip(emulated_params, cpu_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        for key, value in cpu.state[q].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(emulated.state[p][key], value, rtol=1e-4, atol=1e-6)



# Shapes whose reductions take several blocks per output: both sides of [1100, 40] and
# [40, 2100] are cut into segments (r of the first reduces 1100 rows at 512 a segment, r of
# the second 2100 at 2048 with a warp per output), and the fold adds 41 chunks.
LARGE_STAND_INS = [(1100, 40), (40, 2100), (3, 700, 40)]
# The real size the stand-ins stand for (GPT-2's token embedding): about 20 minutes under the
# emulator on one core, so run only on request (LO_OPS_EMULATE_FULL_SIZE=1).
FULL_SIZE = [(50257, 1024)]


@pytest.mark.parametrize("shapes", [
    pytest.param(LARGE_STAND_INS, id="stand-ins"),
    pytest.param(FULL_SIZE, id="wte-50257x1024", marks=pytest.mark.skipif(
        os.environ.get("LO_OPS_EMULATE_FULL_SIZE") != "1",
        reason="the full size takes about 20 minutes under the emulator; LO_OPS_EMULATE_FULL_SIZE=1 runs it")),
])
def test_large_tensors_match_cpu(shapes):
    emulated = _run_small_fc(_small_fc_args(shapes, torch.float32), "adversarial", seed=9)
    cpu = _run_small_fc(_small_fc_args(shapes, torch.float32))
    _assert_lists_close(emulated[:8], cpu[:8], torch.float32, "emulated CUDA vs CPU")
    Xe, _, velo_emulated = _run_velo(*_velo_args(shapes, torch.float32), "lockstep")
    Xc, _, velo_cpu = _run_velo(*_velo_args(shapes, torch.float32))
    torch.testing.assert_close(Xe, Xc, rtol=1e-5, atol=1e-5)
    _assert_lists_close(velo_emulated[:7], velo_cpu[:7], torch.float32, "emulated CUDA vs CPU")


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo"])
def test_compiled_step_through_the_emulated_kernels(kind):
    """torch.compile(opt.step, fullgraph=True) traces the ops (their fake kernels) and runs the
    emulated CUDA kernels: one graph, equal to the eager CPU step."""
    torch._dynamo.reset()
    shapes = [(), (5,), (7, 5), (3, 4, 6)]
    comp_params, cpu_params = make_params(shapes, non_contiguous=False), make_params(shapes, non_contiguous=False)
    comp, cpu = _make(kind, comp_params, lr=0.5), _make(kind, cpu_params, lr=0.5)
    counter = CountingBackend("aot_eager")
    step = torch.compile(comp.step, backend=counter, fullgraph=True)
    before = testing.emulator_stats()["launches"]
    for k in range(4):
        set_grads([comp_params, cpu_params], k)
        loss = {} if kind == "small_fc_lopt" else {"loss": torch.tensor(2.0 + math.sin(k))}
        with testing.cuda_emulation("lockstep"):
            step(**loss)
        cpu.step(**loss)
    assert counter.graphs == 1
    assert testing.emulator_stats()["launches"] > before
    for p, q in zip(comp_params, cpu_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- the phase ops (sharded parameters) under the emulator ------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_phase_ops_equal_the_one_call_ops_bitwise(schedule):
    """On whole tensors the emulated phase kernels give bitwise the emulated one-call kernels'
    numbers (parameters, every state, step counts; VeLO's X), with and without skip, and with
    μLO's step multiplier and nan_to_num."""
    import test_phase_ops as phases

    with testing.cuda_emulation(schedule, seed=5):
        for dtype in (torch.float32, torch.bfloat16):
            for mulo in (False, True):
                phases.test_small_fc_lopt_phases_equal_the_step_op_bitwise(dtype, mulo)
            for skip in (False, True):
                phases.test_velo_phases_equal_the_step_ops_bitwise(dtype, skip)
        phases.test_shards_without_elements_add_nothing()


@pytest.mark.parametrize("axis,count", [(0, 3), (1, 2)])
def test_phase_ops_on_shards_equal_the_whole_tensor(axis, count):
    """Tensors split into shards (uneven, empty), the emulated phase kernels on each, the sums
    added up across shards: equal to the emulated one-call kernel on the whole tensor."""
    import test_phase_ops as phases

    with testing.cuda_emulation():
        phases.test_small_fc_lopt_on_shards_equals_the_whole_tensor(axis, count, torch.float32)
        phases.test_velo_on_shards_equals_the_whole_tensor(axis, count)


def test_phase_ops_match_the_cpu_phase_ops():
    """The emulated phase kernels against the CPU ones, op by op, on the shape zoo."""
    import test_phase_ops as phases
    from lo_ops import _phases

    shapes = [s for s in ZOO if s != (0,)]
    lists = phases._lists(shapes, torch.float32)
    b = _phases.Bucket(list(range(len(shapes))), reference.slots_of(*lists))
    decays = phases.effective_decays(phases._ZERO_OFFSETS)

    def run():
        work = phases._clone(lists)
        bk = _phases.Bucket(b.index, reference.slots_of(*work))
        gsq = [t for t, _ in _phases.gsq_sums(bk, 1000.0)]
        rows = [t for t, _ in _phases.factored_update(bk, gsq, decays, None)]
        feats = torch.ops.lo_ops.small_fc_lopt_feature_sums_(*work, rows, decays, None, bk.geometry)
        m = torch.ops.lo_ops.velo_lstm_moments(*work[:4], None)
        return gsq, rows, feats, m, work

    want = run()
    with testing.cuda_emulation():
        got = run()
    for name, x, y in zip(("gsq", "rows", "features", "moments"), got[:4], want[:4]):
        for a, c in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            # float32 terms (a fused multiply-add on one side only can move one by an ulp),
            # added up in float64 in another order; the CPU's LSTM moments add runs of eight
            # vector tiles in float32 first
            tol = dict(rtol=2e-5, atol=1e-6) if name == "moments" else dict(rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(a, c, **tol, msg=lambda m: f"{name}: {m}")
    for la, lb in zip(got[4], want[4]):
        for a, c in zip(la, lb):
            torch.testing.assert_close(a, c, **STATE_TOL)
