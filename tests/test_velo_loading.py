"""Loading VeLO meta-weights: PyLO's directories and Hub repos, Google's msgpack, lo_ops' own
layout, the converter, and clear errors for anything else."""

import shutil

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file

import lo_ops
from lo_ops.__main__ import main
from lo_ops.hyperv2.network import VeLONetwork, load_velo_network, read_flax_msgpack

from conftest import VELO_FIXTURES


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference_net():
    return load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _pack_tree(tree):
    def encode(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.contiguous()
            payload = msgpack.packb((list(t.shape), str(t.dtype).removeprefix("torch."),
                                     t.numpy().tobytes()))
            return msgpack.ExtType(1, payload)
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=encode)


def _nest(flat):
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def test_both_external_layouts_give_the_same_network(reference_net):
    net, layout = load_velo_network(VELO_FIXTURES["jax"]())
    assert layout == "jax"
    _same(net, reference_net)
    pylo_root = VELO_FIXTURES["pylo"]()
    net, layout = load_velo_network((pylo_root / "VeLO_RNN", pylo_root / "VeLO_MLP"))
    assert layout == "pylo"
    _same(net, reference_net)


@pytest.mark.parametrize("source", ["jax", "pylo"])
def test_convert_command_line_round_trip(tmp_path, reference_net, source, capsys):
    out = tmp_path / "velo"
    assert main(["convert", str(VELO_FIXTURES[source]()), "--out", str(out)]) == 0
    assert "lo_ops' layout" in capsys.readouterr().out
    net, layout = load_velo_network(out)
    assert layout == "lo_ops"
    _same(net, reference_net)
    _same(VeLONetwork.from_pretrained(out), reference_net)
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = lo_ops.VeLO(params, num_steps=10, pretrained=str(out))
    params[0].grad = torch.randn(4, 3)
    opt.step(loss=torch.tensor(1.0))


def test_convert_command_line_reports_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.msgpack"), "--out", str(tmp_path / "o")]) == 2
    assert "lo_ops convert:" in capsys.readouterr().err


def test_save_pretrained_keeps_step_and_exp_mult(tmp_path, reference_net):
    net = VeLONetwork(step_mult=0.002, exp_mult=0.003)
    net.load_state_dict(reference_net.state_dict())
    net.save_pretrained(tmp_path / "x")
    back, _ = load_velo_network(tmp_path / "x")
    assert (back.step_mult, back.exp_mult) == (0.002, 0.003)
    opt = lo_ops.VeLO([torch.nn.Parameter(torch.zeros(2))], num_steps=5, pretrained=back)
    assert (opt.step_mult, opt.exp_mult) == (0.002, 0.003)


def _copy_pylo(tmp_path):
    root = tmp_path / "pylo"
    shutil.copytree(VELO_FIXTURES["pylo"](), root)
    return root


