"""torch.compile(opt.step, fullgraph=True) equals eager, with no recompiles under a scheduler."""

import warnings

import pytest
import torch

from helpers import CountingBackend, clone_params, make_opt, make_params, set_grads

SHAPES = [(), (5,), (7, 5), (6, 6), (3, 4, 6)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_no_recompiles(backend):
    torch._dynamo.reset()
    eager_params = make_params(SHAPES, non_contiguous=False)
    comp_params = clone_params(eager_params)
    eager = make_opt(eager_params, lr=0.5, weight_decay=0.01)
    comp = make_opt(comp_params, lr=0.5, weight_decay=0.01)
    counter = CountingBackend(backend)
    # Compile the optimizer's own step: schedulers wrap opt.step in a function Dynamo skips.
    compiled_step = torch.compile(comp.step, backend=counter, fullgraph=True)
    eager_sched = torch.optim.lr_scheduler.CosineAnnealingLR(eager, T_max=10)
    comp_sched = torch.optim.lr_scheduler.CosineAnnealingLR(comp, T_max=10)
    warm = None
    for k in range(10):
        set_grads([eager_params, comp_params], k)
        eager.step()
        compiled_step()
        if k == 1:
            warm = counter.graphs
        eager_sched.step()
        with warnings.catch_warnings():  # the compiled step bypasses the scheduler's step wrapper
            warnings.simplefilter("ignore", UserWarning)
            comp_sched.step()
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(eager_params, comp_params):
        for key in eager.state[a]:
            torch.testing.assert_close(eager.state[a][key], comp.state[b][key], rtol=0, atol=0)
    # One graph, state creation included; the scheduled steps after it reuse it.
    assert warm == 1
    assert counter.graphs == 1, f"{counter.graphs - 1} recompiles over 10 scheduled steps"
    assert comp.param_groups[0]["lr"].item() == pytest.approx(eager.param_groups[0]["lr"].item())
