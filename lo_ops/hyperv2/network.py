"""The HyperV2 meta-network (VeLO, Celo, Celo-Adam; spec sections 3 and 5) and the loading and
conversion of its weights.

Layouts read (spec section 4):
- lo_ops' own: one directory, ``config.json`` (``"architecture"``: "velo", "celo" or
  "celo_adam", sizes, step_mult, exp_mult) and ``model.safetensors``; written by
  ``save_pretrained`` / ``push_to_hub`` and by ``convert_hyperv2`` / ``python -m lo_ops convert``.
- PyLO's (VeLO only): a directory holding ``VeLO_RNN/`` and ``VeLO_MLP/`` (each
  ``config.json`` + ``model.safetensors``), or a pair of Hugging Face repo ids.
- flax-msgpack files: Google's VeLO checkpoint (4.2) and the Celo authors' ``theta.state``
  (4.3), read with the ``msgpack`` package alone; the architecture follows from the tree.

Every layout is checked strictly: a missing, extra or wrongly shaped tensor is an error that
names the file and the key. Celo's and Celo-Adam's published weights (MIT) ship inside the
package (``lo_ops/weights/celo*``, with their licence); VeLO's do not (2.3M meta-parameters
under the checkpoint's own terms), so VeLO has no embedded default.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file
from torch import nn

from .._layout import (
    HYPERV2_CONFIGS,
    VELO_EXP_MULT,
    VELO_LSTM_HIDDEN,
    VELO_LSTM_INPUTS,
    VELO_MLP_HIDDEN,
    VELO_MLP_OUTPUTS,
    VELO_NUM_FEATURES,
    VELO_PARAM_INITS,
    VELO_STEP_MULT,
    HyperV2Config,
)
from .._loading import REPO_ID, ReadableSaves, load_strict, resolve_directory

logger = logging.getLogger(__name__)

PACKAGED_WEIGHTS = {name: Path(__file__).resolve().parent.parent / "weights" / name for name in ("celo", "celo_adam")}
_NAMES = {"velo": "VeLO", "celo": "Celo", "celo_adam": "Celo-Adam"}

NO_WEIGHTS_MESSAGE = (
    "VeLO needs its meta-weights, which lo_ops does not ship. Pass pretrained= one of: "
    "Google's published checkpoint file (flax msgpack, e.g. the VeLO params file of "
    "learned_optimization); a directory holding PyLO's VeLO_RNN/ and VeLO_MLP/; a pair of "
    "Hugging Face repo ids (rnn_repo, mlp_repo) in PyLO's layout; or a directory in lo_ops' own "
    "layout. Convert any of them once with `python -m lo_ops convert SOURCE --out DIR` (or "
    "lo_ops.convert_velo) and pass DIR afterwards."
)

# PyLO's VeLO_RNN / VeLO_MLP keys -> ours; None: present in the checkpoint but without effect.
_PYLO_RNN_KEYS = {
    "mix_layer1.weight": None,  # the first mixing layer, whose output the original discards
    "mix_layer1.bias": None,
    "mix_layer2.weight": "mix_in.weight",
    "mix_layer2.bias": "mix_in.bias",
    "final_mix_layer.weight": "mix_out.weight",
    "final_mix_layer.bias": "mix_out.bias",
    "lstm.linear.weight": "lstm.weight",
    "lstm.linear.bias": "lstm.bias",
    "rnn_to_controls.weight": "to_controls.weight",
    "rnn_to_controls.bias": "to_controls.bias",
    "step_size.weight": "to_lr_mult.weight",
    "step_size.bias": "to_lr_mult.bias",
    "lstm_init_state.0": "init_hidden",
    "lstm_init_state.1": "init_cell",
}
_PYLO_MLP_KEYS = {
    "input_weights_": "mlp_w0",
    "input_bias_": "mlp_b0",
    "hidden_weights_.0": "mlp_w1",
    "hidden_bias_.0": "mlp_b1",
    "output_weights_": "mlp_w2",
    "output_bias_": "mlp_b2",
    # the "live" single-set copies, unused by the optimizer
    "input_weights": None,
    "input_bias": None,
    "hidden_weights.0": None,
    "hidden_bias.0": None,
    "output_weights": None,
    "output_bias": None,
}
# The flax trees (JAX [in, out] weights): path -> (our key, transpose the last two axes).
_JAX_KEYS = {
    "rnn_params/linear/w": (None, False),  # the discarded mixing layer
    "rnn_params/linear/b": (None, False),
    "rnn_params/linear_1/w": ("mix_in.weight", True),
    "rnn_params/linear_1/b": ("mix_in.bias", False),
    "rnn_params/linear_2/w": ("mix_out.weight", True),
    "rnn_params/linear_2/b": ("mix_out.bias", False),
    "rnn_params/rnn/linear/w": ("lstm.weight", True),
    "rnn_params/rnn/linear/b": ("lstm.bias", False),
    "rnn_params/rnn_to_controls/w": ("to_controls.weight", True),
    "rnn_params/rnn_to_controls/b": ("to_controls.bias", False),
    "rnn_params/step_size/w": ("to_lr_mult.weight", True),
    "rnn_params/step_size/b": ("to_lr_mult.bias", False),
    "lstm_init_state/hidden": ("init_hidden", False),
    "lstm_init_state/cell": ("init_cell", False),
    "ff_mod_stack/~/b0": ("mlp_b0", False),
    "ff_mod_stack/~/w1": ("mlp_w1", True),
    "ff_mod_stack/~/b1": ("mlp_b1", False),
    "ff_mod_stack/~/w2": ("mlp_w2", True),
    "ff_mod_stack/~/b2": ("mlp_b2", False),
}
# The first layer's weights come as 14 blocks of input channels, concatenated in numeric order.
_JAX_W0_BLOCKS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
_MSGPACK_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64,
}


class HyperV2Network(
    ReadableSaves,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="lo_ops",
    tags=["learned-optimizer", "lo_ops", "hyperv2"],
):
    """The meta-network of VeLO, Celo or Celo-Adam (``architecture``; spec 5.4).

    - ``mix_in`` (A1) and ``mix_out`` (A2): LSTM input -> hidden mixing layers (30 -> 512 for
      VeLO, 18 -> 64 for Celo*); ``lstm``: one linear map over ``[x, h]`` (gates i, g, f, o);
      ``init_hidden`` / ``init_cell``: the learned initial LSTM state ``[1, hidden]``.
    - ``to_lr_mult`` (hidden -> 1); with an MLP (VeLO, Celo) also ``to_controls`` (hidden ->
      sets) and the MLP weight sets ``mlp_w0 [sets, 4, 30]``, ``mlp_b0 [sets, 4]``,
      ``mlp_w1 [sets, 4, 4]``, ``mlp_b1``, ``mlp_w2 [sets, 3, 4]``, ``mlp_b2 [sets, 3]``
      (``[out, in]`` per set): 256 for VeLO, 1 for Celo.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` use lo_ops' own layout.
    """

    _default_architecture = "velo"

    def __init__(
        self,
        architecture: str | None = None,
        input_size: int | None = None,
        lstm_hidden_size: int | None = None,
        param_inits: int | None = None,
        mlp_hidden_size: int = VELO_MLP_HIDDEN,
        mlp_output_size: int = VELO_MLP_OUTPUTS,
        step_mult: float = VELO_STEP_MULT,
        exp_mult: float = VELO_EXP_MULT,
    ):
        super().__init__()
        architecture = type(self)._default_architecture if architecture is None else architecture
        if architecture not in HYPERV2_CONFIGS:
            raise ValueError(
                f"{type(self).__name__}: architecture must be one of {sorted(HYPERV2_CONFIGS)}, got {architecture!r}"
            )
        cfg: HyperV2Config = HYPERV2_CONFIGS[architecture]
        names = ("input_size", "lstm_hidden_size", "param_inits", "mlp_hidden_size", "mlp_output_size")
        expected = (cfg.lstm_inputs, cfg.lstm_hidden, cfg.param_inits, VELO_MLP_HIDDEN, VELO_MLP_OUTPUTS)
        given = (input_size, lstm_hidden_size, param_inits, mlp_hidden_size, mlp_output_size)
        wrong = {n: g for n, g, e in zip(names, given, expected) if g is not None and g != e}
        if wrong:
            raise ValueError(
                f"{type(self).__name__}({architecture!r}) implements {dict(zip(names, expected))}; the "
                f"configuration asks for {wrong}"
            )
        for name, value in (("step_mult", step_mult), ("exp_mult", exp_mult)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}: {name} must be a finite number, got {value!r}")
        self.config = cfg
        self.architecture = architecture
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        # What save_pretrained writes: every size spelled out.
        self._hub_mixin_config = {"architecture": architecture, **dict(zip(names, expected)),
                                  "step_mult": self.step_mult, "exp_mult": self.exp_mult}
        h, k, n_in = cfg.lstm_hidden, cfg.param_inits, cfg.lstm_inputs
        self.mix_in = nn.Linear(n_in, h)
        self.mix_out = nn.Linear(n_in, h)
        self.lstm = nn.Linear(2 * h, 4 * h)
        self.to_lr_mult = nn.Linear(h, 1)
        self.init_hidden = nn.Parameter(torch.zeros(1, h))
        self.init_cell = nn.Parameter(torch.zeros(1, h))
        if k > 0:
            f, mh, mo = VELO_NUM_FEATURES, VELO_MLP_HIDDEN, VELO_MLP_OUTPUTS
            self.to_controls = nn.Linear(h, k)
            self.mlp_w0 = nn.Parameter(torch.zeros(k, mh, f))
            self.mlp_b0 = nn.Parameter(torch.zeros(k, mh))
            self.mlp_w1 = nn.Parameter(torch.zeros(k, mh, mh))
            self.mlp_b1 = nn.Parameter(torch.zeros(k, mh))
            self.mlp_w2 = nn.Parameter(torch.zeros(k, mo, mh))
            self.mlp_b2 = nn.Parameter(torch.zeros(k, mo))

    def packed_mlp_sets(self) -> torch.Tensor | None:
        """The MLP weight sets as ``[sets, 159]`` float32 (W0, b0, W1, b1, W2, b2 per row);
        None without an MLP (Celo-Adam)."""
        if self.config.param_inits == 0:
            return None
        k = self.mlp_w0.shape[0]
        parts = (self.mlp_w0, self.mlp_b0, self.mlp_w1, self.mlp_b1, self.mlp_w2, self.mlp_b2)
        return torch.cat([t.detach().reshape(k, -1).float() for t in parts], dim=1).contiguous()

    def load_strict(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        load_strict(self, tensors, f"{_NAMES[self.architecture]} weights in {source}")

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", strict=True,
                         **model_kwargs):
        directory = resolve_directory(
            str(model_id), revision=revision, cache_dir=cache_dir, token=token,
            force_download=force_download, local_files_only=local_files_only,
        )
        want = None if cls is HyperV2Network else cls._default_architecture
        net = _load_own_layout(directory, str(model_id), want)
        return net.to(map_location)


class VeLONetwork(HyperV2Network):
    """VeLO's meta-network (``architecture="velo"``): LSTM hidden 512, 256 MLP weight sets."""

    _default_architecture = "velo"


class CeloNetwork(HyperV2Network):
    """Celo's meta-network (``architecture="celo"``): LSTM hidden 64 on 18 shared inputs, one
    MLP weight set."""

    _default_architecture = "celo"


class CeloAdamNetwork(HyperV2Network):
    """Celo-Adam's meta-network (``architecture="celo_adam"``): the LSTM schedule only."""

    _default_architecture = "celo_adam"


_CLASSES = {"velo": VeLONetwork, "celo": CeloNetwork, "celo_adam": CeloAdamNetwork}


def network_of(architecture: str) -> HyperV2Network:
    """An (all-zero) network of ``architecture``, of its own class."""
    return _CLASSES[architecture](architecture)

def _read_json_object(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def _checkpoint_files(directory: Path, source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {source!r} has no {f.name} (looked in {directory})")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{weights_path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return _read_json_object(config_path), tensors


def _load_own_layout(directory: Path, source: str, architecture: str | None) -> HyperV2Network:
    config, tensors = _checkpoint_files(directory, source)
    got = config.get("architecture")
    if got not in HYPERV2_CONFIGS or (architecture is not None and got != architecture):
        want = repr(architecture) if architecture is not None else f"one of {sorted(HYPERV2_CONFIGS)}"
        raise ValueError(
            f"{directory / 'config.json'} is not a{'' if architecture is None else ' ' + _NAMES[architecture]} "
            f"checkpoint in lo_ops' layout (architecture {got!r}, expected {want})"
        )
    net = _CLASSES[got](**config)
    net.load_strict(tensors, source)
    return net


def _map_keys(tensors: Mapping[str, torch.Tensor], key_map: Mapping[str, str | None], what: str,
              expected_shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """Our keys from ``key_map`` (None: checked, then dropped); every key must be present, and
    the dropped ones must have their ``expected_shapes``."""
    missing = sorted(set(key_map) - set(tensors))
    extra = sorted(set(tensors) - set(key_map))
    if missing or extra:
        raise ValueError(
            f"{what}: "
            + "; ".join(p for p in (f"missing keys {missing}" if missing else "",
                                    f"unexpected keys {extra}" if extra else "") if p)
        )
    for key, shape in expected_shapes.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"{what}: wrong shapes ['{key}: {tuple(tensors[key].shape)} (expected {tuple(shape)})']")
    return {ours: tensors[k] for k, ours in key_map.items() if ours is not None}


def _discarded_shapes() -> dict[str, tuple]:
    return {"weight": (VELO_LSTM_HIDDEN, VELO_LSTM_INPUTS), "bias": (VELO_LSTM_HIDDEN,)}


def velo_from_pylo_tensors(rnn: Mapping[str, torch.Tensor], mlp: Mapping[str, torch.Tensor],
                           source: str) -> HyperV2Network:
    """A network from the state dicts of PyLO's VeLO_RNN and VeLO_MLP (strictly checked)."""
    d = _discarded_shapes()
    tensors = _map_keys(rnn, _PYLO_RNN_KEYS, f"PyLO VeLO_RNN weights in {source}",
                        {"mix_layer1.weight": d["weight"], "mix_layer1.bias": d["bias"]})
    tensors |= _map_keys(mlp, _PYLO_MLP_KEYS, f"PyLO VeLO_MLP weights in {source}",
                         {"input_weights": (VELO_MLP_HIDDEN, VELO_NUM_FEATURES),
                          "input_bias": (VELO_MLP_HIDDEN,),
                          "hidden_weights.0": (VELO_MLP_HIDDEN, VELO_MLP_HIDDEN),
                          "hidden_bias.0": (VELO_MLP_HIDDEN,),
                          "output_weights": (VELO_MLP_OUTPUTS, VELO_MLP_HIDDEN),
                          "output_bias": (VELO_MLP_OUTPUTS,)})
    net = network_of("velo")
    net.load_strict(tensors, source)
    return net


def _load_pylo_directories(rnn_dir: Path, mlp_dir: Path, source: str) -> HyperV2Network:
    rnn_config, rnn = _checkpoint_files(rnn_dir, f"{source} (VeLO_RNN)")
    mlp_config, mlp = _checkpoint_files(mlp_dir, f"{source} (VeLO_MLP)")
    want_rnn = {"input_size": VELO_LSTM_INPUTS, "lstm_hidden_size": VELO_LSTM_HIDDEN,
                "param_inits": VELO_PARAM_INITS}
    want_mlp = {"input_size": VELO_NUM_FEATURES, "hidden_size": VELO_MLP_HIDDEN,
                "output_size": VELO_MLP_OUTPUTS, "param_inits": VELO_PARAM_INITS}
    for config, want, d in ((rnn_config, want_rnn, rnn_dir), (mlp_config, want_mlp, mlp_dir)):
        wrong = {k: config.get(k) for k, v in want.items() if config.get(k) != v}
        if wrong:
            raise ValueError(f"{d / 'config.json'}: {wrong} differ from VeLO's {want}")
    return velo_from_pylo_tensors(rnn, mlp, source)


# -- Google's flax msgpack checkpoint -------------------------------------------------------------
def _msgpack_ext(code: int, data: bytes):
    import msgpack

    if code != 1:
        raise ValueError(f"msgpack extension type {code} is not an array (only type 1 is)")
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    if dtype_name not in _MSGPACK_DTYPES:
        raise ValueError(f"array of dtype {dtype_name!r} is not supported")
    dtype = _MSGPACK_DTYPES[dtype_name]
    count = 1
    for s in shape:
        count *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(buffer) != count * itemsize:
        raise ValueError(
            f"array of shape {list(shape)} and dtype {dtype_name} needs {count * itemsize} bytes, "
            f"has {len(buffer)}"
        )
    if count == 0:
        return torch.zeros(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(tuple(int(s) for s in shape)).clone()


def _flatten(tree, prefix: str, out: dict) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)
    else:
        out[prefix] = tree


def read_flax_msgpack(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameter tree of a flax-msgpack checkpoint, flattened to ``"a/b/c" -> tensor``.

    Accepts either the whole checkpoint ``{"params": tree, ...}`` or a bare tree.
    """
    import msgpack

    path = Path(path)
    raw = path.read_bytes()
    try:
        state = msgpack.unpackb(raw, ext_hook=_msgpack_ext, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack's ExtraData / FormatError / OutOfData, bad arrays
        raise ValueError(
            f"{path} is not a readable flax-msgpack checkpoint, or is truncated "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: a flax checkpoint is a msgpack map, got {type(state).__name__}")
    tree = state["params"] if "params" in state and isinstance(state["params"], Mapping) else state
    flat: dict = {}
    _flatten(tree, "", flat)
    not_arrays = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if not_arrays:
        raise ValueError(f"{path}: the parameter tree has entries that are not arrays: {not_arrays[:5]}")
    return flat


def detect_architecture(flat: Mapping[str, torch.Tensor]) -> str | None:
    """Which HyperV2 optimizer a flattened flax tree belongs to (None: none of them)."""
    if "ff_mod_stack/~/b0" not in flat:
        return "celo_adam" if "rnn_params/step_size/w" in flat else None
    sets = flat["ff_mod_stack/~/b0"].shape[0]
    return {VELO_PARAM_INITS: "velo", 1: "celo"}.get(sets)


def hyperv2_from_jax_tree(flat: Mapping[str, torch.Tensor], source: str,
                          architecture: str | None = None) -> HyperV2Network:
    """A network from a flattened flax parameter tree: Google's VeLO (spec 4.2) or the Celo
    authors' ``theta.state`` (4.3). ``architecture`` None: the one the tree holds."""
    found = detect_architecture(flat)
    if architecture is None:
        if found is None:
            raise ValueError(f"{source} is not a VeLO, Celo or Celo-Adam parameter tree (keys {sorted(flat)[:6]}...)")
        architecture = found
    cfg = HYPERV2_CONFIGS[architecture]
    name = _NAMES[architecture]
    blocks = [f"ff_mod_stack/~/w0__{i}" for i in range(len(_JAX_W0_BLOCKS))] if cfg.param_inits else []
    expected = {k for k in _JAX_KEYS
                if cfg.param_inits or not (k.startswith("ff_mod_stack") or "rnn_to_controls" in k)} | set(blocks)
    missing = sorted(expected - set(flat))
    extra = sorted(set(flat) - expected)
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
        hint = f" (it looks like {_NAMES[found]}'s)" if found not in (None, architecture) else ""
        raise ValueError(f"{source} is not a {name} (HyperV2) parameter tree{hint}: " + "; ".join(p for p in parts if p))
    for i, (b, k) in enumerate(zip(blocks, _JAX_W0_BLOCKS)):
        shape = (cfg.param_inits, k, VELO_MLP_HIDDEN)
        if tuple(flat[b].shape) != shape:
            raise ValueError(f"{name} weights in {source}: {b} has shape {tuple(flat[b].shape)}, expected {shape}")
    discarded = {"rnn_params/linear/w": (cfg.lstm_inputs, cfg.lstm_hidden), "rnn_params/linear/b": (cfg.lstm_hidden,)}
    for key, shape in discarded.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(f"{name} weights in {source}: {key} has shape {tuple(flat[key].shape)}, expected {shape}")
    tensors = {}
    for key, (ours, transpose) in _JAX_KEYS.items():
        if ours is None or key not in expected:
            continue
        t = flat[key]
        tensors[ours] = t.transpose(-1, -2) if transpose and t.dim() >= 2 else t
    if blocks:
        w0 = torch.cat([flat[b] for b in blocks], dim=1)  # [sets, 30, 4], numeric block order
        tensors["mlp_w0"] = w0.transpose(1, 2)
    net = network_of(architecture)
    net.load_strict({k: v.contiguous() for k, v in tensors.items()}, source)
    return net


def velo_from_jax_tree(flat: Mapping[str, torch.Tensor], source: str) -> HyperV2Network:
    """A VeLO network from Google's flattened parameter tree (spec section 4.2)."""
    return hyperv2_from_jax_tree(flat, source, "velo")


# -- entry points ----------------------------------------------------------------------------------
def load_hyperv2_network(
    pretrained, architecture: str | None = None, *, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
) -> tuple[HyperV2Network, str]:
    """Loads HyperV2 meta-weights; returns ``(network, layout)`` with layout "lo_ops", "pylo",
    "jax" or "package". ``architecture`` ("velo", "celo", "celo_adam"; None: whatever the
    source holds) is checked against what the source holds.

    ``pretrained``: a network; a flax-msgpack file (Google's VeLO checkpoint or a Celo
    ``theta.state``); a directory in lo_ops' layout or holding PyLO's ``VeLO_RNN/`` and
    ``VeLO_MLP/``; a Hub repo id in lo_ops' layout; a pair ``(rnn, mlp)`` of PyLO directories or
    Hub repo ids; or None: the weights shipped in the package (Celo and Celo-Adam only).
    """
    if architecture is not None and architecture not in HYPERV2_CONFIGS:
        raise ValueError(f"architecture must be one of {sorted(HYPERV2_CONFIGS)}, got {architecture!r}")
    name = _NAMES.get(architecture, "HyperV2")
    if pretrained is None:
        if architecture not in PACKAGED_WEIGHTS:
            raise ValueError(NO_WEIGHTS_MESSAGE)
        directory = PACKAGED_WEIGHTS[architecture]
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"{name}'s packaged weights are missing from {directory} (a broken install?)")
        return _load_own_layout(directory, f"lo_ops' packaged {name} weights", architecture), "package"
    if isinstance(pretrained, HyperV2Network):
        if architecture is not None and pretrained.architecture != architecture:
            raise ValueError(
                f"pretrained is a {_NAMES[pretrained.architecture]} network ({type(pretrained).__name__}); "
                f"{name} needs {name}'s"
            )
        return pretrained, "lo_ops"
    kwargs = dict(revision=revision, cache_dir=cache_dir, token=token)
    if isinstance(pretrained, Sequence) and not isinstance(pretrained, (str, bytes)):
        if architecture not in (None, "velo"):
            raise TypeError(f"pretrained as a pair (rnn, mlp) is PyLO's VeLO layout; {name} takes one source")
        if len(pretrained) != 2 or not all(isinstance(x, (str, os.PathLike)) for x in pretrained):
            raise TypeError(
                "pretrained as a sequence must be a pair (rnn, mlp) of PyLO VeLO_RNN / VeLO_MLP "
                f"directories or Hub repo ids; got {pretrained!r}"
            )
        rnn_src, mlp_src = (os.fspath(x) for x in pretrained)
        rnn_dir = resolve_directory(rnn_src, **kwargs)
        mlp_dir = resolve_directory(mlp_src, **kwargs)
        net = _load_pylo_directories(rnn_dir, mlp_dir, f"{rnn_src} + {mlp_src}")
        logger.info("loaded VeLO weights (PyLO layout) from %s and %s", rnn_dir, mlp_dir)
        return net, "pylo"
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be a {name} network, a checkpoint file or directory, a Hub repo id"
            + (", or a pair of PyLO repo ids" if architecture in (None, "velo") else "")
            + f"; got {type(pretrained).__name__}"
        )
    source = os.fspath(pretrained)
    path = Path(source).expanduser()
    if path.is_file():
        net = hyperv2_from_jax_tree(read_flax_msgpack(path), source, architecture)
        logger.info("loaded %s weights (flax msgpack) from %s", _NAMES[net.architecture], path)
        return net, "jax"
    if path.is_dir():
        if (path / "VeLO_RNN").is_dir() or (path / "VeLO_MLP").is_dir():
            if architecture not in (None, "velo"):
                raise ValueError(f"pretrained={source!r} holds PyLO's VeLO weights; {name} needs {name}'s")
            return _load_pylo_directories(path / "VeLO_RNN", path / "VeLO_MLP", source), "pylo"
        if (path / "config.json").is_file():
            return _load_own_layout(path, source, architecture), "lo_ops"
        if (path / "theta.state").is_file():
            return load_hyperv2_network(path / "theta.state", architecture)
        raise FileNotFoundError(
            f"pretrained={source!r}: the directory has neither lo_ops' config.json + "
            "model.safetensors, a theta.state, nor PyLO's VeLO_RNN/ and VeLO_MLP/"
        )
    if not REPO_ID.match(source):
        raise FileNotFoundError(
            f"pretrained={source!r} is neither an existing file or directory nor a Hugging Face "
            "repo id (owner/name)." + (" " + NO_WEIGHTS_MESSAGE if architecture in (None, "velo") else "")
        )
    directory = resolve_directory(source, **kwargs)
    return _load_own_layout(directory, source, architecture), "lo_ops"


def load_velo_network(pretrained, **kwargs) -> tuple[HyperV2Network, str]:
    """``load_hyperv2_network(pretrained, "velo")``: VeLO's meta-weights, in any layout."""
    if pretrained is None:
        raise ValueError(NO_WEIGHTS_MESSAGE)
    return load_hyperv2_network(pretrained, "velo", **kwargs)


def load_celo_network(pretrained=None, **kwargs) -> tuple[HyperV2Network, str]:
    """``load_hyperv2_network(pretrained, "celo")``; None: the weights shipped in the package."""
    return load_hyperv2_network(pretrained, "celo", **kwargs)


def load_celo_adam_network(pretrained=None, **kwargs) -> tuple[HyperV2Network, str]:
    """``load_hyperv2_network(pretrained, "celo_adam")``; None: the weights shipped in the package."""
    return load_hyperv2_network(pretrained, "celo_adam", **kwargs)


def convert_hyperv2(pretrained, out_dir: str | os.PathLike, architecture: str | None = None,
                    **load_kwargs) -> Path:
    """Converts VeLO, Celo or Celo-Adam weights in any readable layout to lo_ops' own layout
    in ``out_dir``."""
    net, layout = load_hyperv2_network(pretrained, architecture, **load_kwargs)
    out = Path(out_dir)
    net.save_pretrained(out)
    logger.info("converted %s weights (%s layout) to %s", _NAMES[net.architecture], layout, out)
    return out


def convert_velo(pretrained, out_dir: str | os.PathLike, **load_kwargs) -> Path:
    """Converts VeLO weights in any readable layout to lo_ops' own layout in ``out_dir``."""
    return convert_hyperv2(pretrained, out_dir, "velo", **load_kwargs)
