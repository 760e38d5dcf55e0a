"""lo_ops optimizers on sharded (DTensor) parameters equal the single-process optimizer.

Every case runs in spawned gloo processes on 127.0.0.1. Each rank steps a DTensor copy of the
parameters and, on the full tensors, the single-process optimizer, then checks its own slice:
element-wise state (momentum, rms, fac_diag) bitwise, the factored state within 1e-6
relative, the parameters within 1e-6 of the step's size plus 4 ulps (most are bitwise), and
every replicated value bitwise equal across the ranks that replicate it.
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed_helpers import assert_replicas_equal, local_part, make_tensors, spawn

# Uneven and empty shards at W=3 ([2, 9] on Shard(0): 1, 1, 0 rows), a 0-d and a [1] tensor,
# > 4096 elements, square and 3-d tensors whose factored axes are not the sharded one.
SHAPES = [(37, 5), (5, 37), (3, 20, 7), (7,), (2, 9), (1,), (), (70, 80), (4100,), (6, 6), (4, 5, 3, 2)]
STEPS = 4


def _placements(kind: str, shape, mesh_ndim: int):
    """FSDP2-like Shard(0); tensor parallel Shard(last axis) (Replicate for 1-d tensors, as TP
    keeps norms); HSDP (Replicate, Shard(0)); FSDP + TP (Shard(0), Shard(last)) and FSDP over
    column-parallel TP (_StridedShard(0), Shard(0))."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    nd = len(shape)
    if nd == 0:
        return [Replicate()] * mesh_ndim
    if kind == "fsdp":
        return [Shard(0)]
    if kind == "tp":
        return [Shard(nd - 1)] if nd >= 2 else [Replicate()]
    if kind == "hsdp":
        return [Replicate(), Shard(0)]
    if kind == "fsdp_tp":
        return [Shard(0), Shard(nd - 1)] if nd >= 2 else [Shard(0), Replicate()]
    if kind == "fsdp_over_colwise_tp":
        return [_StridedShard(0, split_factor=2), Shard(0)]
    raise ValueError(kind)


def _make_opt(name, params, fused, velo_fixture, **kw):
    import lo_ops

    if name == "small_fc_lopt":
        return lo_ops.SmallFCLOpt(params, lr=0.7, weight_decay=0.01, fused=fused, **kw)
    if name in HYPERV2:
        return HYPERV2[name](params, num_steps=20, lr=0.9, weight_decay=0.01, fused=fused, **kw)
    return lo_ops.VeLO(params, num_steps=20, lr=0.9, weight_decay=0.01, pretrained=velo_fixture, fused=fused,
                       **kw)


def _hyperv2():
    import lo_ops

    return {"celo": lo_ops.Celo, "celo_adam": lo_ops.CeloAdam}


HYPERV2 = _hyperv2()
WITH_LOSS = ("velo", "celo", "celo_adam")  # the optimizers whose step takes the loss


def _step(opt, name, k):
    if name in WITH_LOSS:
        opt.step(loss=torch.tensor(2.0 / (k + 1)))
    else:
        opt.step()


def assert_param_close(got, expected, step_size, what):
    """Within 1e-6 of the step's size plus 4 units in the last place of the parameter's dtype:
    partial sums added in another order may flip the last bit of a sum, and so of a parameter,
    and a flipped bit feeds the next steps' features."""
    if got.numel() == 0:
        return
    diff = (got.float() - expected.float()).abs()
    bound = 1e-6 * step_size + 4 * torch.finfo(got.dtype).eps * expected.float().abs()
    worst = diff.flatten().argmax()
    assert (diff <= bound).all(), (f"{what}: |param - single process| up to {diff.max().item():g} "
                                   f"at value {expected.flatten()[worst].item()}")


