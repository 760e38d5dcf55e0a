"""The shared per-element headers compile as CUDA device code (needs nvcc, not a GPU)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from cxx_standard import nvcc_std_flag

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_shared_math_compiles_for_cuda(tmp_path):
    cmd = ["nvcc", nvcc_std_flag(), "-O2", f"-I{ROOT / 'csrc'}", "-c",
           str(ROOT / "tests" / "cuda" / "header_check.cu"), "-o", str(tmp_path / "check.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "check.o").stat().st_size > 0
