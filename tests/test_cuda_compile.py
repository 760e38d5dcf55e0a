"""The CUDA sources compile with nvcc for sm_80 and sm_90 (needs nvcc and torch's headers, not a
GPU), so CUDA code is checked on every machine that has a CUDA toolkit; also with the 4 KB
kernel-parameter tables of toolkits before CUDA 12.1. ptxas' resource report (-Xptxas -v) must
show no kernel with a stack frame or spills: per-element arrays in local memory are what makes a
kernel slow on a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from cxx_standard import nvcc_std_flag

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


# (what the build defines, architectures)
CONFIGS = {
    "default": ([], ("80", "90")),
    "4KB-tables": (["-DLO_OPS_KERNEL_PARAM_BYTES=4096"], ("80",)),
}

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_resources(report: str) -> list[dict]:
    """One entry per kernel and architecture of a `-Xptxas -v` report: stack frame, spill stores
    and loads (bytes) and registers."""
    kernels, current = [], None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
            kernels.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return kernels


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_without_stack_frames(tmp_path, source, config):
    defines, archs = CONFIGS[config]
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{d}" for d in cpp_extension.include_paths()]
    gencode = [flag for a in archs for flag in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    cmd = ["nvcc", nvcc_std_flag(), "-O3", "-Xcompiler", "-Wno-c++20-extensions", *gencode,
           "-Xptxas", "-v", *defines, *includes, "-c", str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0
    kernels = ptxas_resources(result.stdout + result.stderr)
    assert {k["arch"] for k in kernels} == {f"sm_{a}" for a in archs}
    assert all("stack" in k and "registers" in k for k in kernels), kernels
    heavy = [k for k in kernels if k["stack"] or k["spill_stores"] or k["spill_loads"]]
    assert not heavy, "kernels with a stack frame or spills:\n" + "\n".join(map(str, heavy))


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda has no .cu files"