def _check_replicated(value, mesh, what):
    """For each mesh dimension that replicates ``value``, its local parts agree bitwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        assert_replicas_equal(value, what=what)
        return
    for d, placement in enumerate(value.placements):
        if placement.is_replicate() and mesh.size(d) > 1:
            assert_replicas_equal(value.to_local(), group=mesh.get_group(d), what=f"{what} (mesh dim {d})")


def _sharded_case(rank, world, name, kind, mesh_shape, dtype, fused, velo_fixture):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    full = make_tensors(SHAPES, dtype)
    ref_params = [torch.nn.Parameter(t.clone()) for t in full]
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, _placements(kind, t.shape, mesh.ndim),
                                                   src_data_rank=None)) for t in full]
    # One process on the same path: the fused kernels (fused None/True) or the reference.
    ref = _make_opt(name, ref_params, fused, velo_fixture)
    opt = _make_opt(name, params, fused, velo_fixture)
    assert opt._phased_fused_for(torch.device("cpu")) is (fused is not False)
    for k in range(STEPS):
        grads = make_tensors(SHAPES, dtype, seed=100 + k, scale=0.1)
        before = [p.detach().clone() for p in ref_params]
        for p, q, g in zip(ref_params, params, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, q.placements, src_data_rank=None)
        _step(ref, name, k)
        _step(opt, name, k)
        for i, (p, q, old) in enumerate(zip(ref_params, params, before)):
            what = f"{name} {kind} step {k} param {i} {tuple(p.shape)}"
            step_size = (p.detach().float() - old.float()).abs().max().item()
            assert_param_close(q.to_local(), local_part(p, q), step_size, what)
            _check_replicated(q, mesh, what)
    for i, (p, q) in enumerate(zip(ref_params, params)):
        for key, value in ref.state[p].items():
            what = f"{name} {kind} param {i} {tuple(p.shape)} state {key}"
            got = opt.state[q][key]
            _check_replicated(got, mesh, what)
            if key in ("step", "lstm_hidden", "lstm_cell", "iteration", "loss_means", "loss_running_min"):
                # replicated, plain tensors
                assert torch.equal(got, value), what
                continue
            assert got.shape == value.shape and got.dtype == torch.float32, what
            expected, local = local_part(value, got), got.to_local()
            if key in ("momentum", "rms", "fac_diag"):
                assert torch.equal(local, expected), what
            else:
                torch.testing.assert_close(local, expected, rtol=1e-6, atol=0, msg=lambda m: f"{what}: {m}")
    if name in WITH_LOSS:
        for key, value in opt.global_state.items():
            assert torch.equal(value, ref.global_state[key]), key
            assert_replicas_equal(value, what=key)


@pytest.fixture(scope="module")
def velo_fixture_dir():
    from conftest import FIXTURES, _need

    return str(_need(FIXTURES / "velo_init" / "pylo_hub"))


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo", "celo", "celo_adam"])
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_and_tp_shards_equal_one_process(world, name, velo_fixture_dir):
    # fused=None: the phase ops (against one process with the fused kernels); fused=False: the
    # phased reference (against one process with the reference).
    cases = [(name, kind, (world,), dtype, fused) for kind in ("fsdp", "tp")
             for dtype in (torch.float32, torch.bfloat16) for fused in (None, False)]
    spawn(world, _run_cases, cases, velo_fixture_dir)


def _run_cases(rank, world, cases, velo_fixture):
    for case in cases:
        _sharded_case(rank, world, *case, velo_fixture)


def _groups_case(rank, world, velo_fixture):
    """Two param groups (their own lr and weight decay) of sharded parameters, with a plain one
    in between: equal to one process with the same groups, on both paths."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(37, 5), (7,), (5, 37), (3, 20, 7), ()]
    for name in ("small_fc_lopt", "velo", "celo", "celo_adam"):
        for fused in (None, False):
            full = make_tensors(shapes)
            ref_params = [torch.nn.Parameter(t.clone()) for t in full]
            params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, _placements("fsdp", t.shape, 1),
                                                           src_data_rank=None)) for t in full]

            def groups(ps):
                return [{"params": ps[:2]}, {"params": ps[2:4], "lr": 0.3, "weight_decay": 0.1},
                        {"params": ps[4:], "lr": 0.5}]

            ref = _make_opt(name, groups(ref_params), fused, velo_fixture)
            opt = _make_opt(name, groups(params), fused, velo_fixture)
            for k in range(3):
                grads = make_tensors(shapes, seed=200 + k, scale=0.1)
                before = [p.detach().clone() for p in ref_params]
                for p, q, g in zip(ref_params, params, grads):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, q.placements, src_data_rank=None)
                _step(ref, name, k)
                _step(opt, name, k)
                for i, (p, q, old) in enumerate(zip(ref_params, params, before)):
                    what = f"{name} fused={fused} groups step {k} param {i}"
                    step_size = (p.detach().float() - old.float()).abs().max().item()
                    assert step_size > 0, what
                    assert_param_close(q.to_local(), local_part(p, q), step_size, what)


