"""The CUDA sources compile with nvcc for sm_80 and sm_90 (needs nvcc and torch's headers, not a
GPU), so CUDA code is checked on every machine that has a CUDA toolkit."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from cxx_standard import nvcc_std_flag

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path, source):
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{d}" for d in cpp_extension.include_paths()]
    cmd = ["nvcc", nvcc_std_flag(), "-O3", "-Xcompiler", "-Wno-c++20-extensions",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           *includes, "-c", str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda has no .cu files"
