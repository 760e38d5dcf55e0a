"""The fused CPU op against the pure-PyTorch reference: parameters and state, many steps."""

import pytest
import torch

from helpers import SHAPES, clone_params, make_opt, make_params, set_grads

# fp32: the two paths differ only in summation order and FMA contraction.
# bf16: parameters are rounded to bf16 after every step, so a 1-ulp rounding flip is allowed.
TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
STATE_TOL = dict(rtol=1e-5, atol=1e-7)


def _run_both(shapes, dtype, steps, weight_decay=0.0, lr=1.0, **kw):
    fused_params = make_params(shapes, dtype)
    ref_params = clone_params(fused_params)
    fused = make_opt(fused_params, lr=lr, weight_decay=weight_decay, fused=True, **kw)
    ref = make_opt(ref_params, lr=lr, weight_decay=weight_decay, fused=False, **kw)
    for k in range(steps):
        set_grads([fused_params, ref_params], k)
        fused.step()
        ref.step()
    return fused_params, ref_params, fused, ref


def _compare(fused_params, ref_params, fused, ref, dtype):
    for i, (a, b) in enumerate(zip(fused_params, ref_params)):
        assert a.dtype == dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
        sa, sb = fused.state[a], ref.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert sa[key].dtype == torch.float32
            torch.testing.assert_close(sa[key], sb[key], **STATE_TOL, msg=lambda m: f"param {i} {key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_random_shapes_20_steps(dtype):
    _compare(*_run_both(SHAPES, dtype, steps=20), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_300_small_tensors(dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [tuple(int(x) for x in torch.randint(1, 6, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen))
              for _ in range(300)]
    _compare(*_run_both(shapes, dtype, steps=20), dtype)


def test_weight_decay_and_lr():
    _compare(*_run_both(SHAPES, torch.float32, steps=5, weight_decay=0.1, lr=0.5), torch.float32)


def test_fp16_parameters():
    fused_params, ref_params, fused, ref = _run_both([(7, 5), (5,)], torch.float16, steps=5)
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_pylo_offsets_and_step_mult(small_fc_lopt_fixture_dir):
    _compare(*_run_both([(7, 5), (6, 6), (5,)], torch.float32, steps=5,
                        pretrained=str(small_fc_lopt_fixture_dir)), torch.float32)


def test_larger_tensor_spans_many_chunks():
    # > one chunk and > one reduction task per axis; a 3-d tensor whose d0 is the middle axis.
    _compare(*_run_both([(300, 70), (5, 2000, 3)], torch.float32, steps=3), torch.float32)


def test_no_grad_params_are_skipped():
    params = make_params([(7, 5), (5,)], non_contiguous=False)
    before = [p.detach().clone() for p in params]
    opt = make_opt(params)
    params[0].grad = torch.randn(7, 5)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1])
    state = opt.state[params[1]]  # created with the optimizer, and left as it was
    assert state["step"].item() == 0 and not state["momentum"].any() and not state["fac_diag"].any()


def test_results_do_not_depend_on_thread_count():
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            params = make_params([(300, 70), (5,)], non_contiguous=False)
            opt = make_opt(params)
            for k in range(3):
                set_grads([params], k)
                opt.step()
            outs.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_dense_network_with_wide_exp_arguments():
    # Every weight non-zero and exp_mult = 4: exp(magnitude * exp_mult) spans many orders of
    # magnitude. One step, compared as the spec compares steps (relative error of the step).
    from lo_ops.small_fc_lopt.network import SmallFCLOptNetwork

    gen = torch.Generator().manual_seed(5)
    net = SmallFCLOptNetwork(exp_mult=4.0, step_mult=0.001)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.normal_(0, 0.4, generator=gen)
            layer.bias.normal_(0, 0.2, generator=gen)
    shapes = [(64, 48), (5, 7, 9), (33,)]
    start = make_params(shapes, non_contiguous=False)
    fused_params, ref_params, fused, ref = _run_both(shapes, torch.float32, steps=1, pretrained=net, lr=2.0**-20)
    for p0, a, b in zip(start, fused_params, ref_params):
        step_a = (p0.double() - a.double()) * 2.0**20
        step_b = (p0.double() - b.double()) * 2.0**20
        assert step_b.abs().max() / step_b.abs().min() > 1e3  # a wide range of step sizes
        assert (step_a - step_b).norm() / step_b.norm() < 1e-5


def _exp_probe_network(arg):
    """A network whose outputs are its output bias (-1, arg): every element's step is
    -exp(arg * exp_mult) * step_mult = -exp(arg), so p moves to p + exp(arg)."""
    from lo_ops.small_fc_lopt.network import SmallFCLOptNetwork

    net = SmallFCLOptNetwork(exp_mult=1.0, step_mult=1.0)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        net.layers[-1].bias.copy_(torch.tensor([-1.0, arg]))
    return net


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_exp_at_the_edges_of_float_range(isa, monkeypatch):
    # exp's argument swept across the ranges where the result is subnormal, zero, near the
    # largest float, inf, and NaN: the fused step must give what torch.exp gives there (to
    # rounding; exactly for 0, inf and NaN).
    monkeypatch.setenv("LO_OPS_CPU_ISA", isa)
    args = [-200.0, -104.5, -103.0, -100.0, -95.0, -88.0, -87.5, -86.0, -1.5, 0.0, 2.25, 86.0,
            87.5, 88.0, 88.72, 88.73, 95.0, 500.0, float("inf"), float("-inf"), float("nan")]
    shapes = [(37,), (6, 40)]
    start = make_params(shapes, non_contiguous=False)
    for arg in args:
        net = _exp_probe_network(arg)
        fused_params, ref_params, _, _ = _run_both(shapes, torch.float32, steps=1, pretrained=net)
        expected = torch.exp(torch.tensor(arg, dtype=torch.float32))
        for p0, a, b in zip(start, fused_params, ref_params):
            if not torch.isfinite(expected) or expected == 0:  # p + inf, p + NaN, p + 0
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"exp({arg})")
            elif expected > 1e30:  # p is lost in p + exp(arg)
                torch.testing.assert_close(a, b, rtol=2e-7, atol=0, msg=f"exp({arg})")
            else:
                torch.testing.assert_close(a - p0, b - p0, rtol=1e-5, atol=1e-7, msg=f"exp({arg})")
    # the subnormal and near-overflow values themselves, with p = 0
    for arg in [-100.0, -95.0, -88.0, 88.72]:
        params = [torch.nn.Parameter(torch.zeros(40))]
        params[0].grad = torch.ones(40)
        make_opt(params, pretrained=_exp_probe_network(arg), fused=True).step()
        expected = torch.exp(torch.tensor(arg, dtype=torch.float32))
        torch.testing.assert_close(params[0].detach(), expected.expand(40), rtol=2e-7, atol=0,
                                   msg=f"exp({arg})")