def test_param_groups_of_sharded_parameters(velo_fixture_dir):
    spawn(2, _groups_case, velo_fixture_dir)


def test_2d_meshes_hsdp_and_fsdp_tp_at_4_ranks(velo_fixture_dir):
    cases = [(name, kind, (2, 2), torch.float32, fused) for name in ("small_fc_lopt", "velo", "celo", "celo_adam")
             for kind in ("hsdp", "fsdp_tp", "fsdp_over_colwise_tp") for fused in (None, False)]
    spawn(4, _run_cases, cases, velo_fixture_dir)


def _compiled_case(rank, world, name, velo_fixture, cache):
    """torch.compile(opt.step, fullgraph=True) on DTensor parameters: one graph, equal to eager.
    Each rank compiles into its own cache: the ranks' uneven shards give graphs of different
    local shapes whose cache entries the compiler may confuse (their keys see the DTensors'
    equal global shapes)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, f"rank{rank}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from helpers import CountingBackend

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(37, 5), (5, 37), (7,), (), (2, 9)]
    full = make_tensors(shapes)

    def make():
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, _placements("fsdp", t.shape, 1),
                                                       src_data_rank=None)) for t in full]
        return params, _make_opt(name, params, None, velo_fixture)

    eager_params, eager = make()
    compiled_params, opt = make()
    backend = CountingBackend("inductor")
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for k in range(3):
        for a, b, g in zip(eager_params, compiled_params, make_tensors(shapes, seed=10 + k, scale=0.1)):
            a.grad = distribute_tensor(g, mesh, a.placements, src_data_rank=None)
            b.grad = distribute_tensor(g.clone(), mesh, b.placements, src_data_rank=None)
        if name in WITH_LOSS:
            loss = torch.tensor(1.0 / (k + 1))
            eager.step(loss=loss)
            step(loss=loss)
        else:
            eager.step()
            step()
    assert backend.graphs == 1, backend.graphs
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(b.to_local(), a.to_local(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo", "celo", "celo_adam"])
def test_compiled_step_on_dtensor_params_equals_eager(name, velo_fixture_dir, tmp_path):
    spawn(2, _compiled_case, name, velo_fixture_dir, str(tmp_path))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 37), torch.nn.ReLU(), torch.nn.Linear(37, 5))


def _batch(rank, k):
    gen = torch.Generator().manual_seed(1000 * k + rank)
    return torch.randn(8, 10, generator=gen), torch.randn(8, 5, generator=gen)


def _fsdp2_case(rank, world, velo_fixture):
    """A model wrapped by FSDP2's fully_shard: each step equals the single-process optimizer
    given the same (gathered) parameters and gradients; VeLO averages the loss itself."""
    for name in ("small_fc_lopt", "velo", "celo", "celo_adam"):
        model, single = _fsdp2_model(world), _model()
        kw = {"all_reduce_loss": True} if name in WITH_LOSS else {}
        opt = _make_opt(name, list(model.parameters()), False, velo_fixture, **kw)
        ref = _make_opt(name, list(single.parameters()), False, velo_fixture)
        for k in range(3):
            _train_with_single(model, opt, single, ref, name, 1, k, rank, own_loss=name in WITH_LOSS)
            for i, (p, q) in enumerate(zip(model.parameters(), single.parameters())):
                assert torch.equal(p.to_local(), local_part(q, p)), f"{name} step {k} param {i}"
        if name in WITH_LOSS:
            assert torch.equal(opt.global_state["loss_means"], ref.global_state["loss_means"])


def _step_both(name, opt, ref, loss, ref_loss):
    """One step of the optimizer under test and of the single-process one (VeLO, Celo* with losses)."""
    if name in WITH_LOSS:
        opt.step(loss=loss)
        ref.step(loss=ref_loss)
    else:
        opt.step()
        ref.step()
    opt.zero_grad()
    ref.zero_grad()


def test_fsdp2_fully_shard_model(velo_fixture_dir):
    spawn(2, _fsdp2_case, velo_fixture_dir)


def _ddp_case(rank, world, velo_fixture):
    """DDP with a lo_ops optimizer, unchanged: the replicas stay bitwise equal, and match one
    process on the whole batch (whose gradient equals DDP's mean up to rounding)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    for name in ("small_fc_lopt", "velo"):
        model = _model()
        single = copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        kw = {"all_reduce_loss": True} if name == "velo" else {}
        opt = _make_opt(name, list(ddp.parameters()), None, velo_fixture, **kw)
        ref = _make_opt(name, list(single.parameters()), None, velo_fixture)
        for k in range(3):
            x, y = _batch(rank, k)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            batches = [_batch(r, k) for r in range(world)]
            full_loss = torch.nn.functional.mse_loss(single(torch.cat([b[0] for b in batches])),
                                                     torch.cat([b[1] for b in batches]))
            full_loss.backward()
            _step_both(name, opt, ref, loss.detach(), full_loss.detach())
        for i, (p, q) in enumerate(zip(model.parameters(), single.parameters())):
            assert_replicas_equal(p.detach(), what=f"{name} param {i}")
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} param {i}: {m}")


