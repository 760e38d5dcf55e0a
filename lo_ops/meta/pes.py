"""Antithetic Persistent Evolution Strategies (PES) over small_fc_lopt's meta-parameters.

Each of K antithetic pairs (per task family) trains two copies of a task (same initialisation, same batches)
with meta-parameters ``theta + eps`` and ``theta - eps``; all 2K copies step in one fused call
(``BatchedSmallFCLOpt``). An outer step unrolls U inner steps, scores each copy by its mean
inner loss normalised by the loss at the start of its run, and estimates the meta-gradient as

    g = sum_k (L+_k - L-_k) xi_k / (2 K sigma^2),

where ``xi_k`` accumulates the pair's perturbations since its inner run started (this is what
makes the truncated estimate unbiased). Inner runs have log-uniform lengths and random start
offsets, and restart with a new task instance when they end. The outer optimizer is AdamW with
linear warm-up, cosine decay and gradient-norm clipping.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .batched import META_NUMEL, BatchedSmallFCLOpt
from .tasks import TeacherStudentMLP


@dataclass
class PESConfig:
    pairs: int = 8
    sigma: float = 0.01
    unroll: int = 10
    min_inner: int = 50
    max_inner: int = 400
    inner_lr: float = 1.0
    outer_lr: float = 3e-3
    outer_steps: int = 1000
    warmup: int = 20
    clip: float = 1.0
    seed: int = 0


class _Particles:
    """K antithetic pairs (2K copies) of one task family, with their inner optimizer state and
    their accumulated perturbations."""

    def __init__(self, family: TeacherStudentMLP, config: PESConfig, gen: torch.Generator,
                 step_mult: float, exp_mult: float):
        self.family = family
        self.config = config
        self.gen = gen
        k = config.pairs
        self.params = family.init_params(2 * k, gen)
        self.inner = BatchedSmallFCLOpt(self.params, step_mult=step_mult, exp_mult=exp_mult)
        self.x, self.y = None, None
        self.xi = torch.zeros(k, META_NUMEL)
        self.length = torch.zeros(k, dtype=torch.long)
        self.t = torch.zeros(k, dtype=torch.long)
        self.start_loss = torch.ones(2 * k)
        self.restart(torch.arange(k), offsets=True)

    def _lengths(self, count: int) -> Tensor:
        lo, hi = math.log(self.config.min_inner), math.log(self.config.max_inner)
        return torch.exp(lo + (hi - lo) * torch.rand(count, generator=self.gen)).round().long()

    @torch.no_grad()
    def restart(self, pairs: Tensor, offsets: bool = False) -> None:
        """New task instances (initialisation and data) for these pairs; fresh inner state."""
        k = self.config.pairs
        n = len(pairs)
        fresh = self.family.init_params(n, self.gen)
        x, y = self.family.make_data(n, self.gen)
        if self.x is None:
            self.x = x.new_zeros((2 * k, *x.shape[1:]))
            self.y = y.new_zeros((2 * k, *y.shape[1:]))
        both = torch.cat([pairs, pairs + k])
        for p, f in zip(self.params, fresh):
            p.data[both] = torch.cat([f, f])
        self.x[both] = torch.cat([x, x])
        self.y[both] = torch.cat([y, y])
        self.inner.reset(both)
        self.xi[pairs] = 0
        self.length[pairs] = self._lengths(n)
        # Random start offsets desynchronise the pairs' restarts (the first runs are shorter).
        self.t[pairs] = (torch.rand(n, generator=self.gen) * self.length[pairs]).long() if offsets else 0
        params = [p[both] for p in self.params]
        self.start_loss[both] = self.family.loss(params, self.x[both], self.y[both]).clamp_min(1e-8)

    def _batch(self) -> tuple[Tensor, Tensor]:
        k, b = self.config.pairs, self.family.batch
        idx = torch.randint(0, self.x.shape[1], (k, b), generator=self.gen)
        idx = torch.cat([idx, idx])  # antithetic copies see the same batches
        rows = torch.arange(2 * k).unsqueeze(1)
        return self.x[rows, idx], self.y[rows, idx]

    def unroll(self, theta: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """U inner steps with theta +- eps; returns (this group's share of the meta-gradient
        sum: sum_k (L+ - L-) xi_k, the copies' normalised scores)."""
        cfg = self.config
        k = cfg.pairs
        thetas = torch.cat([theta + eps, theta - eps])
        total = torch.zeros(2 * k)
        for _ in range(cfg.unroll):
            xb, yb = self._batch()
            with torch.enable_grad():
                loss = self.family.loss(self.params, xb, yb)
                grads = torch.autograd.grad(loss.sum(), self.params)
            self.inner.step(grads, thetas, lr=cfg.inner_lr)
            total += loss.detach() / self.start_loss
        scores = total / cfg.unroll
        self.xi += eps
        diff = scores[:k] - scores[k:]
        finite = torch.isfinite(diff)
        diff = torch.where(finite, diff, torch.zeros_like(diff))  # a diverged pair gives no signal
        contribution = (diff.unsqueeze(1) * self.xi).sum(0)
        self.t += cfg.unroll
        done = ((self.t >= self.length) | ~finite).nonzero().flatten()
        if len(done):
            self.restart(done)
        return contribution, scores

    def state_dict(self) -> dict:
        return {
            "params": [p.detach().clone() for p in self.params],
            "inner_state": [{k: v.clone() for k, v in st.items()} for st in self.inner.state],
            "inner_steps": self.inner.steps.clone(),
            "x": self.x.clone(), "y": self.y.clone(), "xi": self.xi.clone(),
            "length": self.length.clone(), "t": self.t.clone(), "start_loss": self.start_loss.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.params, state["params"]):
            p.data.copy_(v)
        for st, saved in zip(self.inner.state, state["inner_state"]):
            for k in st:
                st[k].copy_(saved[k])
        self.inner.steps.copy_(state["inner_steps"])
        self.x, self.y = state["x"].clone(), state["y"].clone()
        for name in ("xi", "length", "t", "start_loss"):
            getattr(self, name).copy_(state[name])


class PES:
    """Meta-trains ``theta`` (``[META_NUMEL]``: packed weights then decay offsets) on one or
    several task families: each family has its own K antithetic pairs, and the meta-gradient
    averages over all pairs of all families (a mixture of architectures in every outer step)."""

    def __init__(self, families: TeacherStudentMLP | list[TeacherStudentMLP], theta0: Tensor,
                 config: PESConfig, step_mult: float = 0.001, exp_mult: float = 0.001):
        if theta0.shape != (META_NUMEL,):
            raise ValueError(f"theta0 must have {META_NUMEL} elements, got {tuple(theta0.shape)}")
        self.families = [families] if isinstance(families, TeacherStudentMLP) else list(families)
        if not self.families:
            raise ValueError("PES needs at least one task family")
        self.config = config
        self.gen = torch.Generator().manual_seed(config.seed)
        self.theta = torch.nn.Parameter(theta0.detach().clone().float())
        self.outer = torch.optim.AdamW([self.theta], lr=config.outer_lr, weight_decay=0.0)

        def schedule(step):
            if step < config.warmup:
                return (step + 1) / config.warmup
            progress = min(1.0, (step - config.warmup) / max(1, config.outer_steps - config.warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.outer, schedule)
        self.groups = [_Particles(f, config, self.gen, step_mult, exp_mult) for f in self.families]
        self.outer_step = 0

    def state_dict(self) -> dict:
        """Everything needed to resume: meta-parameters, outer optimizer and schedule, the
        particles (task instances, inner state, accumulated perturbations) and the RNG."""
        return {
            "theta": self.theta.detach().clone(),
            # copies: torch.optim's state_dict shares its tensors (the step count among them)
            "outer": copy.deepcopy(self.outer.state_dict()),
            "schedule": copy.deepcopy(self.schedule.state_dict()),
            "groups": [g.state_dict() for g in self.groups],
            "outer_step": self.outer_step,
            "rng": self.gen.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["groups"]) != len(self.groups):
            raise ValueError(f"the saved run has {len(state['groups'])} task families, this one {len(self.groups)}")
        self.theta.copy_(state["theta"])
        self.outer.load_state_dict(state["outer"])
        self.schedule.load_state_dict(state["schedule"])
        for g, saved in zip(self.groups, state["groups"]):
            g.load_state_dict(saved)
        self.outer_step = int(state["outer_step"])
        self.gen.set_state(state["rng"])

    def step(self) -> float:
        """One outer step; returns the mean normalised inner loss of the unroll."""
        cfg = self.config
        theta = self.theta.detach()
        grad = torch.zeros(META_NUMEL)
        scores = []
        for group in self.groups:
            eps = cfg.sigma * torch.randn(cfg.pairs, META_NUMEL, generator=self.gen)
            contribution, s = group.unroll(theta, eps)
            grad += contribution
            scores.append(s)
        self.theta.grad = grad / (2 * cfg.pairs * len(self.groups) * cfg.sigma**2)
        torch.nn.utils.clip_grad_norm_([self.theta], cfg.clip)
        self.outer.step()
        self.schedule.step()
        self.outer_step += 1
        all_scores = torch.cat(scores)
        finite = all_scores[torch.isfinite(all_scores)]
        return float(finite.mean()) if len(finite) else float("nan")


@torch.no_grad()
def evaluate(family: TeacherStudentMLP, theta: Tensor, *, copies: int = 8, steps: int = 200,
             seed: int = 1234, step_mult: float = 0.001, exp_mult: float = 0.001,
             lr: float = 1.0) -> float:
    """Mean over copies of the final full-data loss after ``steps`` steps with ``theta``,
    normalised by the initial loss (same seed, same tasks for every theta)."""
    gen = torch.Generator().manual_seed(seed)
    params = family.init_params(copies, gen)
    x, y = family.make_data(copies, gen)
    inner = BatchedSmallFCLOpt(params, step_mult=step_mult, exp_mult=exp_mult)
    thetas = theta.detach().float().expand(copies, -1).contiguous()
    start = family.loss(params, x, y)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[1], (copies, family.batch), generator=gen)
        rows = torch.arange(copies).unsqueeze(1)
        with torch.enable_grad():
            loss = family.loss(params, x[rows, idx], y[rows, idx])
            grads = torch.autograd.grad(loss.sum(), params)
        inner.step(grads, thetas, lr=lr)
    return float((family.loss(params, x, y) / start).mean())
