"""The C++ standard that the installed torch requires, for the tests that call nvcc themselves
(torch 2.13's headers need C++17, torch 2.14's C++20)."""

import functools
import inspect
import re
from pathlib import Path

import torch.utils.cpp_extension as cpp_extension

# Headers that state the standard they need as `#if ... __cplusplus < 202002L` then `#error`.
_HEADERS = ("ATen/ATen.h", "torch/all.h", "torch/extension.h", "c10/macros/Macros.h")
_REQUIREMENT = re.compile(
    r"^\s*#\s*if\b[^\n]*__cplusplus\s*<\s*(\d{4})\d\dL[^\n]*\n\s*#\s*error", re.MULTILINE
)


@functools.cache
def torch_cxx_standard() -> str:
    """`c++17`, `c++20`, ...: the newest standard that torch's headers demand with an `#error`,
    or, should no header state one, the newest `-std=` that torch.utils.cpp_extension passes."""
    years = [
        int(year)
        for include in cpp_extension.include_paths()
        for header in _HEADERS
        if (Path(include) / header).is_file()
        for year in _REQUIREMENT.findall((Path(include) / header).read_text(errors="replace"))
    ]
    if not years:
        flags = re.findall(r"-std=c\+\+(\d\d)\b", inspect.getsource(cpp_extension))
        years = [2000 + int(v) for v in flags]
    if not years:
        raise RuntimeError("cannot tell which C++ standard the installed torch requires")
    return f"c++{max(years) % 100}"


def nvcc_std_flag() -> str:
    return f"-std={torch_cxx_standard()}"