def test_ddp_unchanged(velo_fixture_dir):
    spawn(2, _ddp_case, velo_fixture_dir)


def _zero_case(rank, world, velo_fixture):
    """ZeroRedundancyOptimizer(optimizer_class=lo_ops.SmallFCLOpt / lo_ops.VeLO): equal to one
    process (VeLO's network sees every rank's tensors), replicas bitwise equal, and the state
    survives consolidate_state_dict / state_dict / load_state_dict bit for bit. With three
    ranks and two parameters one partition is empty."""
    import copy

    import lo_ops
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def build(name, params):
        if name == "velo":
            return ZeroRedundancyOptimizer(params, optimizer_class=lo_ops.VeLO, num_steps=20, lr=0.9,
                                           weight_decay=0.01, pretrained=velo_fixture, partitioned=True)
        if name in HYPERV2:
            return ZeroRedundancyOptimizer(params, optimizer_class=HYPERV2[name], num_steps=20, lr=0.9,
                                           weight_decay=0.01, partitioned=True)
        return ZeroRedundancyOptimizer(params, optimizer_class=lo_ops.SmallFCLOpt, lr=0.7, weight_decay=0.01)

    def train(model, opt, name, steps, offset=0):
        for k in range(offset, offset + steps):
            x, y = _batch(0, k)  # the same batch on every rank: equal gradients without DDP
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss.detach()) if name in WITH_LOSS else opt.step()
            opt.zero_grad()

    models = {"four params": _model(), "two params": torch.nn.Sequential(torch.nn.Linear(10, 5))}
    for label, model in models.items():
        for name in ("small_fc_lopt", "velo", "celo", "celo_adam"):
            zero_model, single = copy.deepcopy(model), copy.deepcopy(model)
            opt = build(name, zero_model.parameters())
            ref = _make_opt(name, list(single.parameters()), None, velo_fixture)
            train(zero_model, opt, name, 3)
            train(single, ref, name, 3)
            for i, (p, q) in enumerate(zip(zero_model.parameters(), single.parameters())):
                what = f"{label} {name} param {i}"
                assert_replicas_equal(p.detach(), what=what)
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")
            opt.consolidate_state_dict(to=0)
            # A copy: rank 0's consolidated state holds its optimizer's live tensors.
            saved = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]
            torch.distributed.broadcast_object_list(saved, src=0)
            resumed_model = copy.deepcopy(zero_model)
            resumed = build(name, resumed_model.parameters())
            resumed.load_state_dict(saved[0])
            train(zero_model, opt, name, 2, offset=3)
            train(resumed_model, resumed, name, 2, offset=3)
            for i, (p, q) in enumerate(zip(zero_model.parameters(), resumed_model.parameters())):
                assert torch.equal(p, q), f"{label} {name} param {i} after load_state_dict"


