"""VeLO against the reference vectors of Google's original (../shared/vectors/velo_init).

Each implementation path (pure-PyTorch reference, fused CPU ops) is checked part by part with
the recorded inputs (LSTM input, LSTM and heads, blended MLP weights, per-tensor step), then
end to end through both external checkpoint layouts (PyLO's directories, Google's msgpack).
"""

import pytest
import torch

import lo_ops
from lo_ops.hyperv2 import reference as ref
from lo_ops._layout import VELO_RMIN_INIT, state_shapes, unpack_velo_mlp
from lo_ops.hyperv2.network import load_velo_network

from conftest import EMULATED_CUDA_PATHS, VELO_FIXTURES, enter_path

# The fused CPU ops once per instruction set (LO_OPS_CPU_ISA caps the one they use; a machine
# without a set runs its best one), the CUDA kernels under the CUDA emulator, and the
# pure-PyTorch reference.
ISAS = {"fused-avx512": "avx512", "fused-avx2": "avx2", "fused-base": "base",
        **{path: None for path in EMULATED_CUDA_PATHS}, "reference": None}
PATHS = list(ISAS)
PROBE = 2.0**24  # lr that makes the step readable from float32 parameters
N_UPDATES = 8


def _use(path, monkeypatch, request):
    """Selects the path's instruction set or the CUDA emulator; returns whether it is a fused
    path."""
    if ISAS[path] is not None:
        monkeypatch.setenv("LO_OPS_CPU_ISA", ISAS[path])
    enter_path(path, request)
    return path != "reference"


def _ops(path, monkeypatch, request):
    if not _use(path, monkeypatch, request):
        return ref.velo_lstm_input, ref.velo_step_
    return torch.ops.lo_ops.velo_lstm_input, torch.ops.lo_ops.velo_step_


