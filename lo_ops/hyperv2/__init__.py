"""The HyperV2 family (spec sections 3 and 5): VeLO, Celo and Celo-Adam on one engine."""

from .celo import Celo, CeloAdam
from .network import (
    CeloAdamNetwork,
    CeloNetwork,
    HyperV2Network,
    VeLONetwork,
    convert_hyperv2,
    convert_velo,
    load_celo_adam_network,
    load_celo_network,
    load_hyperv2_network,
    load_velo_network,
)
from .optimizer import HyperV2Optimizer, VeLO

__all__ = [
    "Celo", "CeloAdam", "CeloAdamNetwork", "CeloNetwork", "HyperV2Network", "HyperV2Optimizer", "VeLO",
    "VeLONetwork", "convert_hyperv2", "convert_velo", "load_celo_adam_network", "load_celo_network",
    "load_hyperv2_network", "load_velo_network",
]