@pytest.mark.parametrize("world", [2, 3])
def test_zero_redundancy_optimizer(world, velo_fixture_dir):
    spawn(world, _zero_case, velo_fixture_dir)


def _fsdp2_model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train_with_single(model, opt, single, ref, name, steps, offset, rank, own_loss=False):
    """FSDP2 steps, with the single-process optimizer given the same gathered gradients and
    the mean loss (``own_loss``: the optimizer under test gets this rank's loss). Returns the
    sum over the steps of each parameter's largest change."""
    moved = [0.0 for _ in single.parameters()]
    for k in range(offset, offset + steps):
        before = [q.detach().clone() for q in single.parameters()]
        x, y = _batch(rank, k)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        for p, q in zip(model.parameters(), single.parameters()):
            assert p.grad.placements == p.placements
            q.grad = p.grad.full_tensor()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
        _step_both(name, opt, ref, loss.detach() if own_loss else mean, mean)
        for i, (q, b) in enumerate(zip(single.parameters(), before)):
            moved[i] += (q.detach() - b).abs().max().item()
    return moved


def _dcp_save(rank, world, path, velo_fixture):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for name in ("small_fc_lopt", "velo"):
        model = _fsdp2_model(world)
        single = _model()
        opt = _make_opt(name, list(model.parameters()), False, velo_fixture)
        ref = _make_opt(name, list(single.parameters()), False, velo_fixture)
        moved = _train_with_single(model, opt, single, ref, name, 3, 0, rank)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=f"{path}/{name}")
        if rank == 0:
            torch.save({"model": single.state_dict(), "optim": ref.state_dict(), "moved": moved},
                       f"{path}/{name}.single.pt")


def _dcp_load(rank, world, path, velo_fixture):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for name in ("small_fc_lopt", "velo"):
        model = _fsdp2_model(world)
        opt = _make_opt(name, list(model.parameters()), False, velo_fixture)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=f"{path}/{name}")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        single = _model()
        ref = _make_opt(name, list(single.parameters()), False, velo_fixture)
        saved = torch.load(f"{path}/{name}.single.pt", weights_only=True)
        single.load_state_dict(saved["model"])
        ref.load_state_dict(saved["optim"])
        for p, q in zip(model.parameters(), single.parameters()):
            assert torch.equal(p.to_local(), local_part(q, p)), f"{name}: parameters after loading"
        _compare_state(model, opt, single, ref, name, "after loading", saved["moved"])
        moved = _train_with_single(model, opt, single, ref, name, 3, 3, rank)
        total = [a + b for a, b in zip(saved["moved"], moved)]
        _compare_state(model, opt, single, ref, name, "after resuming", total)


def _compare_state(model, opt, single, ref, name, when, moved):
    """Parameters within 1e-6 of the distance they moved (and 4 ulps), state within 1e-6."""
    for i, (p, q) in enumerate(zip(model.parameters(), single.parameters())):
        assert_param_close(p.to_local(), local_part(q, p), moved[i], f"{name} param {i} {when}")
        for key, value in ref.state[q].items():
            got = opt.state[p][key]
            sharded = hasattr(got, "device_mesh")
            expected = local_part(value, got) if sharded else value
            local = got.to_local() if sharded else got
            torch.testing.assert_close(local, expected, rtol=1e-6, atol=0,
                                       msg=lambda m: f"{name} param {i} state {key} {when}: {m}")


