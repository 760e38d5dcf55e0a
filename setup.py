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
from torch.utils import cpp_extension
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# torch's BuildExtension defines Py_LIMITED_API (as its min_supported_cpython) for every
# py_limited_api extension, so it is not defined here again; the abi3 wheel names that version.
_LIMITED_API = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
ABI3_TAG = f"cp{_LIMITED_API >> 24}{(_LIMITED_API >> 16) & 0xFF}"


def _check_cuda_home() -> None:
    """CUDA_HOME must be the toolkit root: torch takes the parent of the directory holding the
    first `nvcc` on PATH, which is wrong when that nvcc is a wrapper script (/usr/local/bin/nvcc
    gives /usr/local), and the link then fails with `cannot find -lcudart`."""
    missing = []
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        missing.append("include/cuda_runtime.h")
    lib_dirs = [os.path.join(CUDA_HOME, d) for d in ("lib64", "lib")]
    lib_dirs += glob.glob(os.path.join(CUDA_HOME, "targets", "*", "lib"))
    if not any(glob.glob(os.path.join(d, "libcudart*")) for d in lib_dirs):
        missing.append("libcudart (in lib64/, lib/ or targets/*/lib/)")
    if missing:
        raise RuntimeError(
            f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit root: it has no "
            f"{' and no '.join(missing)}. "
            "Set CUDA_HOME to the toolkit root, the directory holding include/cuda_runtime.h and "
            "lib64/libcudart.so (e.g. CUDA_HOME=/usr/local/cuda-13.0)."
        )


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
    elif flag != "auto":
        raise RuntimeError(f"LO_OPS_BUILD_CUDA must be 0, 1 or auto, got {flag!r}")
    elif not available:
        return False
    _check_cuda_home()
    return True


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
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
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
