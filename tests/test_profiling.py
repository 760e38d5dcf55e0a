"""A step the torch profiler explains: every phase of every optimizer's step is an event whose
name starts with ``lo_ops``, together >= 90% of ``Optimizer.step``'s time; no ranges, no cost
and no graph break when not profiling or compiled."""

import importlib.util
from pathlib import Path

import pytest
import torch

import lo_ops
from conftest import VELO_FIXTURES
from helpers import CountingBackend, make_params, set_grads

_spec = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).resolve().parents[1] / "perf" / "profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)

# A small model: a few matrices (factored), biases and norms (unfactored), a 0-d scale.
SHAPES = [(64, 32), (32,), (32, 64), (64,), (16, 8, 3, 3), (16,), ()]
PHASES = {
    "small_fc_lopt": {"collect", "update"},
    "velo": {"collect", "loss_buffer", "lstm_input", "lstm", "blend", "update", "lstm_commit", "commit"},
    "celo": {"collect", "loss_buffer", "nonfinite_check", "schedule", "update", "commit"},
    "celo_adam": {"collect", "loss_buffer", "nonfinite_check", "schedule", "update", "commit"},
}


@pytest.mark.parametrize("name", list(PHASES))
def test_step_time_is_inside_named_lo_ops_events(name):
    params = make_params(SHAPES, non_contiguous=False)
    set_grads([params], 0)
    opt, step = profile_step.make_optimizer(name, params, VELO_FIXTURES["jax"]())
    prof = profile_step.profile_steps(step, "cpu", warmup=2, steps=3)
    summary = profile_step.analyse(prof.events(), type(opt).__name__, 3)
    assert summary["steps"] == 3
    phases = set(summary["phases"]) - {"(between phases)"}
    assert {n.split(".", 2)[2] for n in phases} == PHASES[name]
    assert all(n.startswith(f"lo_ops.{name}.") for n in phases)
    named = sum(row["host_ms"] for n, row in summary["phases"].items() if n in phases)
    assert named >= 0.8 * summary["step_ms"], summary  # the phases themselves explain the step
    assert summary["lo_ops_share"] >= 0.9, summary
    op_names = {e.name for e in prof.events() if e.name.startswith("lo_ops::")}
    assert op_names, "the fused ops appear as lo_ops:: events"


def test_several_calls_name_the_nonfinite_check():
    """SmallFCLOpt with two param groups checks all gradients first, under its own name."""
    params = make_params(SHAPES, non_contiguous=False)
    set_grads([params], 0)
    opt = lo_ops.SmallFCLOpt([{"params": params[:3]}, {"params": params[3:], "lr": 0.5}])
    prof = profile_step.profile_steps(opt.step, "cpu", warmup=1, steps=2)
    summary = profile_step.analyse(prof.events(), "SmallFCLOpt", 2)
    assert "lo_ops.small_fc_lopt.nonfinite_check" in summary["phases"]
    assert summary["lo_ops_share"] >= 0.9


def test_no_ranges_without_a_profiler():
    from lo_ops._optim import phase

    assert phase("lo_ops.x.y") is phase("lo_ops.x.z")  # the shared null context
    with torch.profiler.profile():
        assert isinstance(phase("lo_ops.x.y"), torch.autograd.profiler.record_function)


def test_compiled_step_under_the_profiler_has_no_graph_break():
    params = make_params(SHAPES, non_contiguous=False)
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=lo_ops.load_velo_network(VELO_FIXTURES["jax"]())[0])
    torch._dynamo.reset()
    counter = CountingBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    loss = torch.tensor(1.0)
    with torch.profiler.profile():
        for k in range(3):
            set_grads([params], k)
            step(loss=loss)
    assert counter.graphs == 1
    assert opt.global_state["iteration"].item() == 3


def test_profile_script_writes_trace_table_and_chart(tmp_path):
    summary = profile_step.main(["--optimizer", "small_fc_lopt", "--set", "vit_tiny_16", "--steps", "1",
                                 "--warmup", "1", "--out", str(tmp_path)])
    stem = tmp_path / "profile_small_fc_lopt_vit_tiny_16_cpu"
    assert summary["lo_ops_share"] >= 0.9
    assert stem.with_suffix(".json").stat().st_size > 0
    assert "lo_ops.small_fc_lopt.update" in stem.with_suffix(".md").read_text()
    pytest.importorskip("matplotlib")
    assert stem.with_suffix(".png").stat().st_size > 0
