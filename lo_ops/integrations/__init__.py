"""Thin integrations of the lo_ops optimizers into training frameworks.

Each submodule imports its framework when it is imported itself; none is a dependency of lo_ops:

- ``lo_ops.integrations.transformers.Trainer``: a drop-in ``transformers.Trainer`` that hands
  each optimizer step's loss to an lo_ops optimizer that reads the loss (VeLO, Celo, Celo-Adam).
- ``lo_ops.integrations.lightning.LossCallback``: the same for Lightning's automatic
  optimization, with any precision (with ``"16-mixed"`` Lightning steps through a
  ``GradScaler`` without a closure).

Both hand the loss over with ``LearnedOptimizer.observe_loss``, which any other loop that calls
``step()`` bare can use itself.
"""

from __future__ import annotations

from .._optim import LearnedOptimizer

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer) -> LearnedOptimizer | None:
    """The lo_ops optimizer inside ``optimizer`` (itself, or the optimizer that wrappers such as
    accelerate's ``AcceleratedOptimizer`` or Lightning's ``LightningOptimizer`` hold), or None."""
    for _ in range(8):
        if isinstance(optimizer, LearnedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if optimizer is None:
            return None
    return None