def test_distributed_checkpoint_saved_at_2_ranks_resumes_at_3(velo_fixture_dir, tmp_path):
    spawn(2, _dcp_save, str(tmp_path), velo_fixture_dir)
    spawn(3, _dcp_load, str(tmp_path), velo_fixture_dir)


def _error_case(rank, world, velo_fixture):
    """Bad input is refused with a message that names the parameter and the problem."""
    import lo_ops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.randn(6, 4)
    partial = torch.nn.Parameter(DTensor.from_local(torch.randn(6, 4), mesh, [Partial()], run_check=False))
    for name in ("small_fc_lopt", "velo"):
        try:
            _make_opt(name, [partial], None, velo_fixture)
        except ValueError as e:
            assert "Partial" in str(e) and "parameter 0" in str(e), str(e)
        else:
            raise AssertionError(f"{name}: a Partial parameter was accepted")
    sharded = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None))
    opt = lo_ops.SmallFCLOpt([sharded])
    sharded.grad = torch.randn(6, 4)
    try:
        opt.step()
    except ValueError as e:
        assert "DTensor gradient" in str(e) and "(6, 4)" in str(e), str(e)
    else:
        raise AssertionError("a plain gradient of a DTensor parameter was accepted")


def test_bad_distributed_input_is_refused(velo_fixture_dir):
    spawn(2, _error_case, velo_fixture_dir)


def test_zero_keyword_arguments_in_param_groups(velo_fixture_dir):
    """ZeroRedundancyOptimizer copies the optimizer's keyword arguments into every param group:
    equal values are accepted, different ones refused."""
    import lo_ops

    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = lo_ops.SmallFCLOpt([{"params": [p], "step_mult": None, "pretrained": None}])
    assert "step_mult" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="step_mult holds for the whole optimizer"):
        lo_ops.SmallFCLOpt([{"params": [p], "step_mult": 0.5}])
    velo = lo_ops.VeLO([{"params": [p], "num_steps": 10, "pretrained": velo_fixture_dir, "partitioned": False}],
                       num_steps=10, pretrained=velo_fixture_dir)
    assert "num_steps" not in velo.param_groups[0]
    with pytest.raises(ValueError, match="all_reduce_loss must be"):
        lo_ops.VeLO([p], num_steps=10, pretrained=velo_fixture_dir, all_reduce_loss="mean")
    with pytest.raises(ValueError, match="partitioned must be"):
        lo_ops.VeLO([p], num_steps=10, pretrained=velo_fixture_dir, partitioned=2)


@pytest.mark.parametrize("optimizer", ["small_fc_lopt", "velo"])
def test_fsdp2_example_runs_under_torchrun(optimizer, velo_fixture_dir, tmp_path):
    """examples/fsdp2_cpu.py, as the README runs it (torchrun, 2 processes, gloo)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(root / "examples" / "fsdp2_cpu.py"), "--steps", "6",
           "--optimizer", optimizer, "--velo-weights", velo_fixture_dir, "--checkpoint", str(tmp_path / "ckpt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step    5  loss" in run.stdout and "saved" in run.stdout, run.stdout
    assert (tmp_path / "ckpt" / ".metadata").exists()


def _nonfinite_case(rank, world, velo_fixture):
    """Every optimizer, fused phase ops and reference: an inf in one element of one rank's
    shard skips the step on every rank (no parameter and no state changes, no step counted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(37, 5), (7,), ()]
    for name in ("small_fc_lopt", "velo", *HYPERV2):
        for fused in (None, False):
            params = [torch.nn.Parameter(distribute_tensor(t, mesh, _placements("fsdp", t.shape, 1),
                                                           src_data_rank=None))
                      for t in make_tensors(shapes)]
            opt = _make_opt(name, params, fused, velo_fixture)
            for k in range(2):
                grads = make_tensors(shapes, seed=100 + k, scale=0.1)
                for p, g in zip(params, grads):
                    p.grad = distribute_tensor(g, mesh, p.placements, src_data_rank=None)
                if k == 1 and rank == world - 1:
                    params[0].grad.to_local()[-1, 2] = float("inf")
                before = [p.to_local().clone() for p in params]
                state = [{key: v.clone() for key, v in opt.state[p].items()} for p in params]
                _step(opt, name, k)
            where = f"{name} (fused={fused})"
            assert all(torch.equal(p.to_local(), b) for p, b in zip(params, before)), f"{where}: a parameter moved"
            for p, s in zip(params, state):
                assert all(torch.equal(opt.state[p][key].to_local() if hasattr(opt.state[p][key], "to_local")
                                       else opt.state[p][key], v.to_local() if hasattr(v, "to_local") else v)
                           for key, v in s.items()), f"{where}: state changed"
            steps = opt.global_state["iteration"] if name in WITH_LOSS else opt.state[params[0]]["step"]
            assert steps.item() == 1, where


