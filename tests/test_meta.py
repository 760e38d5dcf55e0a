"""Meta-training: the batched inner step equals SmallFCLOpt.step() copy by copy."""

import torch

import lo_ops
from lo_ops.meta import BatchedSmallFCLOpt, pack_meta
from lo_ops.networks import normalised_adam_network


def _random_network(seed):
    net = normalised_adam_network()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.normal_(0, 0.3, generator=gen)
            layer.bias.normal_(0, 0.1, generator=gen)
    offsets = {"momentum": (0.1 * torch.randn(3, generator=gen)).tolist(),
               "rms": (0.1 * torch.randn(1, generator=gen)).tolist(),
               "adafactor": (0.1 * torch.randn(3, generator=gen)).tolist()}
    net.decay_offsets = offsets
    return net


def test_batched_step_equals_small_fc_lopt_per_copy():
    shapes = [(7, 5), (5,), (), (3, 4, 6)]
    copies = 3
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.randn(copies, *s, generator=gen) for s in shapes]
    nets = [_random_network(c) for c in range(copies)]
    theta = torch.stack([
        pack_meta(n.packed_weights(), n.decay_offsets["momentum"] + n.decay_offsets["rms"] + n.decay_offsets["adafactor"])
        for n in nets
    ])
    batched = BatchedSmallFCLOpt([s.clone() for s in stacked], step_mult=0.001, exp_mult=0.001)
    singles = []
    for c in range(copies):
        params = [torch.nn.Parameter(s[c].clone()) for s in stacked]
        singles.append((params, lo_ops.SmallFCLOpt(params, lr=0.7, pretrained=nets[c], step_mult=0.001,
                                                    decay_offsets=nets[c].decay_offsets)))
    for k in range(5):
        grads = [torch.randn(copies, *s, generator=gen) for s in shapes]
        batched.step(grads, theta, lr=0.7)
        for c, (params, opt) in enumerate(singles):
            for p, g in zip(params, grads):
                p.grad = g[c].clone()
            opt.step()
    for c, (params, opt) in enumerate(singles):
        for i, p in enumerate(params):
            torch.testing.assert_close(batched.params[i][c], p.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(batched.state[i]["momentum"][c], opt.state[p]["momentum"])
        assert torch.equal(batched.steps[c], torch.full((len(shapes),), 5.0))


def test_reset_zeroes_the_state_of_chosen_copies():
    batched = BatchedSmallFCLOpt([torch.randn(4, 3, 2), torch.randn(4, 2)])
    theta = pack_meta(normalised_adam_network().packed_weights(), [0.0] * 7).expand(4, -1).contiguous()
    batched.step([torch.randn(4, 3, 2), torch.randn(4, 2)], theta)
    batched.reset([1, 3])
    for st in batched.state:
        for v in st.values():
            assert v[[1, 3]].abs().sum() == 0 and v[[0, 2]].abs().sum() > 0
    assert batched.steps[[1, 3]].abs().sum() == 0 and batched.steps[[0, 2]].min() == 1


def test_pes_smoke_meta_loss_goes_down():
    """A short PES run from a deliberately slow start (normalised Adam with a tenth of its step)
    must improve held-out training loss, with nothing NaN (seconds on a CPU)."""
    from lo_ops.meta.pes import PES, PESConfig, evaluate
    from lo_ops.meta.tasks import TeacherStudentMLP

    net = normalised_adam_network()
    with torch.no_grad():
        net.layers[2].weight[0, :2] *= 0.1
    theta0 = pack_meta(net.packed_weights(), [0.0] * 7)
    family = TeacherStudentMLP(in_dim=8, hidden=(16,), out_dim=2, examples=256, batch=32)
    before = evaluate(family, theta0, steps=100)
    pes = PES(family, theta0, PESConfig(pairs=8, sigma=0.01, unroll=10, min_inner=20, max_inner=100,
                                        outer_lr=1e-2, outer_steps=40, warmup=2))
    scores = [pes.step() for _ in range(40)]
    after = evaluate(family, pes.theta, steps=100)
    assert all(torch.isfinite(torch.tensor(scores)))
    assert torch.isfinite(pes.theta).all()
    assert after < 0.9 * before, (before, after)


def test_classification_family_loss_shapes():
    from lo_ops.meta.tasks import TeacherStudentMLP

    family = TeacherStudentMLP(classification=True, hidden=(8, 8), out_dim=3, examples=32)
    gen = torch.Generator().manual_seed(0)
    params = family.init_params(4, gen)
    x, y = family.make_data(4, gen)
    assert y.dtype == torch.long and y.shape == (4, 32)
    loss = family.loss(params, x, y)
    assert loss.shape == (4,) and torch.isfinite(loss).all()


def test_meta_train_command_checkpoints_and_resumes(tmp_path, capsys):
    from lo_ops.__main__ import main

    out = tmp_path / "run"
    args = ["meta-train", "--out", str(out), "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2",
            "--eval-steps", "10", "--pairs", "2", "--min-inner", "5", "--max-inner", "10"]
    assert main(args) == 0
    assert (out / "last.pt").exists() and (out / "best" / "model.safetensors").exists()
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["pes"]["outer_step"] == 4
    assert main([*args[:4], "6", *args[5:], "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(out / "last.pt", weights_only=True)["pes"]["outer_step"] == 6
    best, layout = lo_ops.load_small_fc_lopt_network(out / "best")
    assert layout == "lo_ops"
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    params[0].grad = torch.randn(3, 2)
    lo_ops.SmallFCLOpt(params, pretrained=best).step()


def test_resumed_pes_continues_identically():
    from lo_ops.meta.pes import PES, PESConfig
    from lo_ops.meta.tasks import TeacherStudentMLP

    theta0 = pack_meta(normalised_adam_network().packed_weights(), [0.0] * 7)
    family = TeacherStudentMLP(in_dim=4, hidden=(8,), out_dim=2, examples=64, batch=16)
    config = PESConfig(pairs=2, unroll=3, min_inner=4, max_inner=8, outer_steps=10, warmup=1)
    families = [family, TeacherStudentMLP(in_dim=3, hidden=(4, 4), out_dim=2, classification=True,
                                          examples=32, batch=8)]
    a = PES(families, theta0, config)
    for _ in range(3):
        a.step()
    b = PES(families, theta0, config)
    b.load_state_dict(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert repr(sa["theta"]) == repr(sb["theta"]) and repr(sa["rng"]) == repr(sb["rng"])
    assert repr(sa["groups"]) == repr(sb["groups"])
    for _ in range(4):
        assert a.step() == b.step()
    assert torch.equal(a.theta, b.theta)


def test_evaluate_command_writes_a_report(tmp_path, monkeypatch):
    from lo_ops.__main__ import main
    from lo_ops.meta import evaluate as ev
    from lo_ops.meta.tasks import TeacherStudentMLP

    monkeypatch.setattr(ev, "EVAL_FAMILIES", {
        "reg": TeacherStudentMLP(in_dim=4, hidden=(8,), out_dim=2, examples=64, batch=16),
        "cls": TeacherStudentMLP(in_dim=4, hidden=(8,), out_dim=3, classification=True, examples=64, batch=16),
    })
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--steps", "20", "--seeds", "2", "--out", str(out), "--no-datasets"]) == 0
    import json

    report = json.loads(out.read_text())
    for name in ("reg", "cls"):
        fam = report["families"][name]
        assert set(fam) >= {"learned", "adamw_tuned", "adamw_0.001", "verdict"}
        assert fam["adamw_tuned"]["lr"] in ev.ADAMW_GRID
        assert all(v["mean"] == v["mean"] for v in fam["learned"].values())  # no NaN
    assert "test_accuracy" in report["families"]["cls"]["learned"]


def test_bundled_dataset_families():
    import pytest

    pytest.importorskip("sklearn")
    from lo_ops.meta.tasks import sklearn_families

    gen = torch.Generator().manual_seed(0)
    for name, family in sklearn_families().items():
        x, y = family.make_data(2, gen)
        assert x.shape[0] == 2 and x.shape[2] == family.in_dim and int(y.max()) + 1 == family.out_dim
        assert not torch.equal(y[0], y[1])  # each copy its own order
        params = family.init_params(2, gen)
        loss = family.loss(params, x[:, :16], y[:, :16])
        assert loss.shape == (2,) and torch.isfinite(loss).all(), name