def test_device_without_kernel_falls_back_to_reference(monkeypatch, caplog):
    import lo_ops

    monkeypatch.setattr(lo_ops, "has_kernel", lambda op, device_type: False)
    with pytest.raises(RuntimeError, match="built without a cpu kernel"):
        make_opt(make_params([(3,)], non_contiguous=False), fused=True)
    params = make_params([(7, 5), (5,)], non_contiguous=False)
    ref_params = clone_params(params)
    with caplog.at_level("WARNING", logger="lo_ops._optim"):
        auto = make_opt(params)  # fused=None
    assert "no fused cpu kernel" in caplog.text
    ref = make_opt(ref_params, fused=False)
    for k in range(3):
        set_grads([params, ref_params], k)
        auto.step()
        ref.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


def test_has_kernel():
    import lo_ops

    assert lo_ops.has_kernel("small_fc_lopt_step_", "cpu")
    assert not lo_ops.has_kernel("small_fc_lopt_step_", "no_such_device")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cpu_instruction_set(isa, dtype, monkeypatch):
    # The CPU kernel has one build of its loops per instruction set; LO_OPS_CPU_ISA caps the
    # choice (a machine without the set runs its best one instead).
    monkeypatch.setenv("LO_OPS_CPU_ISA", isa)
    _compare(*_run_both(SHAPES + [(300, 70)], dtype, steps=5), dtype)


def test_bad_cpu_instruction_set_name(monkeypatch):
    monkeypatch.setenv("LO_OPS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="LO_OPS_CPU_ISA must be base, avx2 or avx512"):
        _run_both([(3, 2)], torch.float32, steps=1)
