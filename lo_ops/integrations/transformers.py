"""``lo_ops.integrations.transformers.Trainer``: a ``transformers.Trainer`` for the lo_ops
optimizers that read the loss (VeLO, Celo, Celo-Adam).

The Trainer calls ``optimizer.step()`` with no loss. This subclass hands the optimizer, before
each step, the loss the Trainer itself logs for that step: the sum over the step's
gradient-accumulation micro-batches of what ``training_step`` returns (each already divided by
the number of micro-batches, or normalised by the step's token count). Everything else is the
Trainer's own: gradient accumulation, mixed precision, ``resume_from_checkpoint`` (the
optimizer's state dict holds its loss history and step count)::

    from lo_ops.integrations.transformers import Trainer

    opt = lo_ops.VeLO(model.parameters(), num_steps=args.max_steps, pretrained=...)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

With ``optimizers=(opt, None)`` the Trainer builds its default scheduler, which changes ``lr``
(a multiplier of the learned step for lo_ops): pass ``lr_scheduler_type="constant"`` to keep
the optimizer's own schedule. An optimizer that does not read the loss (SmallFCLOpt), or one
that is not lo_ops', is left alone.
"""

from __future__ import annotations

import transformers

from . import unwrap_optimizer

__all__ = ["Trainer"]


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` that hands each optimizer step's loss to an lo_ops optimizer."""

    _lo_ops_window: int | None = None  # the global step whose losses are being observed

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        opt = unwrap_optimizer(self.optimizer)
        if opt is not None and opt.reads_loss:
            if self._lo_ops_window != self.state.global_step:
                # A new optimizer step: drop what a step the GradScaler skipped left behind.
                opt.discard_observed_loss()
                self._lo_ops_window = self.state.global_step
            opt.observe_loss(loss, reduction="sum")
        return loss
