"""Loss delivery for the optimizers that read the loss: ``observe_loss`` and the GradScaler, and
the Hugging Face Trainer and Lightning integrations against the real frameworks (tiny random
models, no downloads)."""

import math

import pytest
import torch

import lo_ops
from conftest import VELO_FIXTURES
from helpers import CountingBackend, make_params, set_grads


@pytest.fixture(scope="module")
def velo_net():
    return lo_ops.load_velo_network(VELO_FIXTURES["pylo"]())[0]


def _velo(params, velo_net, **kw):
    return lo_ops.VeLO(params, num_steps=20, pretrained=velo_net, **kw)


def _record_losses(opt):
    """Makes ``opt`` record the loss every step reads (as a float)."""
    seen = []
    loss_tensor = opt._loss_tensor

    def recording(loss):
        out = loss_tensor(loss)
        seen.append(float(out))
        return out

    opt._loss_tensor = recording
    return seen


# -- observe_loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_observed_losses_step_like_the_loss_given(velo_net, reduction):
    shapes = [(7, 5), (5,)]
    a, b = make_params(shapes, non_contiguous=False), make_params(shapes, non_contiguous=False)
    opt_a, opt_b = _velo(a, velo_net), _velo(b, velo_net)
    for k in range(4):
        micro = [torch.tensor(2.0 + 0.3 * k + 0.1 * j) for j in range(3)]
        set_grads([a, b], k)
        for loss in micro:
            opt_a.observe_loss(loss / 3 if reduction == "sum" else loss, reduction=reduction)
        opt_a.step()
        opt_b.step(loss=sum(micro) / 3)
    for x, y in zip(a, b):  # (the sum of the thirds may differ from the third of the sum in the last bit)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert opt_a.global_state["iteration"].item() == 4


def test_loss_given_to_step_replaces_observed_losses(velo_net):
    params = make_params([(4, 3)], non_contiguous=False)
    opt = _velo(params, velo_net)
    seen = _record_losses(opt)
    set_grads([params], 0)
    opt.observe_loss(torch.tensor(5.0))
    opt.step(loss=torch.tensor(2.0))
    set_grads([params], 1)
    opt.observe_loss(torch.tensor(7.0))
    opt.step(closure=lambda: torch.tensor(1.0))  # observed losses come before the closure's
    assert seen == [2.0, 7.0]


def test_zero_grad_and_discard_drop_observed_losses(velo_net):
    params = make_params([(4, 3)], non_contiguous=False)
    opt = _velo(params, velo_net)
    seen = _record_losses(opt)
    opt.observe_loss(torch.tensor(100.0))  # e.g. of a step the GradScaler skipped
    opt.zero_grad()
    set_grads([params], 0)
    opt.observe_loss(torch.tensor(3.0))
    opt.step()
    opt.observe_loss(torch.tensor(100.0))
    opt.discard_observed_loss()
    set_grads([params], 1)
    with pytest.raises(ValueError, match=r"opt.observe_loss\(loss\)"):
        opt.step()
    assert seen == [3.0]


def test_observe_loss_rejects_bad_input(velo_net):
    opt = _velo(make_params([(4, 3)], non_contiguous=False), velo_net)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        opt.observe_loss(torch.tensor(1.0), reduction="max")
    with pytest.raises(ValueError, match=r"VeLO.observe_loss: the loss must be a scalar .* shape \(2,\)"):
        opt.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="VeLO.observe_loss: the loss must be a scalar tensor or a number, got str"):
        opt.observe_loss("1.0")
    opt.observe_loss(torch.tensor(1.0))
    with pytest.raises(ValueError, match="observed with reduction='mean', not 'sum'"):
        opt.observe_loss(torch.tensor(1.0), reduction="sum")


def test_observe_loss_keeps_no_graph_and_optimizers_without_loss_ignore_it(velo_net):
    p = torch.nn.Parameter(torch.randn(3))
    opt = _velo([p], velo_net)
    loss = (p * 2).sum()
    opt.observe_loss(loss)
    assert not opt._observed[0].requires_grad
    small = lo_ops.SmallFCLOpt([torch.nn.Parameter(torch.randn(3))])
    assert not small.reads_loss and opt.reads_loss
    small.observe_loss(loss)
    assert small._observed is None
    with pytest.raises(ValueError, match="reduction"):
        small.observe_loss(loss, reduction="median")


def test_compiled_step_reads_observed_losses_without_recompiling(velo_net):
    shapes = [(7, 5), (5,)]
    a, b = make_params(shapes, non_contiguous=False), make_params(shapes, non_contiguous=False)
    opt_a, opt_b = _velo(a, velo_net), _velo(b, velo_net)
    torch._dynamo.reset()
    counter = CountingBackend("aot_eager")
    step = torch.compile(opt_a.step, backend=counter, fullgraph=True)
    for k in range(4):
        set_grads([a, b], k)
        for j in range(2):
            opt_a.observe_loss(torch.tensor(3.0 - 0.2 * k + j))
        step()
        opt_b.step(loss=torch.tensor(3.5 - 0.2 * k))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert counter.graphs == 1


