"""Meta-training: the batched inner step equals SmallFCLOpt.step() copy by copy."""

import torch

import lo_ops
from lo_ops.meta import BatchedSmallFCLOpt, pack_meta
from lo_ops.small_fc_lopt.network import normalised_adam_network


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
    import json

    import pytest

    provenance = json.loads((out / "best" / "provenance.json").read_text())
    assert provenance["command"].startswith("python -m lo_ops meta-train --out")
    assert provenance["seed"] == 0 and provenance["exp_mult"] == 1.0 and provenance["init"] == "normalised-adam"
    with pytest.raises(SystemExit, match="other settings"):
        main([*args[:4], "8", *args[5:], "--resume", "--sigma", "0.02"])
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
        assert set(fam) >= {"learned", "celo", "celo_adam", "adamw_tuned", "adamw_0.001", "verdict"}
        assert fam["adamw_tuned"]["lr"] in ev.ADAMW_GRID
        for method in ("learned", "celo", "celo_adam"):
            assert all(v["mean"] == v["mean"] for v in fam[method].values())  # no NaN
    assert "test_accuracy" in report["families"]["cls"]["celo"]


def test_published_optimizers_train_each_copy_on_its_own_loss():
    """Celo on batched copies: one optimizer per copy, equal to training that copy alone."""
    import lo_ops
    from lo_ops.meta import evaluate as ev

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, 5, generator=gen), torch.randn(3, 5, generator=gen)]
    alone = [p[1].clone() for p in params]
    step = ev._hyperv2(lo_ops.Celo)(params, 10)
    opt = lo_ops.Celo(alone, num_steps=10)
    for k in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        loss = torch.tensor([1.0, 2.0 - 0.1 * k, 3.0])
        step(grads, loss)
        for p, g in zip(alone, grads):
            p.grad = g[1]
        opt.step(loss=loss[1])
    for p, q in zip(params, alone):
        assert torch.equal(p[1], q)


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


def test_schedule_units_leave_the_step_unchanged():
    """The meta-training start: normalised Adam with its time pathway open steps exactly like
    normalised Adam (its schedule weights are zero)."""
    gen = torch.Generator().manual_seed(3)
    results = []
    for net in (normalised_adam_network(), normalised_adam_network(exp_mult=1.0, schedule_units=True)):
        p = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
        opt = lo_ops.SmallFCLOpt([p], pretrained=net)
        for i in range(5):
            p.grad = torch.randn(6, 5, generator=gen)
            opt.step()
        results.append(p.detach().clone())
        gen.manual_seed(3)
    assert torch.equal(results[0], results[1])
    net = normalised_adam_network(schedule_units=True)
    time_units = net.layers[0].weight[2:13, 28:]
    assert torch.equal(time_units, torch.eye(11)) and (net.layers[2].weight[:, 2:13] == 0).all()


def test_pes_config_rejects_bad_values():
    import pytest

    from lo_ops.meta.pes import PESConfig

    with pytest.raises(ValueError, match="objective"):
        PESConfig(objective="mean")
    with pytest.raises(ValueError, match="min_inner"):
        PESConfig(min_inner=50, max_inner=10)
    with pytest.raises(ValueError, match="pairs"):
        PESConfig(pairs=0)
    with pytest.raises(ValueError, match="reparam"):
        PESConfig(reparam=-1.0)


