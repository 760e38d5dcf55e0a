import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LO_OPS_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
VECTORS = SHARED / "vectors"
FIXTURES = SHARED / "fixtures"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests read ../shared next to the repository")
    return path


@pytest.fixture(scope="session")
def small_fc_lopt_vectors():
    from safetensors.torch import load_file

    meta = json.loads(_need(VECTORS / "small_fc_lopt_init.json").read_text())
    return meta, load_file(str(_need(VECTORS / "small_fc_lopt_init.safetensors")))


@pytest.fixture(scope="session")
def small_fc_lopt_fixture_dir():
    return _need(FIXTURES / "small_fc_lopt_init" / "pylo_hub" / "MetaMLP")


@pytest.fixture(scope="session")
def small_fc_lopt_fixture_offsets():
    raw = json.loads(_need(FIXTURES / "small_fc_lopt_init" / "decay_offsets.json").read_text())
    return {"momentum": raw["momentum_decays"], "rms": raw["rms_decays"], "adafactor": raw["adafactor_decays"]}


@pytest.fixture(scope="session")
def velo_vectors():
    from safetensors.torch import load_file

    meta = json.loads(_need(VECTORS / "velo_init.json").read_text())
    return meta, load_file(str(_need(VECTORS / "velo_init.safetensors")))


VELO_FIXTURES = {
    "pylo": lambda: _need(FIXTURES / "velo_init" / "pylo_hub"),
    "jax": lambda: _need(FIXTURES / "velo_init" / "jax" / "params.msgpack"),
}


@pytest.fixture(scope="session", params=sorted(VELO_FIXTURES))
def velo_fixture(request):
    """The VeLO test meta-weights, through each external layout."""
    return VELO_FIXTURES[request.param]()


# The CUDA kernels through the CUDA emulator, under each schedule (see lo_ops.testing).
EMULATED_CUDA_PATHS = {"emulated-cuda-lockstep": "lockstep", "emulated-cuda-adversarial": "adversarial"}


def enter_path(path, request):
    """For an emulated-CUDA path, runs the rest of the test under lo_ops.testing.cuda_emulation."""
    if path not in EMULATED_CUDA_PATHS:
        return
    from lo_ops.testing import cuda_emulation

    context = cuda_emulation(EMULATED_CUDA_PATHS[path], seed=0)
    context.__enter__()
    request.addfinalizer(lambda: context.__exit__(None, None, None))
