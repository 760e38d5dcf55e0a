"""Golden tests (expecttest): the ops of each optimizer's compiled step, as Dynamo captures them,
and the exact text of the errors users see. A change that adds a graph break, a per-parameter
op or a host sync to a compiled step, or rewords an error, shows up as a diff here; accept an
intended one with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_golden.py``."""

import textwrap

import pytest
import torch

expecttest = pytest.importorskip("expecttest")

import lo_ops  # noqa: E402
from conftest import VELO_FIXTURES  # noqa: E402
from helpers import make_params, set_grads  # noqa: E402


def _name(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', target)}".lstrip(".")


def compiled_ops(make, n_params: int, loss=False) -> str:
    """The calls of the one graph Dynamo captures of ``opt.step`` (fullgraph), in order, without
    the tuple indexing, consecutive repeats as ``name xN``; one op per line."""
    params = make_params([(8, 4), (4,), (3, 2, 2), ()] * (n_params // 4), non_contiguous=False)
    set_grads([params], 0)
    opt = make(params)
    graphs = []

    def backend(gm, inputs):
        graphs.append([_name(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    step(loss=torch.tensor(1.5)) if loss else step()
    assert len(graphs) == 1
    names = [n for n in graphs[0] if n != "_operator.getitem"]
    runs: list[list] = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return "\n".join(n if k == 1 else f"{n} x{k}" for n, k in runs)


def _velo(params):
    return lo_ops.VeLO(params, num_steps=10, pretrained=lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0])


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the subject
        return f"{type(e).__name__}: " + textwrap.dedent(str(e)).strip()
    raise AssertionError("no error")


class CompiledStepOps(expecttest.TestCase):
    def test_small_fc_lopt(self):
        ops = compiled_ops(lo_ops.SmallFCLOpt, 4)
        self.assertEqual(ops, compiled_ops(lo_ops.SmallFCLOpt, 8))  # nothing per parameter
        self.assertExpectedInline(ops, """\
torch._C._set_grad_enabled
lo_ops.small_fc_lopt_step_
torch._C._set_grad_enabled""")

    def test_velo(self):
        ops = compiled_ops(_velo, 4, loss=True)
        self.assertEqual(ops, compiled_ops(_velo, 8, loss=True))
        self.assertExpectedInline(ops, """\
torch._C._set_grad_enabled
detach
reshape
to x2
_operator.add
_operator.pow
_operator.sub
_operator.truediv
_operator.eq
max
torch.where
abs
_operator.mul
torch.minimum
_operator.mul
_operator.sub
_operator.mul
_operator.add
_operator.truediv
torch.minimum
_operator.sub x2
torch.clamp
_operator.truediv
_operator.sub
torch.clamp
_operator.le
torch.zeros_like
torch.where
torch.stack x2
torch.isfinite
lo_ops.velo_lstm_input
_operator.and_
torch.cat
torch._C._nn.linear
torch.relu
amax
torch._C._nn.linear
_operator.add
torch.cat
torch._C._nn.linear
chunk
_operator.add
torch.sigmoid
_operator.mul
torch.sigmoid
torch.tanh
_operator.mul
_operator.add
torch.sigmoid
torch.tanh
_operator.mul
torch._C._nn.linear x2
_operator.invert
_operator.matmul
_operator.mul
lo_ops.velo_step_
_operator.invert
torch.where
unbind
torch._foreach_copy_
torch.where
unbind
torch._foreach_copy_
_operator.invert
torch.where
copy_
torch.where
copy_
float
add_
torch._C._set_grad_enabled""")

    def test_celo(self):
        ops = compiled_ops(lambda ps: lo_ops.Celo(ps, num_steps=10), 4, loss=True)
        self.assertEqual(ops, compiled_ops(lambda ps: lo_ops.Celo(ps, num_steps=10), 8, loss=True))
        self.assertExpectedInline(ops, """\
torch._C._set_grad_enabled
detach
reshape
to x2
_operator.add
_operator.pow
_operator.sub
_operator.truediv
_operator.eq
max
torch.where
abs
_operator.mul
torch.minimum
_operator.mul
_operator.sub
_operator.mul
_operator.add
_operator.truediv
torch.minimum
_operator.sub x2
torch.clamp
_operator.truediv
_operator.sub
torch.clamp
_operator.le
torch.zeros_like
torch.where
torch.isfinite
torch.zeros x2
torch.ones
torch._amp_foreach_non_finite_check_and_unscale_
_operator.gt
to
_operator.or_
to
_operator.invert
_operator.and_
_operator.invert
reshape
torch.tensor
torch.full
float
_operator.truediv
_operator.sub
_operator.mul
torch.tanh
float
torch.cat
torch._C._nn.linear
torch.relu
amax
torch._C._nn.linear
_operator.add
torch.cat
torch._C._nn.linear
chunk
_operator.add
torch.sigmoid
_operator.mul
torch.sigmoid
torch.tanh
_operator.mul
_operator.add
torch.sigmoid
torch.tanh
_operator.mul
torch._C._nn.linear
torch.exp
_operator.mul
expand
contiguous
expand
contiguous
lo_ops.velo_step_
torch.where
copy_
torch.where
copy_
_operator.invert
torch.where
copy_
torch.where
copy_
float
add_
torch._C._set_grad_enabled""")

    def test_celo_adam(self):
        ops = compiled_ops(lambda ps: lo_ops.CeloAdam(ps, num_steps=10), 4, loss=True)
        self.assertEqual(ops, compiled_ops(lambda ps: lo_ops.CeloAdam(ps, num_steps=10), 8, loss=True))
        self.assertExpectedInline(ops, """\
torch._C._set_grad_enabled
detach
reshape
to x2
_operator.add
_operator.pow
_operator.sub
_operator.truediv
_operator.eq
max
torch.where
abs
_operator.mul
torch.minimum
_operator.mul
_operator.sub
_operator.mul
_operator.add
_operator.truediv
torch.minimum
_operator.sub x2
torch.clamp
_operator.truediv
_operator.sub
torch.clamp
_operator.le
torch.zeros_like
torch.where
torch.isfinite
torch.zeros x2
torch.ones
torch._amp_foreach_non_finite_check_and_unscale_
_operator.gt
to
_operator.or_
to
_operator.invert
_operator.and_
_operator.invert
reshape
torch.tensor
torch.full
float
_operator.truediv
_operator.sub
_operator.mul
torch.tanh
float
torch.cat
torch._C._nn.linear
torch.relu
amax
torch._C._nn.linear
_operator.add
torch.cat
torch._C._nn.linear
chunk
_operator.add
torch.sigmoid
_operator.mul
torch.sigmoid
torch.tanh
_operator.mul
_operator.add
torch.sigmoid
torch.tanh
_operator.mul
torch._C._nn.linear
torch.exp
_operator.mul
expand
contiguous
lo_ops.celo_adam_step_
torch.where
copy_
torch.where
copy_
_operator.invert
torch.where
copy_
torch.where
copy_
float
add_
torch._C._set_grad_enabled""")


class ErrorMessages(expecttest.TestCase):
    def setUp(self):
        self.p = torch.nn.Parameter(torch.randn(4, 3))

    def test_arguments(self):
        p = self.p
        self.assertExpectedInline(_error(lambda: lo_ops.SmallFCLOpt([p], lr=-1.0)), """ValueError: lr must be a finite number >= 0, got -1.0""")
        self.assertExpectedInline(_error(lambda: lo_ops.SmallFCLOpt([p], weight_decay=float("nan"))), """ValueError: weight_decay must be a finite number >= 0, got nan""")
        self.assertExpectedInline(_error(lambda: lo_ops.SmallFCLOpt([p], fused="yes")), """ValueError: fused must be None, True or False, got 'yes'""")
        self.assertExpectedInline(_error(lambda: lo_ops.SmallFCLOpt([{"params": [p], "step_mult": 2.0}])), """ValueError: SmallFCLOpt: step_mult holds for the whole optimizer; pass it to SmallFCLOpt(...), not in a param group (got 2.0 there and None for the optimizer)""")
        self.assertExpectedInline(_error(lambda: lo_ops.Celo([p], num_steps=0)), """ValueError: Celo: num_steps (the training horizon) must be an int >= 1, got 0""")

    def test_loss(self):
        opt = lo_ops.Celo([self.p], num_steps=10)
        self.p.grad = torch.ones_like(self.p)
        self.assertExpectedInline(_error(lambda: opt.step()), """ValueError: Celo needs the loss of every step (its LSTM reads the loss history): call opt.step(closure) with a closure that returns the loss, opt.step(loss=loss), or hand it over first with opt.observe_loss(loss) (lo_ops.integrations does that for the Hugging Face Trainer and Lightning)""")
        self.assertExpectedInline(_error(lambda: opt.step(loss=torch.ones(2))), """ValueError: Celo: the loss must be a scalar (one element), got a tensor of shape (2,)""")
        self.assertExpectedInline(_error(lambda: opt.step(loss="1.0")), """TypeError: Celo: the loss must be a scalar tensor or a number, got str""")
        self.assertExpectedInline(_error(lambda: opt.observe_loss(torch.ones(1), reduction="max")), """ValueError: Celo.observe_loss: reduction must be 'mean' or 'sum', got 'max'""")
        torch._dynamo.reset()
        step = torch.compile(opt.step, backend="eager", fullgraph=True)
        # (fullgraph: Dynamo reports the step's own exception, which it raised while tracing)
        message = _error(lambda: step(loss=1.5))
        self.assertExpectedInline(next(line.strip() for line in message.splitlines() if "0-d tensor" in line), """Developer debug context: raised exception TypeError('Celo: a compiled step needs the loss as a 0-d tensor (e.g. step(loss=loss.detach())), not a Python number, whose every value would compile a new graph')""")

    def test_gradients_and_state(self):
        opt = lo_ops.SmallFCLOpt([self.p])
        self.p.grad = torch.ones_like(self.p).to_sparse()
        self.assertExpectedInline(_error(opt.step), """RuntimeError: SmallFCLOpt does not support sparse gradients (parameter 0 of its param group, shape (4, 3)); use a dense gradient""")
        state = opt.state_dict()
        state["state"][0]["momentum"] = torch.zeros(2, 2)
        self.assertExpectedInline(_error(lambda: opt.load_state_dict(state)), """ValueError: load_state_dict: state['momentum'] of parameter 0 should be a tensor of shape (3, 4, 3), got torch.Size([2, 2])""")

    def test_op_arguments(self):
        p, g = torch.randn(4, 3), torch.randn(4, 3)
        m, v = torch.zeros(3, 4, 3), torch.zeros(4, 3)
        r, c = torch.zeros(3, 3), torch.zeros(3, 4)
        weights = lo_ops.SmallFCLOpt([torch.nn.Parameter(p.clone())])._meta(torch.device("cpu"))
        bad_steps = [torch.zeros(2)]
        self.assertExpectedInline(_error(lambda: torch.ops.lo_ops.small_fc_lopt_step_(
            [p], [g], [m], [v], [r], [c], [], bad_steps, torch.tensor(1.0), *weights, 0.0, 1.0, 1.0)), """RuntimeError: small_fc_lopt_step_: state_steps[0] must be a float32 tensor with one element on cpu, got Float of shape [2] on cpu""")
        self.assertExpectedInline(_error(lambda: torch.ops.lo_ops.small_fc_lopt_step_(
            [p], [g], [m], [v], [r], [c], [], [torch.zeros(())], torch.tensor(1.0), *weights, 0.0, 1.0, 1.0,
            torch.tensor([True, False]))), """RuntimeError: small_fc_lopt_step_: skip must be a bool tensor with one element on cpu, got Bool of shape [2] on cpu""")
