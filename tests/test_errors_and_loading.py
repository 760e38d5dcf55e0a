"""Bad input gets a clear error; meta-weights load strictly from every supported source."""

import json

import pytest
import torch
from safetensors.torch import save_file

import lo_ops
from lo_ops.small_fc_lopt.network import PYLO_DECAY_OFFSETS, SmallFCLOptNetwork, load_small_fc_lopt_network

from helpers import make_opt, make_params
from test_opcheck import _op_args


# -- bad optimizer input --------------------------------------------------------------------
def test_sparse_gradient():
    w = torch.nn.Parameter(torch.randn(5, 3))
    w.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter 0 of its param group, shape \(5, 3\)\)"):
        make_opt([w]).step()


def test_complex_parameter():
    with pytest.raises(ValueError, match="complex parameters"):
        make_opt([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize("kw, match", [({"lr": -1.0}, "lr must be"), ({"weight_decay": float("nan")}, "weight_decay must be"),
                                       ({"lr": torch.ones(2)}, "one-element"), ({"fused": "yes"}, "fused must be"),
                                       ({"decay_offsets": {"momentum": [0, 0]}}, "decay_offsets must have exactly the keys")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_opt(make_params([(3,)], non_contiguous=False), **kw)


def test_op_rejects_grad_of_other_shape():
    args = list(_op_args([(7, 5)], torch.float32))
    args[1] = [torch.randn(5, 7)] + args[1][1:]
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[5, 7\] but its parameter has shape \[7, 5\]"):
        torch.ops.lo_ops.small_fc_lopt_step_(*args)


def test_op_rejects_tensors_on_different_devices():
    args = list(_op_args([(7, 5), (5,)], torch.float32))
    args[0] = [args[0][0], args[0][1].to("meta")] + args[0][2:]
    with pytest.raises(RuntimeError, match=r"params\[1\] is on meta"):
        torch.ops.lo_ops.small_fc_lopt_step_(*args)


def test_op_rejects_state_of_wrong_shape():
    args = list(_op_args([(7, 5)], torch.float32))
    args[4] = [torch.zeros(3, 7)] + args[4][1:]  # fac_row must drop d0 = axis 0 -> [3, 5]
    with pytest.raises(RuntimeError, match=r"fac_row\[0\] has shape \[3, 7\].*needs \[3, 5\]"):
        torch.ops.lo_ops.small_fc_lopt_step_(*args)


def test_fake_kernel_rejects_mismatched_lists():
    args = list(_op_args([(7, 5), (5,)], torch.float32))
    args = [[t.to("meta") for t in a] if isinstance(a, list) else (a.to("meta") if isinstance(a, torch.Tensor) else a) for a in args]
    args[6] = []  # fac_diag missing
    with pytest.raises(RuntimeError, match="fac_diag needs 1 entries"):
        torch.ops.lo_ops.small_fc_lopt_step_(*args)


# -- checkpoints ----------------------------------------------------------------------------
def _pylo_dir(tmp_path, tensors, config=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config or {"input_size": 39, "hidden_size": 32, "hidden_layers": 1}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _pylo_tensors():
    return {
        "network.input.weight": torch.randn(32, 39), "network.input.bias": torch.randn(32),
        "network.linear_0.weight": torch.randn(32, 32), "network.linear_0.bias": torch.randn(32),
        "network.output.weight": torch.randn(2, 32), "network.output.bias": torch.randn(2),
    }


def test_pylo_layout_defaults(tmp_path):
    d = _pylo_dir(tmp_path / "m", _pylo_tensors())
    opt = make_opt(make_params([(3,)], non_contiguous=False), pretrained=str(d))
    assert opt.layout == "pylo" and opt.step_mult == 0.01
    assert opt.decay_offsets == PYLO_DECAY_OFFSETS
    opt = make_opt(make_params([(3,)], non_contiguous=False), pretrained=d, step_mult=0.001,
                   decay_offsets={"momentum": [3] * 3, "rms": [1], "adafactor": [3] * 3})
    assert opt.step_mult == 0.001 and opt.decay_offsets["rms"] == [1.0]


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("network.output.bias"), r"missing keys \['network.output.bias'\]"),
    (lambda t: t.update({"network.extra": torch.zeros(1)}), r"unexpected keys \['network.extra'\]"),
    (lambda t: t.update({"network.input.weight": torch.zeros(32, 38)}), r"wrong shapes \['layers.0.weight: \(32, 38\)"),
])
def test_pylo_checkpoint_strict(tmp_path, mutate, match):
    tensors = _pylo_tensors()
    mutate(tensors)
    d = _pylo_dir(tmp_path / "m", tensors)
    with pytest.raises(ValueError, match=match):
        make_opt(make_params([(3,)], non_contiguous=False), pretrained=str(d))


def test_lo_ops_layout_strict(tmp_path):
    net = load_small_fc_lopt_network()[0]
    net.save_pretrained(tmp_path / "ok")
    tensors = dict(net.state_dict())
    tensors["layers.3.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.3.weight'\]"):
        make_opt(make_params([(3,)], non_contiguous=False), pretrained=tmp_path / "ok")


def test_wrong_architecture_in_config(tmp_path):
    d = _pylo_dir(tmp_path / "m", _pylo_tensors(), {"input_size": 39, "hidden_size": 64, "hidden_layers": 1})
    with pytest.raises(ValueError, match="is not small_fc_lopt's"):
        load_small_fc_lopt_network(d)


def test_missing_files_and_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_small_fc_lopt_network(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor"):
        load_small_fc_lopt_network(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(TypeError, match="pretrained must be"):
        load_small_fc_lopt_network(3)


def test_save_pretrained_round_trip(tmp_path):
    net = SmallFCLOptNetwork(decay_offsets={"momentum": [0.1, 0.2, 0.3], "rms": [0.4], "adafactor": [0.5, 0.6, 0.7]},
                             step_mult=0.02, exp_mult=0.002)
    net.save_pretrained(tmp_path / "mine")
    back = SmallFCLOptNetwork.from_pretrained(tmp_path / "mine")
    assert back.decay_offsets == net.decay_offsets and back.step_mult == 0.02 and back.exp_mult == 0.002
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    opt = make_opt(make_params([(3,)], non_contiguous=False), pretrained=tmp_path / "mine")
    assert opt.step_mult == 0.02 and opt.exp_mult == 0.002 and opt.decay_offsets["rms"] == [0.4]


def test_in_memory_modules():
    net = SmallFCLOptNetwork()
    assert make_opt(make_params([(3,)], non_contiguous=False), pretrained=net).network is net

    class PyLOLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = torch.nn.ModuleDict({"input": torch.nn.Linear(39, 32), "linear_0": torch.nn.Linear(32, 32),
                                                "output": torch.nn.Linear(32, 2)})

    opt = make_opt(make_params([(3,)], non_contiguous=False), pretrained=PyLOLike())
    assert opt.layout == "pylo"
    with pytest.raises(ValueError, match="neither a SmallFCLOptNetwork nor in PyLO's MetaMLP layout"):
        make_opt(make_params([(3,)], non_contiguous=False), pretrained=torch.nn.Linear(2, 2))


def test_hub_repo_from_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    # A Hub cache as huggingface_hub lays it out, filled from a save_pretrained directory.
    repo = tmp_path / "cache" / "models--someone--small-fc-lopt"
    snap = repo / "snapshots" / ("0" * 40)
    SmallFCLOptNetwork(step_mult=0.05).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    net, layout = load_small_fc_lopt_network("someone/small-fc-lopt", cache_dir=tmp_path / "cache")
    assert layout == "lo_ops" and net.step_mult == 0.05
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set and the file is not in the local cache"):
        load_small_fc_lopt_network("someone/not-cached", cache_dir=tmp_path / "cache")


def test_default_weights_carry_their_provenance():
    """The embedded default is a meta-training result: it loads, and ships the command, seed,
    wall time, outer steps, commit and evaluation table it was made with."""
    import json

    from lo_ops.small_fc_lopt.network import DEFAULT_WEIGHTS_DIR, normalised_adam_network

    shipped, layout = load_small_fc_lopt_network()
    assert layout == "lo_ops"
    provenance = json.loads((DEFAULT_WEIGHTS_DIR / "provenance.json").read_text())
    for key in ("command", "seed", "wall_time_s", "outer_step", "outer_steps", "lo_ops_commit", "evaluation"):
        assert provenance[key] is not None, key
    assert provenance["command"].startswith("python -m lo_ops meta-train")
    assert not provenance["lo_ops_commit"].endswith("+dirty")
    assert (shipped.step_mult, shipped.exp_mult) == (provenance["step_mult"], provenance["exp_mult"])
    families = provenance["evaluation"]["families"]
    assert {"regression_wide", "classification_10", "digits"} <= set(families)
    card = (DEFAULT_WEIGHTS_DIR / "README.md").read_text()
    assert provenance["command"] in card
    start = normalised_adam_network(exp_mult=1.0, schedule_units=True)
    assert not torch.equal(shipped.packed_weights(), start.packed_weights())  # trained, not the start


def test_normalised_adam_construction_is_normalised_momentum_step():
    from lo_ops.small_fc_lopt.network import normalised_adam_network

    # With the hand-built construction (meta-training's start), one step is -lr * step_mult * x6 / rms(x6), x6 = m / sqrt(v + 1e-6).
    w = torch.nn.Parameter(torch.randn(6, 4))
    g = torch.randn(6, 4)
    w.grad = g.clone()
    before = w.detach().clone()
    lo_ops.SmallFCLOpt([w], lr=1.0, pretrained=normalised_adam_network()).step()
    m, v = 0.1 * g, 0.001 * g * g
    x6 = m / torch.sqrt(v + 1e-6)
    expected = before - 0.001 * x6 / torch.sqrt(1e-5 + x6.square().mean())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_push_to_hub_uploads_the_lo_ops_layout(tmp_path, monkeypatch):
    # No network: the Hub API is replaced by a stand-in that keeps what would be uploaded.
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    uploaded = tmp_path / "uploaded"

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kw):
            shutil.copytree(folder_path, uploaded)
            return f"uploaded {repo_id}"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    net = SmallFCLOptNetwork(step_mult=0.003, decay_offsets={"momentum": [0.1] * 3, "rms": [0.2], "adafactor": [0.3] * 3})
    assert net.push_to_hub("someone/lopt") == "uploaded someone/lopt"
    back, layout = load_small_fc_lopt_network(uploaded)
    assert layout == "lo_ops" and back.step_mult == 0.003 and back.decay_offsets["rms"] == [0.2]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))


def test_pylo_parent_directory_with_metamlp(small_fc_lopt_fixture_dir):
    direct, layout = load_small_fc_lopt_network(small_fc_lopt_fixture_dir)
    parent, parent_layout = load_small_fc_lopt_network(small_fc_lopt_fixture_dir.parent)
    assert layout == parent_layout == "pylo"
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), parent.state_dict().values()))
