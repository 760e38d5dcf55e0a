"""Testing tools: lo_ops' CUDA kernels executed on the CPU.

``cuda_emulation()`` points every ``torch.ops.lo_ops`` call on CPU tensors at the CUDA kernels
(``csrc/cuda``), compiled as host C++ and run by the CUDA emulator
(``lo_ops/testing/cuda_emulator``): each CUDA thread is a cooperative context with real block
barriers and warp exchanges, shared memory and scratch are poisoned with NaN, and misuse of
barriers and shuffles is an error. So the device code can be tested, and optimizer steps run
through it, on a machine without a GPU::

    with lo_ops.testing.cuda_emulation(schedule="adversarial", seed=3):
        opt.step()

The emulator is compiled with ``torch.utils.cpp_extension.load`` on first use (a minute or so;
cached in ``TORCH_EXTENSIONS_DIR``) and needs a C++ compiler, ninja and the lo_ops sources,
which the package carries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

import lo_ops

__all__ = ["cuda_emulation", "load_cuda_emulator", "emulator_stats", "SCHEDULES"]

logger = logging.getLogger(__name__)

SCHEDULES = ("lockstep", "adversarial")
OPS = ("small_fc_lopt_step_", "velo_lstm_input", "velo_step_", "factored_gsq_sums", "factored_update_",
       "small_fc_lopt_feature_sums_", "small_fc_lopt_apply_", "velo_feature_sums_", "velo_apply_",
       "velo_lstm_moments", "velo_lstm_rows", "celo_adam_step_")
EMULATED = "lo_ops_cuda_emulated"
_EMULATOR_DIR = Path(__file__).resolve().parent / "cuda_emulator"
_STATS = ("launches", "blocks", "threads", "switches", "barriers", "exchanges")

_lock = threading.Lock()
# The emulated ops' schema definitions, once loaded (they last as long as this object).
_schemas: torch.library.Library | None = None


def _csrc() -> Path:
    """The C++/CUDA sources: inside the installed package, or beside it in a source tree."""
    package = Path(lo_ops.__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "cuda" / "ops.cu").is_file():
            return candidate
    raise RuntimeError(
        f"lo_ops.testing: the CUDA sources (csrc/cuda/ops.cu) are neither in {package / 'csrc'} "
        f"nor in {package.parent / 'csrc'}; reinstall lo_ops"
    )


def load_cuda_emulator(verbose: bool = False) -> None:
    """Builds (once, cached on disk) and loads the CUDA emulator and its emulated lo_ops ops."""
    global _schemas
    with _lock:
        if _schemas is not None:
            return
        from torch.utils.cpp_extension import load

        csrc = _csrc()
        sources = [_EMULATOR_DIR / name for name in ("ops.cpp", "probes.cpp", "runtime.cpp")]
        sources.append(csrc / "checks.cpp")
        logger.info("building the lo_ops CUDA emulator from %s (first use only)", csrc)
        load(
            name="lo_ops_cuda_emulator",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(_EMULATOR_DIR / "include"), str(_EMULATOR_DIR), str(csrc)],
            # -fdata-sections gives each __shared__ variable its own section, which
            # shared_memory.ld gathers; no -ffast-math, as for the real kernels.
            extra_cflags=["-O2", "-fdata-sections", "-fno-math-errno", "-Wno-psabi"],
            extra_ldflags=[f"-Wl,-T,{_EMULATOR_DIR / 'shared_memory.ld'}"],
            is_python_module=False,
            verbose=verbose,
        )
        # The emulated ops take lo_ops' own schemas (declared once, in csrc/lo_ops.cpp).
        lib = torch.library.Library(EMULATED, "FRAGMENT")
        for op in OPS:
            schema = str(getattr(torch.ops.lo_ops, op).default._schema)
            lib.define(schema.split("::", 1)[1])
        _schemas = lib


def emulator_stats() -> dict[str, int]:
    """Counters of the emulator since it was loaded (launches, blocks, threads, switches, ...)."""
    load_cuda_emulator()
    return dict(zip(_STATS, torch.ops.lo_ops_cuda_emulator.stats()))


@contextlib.contextmanager
def cuda_emulation(schedule: str = "lockstep", seed: int = 0) -> Iterator[None]:
    """Within the block, ``torch.ops.lo_ops.*`` on CPU tensors run the CUDA kernels, emulated.

    ``schedule``: "lockstep" (threads round-robin in order, blocks in order) or "adversarial"
    (blocks in random order; one warp at a time, chosen at random, its lanes in random order),
    with ``seed`` for the random choices. Errors the emulator detects (barriers some threads
    never reach, shuffles naming exited lanes, mixed barrier kinds, ...) raise RuntimeError.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"cuda_emulation: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"cuda_emulation: seed must be a non-negative int, got {seed!r}")
    load_cuda_emulator(verbose=os.environ.get("LO_OPS_EMULATOR_VERBOSE") == "1")
    torch.ops.lo_ops_cuda_emulator.configure(schedule, seed)
    lib = torch.library.Library("lo_ops", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            for op in OPS:
                lib.impl(op, getattr(getattr(torch.ops, EMULATED), op).default, "CPU")
        yield
    finally:
        lib._destroy()
