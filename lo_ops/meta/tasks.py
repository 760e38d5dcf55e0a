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


@dataclass(frozen=True)
class DatasetMLP(TeacherStudentMLP):
    """Classify one of scikit-learn's bundled datasets (``digits``, ``wine``, ``breast_cancer``;
    no download) with an MLP of the given widths. Every copy sees the whole dataset, standardised,
    in its own random order (so its own train/test split in ``lo_ops evaluate``)."""

    dataset: str = "digits"
    classification: bool = True

    def _arrays(self) -> tuple[Tensor, Tensor]:
        try:
            from sklearn import datasets
        except ImportError as e:
            raise ImportError(
                f"the {self.dataset!r} task needs scikit-learn (pip install 'lo_ops[examples]')"
            ) from e
        loaders = {"digits": datasets.load_digits, "wine": datasets.load_wine,
                   "breast_cancer": datasets.load_breast_cancer}
        if self.dataset not in loaders:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {sorted(loaders)}")
        bunch = loaders[self.dataset]()
        x = torch.tensor(bunch.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        return x, torch.tensor(bunch.target, dtype=torch.long)

    def make_data(self, copies: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self._arrays()
        if x.shape[1] != self.in_dim or int(y.max()) + 1 != self.out_dim:
            raise ValueError(f"{self.dataset} has {x.shape[1]} features and {int(y.max()) + 1} classes; "
                             f"the family says in_dim={self.in_dim}, out_dim={self.out_dim}")
        order = torch.stack([torch.randperm(len(x), generator=gen) for _ in range(copies)])
        return x[order], y[order]


def sklearn_families() -> dict[str, DatasetMLP]:
    """The bundled-dataset families, when scikit-learn is installed (else none)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return {}
    return {
        "digits": DatasetMLP(dataset="digits", in_dim=64, hidden=(64,), out_dim=10, batch=64),
        "wine": DatasetMLP(dataset="wine", in_dim=13, hidden=(32,), out_dim=3, batch=32),
        "breast_cancer": DatasetMLP(dataset="breast_cancer", in_dim=30, hidden=(32,), out_dim=2, batch=64),
    }
