"""Shapes and packing shared by the reference, the fake kernels and the optimizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
NUM_FEATURES = 28
INPUT_SIZE = NUM_FEATURES + len(TIME_SCALES)  # 39
HIDDEN_SIZE = 32
OUTPUT_SIZE = 2
# Packed meta-network: W0 [32, 39], b0, W1 [32, 32], b1, W2 [2, 32], b2 (PyTorch layout).
PACKED_SHAPES = (
    (HIDDEN_SIZE, INPUT_SIZE),
    (HIDDEN_SIZE,),
    (HIDDEN_SIZE, HIDDEN_SIZE),
    (HIDDEN_SIZE,),
    (OUTPUT_SIZE, HIDDEN_SIZE),
    (OUTPUT_SIZE,),
)
PACKED_NUMEL = sum(torch.Size(s).numel() for s in PACKED_SHAPES)
NUM_DECAYS = 7


def factored_axes(shape: Sequence[int]) -> tuple[int, int]:
    """(d0, d1): the largest and second-largest axes, ties to the lower index (stable argsort)."""
    order = sorted(range(len(shape)), key=lambda i: shape[i])  # sorted() is stable
    return order[-1], order[-2]


def state_shapes(shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The float32 state of one parameter of this shape (channel axis first)."""
    shape = tuple(shape)
    out = {"momentum": (3, *shape), "rms": shape}
    if len(shape) >= 2:
        d0, d1 = factored_axes(shape)
        out["fac_row"] = (3, *(s for i, s in enumerate(shape) if i != d0))
        out["fac_col"] = (3, *(s for i, s in enumerate(shape) if i != d1))
    else:
        out["fac_diag"] = (3, *shape)
    return out


def dropped_axis(shape: Sequence[int], key: str) -> int | None:
    """The parameter axis that state ``key`` does not have (fac_row: d0, fac_col: d1)."""
    if key in ("fac_row", "fac_col"):
        d0, d1 = factored_axes(shape)
        return d0 if key == "fac_row" else d1
    return None