def test_nonfinite_gradient_on_one_rank_skips_everywhere(velo_fixture_dir):
    spawn(2, _nonfinite_case, velo_fixture_dir)


def _vectors_case(rank, world, shared, velo_fixture, small_fc_lopt_fixture):
    """The recorded trajectories of the original JAX optimizers (../shared/vectors) through
    sharded parameters: FSDP-style Shard(0) and TP Shard(last), steps read exactly with a
    large lr, the relative step error of each whole tensor within the vectors' tolerances
    (small_fc_lopt 1e-5, VeLO end to end 1e-3)."""
    import json
    from pathlib import Path

    import lo_ops
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    probe = 2.0 ** 24
    vectors = Path(shared) / "vectors"
    offsets = json.loads((Path(shared) / "fixtures" / "small_fc_lopt_init" / "decay_offsets.json").read_text())
    offsets = {"momentum": offsets["momentum_decays"], "rms": offsets["rms_decays"],
               "adafactor": offsets["adafactor_decays"]}
    for name, tol in (("small_fc_lopt", 1e-5), ("velo", 1e-3)):
        meta = json.loads((vectors / f"{name}_init.json").read_text())
        t = load_file(str(vectors / f"{name}_init.safetensors"))
        leaves = meta["leaf_order"]
        for kind in ("fsdp", "tp"):
            full = [t[f"params.step0.{leaf}"] for leaf in leaves]
            params = [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, _placements(kind, x.shape, 1),
                                                           src_data_rank=None)) for x in full]
            if name == "velo":
                opt = lo_ops.VeLO(params, num_steps=meta["horizon_num_steps"], lr=probe, pretrained=velo_fixture)
                pattern = meta["problem"]["loss_pattern"]
                losses = [pattern[k % 8] - 0.05 * (k // 8) for k in range(meta["n_updates"])]
            else:
                opt = lo_ops.SmallFCLOpt(params, lr=probe, pretrained=small_fc_lopt_fixture, step_mult=0.001,
                                         decay_offsets=offsets)
            for k in range(1, meta["n_updates"] + 1):
                with torch.no_grad():
                    for p, leaf in zip(params, leaves):
                        prev = distribute_tensor(t[f"params.step{k - 1}.{leaf}"], mesh, p.placements,
                                                 src_data_rank=None)
                        p.to_local().copy_(prev.to_local())
                        p.grad = distribute_tensor(t[f"grads.step{k}.{leaf}"].clone(), mesh, p.placements,
                                                   src_data_rank=None)
                opt.step(loss=torch.tensor(losses[k - 1])) if name == "velo" else opt.step()
                for p, leaf in zip(params, leaves):
                    step = (t[f"params.step{k - 1}.{leaf}"].double() - p.full_tensor().double()) / probe
                    ref = t[f"steps.step{k}.{leaf}"].double()
                    err = ((step - ref).norm() / ref.norm()).item()
                    assert err <= tol, f"{name} {kind} update {k}, {leaf}: relative step error {err:.3g}"


@pytest.mark.parametrize("world", [2, 3])
def test_vectors_through_sharded_parameters(world, velo_fixture_dir, small_fc_lopt_fixture_dir):
    from conftest import SHARED

    spawn(world, _vectors_case, str(SHARED), velo_fixture_dir, str(small_fc_lopt_fixture_dir))


def _mulo_case(rank, world, small_fc_lopt_fixture):
    """MuLO on sharded parameters: param groups with mixed ``mup_scale`` (one of them plain),
    gradients holding NaNs in some shards (μLO maps them to 0 through nan_to_num, so the step
    is taken everywhere; an infinity becomes FLT_MAX, whose square overflows, as in the
    original), fp32 and bf16, both paths: equal to one process."""
    import lo_ops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(37, 5), (7,), (5, 37), (3, 20, 7), (), (70, 80), (9, 4)]
    for kind in ("fsdp", "tp"):
        for dtype in (torch.float32, torch.bfloat16):
            for fused in (None, False):
                full = make_tensors(shapes, dtype)
                ref_params = [torch.nn.Parameter(t.clone()) for t in full]
                params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, _placements(kind, t.shape, 1),
                                                               src_data_rank=None)) for t in full]

                def groups(ps):
                    return [{"params": ps[:2], "mup_scale": 1 / 37}, {"params": ps[2:4], "weight_decay": 0.1},
                            {"params": ps[4:6], "mup_scale": 1 / 80, "lr": 0.5}, {"params": ps[6:], "mup_scale": 0.25}]

                ref = lo_ops.MuLO(groups(ref_params), lr=0.7, pretrained=small_fc_lopt_fixture, fused=fused)
                opt = lo_ops.MuLO(groups(params), lr=0.7, pretrained=small_fc_lopt_fixture, fused=fused)
                for k in range(3):
                    grads = make_tensors(shapes, dtype, seed=300 + k, scale=0.1)
                    grads[0][k, 1] = float("nan")  # (rows 0-2 of a Shard(0) [37, 5]: rank 0's shard)
                    grads[2][4, 30 + k] = float("nan")  # (the last columns: the last rank's TP shard)
                    grads[5][60, 2] = float("nan")
                    grads[6].view(-1)[k] = float("nan")
                    before = [p.detach().clone() for p in ref_params]
                    for p, q, g in zip(ref_params, params, grads):
                        p.grad = g.clone()
                        q.grad = distribute_tensor(g.clone(), mesh, q.placements, src_data_rank=None)
                    ref.step()
                    opt.step()
                    for i, (p, q, old) in enumerate(zip(ref_params, params, before)):
                        what = f"mulo {kind} {dtype} fused={fused} step {k} param {i}"
                        assert torch.isfinite(p).all(), what
                        step_size = (p.detach().float() - old.float()).abs().max().item()
                        assert step_size > 0 or dtype == torch.bfloat16, what  # (bf16: below an ulp)
                        assert_param_close(q.to_local(), local_part(p, q), step_size, what)
                        _check_replicated(q, mesh, what)
                # A last step with +-inf (FLT_MAX after nan_to_num, then non-finite squares, as in the
                # original): the same state, NaNs and infinities included, FLT_MAX momentum in bf16 too.
                grads = make_tensors(shapes, dtype, seed=400, scale=0.1)
                grads[5][60, 2], grads[2][4, 36] = float("inf"), -float("inf")
                for p, q, g in zip(ref_params, params, grads):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, q.placements, src_data_rank=None)
                ref.step()
                opt.step()
                assert ref.state[ref_params[5]]["momentum"][:, 60, 2].abs().min() > 1e34
                for i, (p, q) in enumerate(zip(ref_params, params)):
                    for key, value in ref.state[p].items():
                        what = f"mulo {kind} {dtype} fused={fused} param {i} state {key}"
                        got = opt.state[q][key]
                        if key == "step":
                            assert torch.equal(got, value), what
                        else:
                            torch.testing.assert_close(got.to_local(), local_part(value, got), rtol=1e-6, atol=0,
                                                       equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_mulo_sharded_with_mup_scales_and_nonfinite_gradients(world, small_fc_lopt_fixture_dir):
    spawn(world, _mulo_case, str(small_fc_lopt_fixture_dir))
