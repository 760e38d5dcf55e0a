"""lo_ops: learned optimizers for PyTorch as fused multi-tensor ops."""

from __future__ import annotations

import torch  # noqa: F401  (the extension needs libtorch loaded first)

from . import _C  # noqa: F401  (registers the lo_ops ops and their CPU/CUDA kernels)
from . import meta_kernels  # noqa: F401  (registers the fake kernels)
from .hyperv2 import (
    Celo,
    CeloAdam,
    CeloAdamNetwork,
    CeloNetwork,
    HyperV2Network,
    VeLO,
    VeLONetwork,
    convert_hyperv2,
    convert_velo,
    load_celo_adam_network,
    load_celo_network,
    load_hyperv2_network,
    load_velo_network,
)
from . import mup  # noqa: F401  (lo_ops.mup: μP helpers for MuLO)
from .small_fc_lopt import MuLO, SmallFCLOpt, SmallFCLOptNetwork, load_small_fc_lopt_network

__all__ = [
    "Celo",
    "CeloAdam",
    "CeloAdamNetwork",
    "CeloNetwork",
    "HyperV2Network",
    "MuLO",
    "SmallFCLOpt",
    "SmallFCLOptNetwork",
    "VeLO",
    "VeLONetwork",
    "convert_hyperv2",
    "convert_velo",
    "has_kernel",
    "load_celo_adam_network",
    "load_celo_network",
    "load_hyperv2_network",
    "load_small_fc_lopt_network",
    "load_velo_network",
]
__version__ = "0.1.0"


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "xpu": "XPU", "mps": "MPS"}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``lo_ops::<op>`` has a kernel for ``device_type`` ("cpu", "cuda", ...)."""
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lo_ops::{op}", key)
    except RuntimeError:  # no such operator in this build
        return False
