"""Build of the lo_ops._C extension.

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built with
LO_OPS_BUILD_CUDA=1 (which needs a CUDA build of torch and nvcc; a GPU need not be present).
They are not built by default yet: they have passed nvcc but not yet a run on a GPU
(perf/gpu_check.sh builds them and runs that check). Without them, CUDA parameters use the
pure-PyTorch reference.
"""

import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_requested() -> bool:
    flag = os.environ.get("LO_OPS_BUILD_CUDA", "0").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "no", ""):
        return False
    if flag in ("1", "true", "yes"):
        if not available:
            raise RuntimeError(
                "LO_OPS_BUILD_CUDA=1 but the installed torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
            )
        return True
    if flag == "auto":
        return available
    raise RuntimeError(f"LO_OPS_BUILD_CUDA must be 0, 1 or auto, got {flag!r}")


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi", "-DPy_LIMITED_API=0x03090000"]
    kwargs = dict(
        name="lo_ops._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if _cuda_requested() and cuda_sources:
        # A100 and H100 at least (and PTX for newer GPUs) unless the caller chose.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
