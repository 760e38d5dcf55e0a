"""small_fc_lopt (spec section 2): the optimizer, its meta-network and loaders, its reference."""

from .network import SmallFCLOptNetwork, load_small_fc_lopt_network
from .mulo import MuLO
from .optimizer import SmallFCLOpt

__all__ = ["MuLO", "SmallFCLOpt", "SmallFCLOptNetwork", "load_small_fc_lopt_network"]
