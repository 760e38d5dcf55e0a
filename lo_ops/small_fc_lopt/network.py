"""The small_fc_lopt meta-network and the loading of its weights.

Three layouts are read:
- lo_ops' own: ``config.json`` (architecture, sizes, decay offsets, step_mult, exp_mult) and
  ``model.safetensors`` with ``layers.{0,1,2}.{weight,bias}`` (PyTorch ``[out, in]``);
  written by ``save_pretrained`` / ``push_to_hub``.
- PyLO's ``MetaMLP`` Hub layout (spec section 4.1): ``network.{input,linear_0,output}.*``; it
  carries no decay offsets or step_mult, so PyLO's values for the published weights are used.
- a Hugging Face Hub repo id in either layout (downloaded with ``huggingface_hub``; cached
  files are used offline, ``HF_HUB_OFFLINE=1`` is respected).
Keys and shapes are checked strictly: a missing, extra or wrongly shaped tensor is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file
from torch import nn

from .._layout import (
    HIDDEN_SIZE,
    INPUT_SIZE,
    NUM_FEATURES,
    OUTPUT_SIZE,
    TIME_SCALES,
    pack_weights,
)
from .._loading import REPO_ID, ReadableSaves, load_strict, resolve_directory

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "small_fc_lopt_default"

# PyLO's defaults for its published μLO (small_fc_lopt) weights, which its layout omits.
PYLO_DECAY_OFFSETS = {
    "momentum": [0.15216392, 0.14245212, 0.06812963],
    "rms": [0.01079706],
    "adafactor": [0.18621896, -0.10864615, -0.06185547],
}
PYLO_STEP_MULT = 0.01
ZERO_DECAY_OFFSETS = {"momentum": [0.0, 0.0, 0.0], "rms": [0.0], "adafactor": [0.0, 0.0, 0.0]}
_DECAY_OFFSET_SIZES = {"momentum": 3, "rms": 1, "adafactor": 3}
_PYLO_KEY_MAP = {
    "network.input.weight": "layers.0.weight",
    "network.input.bias": "layers.0.bias",
    "network.linear_0.weight": "layers.1.weight",
    "network.linear_0.bias": "layers.1.bias",
    "network.output.weight": "layers.2.weight",
    "network.output.bias": "layers.2.bias",
}


def check_decay_offsets(offsets: Mapping[str, Sequence[float]], what: str = "decay_offsets") -> dict:
    """Validates ``{"momentum": [3], "rms": [1], "adafactor": [3]}`` and returns a plain copy."""
    if not isinstance(offsets, Mapping):
        raise TypeError(f"{what} must be a dict with keys momentum, rms, adafactor; got {type(offsets).__name__}")
    if set(offsets) != set(_DECAY_OFFSET_SIZES):
        raise ValueError(
            f"{what} must have exactly the keys {sorted(_DECAY_OFFSET_SIZES)}, got {sorted(offsets)}"
        )
    out = {}
    for key, size in _DECAY_OFFSET_SIZES.items():
        values = [float(x) for x in (offsets[key] if isinstance(offsets[key], Sequence) else [offsets[key]])]
        if len(values) != size:
            raise ValueError(f"{what}[{key!r}] must have {size} values, got {len(values)}")
        if not all(torch.isfinite(torch.tensor(values))):
            raise ValueError(f"{what}[{key!r}] must be finite, got {values}")
        out[key] = values
    return out


class SmallFCLOptNetwork(
    ReadableSaves,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="lo_ops",
    tags=["learned-optimizer", "lo_ops", "small_fc_lopt"],
):
    """The per-element MLP of small_fc_lopt (39 -> 32 -> 32 -> 2, ReLU) with its decay offsets.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` use lo_ops' own layout.
    """

    def __init__(
        self,
        architecture: str = "small_fc_lopt",
        input_size: int = INPUT_SIZE,
        hidden_size: int = HIDDEN_SIZE,
        hidden_layers: int = 2,
        output_size: int = OUTPUT_SIZE,
        decay_offsets: dict | None = None,
        step_mult: float = 0.001,
        exp_mult: float = 0.001,
    ):
        super().__init__()
        expected = ("small_fc_lopt", INPUT_SIZE, HIDDEN_SIZE, 2, OUTPUT_SIZE)
        got = (architecture, input_size, hidden_size, hidden_layers, output_size)
        if got != expected:
            raise ValueError(
                "SmallFCLOptNetwork implements (architecture, input_size, hidden_size, "
                f"hidden_layers, output_size) = {expected}; the configuration asks for {got}"
            )
        self.decay_offsets = check_decay_offsets(decay_offsets or ZERO_DECAY_OFFSETS)
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        self.layers = nn.ModuleList(
            [
                nn.Linear(input_size, hidden_size),
                nn.Linear(hidden_size, hidden_size),
                nn.Linear(hidden_size, output_size),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.layers[0](x))
        x = torch.relu(self.layers[1](x))
        return self.layers[2](x)

    def packed_weights(self) -> torch.Tensor:
        """(W0, b0, W1, b1, W2, b2) flattened into one float32 vector, the kernels' layout."""
        return pack_weights([t for layer in self.layers for t in (layer.weight, layer.bias)])

    def load_strict(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Loads ``tensors`` after checking keys and shapes exactly; errors name ``source``."""
        load_strict(self, tensors, f"small_fc_lopt weights in {source}")

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", strict=True,
                         **model_kwargs):
        directory = resolve_directory(
            str(model_id), revision=revision, cache_dir=cache_dir, token=token,
            force_download=force_download, local_files_only=local_files_only,
        )
        net, layout = _load_directory(directory, str(model_id))
        if layout != "lo_ops":
            raise ValueError(
                f"{model_id} is in PyLO's layout; load it with lo_ops.load_small_fc_lopt_network"
            )
        return net.to(map_location)


def normalised_adam_network(*, exp_mult: float = 0.001, schedule_units: bool = False) -> SmallFCLOptNetwork:
    """A hand-built network whose step is normalised Adam.

    Hidden units 0 and 1 carry relu(+x6) and relu(-x6), where x6 = m(0.9) * rsqrt(v + 1e-6)
    after per-tensor normalisation; the direction output is their difference (= x6), the
    magnitude output and all other units are zero. With step_mult = 0.001 and lr = 1 each step
    is 0.001 times the normalised momentum-over-rms direction.

    ``schedule_units=True`` (the start of meta-training) also routes the 11 time features
    through hidden units 2-12 of both layers (``tanh(t / s - 1) + 1``, always positive, so the
    ReLUs pass them unchanged) with zero weight to both outputs: the step is unchanged, but a
    learned step-size schedule is then one layer of weights away (the magnitude output, whose
    effect on the log step size is ``exp_mult`` times its weights) instead of three.
    """
    net = SmallFCLOptNetwork(decay_offsets=ZERO_DECAY_OFFSETS, step_mult=0.001, exp_mult=exp_mult)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        net.layers[0].weight[0, 6] = 1.0
        net.layers[0].weight[1, 6] = -1.0
        net.layers[1].weight[0, 0] = 1.0
        net.layers[1].weight[1, 1] = 1.0
        net.layers[2].weight[0, 0] = 1.0
        net.layers[2].weight[0, 1] = -1.0
        if schedule_units:
            for k in range(len(TIME_SCALES)):
                unit = 2 + k
                net.layers[0].weight[unit, NUM_FEATURES + k] = 1.0
                net.layers[0].bias[unit] = 1.0
                net.layers[1].weight[unit, unit] = 1.0
    return net


def _load_directory(directory: Path, source: str) -> tuple[SmallFCLOptNetwork, str]:
    if not (directory / "config.json").exists() and (directory / "MetaMLP" / "config.json").exists():
        directory = directory / "MetaMLP"  # PyLO's repository layout, one level up
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"small_fc_lopt checkpoint {source!r} has no {f.name} (looked in {directory})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    tensors = load_file(str(weights_path))
    if "architecture" in config:
        net = SmallFCLOptNetwork(**config)
        net.load_strict(tensors, source)
        return net, "lo_ops"
    if set(config) >= {"input_size", "hidden_size", "hidden_layers"}:
        # PyLO's MetaMLP: hidden_layers counts the hidden-to-hidden linear layers.
        pylo = (config["input_size"], config["hidden_size"], config["hidden_layers"])
        if pylo != (INPUT_SIZE, HIDDEN_SIZE, 1):
            raise ValueError(
                f"{config_path}: PyLO MetaMLP config {pylo} (input_size, hidden_size, hidden_layers) "
                f"is not small_fc_lopt's ({INPUT_SIZE}, {HIDDEN_SIZE}, 1)"
            )
        net = SmallFCLOptNetwork(decay_offsets=PYLO_DECAY_OFFSETS, step_mult=PYLO_STEP_MULT)
        extra = sorted(set(tensors) - set(_PYLO_KEY_MAP))
        missing = sorted(set(_PYLO_KEY_MAP) - set(tensors))
        if extra or missing:
            raise ValueError(
                f"PyLO MetaMLP weights in {source}: "
                + "; ".join(p for p in (f"missing keys {missing}" if missing else "",
                                        f"unexpected keys {extra}" if extra else "") if p)
            )
        net.load_strict({_PYLO_KEY_MAP[k]: v for k, v in tensors.items()}, source)
        return net, "pylo"
    raise ValueError(
        f"{config_path} is neither lo_ops' layout (has 'architecture') nor PyLO's MetaMLP "
        "(has input_size, hidden_size, hidden_layers)"
    )


def load_small_fc_lopt_network(
    pretrained: str | os.PathLike | nn.Module | None = None, *, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
) -> tuple[SmallFCLOptNetwork, str]:
    """Loads small_fc_lopt meta-weights; returns ``(network, layout)``.

    ``pretrained``: None (the embedded default), a local directory (lo_ops' or PyLO's
    layout), a Hub repo id, or a module (a ``SmallFCLOptNetwork``, or any module whose
    ``state_dict`` is in PyLO's MetaMLP layout). ``layout`` is "lo_ops" or "pylo"; PyLO
    weights get PyLO's decay offsets and step_mult.
    """
    if pretrained is None:
        return _load_directory(DEFAULT_WEIGHTS_DIR, "the embedded default")[0], "lo_ops"
    if isinstance(pretrained, SmallFCLOptNetwork):
        return pretrained, "lo_ops"
    if isinstance(pretrained, nn.Module):
        tensors = {k: v.detach().cpu() for k, v in pretrained.state_dict().items()}
        if set(tensors) == set(_PYLO_KEY_MAP):
            net = SmallFCLOptNetwork(decay_offsets=PYLO_DECAY_OFFSETS, step_mult=PYLO_STEP_MULT)
            net.load_strict({_PYLO_KEY_MAP[k]: v for k, v in tensors.items()}, type(pretrained).__name__)
            return net, "pylo"
        raise ValueError(
            f"pretrained module {type(pretrained).__name__} is neither a SmallFCLOptNetwork nor in "
            f"PyLO's MetaMLP layout (keys {sorted(_PYLO_KEY_MAP)}); got keys {sorted(tensors)}"
        )
    if isinstance(pretrained, (str, os.PathLike)):
        directory = resolve_directory(os.fspath(pretrained), revision=revision, cache_dir=cache_dir, token=token)
        net, layout = _load_directory(directory, os.fspath(pretrained))
        logger.info("loaded small_fc_lopt weights (%s layout) from %s", layout, directory)
        return net, layout
    raise TypeError(
        "pretrained must be None, a directory, a Hugging Face repo id or an nn.Module; "
        f"got {type(pretrained).__name__}"
    )
