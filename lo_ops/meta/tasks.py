"""Offline task families for meta-training: small MLPs whose copies train side by side.

A family describes one architecture; every copy has its own initialisation and its own data
(teacher-student problems drawn from a seed, so nothing is downloaded). Parameters are
stacked over copies (``[N, *S]``) and the forward pass is batched with ``torch.bmm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TeacherStudentMLP:
    """Fit a random teacher MLP's outputs (regression) or its argmax (classification) with a
    student MLP of the given widths (tanh hidden layers)."""

    in_dim: int = 8
    hidden: tuple[int, ...] = (32,)
    out_dim: int = 4
    classification: bool = False
    examples: int = 512
    batch: int = 64
    teacher_hidden: int = 16
    noise: float = 0.01

    def widths(self) -> list[int]:
        return [self.in_dim, *self.hidden, self.out_dim]

    def init_params(self, copies: int, gen: torch.Generator) -> list[Tensor]:
        """Stacked student parameters ``[copies, out, in]`` / ``[copies, out]`` per layer."""
        params = []
        w = self.widths()
        for fan_in, fan_out in zip(w[:-1], w[1:]):
            params.append(torch.randn(copies, fan_out, fan_in, generator=gen) / math.sqrt(fan_in))
            params.append(torch.zeros(copies, fan_out))
        return [p.requires_grad_() for p in params]

    def make_data(self, copies: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Inputs ``[copies, examples, in]`` and targets (floats, or class indices)."""
        x = torch.randn(copies, self.examples, self.in_dim, generator=gen)
        w1 = torch.randn(copies, self.in_dim, self.teacher_hidden, generator=gen) / math.sqrt(self.in_dim)
        w2 = torch.randn(copies, self.teacher_hidden, self.out_dim, generator=gen) / math.sqrt(self.teacher_hidden)
        y = torch.tanh(x @ w1) @ w2
        if self.classification:
            return x, y.argmax(dim=-1)
        return x, y + self.noise * torch.randn(y.shape, generator=gen)

    def forward(self, params: list[Tensor], x: Tensor) -> Tensor:
        """Every copy's outputs on its own inputs: ``[copies, batch, out]``."""
        h = x
        layers = len(params) // 2
        for i in range(layers):
            h = torch.baddbmm(params[2 * i + 1].unsqueeze(1), h, params[2 * i].transpose(1, 2))
            if i < layers - 1:
                h = torch.tanh(h)
        return h

    def loss(self, params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The loss of every copy on its own batch: ``[copies]``."""
        h = self.forward(params, x)
        if self.classification:
            return torch.nn.functional.cross_entropy(
                h.reshape(-1, self.out_dim), y.reshape(-1), reduction="none"
            ).view(h.shape[0], -1).mean(dim=1)
        return (h - y).square().mean(dim=(1, 2))
