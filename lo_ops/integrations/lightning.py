"""``lo_ops.integrations.lightning.LossCallback``: Lightning's automatic optimization for the
lo_ops optimizers that read the loss (VeLO, Celo, Celo-Adam), with every precision.

With ``precision="32"`` or ``"bf16-mixed"`` Lightning calls ``optimizer.step(closure)``, and
the closure's loss reaches the optimizer; with ``"16-mixed"`` (a ``GradScaler``) it runs the
closure itself and calls ``scaler.step(optimizer)`` with no loss. The callback hands the
optimizer each micro-batch's loss as Lightning passes it to ``backward`` (divided by
``accumulate_grad_batches``, and unscaled here when a ``GradScaler`` scaled it), so every step
reads the mean loss of its micro-batches whatever the precision::

    trainer = lightning.Trainer(precision="16-mixed", callbacks=[LossCallback()])

In manual optimization hand the loss to ``step`` yourself (``opt.step(loss=...)``). Imports
``lightning`` (or, without it, ``pytorch_lightning``).
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from . import unwrap_optimizer

__all__ = ["LossCallback"]


class LossCallback(Callback):
    """Hands each micro-batch's loss to every lo_ops optimizer of the trainer that reads it."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not pl_module.automatic_optimization:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # set for "16-mixed"
        for optimizer in trainer.optimizers:
            opt = unwrap_optimizer(optimizer)
            if opt is not None and opt.reads_loss:
                opt.observe_loss(loss, reduction="sum", scaler=scaler)