def _losses(meta):
    pattern = meta["problem"]["loss_pattern"]
    return [pattern[k % 8] - 0.05 * (k // 8) for k in range(meta["n_updates"])]


def _recorded_state(t, k, leaf, shape):
    """The accumulators after update k (zeros for k = 0), in lo_ops' channel-first layout."""
    shapes = state_shapes(shape)
    if k == 0:
        return {key: torch.zeros(s) for key, s in shapes.items()}
    names = {"momentum": "mom", "rms": "rms", "fac_row": "fac_v_row", "fac_col": "fac_v_col",
             "fac_diag": "fac_v_diag"}
    out = {}
    for key, s in shapes.items():
        x = t[f"state.step{k}.{names[key]}.{leaf}"]
        out[key] = x.movedim(-1, 0).reshape(s).clone(memory_format=torch.contiguous_format)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def net(velo_fixture):
    """The test meta-weights, loaded through each external layout in turn."""
    return load_velo_network(velo_fixture)[0]


def test_loss_buffer_matches(velo_vectors):
    meta, t = velo_vectors
    decays = ref.loss_buffer_decays(meta["horizon_num_steps"])
    torch.testing.assert_close(decays, t["state.step1.loss_buffer.decays"], rtol=0, atol=1e-7)
    means, rmin, it = torch.zeros(10), torch.full((10,), VELO_RMIN_INIT), torch.zeros(())
    for k, loss in enumerate(_losses(meta), start=1):
        means, rmin, feats = ref.loss_buffer_update(means, rmin, it, torch.tensor(loss), decays)
        it = it + 1
        torch.testing.assert_close(means, t[f"state.step{k}.loss_buffer.means"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rmin, t[f"state.step{k}.loss_buffer.running_min"], rtol=1e-6, atol=1e-6)
        recorded = t[f"probe.step{k}.rnn_input"][0, 9:18]
        atol = 1e-3 if k == 3 else 5e-4  # badly conditioned; first non-zero at update 3
        torch.testing.assert_close(feats, recorded, rtol=0, atol=atol)


@pytest.mark.parametrize("path", PATHS)
def test_lstm_input_matches_probes(velo_vectors, path, monkeypatch, request):
    meta, t = velo_vectors
    lstm_input, _ = _ops(path, monkeypatch, request)
    leaves = meta["leaf_order"]
    for k in range(1, N_UPDATES + 1):
        params = [t[f"params.step{k - 1}.{leaf}"] for leaf in leaves]
        grads = [t[f"grads.step{k}.{leaf}"] for leaf in leaves]
        states = [_recorded_state(t, k - 1, leaf, p.shape) for leaf, p in zip(leaves, params)]
        recorded = t[f"probe.step{k}.rnn_input"]
        X, finite = lstm_input(params, grads, [s["momentum"] for s in states],
                               [s["rms"] for s in states], recorded[0, 9:18].clone(),
                               torch.tensor(float(k - 1)), float(meta["horizon_num_steps"]))
        assert X.shape == (len(leaves), 30) and X.dtype == torch.float32
        assert finite.dtype == torch.bool and bool(finite)
        torch.testing.assert_close(X, recorded, rtol=0, atol=1e-5)


def test_lstm_and_blending_match_probes(velo_vectors, net):
    meta, t = velo_vectors
    sets = net.packed_mlp_sets()
    for k in range(1, N_UPDATES + 1):
        h, c, controls, lr_mult = ref.per_tensor_network(
            t[f"probe.step{k}.rnn_input"], t[f"probe.step{k}.lstm_hidden_in"],
            t[f"probe.step{k}.lstm_cell_in"], net,
        )
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, t[f"probe.step{k}.lstm_hidden_out"], **tol)
        torch.testing.assert_close(c, t[f"probe.step{k}.lstm_cell_out"], **tol)
        torch.testing.assert_close(controls, t[f"probe.step{k}.controls"], **tol)
        torch.testing.assert_close(lr_mult, t[f"probe.step{k}.lr_mult"], **tol)
        blended = ref.blend_mlp_weights(t[f"probe.step{k}.controls"], sets)
        for i, leaf in enumerate(meta["leaf_order"]):
            w0, b0, w1, b1, w2, b2 = unpack_velo_mlp(blended[i])
            pre = f"probe.step{k}.ff_param.{leaf}.~."
            jax_w0 = torch.cat([t[f"{pre}w0__{j}"] for j in range(14)], dim=0)  # [30, 4]
            for ours, theirs in ((w0, jax_w0.T), (b0, t[pre + "b0"]), (w1, t[pre + "w1"].T),
                                 (b1, t[pre + "b1"]), (w2, t[pre + "w2"].T), (b2, t[pre + "b2"])):
                torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_per_tensor_step_given_recorded_controls(velo_vectors, net, path, monkeypatch, request):
    meta, t = velo_vectors
    _, velo_step = _ops(path, monkeypatch, request)
    sets = net.packed_mlp_sets()
    leaves = meta["leaf_order"]
    worst = 0.0
    for k in range(1, N_UPDATES + 1):
        mlp = ref.blend_mlp_weights(t[f"probe.step{k}.controls"], sets)
        lr_mult = t[f"probe.step{k}.lr_mult"]
        for i, leaf in enumerate(leaves):
            p = t[f"params.step{k - 1}.{leaf}"].clone()
            s = _recorded_state(t, k - 1, leaf, p.shape)
            velo_step([p], [t[f"grads.step{k}.{leaf}"]], [s["momentum"]], [s["rms"]],
                      [s["fac_row"]] if "fac_row" in s else [], [s["fac_col"]] if "fac_col" in s else [],
                      [s["fac_diag"]] if "fac_diag" in s else [], torch.tensor(PROBE),
                      mlp[i:i + 1], lr_mult[i:i + 1], torch.tensor(False), 0.0, 0.001, 0.001)
            step = (t[f"params.step{k - 1}.{leaf}"].double() - p.double()) / PROBE
            err = _rel(step, t[f"steps.step{k}.{leaf}"])
            worst = max(worst, err)
            assert err <= 1e-4, f"update {k}, {leaf}: relative step error {err:.2e}"
            recorded = _recorded_state(t, k, leaf, p.shape)
            for key in s:  # absolute slack for elements that cancel (momentum near 0)
                scale = recorded[key].abs().max().item()
                torch.testing.assert_close(s[key], recorded[key], rtol=1e-5, atol=1e-6 * scale)
    print(f"worst per-tensor step error ({path}): {worst:.2e}")


@pytest.mark.parametrize("path", PATHS)
def test_end_to_end_through_fixture(velo_vectors, velo_fixture, path, monkeypatch, request):
    """The optimizer's own state (loss buffer, LSTM, accumulators) over 8 updates; the
    parameters follow the recorded trajectory so that each step can be read exactly."""
    meta, t = velo_vectors
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(t[f"params.step0.{leaf}"].clone()) for leaf in leaves]
    opt = lo_ops.VeLO(params, num_steps=meta["horizon_num_steps"], lr=PROBE,
                      pretrained=velo_fixture, fused=_use(path, monkeypatch, request))
    worst = 0.0
    for k, loss in enumerate(_losses(meta), start=1):
        with torch.no_grad():
            for p, leaf in zip(params, leaves):
                p.copy_(t[f"params.step{k - 1}.{leaf}"])
        for p, leaf in zip(params, leaves):
            p.grad = t[f"grads.step{k}.{leaf}"].clone()
        opt.step(loss=torch.tensor(loss))
        for p, leaf in zip(params, leaves):
            step = (t[f"params.step{k - 1}.{leaf}"].double() - p.detach().double()) / PROBE
            err = _rel(step, t[f"steps.step{k}.{leaf}"])
            worst = max(worst, err)
            assert err <= 1e-3, f"update {k}, {leaf}: relative step error {err:.2e}"
        hidden = torch.stack([opt.state[p]["lstm_hidden"] for p in params])
        torch.testing.assert_close(hidden, t[f"state.step{k}.lstm_hidden"], rtol=1e-3, atol=1e-4)
    assert opt.velo_state["iteration"].item() == N_UPDATES
    print(f"worst end-to-end step error ({path}): {worst:.2e}")


@pytest.mark.parametrize("path", PATHS)
def test_free_running_trajectory(velo_vectors, path, monkeypatch, request):
    """lr = 1, the optimizer's own parameters: after 8 updates they match the recorded ones."""

    meta, t = velo_vectors
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(t[f"params.step0.{leaf}"].clone()) for leaf in leaves]
    opt = lo_ops.VeLO(params, num_steps=meta["horizon_num_steps"],
                      pretrained=VELO_FIXTURES["jax"](), fused=_use(path, monkeypatch, request))
    for k, loss in enumerate(_losses(meta), start=1):
        for p, leaf in zip(params, leaves):
            p.grad = t[f"grads.step{k}.{leaf}"].clone()
        opt.step(loss=torch.tensor(loss))
    for p, leaf in zip(params, leaves):
        moved = t[f"params.step{N_UPDATES}.{leaf}"].double() - t[f"params.step0.{leaf}"].double()
        diff = p.detach().double() - t[f"params.step{N_UPDATES}.{leaf}"].double()
        assert diff.norm() <= 1e-3 * moved.norm(), leaf