@pytest.mark.parametrize("sub, mutate, match", [
    ("VeLO_RNN", lambda t: t.pop("lstm.linear.bias"), r"missing keys \['lstm.linear.bias'\]"),
    ("VeLO_RNN", lambda t: t.update(extra=torch.zeros(1)), r"unexpected keys \['extra'\]"),
    ("VeLO_RNN", lambda t: t.update({"lstm.linear.weight": torch.zeros(2048, 1000)}), "lstm.weight"),
    ("VeLO_MLP", lambda t: t.update(input_weights_=torch.zeros(256, 4, 29)), "mlp_w0"),
    ("VeLO_MLP", lambda t: t.update({"input_bias": torch.zeros(5)}), "input_bias"),
    ("VeLO_RNN", lambda t: t.update({"mix_layer1.weight": torch.zeros(3)}), "mix_layer1.weight"),
])
def test_pylo_checkpoint_is_checked_strictly(tmp_path, sub, mutate, match):
    root = _copy_pylo(tmp_path)
    tensors = load_file(str(root / sub / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(root / sub / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        load_velo_network(root)


def test_truncated_and_damaged_files(tmp_path):
    root = _copy_pylo(tmp_path)
    weights = root / "VeLO_MLP" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_velo_network(root)
    truncated = tmp_path / "params.msgpack"
    truncated.write_bytes(VELO_FIXTURES["jax"]().read_bytes()[:-5000])
    with pytest.raises(ValueError, match="msgpack"):
        load_velo_network(truncated)
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\x92\x01\x02")  # a msgpack list, not a map
    with pytest.raises(ValueError, match="msgpack map"):
        load_velo_network(garbage)


def test_msgpack_that_is_not_a_velo_tree(tmp_path):
    other = tmp_path / "other.msgpack"
    other.write_bytes(_pack_tree({"params": {"dense": {"w": torch.zeros(3, 2)}}, "step": 0}))
    with pytest.raises(ValueError, match="not a VeLO .HyperV2. parameter tree"):
        load_velo_network(other)
    flat = read_flax_msgpack(VELO_FIXTURES["jax"]())
    flat["ff_mod_stack/~/w0__3"] = torch.zeros(256, 2, 4)
    wrong = tmp_path / "wrong.msgpack"
    wrong.write_bytes(_pack_tree({"params": _nest(flat)}))
    with pytest.raises(ValueError, match=r"w0__3 has shape \(256, 2, 4\)"):
        load_velo_network(wrong)
    flat["ff_mod_stack/~/w0__3"] = torch.zeros(256, 3, 4)
    flat["rnn_params/rnn/linear/w"] = torch.zeros(1024, 2000)
    wrong.write_bytes(_pack_tree({"params": _nest(flat)}))
    with pytest.raises(ValueError, match="lstm.weight"):
        load_velo_network(wrong)


def test_msgpack_round_trip_of_a_written_tree(tmp_path, reference_net):
    """A tree written here in Google's format (nested maps, ext-type-1 arrays) loads the same."""
    flat = read_flax_msgpack(VELO_FIXTURES["jax"]())
    path = tmp_path / "again.msgpack"
    path.write_bytes(_pack_tree({"params": _nest(flat), "gen_id": "x", "step": 3}))
    _same(load_velo_network(path)[0], reference_net)


def test_hub_repo_pair(monkeypatch, reference_net):
    import huggingface_hub

    root = VELO_FIXTURES["pylo"]()
    repos = {"someone/VeLO_RNN": root / "VeLO_RNN", "someone/VeLO_MLP": root / "VeLO_MLP"}
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(repos[repo_id] / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    net, layout = load_velo_network(("someone/VeLO_RNN", "someone/VeLO_MLP"))
    assert layout == "pylo"
    _same(net, reference_net)
    assert {c[0] for c in calls} == set(repos)


def test_hub_repo_offline_without_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_velo_network(("nobody/VeLO_RNN", "nobody/VeLO_MLP"), cache_dir=tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(TypeError, match="pair"):
        load_velo_network(("a/b", "c/d", "e/f"))
    with pytest.raises(TypeError, match="pretrained must be"):
        load_velo_network(3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither lo_ops' config.json"):
        load_velo_network(tmp_path / "empty")
    small = tmp_path / "small"
    lo_ops.SmallFCLOptNetwork().save_pretrained(small)
    with pytest.raises(ValueError, match="not a VeLO checkpoint"):
        load_velo_network(small)


def test_convert_two_pylo_sources(tmp_path, reference_net):
    root = VELO_FIXTURES["pylo"]()
    out = tmp_path / "velo"
    assert main(["convert", str(root / "VeLO_RNN"), str(root / "VeLO_MLP"), "--out", str(out)]) == 0
    _same(load_velo_network(out)[0], reference_net)


def test_hub_repo_in_lo_ops_layout(tmp_path, monkeypatch, reference_net):
    import huggingface_hub

    converted = tmp_path / "converted"
    reference_net.save_pretrained(converted)

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "someone/velo"
        return str(converted / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    net, layout = load_velo_network("someone/velo")
    assert layout == "lo_ops"
    _same(net, reference_net)