def test_reparameterisation_keeps_the_function_and_pairs():
    """With reparameterisation each copy stores p / s per tensor: the model the copy computes is
    the fresh initialisation (same loss as without), both copies of a pair share their scales,
    and the scales differ between pairs and tensors."""
    from lo_ops.meta.pes import PESConfig, _Particles
    from lo_ops.meta.tasks import TeacherStudentMLP

    family = TeacherStudentMLP(in_dim=4, hidden=(8,), out_dim=2, examples=64, batch=16)
    plain = _Particles(family, PESConfig(pairs=3), torch.Generator().manual_seed(5), 0.001, 0.001)
    augmented = _Particles(family, PESConfig(pairs=3, reparam=1.0), torch.Generator().manual_seed(5), 0.001, 0.001)
    assert all((s == 1).all() for s in plain.scales)
    for s in augmented.scales:
        assert torch.equal(s[:3], s[3:]) and s.log().abs().max() <= 1.0 and s.unique().numel() == 3
    assert not torch.equal(augmented.scales[0], augmented.scales[2])
    assert torch.allclose(augmented.start_loss, augmented.loss(augmented.x, augmented.y), rtol=1e-5)
    # The stored parameters are the model's divided by the scale: the copies' gradients scale too.
    xb, yb = augmented.x[:, :16], augmented.y[:, :16]
    with torch.enable_grad():
        loss = augmented.loss(xb, yb)
        grads = torch.autograd.grad(loss.sum(), augmented.params)
        model = [(p * s).detach().requires_grad_() for p, s in zip(augmented.params, augmented.scales)]
        model_grads = torch.autograd.grad(family.loss(model, xb, yb).sum(), model)
    for g, mg, s in zip(grads, model_grads, augmented.scales):
        assert torch.allclose(g, mg * s, rtol=1e-5, atol=1e-7)


def test_evaluate_uses_the_networks_exp_mult():
    from lo_ops.meta.evaluate import evaluate_weights

    reports = []
    for exp_mult in (0.001, 1.0):
        net = normalised_adam_network(exp_mult=exp_mult)
        with torch.no_grad():
            net.layers[2].bias[1] = -20.0  # exp(-20) with exp_mult 1: almost no step
        reports.append(evaluate_weights(net, steps=5, seeds=2, datasets=False))
    fam = "regression_narrow"
    moved, frozen = (r["families"][fam]["learned"]["train_loss"]["mean"] for r in reports)
    assert frozen > moved


def test_pes_head_subset_trains_only_the_head():
    from lo_ops.meta.pes import PES, SUBSETS, PESConfig
    from lo_ops.meta.tasks import TeacherStudentMLP

    theta0 = pack_meta(normalised_adam_network(exp_mult=1.0, schedule_units=True).packed_weights(), [0.0] * 7)
    family = TeacherStudentMLP(in_dim=4, hidden=(8,), out_dim=2, examples=64, batch=16)
    pes = PES(family, theta0, PESConfig(pairs=4, unroll=3, min_inner=4, max_inner=8, subset="head", warmup=1),
              exp_mult=1.0)
    for _ in range(3):
        pes.step()
    head = SUBSETS["head"]
    changed = (pes.theta.detach() != theta0).nonzero().flatten()
    assert len(changed) > 0 and changed.min() >= head.start
    assert head.stop - head.start == 2 * 33 + 7


def test_ship_writes_weights_provenance_and_card(tmp_path):
    """A meta-training result becomes a loadable default with its provenance, evaluation and card."""
    import json

    from lo_ops.__main__ import main
    from lo_ops.meta.ship import ship

    run = tmp_path / "run"
    assert main(["meta-train", "--out", str(run), "--steps", "2", "--eval-every", "1", "--eval-steps", "5",
                 "--pairs", "2", "--min-inner", "3", "--max-inner", "5", "--no-datasets"]) == 0
    target, evaluation = tmp_path / "default", tmp_path / "results" / "evaluate.json"
    provenance = ship(run / "best", target, evaluation, "a test machine", steps=5, seeds=2)
    saved = json.loads((target / "provenance.json").read_text())
    assert saved == json.loads(json.dumps(provenance))
    assert saved["command"].startswith("python -m lo_ops meta-train") and "evaluation" in saved
    assert json.loads(evaluation.read_text())["families"].keys() == saved["evaluation"]["families"].keys()
    card = (target / "README.md").read_text()
    assert saved["command"] in card and "| regression_wide |" in card
    net, layout = lo_ops.load_small_fc_lopt_network(target)
    source, _ = lo_ops.load_small_fc_lopt_network(run / "best")
    assert layout == "lo_ops" and torch.equal(net.packed_weights(), source.packed_weights())
    assert net.exp_mult == source.exp_mult == 1.0


def test_ship_refuses_a_directory_without_provenance(tmp_path):
    import pytest

    from lo_ops.meta.ship import ship

    normalised_adam_network().save_pretrained(tmp_path / "net")
    with pytest.raises(FileNotFoundError, match="provenance"):
        ship(tmp_path / "net", tmp_path / "out", tmp_path / "eval.json", "x")
    assert not (tmp_path / "out").exists()
