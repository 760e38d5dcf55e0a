"""The reference and the fused CPU path reproduce Google's original small_fc_lopt."""

import pytest
import torch

import lo_ops
from lo_ops._layout import factored_axes

from conftest import EMULATED_CUDA_PATHS, enter_path

STEP_RTOL = 1e-5
LR_PROBE = 2.0**24  # p - lr * step is dominated by lr * step: the step is read back exactly


def _jax_state_to_ours(name, leaf_shape, value):
    if name == "rms":
        return value.reshape(leaf_shape)
    return value.movedim(-1, 0)  # [..., 3] -> [3, ...]


# The fused CPU kernel once per instruction set (LO_OPS_CPU_ISA caps the one it uses; a
# machine without a set runs its best one), the CUDA kernels under the CUDA emulator, and the
# pure-PyTorch reference.
PATHS = {"fused-avx512": (True, "avx512"), "fused-avx2": (True, "avx2"), "fused-base": (True, "base"),
         **{path: (True, None) for path in EMULATED_CUDA_PATHS}, "reference": (False, None)}


@pytest.mark.parametrize("path", list(PATHS))
def test_small_fc_lopt_matches_original(path, small_fc_lopt_vectors, small_fc_lopt_fixture_dir,
                                        small_fc_lopt_fixture_offsets, monkeypatch, request):
    fused, isa = PATHS[path]
    if isa is not None:
        monkeypatch.setenv("LO_OPS_CPU_ISA", isa)
    enter_path(path, request)
    meta, vec = small_fc_lopt_vectors
    leaves = meta["leaf_order"]
    params = [torch.nn.Parameter(vec[f"params.step0.{k}"].clone()) for k in leaves]
    opt = lo_ops.SmallFCLOpt(
        params, lr=LR_PROBE, pretrained=str(small_fc_lopt_fixture_dir), step_mult=0.001,
        decay_offsets=small_fc_lopt_fixture_offsets, fused=fused,
    )
    for k in range(1, meta["n_updates"] + 1):
        with torch.no_grad():
            for name, p in zip(leaves, params):
                p.copy_(vec[f"params.step{k - 1}.{name}"])
                p.grad = vec[f"grads.step{k}.{name}"].clone()
        opt.step()
        for name, p in zip(leaves, params):
            prev = vec[f"params.step{k - 1}.{name}"].double()
            ours = (prev - p.detach().double()) / LR_PROBE
            ref = vec[f"steps.step{k}.{name}"].double()
            err = (ours - ref).norm() / ref.norm()
            assert err <= STEP_RTOL, f"update {k}, {name}: relative step error {err:.3g}"
            state = opt.state[p]
            shape = tuple(p.shape)
            jax_names = {"mom": "momentum", "rms": "rms"}
            if len(shape) >= 2:
                jax_names |= {"fac_v_row": "fac_row", "fac_v_col": "fac_col"}
            else:
                jax_names |= {"fac_v_diag": "fac_diag"}
            for jax_name, ours_name in jax_names.items():
                expected = _jax_state_to_ours(ours_name, shape, vec[f"state.step{k}.{jax_name}.{name}"])
                torch.testing.assert_close(state[ours_name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                           msg=lambda m: f"update {k}, {name}, {ours_name}: {m}")
            assert state["step"].item() == k


def test_factored_axes_tie_rule():
    assert factored_axes([4, 4]) == (1, 0)
    assert factored_axes([3, 4, 6]) == (2, 1)
    assert factored_axes([64, 64, 3, 3]) == (1, 0)
    assert factored_axes([7, 5]) == (0, 1)