# -- torch.amp.GradScaler ---------------------------------------------------------------------------
def _scaled_run(velo_net, use_scaler, poison_step=None, observe=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = _velo(list(model.parameters()), velo_net)
    seen = _record_losses(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=use_scaler)
    gen = torch.Generator().manual_seed(1)
    for k in range(4):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaled = scaler.scale(loss)
        scaled.backward()
        if k == poison_step:
            model[0].weight.grad[0, 0] = float("inf")
        if observe:
            opt.observe_loss(scaled, scaler=scaler)
            scaler.step(opt)
        else:
            scaler.step(opt, loss=loss.detach())
        scaler.update()
    return model, opt, seen


@pytest.mark.parametrize("observe", [False, True], ids=["step_loss_kwarg", "observe_loss_scaler"])
def test_grad_scaler_steps_like_no_scaler(velo_net, observe):
    plain, plain_opt, plain_seen = _scaled_run(velo_net, use_scaler=False)
    scaled, scaled_opt, scaled_seen = _scaled_run(velo_net, use_scaler=True, observe=observe)
    assert scaled_seen == plain_seen  # powers of two: the unscaled loss is exact
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert scaled_opt.global_state["iteration"].item() == 4


@pytest.mark.parametrize("observe", [False, True], ids=["step_loss_kwarg", "observe_loss_scaler"])
def test_grad_scaler_skipped_step_leaves_no_loss_behind(velo_net, observe):
    _, opt, seen = _scaled_run(velo_net, use_scaler=True, poison_step=1, observe=observe)
    assert opt.global_state["iteration"].item() == 3
    assert len(seen) == 3 and all(math.isfinite(v) and v < 10 for v in seen)


# -- Hugging Face Trainer ---------------------------------------------------------------------------
class _Regressor(torch.nn.Module):
    """A tiny model the Trainer can drive: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.losses: list[float] = []

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = torch.nn.functional.mse_loss(out, labels)
        if self.training:
            self.losses.append(loss.item())
        return {"loss": loss, "logits": out}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=64):
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=gen)
        self.y = self.x[:, :1] * 0.5 + 0.1 * torch.randn(n, 1, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_trainer(tmp_path, velo_net, max_steps=6, **kw):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from lo_ops.integrations.transformers import Trainer

    torch.manual_seed(0)
    model = _Regressor()
    opt = _velo(list(model.parameters()), velo_net)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, gradient_accumulation_steps=2,
        per_device_train_batch_size=4, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
        lr_scheduler_type="constant", seed=0, disable_tqdm=True, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(opt, None)), model, opt


def test_hf_trainer_hands_each_step_its_mean_loss(tmp_path, velo_net):
    trainer, model, opt = _hf_trainer(tmp_path, velo_net)
    seen = _record_losses(opt)
    trainer.train()
    assert opt.global_state["iteration"].item() == 6
    expected = [(model.losses[2 * k] + model.losses[2 * k + 1]) / 2 for k in range(6)]
    assert len(model.losses) == 12
    assert seen == pytest.approx(expected, rel=1e-6)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(seen, rel=1e-4, abs=1e-4)  # what the Trainer logs for the step


def test_hf_trainer_resumes_from_checkpoint_exactly(tmp_path, velo_net):
    full, full_model, full_opt = _hf_trainer(tmp_path / "full", velo_net)
    full.train()
    first, _, _ = _hf_trainer(tmp_path / "resumed", velo_net, max_steps=3)
    first.train()
    resumed, model, opt = _hf_trainer(tmp_path / "resumed", velo_net)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    assert opt.global_state["iteration"].item() == 6
    for a, b in zip(full_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in full_opt.global_state.items():
        torch.testing.assert_close(opt.global_state[key], value, rtol=0, atol=0, msg=key)


# -- Lightning --------------------------------------------------------------------------------------
def _lightning_fit(velo_net, precision, callback=True):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.plugins import MixedPrecision

    from lo_ops.integrations.lightning import LossCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.net(batch["x"]).float(), batch["labels"])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            self.opt = _velo(list(self.parameters()), velo_net)
            self.seen = _record_losses(self.opt)
            return self.opt

    torch.manual_seed(0)
    module = Module()
    plugins = []
    if precision == "16-mixed":  # Lightning's AMP plugin with a GradScaler, here on the CPU
        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]
    trainer = L.Trainer(
        max_steps=6, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        precision=None if plugins else precision, plugins=plugins,
        callbacks=[LossCallback()] if callback else [],
    )
    loader = torch.utils.data.DataLoader(_Rows(), batch_size=4)
    trainer.fit(module, loader)
    return module


@pytest.mark.parametrize("precision", ["16-mixed", "32-true", "bf16-mixed"])
def test_lightning_steps_read_the_mean_loss(velo_net, precision):
    module = _lightning_fit(velo_net, precision)
    assert module.opt.global_state["iteration"].item() == 6
    expected = [(module.losses[2 * k] + module.losses[2 * k + 1]) / 2 for k in range(6)]
    assert module.seen == pytest.approx(expected, rel=1e-5)


def test_lightning_16_mixed_without_the_callback_says_what_to_do(velo_net):
    with pytest.raises(ValueError, match=r"observe_loss.*lo_ops.integrations"):
        _lightning_fit(velo_net, "16-mixed", callback=False)