def pack_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flattens (W0, b0, W1, b1, W2, b2) into the vector the kernels read."""
    if len(weights) != len(PACKED_SHAPES):
        raise ValueError(f"expected {len(PACKED_SHAPES)} weight tensors, got {len(weights)}")
    for i, (w, s) in enumerate(zip(weights, PACKED_SHAPES)):
        if tuple(w.shape) != s:
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}, expected {s}")
    return torch.cat([w.detach().reshape(-1).float() for w in weights]).contiguous()


def unpack_weights(packed: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in PACKED_SHAPES:
        numel = torch.Size(s).numel()
        out.append(packed[offset : offset + numel].view(s))
        offset += numel
    return out


def effective_decays(offsets: dict[str, Sequence[float]]) -> torch.Tensor:
    """The 7 decays (momentum 3, rms 1, factored 3) after the learned offsets, in float32.

    decay = param_to_decay(decay_to_param(d) + o), decay_to_param(x) = log(1 - x) / 10,
    param_to_decay(y) = 1 - exp(10 y).
    """
    off = torch.tensor(
        [*offsets["momentum"], *offsets["rms"], *offsets["adafactor"]], dtype=torch.float32
    )
    return decays_from_offsets(off)


def decays_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """``effective_decays`` for a float32 tensor of offsets ``[..., 7]`` (same order)."""
    base = torch.tensor(MOMENTUM_DECAYS + RMS_DECAYS + ADAFACTOR_DECAYS, dtype=torch.float32,
                        device=offsets.device)
    param = torch.log(1 - base) / 10
    return 1 - torch.exp(10 * (param + offsets.float()))


# -- VeLO (spec section 3) ----------------------------------------------------------------------
VELO_DECAYS = (0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999)  # momentum 3, rms 1, factored 3
VELO_LSTM_INPUTS = 30
VELO_LSTM_HIDDEN = 512
VELO_PARAM_INITS = 256  # weight sets of the per-element MLP
VELO_NUM_FEATURES = 30
VELO_GRAD_CLIP = 1000.0  # gradients are clipped to [-1000, 1000]
VELO_MLP_HIDDEN = 4
VELO_MLP_OUTPUTS = 3
VELO_TIME_OFFSETS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
VELO_LOSS_FEATURES = 9
VELO_LOSS_BUFFER = 10
VELO_RMIN_INIT = 999999999999.0
VELO_STEP_MULT = 0.001
VELO_EXP_MULT = 0.001
# One weight set of the per-element MLP, packed: W0 [4, 30], b0, W1 [4, 4], b1, W2 [3, 4], b2
# (PyTorch [out, in] layout).
VELO_MLP_SHAPES = (
    (VELO_MLP_HIDDEN, VELO_NUM_FEATURES),
    (VELO_MLP_HIDDEN,),
    (VELO_MLP_HIDDEN, VELO_MLP_HIDDEN),
    (VELO_MLP_HIDDEN,),
    (VELO_MLP_OUTPUTS, VELO_MLP_HIDDEN),
    (VELO_MLP_OUTPUTS,),
)
VELO_MLP_NUMEL = sum(torch.Size(s).numel() for s in VELO_MLP_SHAPES)  # 159


def unpack_velo_mlp(packed: torch.Tensor) -> list[torch.Tensor]:
    """[..., 159] -> (W0 [..., 4, 30], b0, W1, b1, W2, b2)."""
    out, offset = [], 0
    lead = packed.shape[:-1]
    for s in VELO_MLP_SHAPES:
        numel = torch.Size(s).numel()
        out.append(packed[..., offset : offset + numel].reshape(*lead, *s))
        offset += numel
    return out


# -- the HyperV2 family: VeLO, Celo, Celo-Adam (spec sections 3 and 5) ------------------------------
HYPERV2_SHARED_INPUTS = len(VELO_TIME_OFFSETS) + VELO_LOSS_FEATURES  # 18: time, then loss features
CELO_LSTM_HIDDEN = 64
CELO_ADAM_DECAYS = (0.9, 0.999)  # momentum, rms
CELO_ADAM_EPSILON = 1e-8


class HyperV2Config:
    """What tells VeLO, Celo and Celo-Adam apart (spec 5.4); the rest of the engine is shared.

    - ``lstm_inputs``: 30 per-tensor inputs (VeLO) or the 18 every tensor shares (Celo*), in
      which case the LSTM runs on one row that stands for every tensor.
    - ``lstm_hidden``: 512 or 64. ``param_inits``: MLP weight sets (256, 1, or 0: no MLP).
    - ``mlp_scale``: a tensor's MLP weights are ``mlp_scale * mean_k(controls_k * W_k)``
      (VeLO: 100); with one set they are that set as is.
    - ``exp_lr_mult``: ``lr_mult = 0.1 * exp(h s + s0)`` (Celo*) rather than ``h s + s0``.
    - ``update``: "mlp" (the per-element 30-4-4-3 MLP of spec 3.5) or "adam" (spec 5.3).
    """

    def __init__(self, architecture, lstm_inputs, lstm_hidden, param_inits, mlp_scale, exp_lr_mult, update):
        self.architecture = architecture
        self.lstm_inputs = lstm_inputs
        self.lstm_hidden = lstm_hidden
        self.param_inits = param_inits
        self.mlp_scale = mlp_scale
        self.exp_lr_mult = exp_lr_mult
        self.update = update

    @property
    def shared_lstm_input(self) -> bool:
        return self.lstm_inputs == HYPERV2_SHARED_INPUTS

    def __repr__(self) -> str:
        return f"HyperV2Config({self.architecture!r})"


HYPERV2_CONFIGS = {
    "velo": HyperV2Config("velo", VELO_LSTM_INPUTS, VELO_LSTM_HIDDEN, VELO_PARAM_INITS, 100.0, False, "mlp"),
    "celo": HyperV2Config("celo", HYPERV2_SHARED_INPUTS, CELO_LSTM_HIDDEN, 1, 1.0, True, "mlp"),
    "celo_adam": HyperV2Config("celo_adam", HYPERV2_SHARED_INPUTS, CELO_LSTM_HIDDEN, 0, 1.0, True, "adam"),
}
