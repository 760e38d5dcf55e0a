"""Antithetic Persistent Evolution Strategies (PES) over small_fc_lopt's meta-parameters.

Each of K antithetic pairs (per task family) trains two copies of a task (same initialisation,
same batches) with meta-parameters ``theta + eps`` and ``theta - eps``; all 2K copies step in
one fused call (``BatchedSmallFCLOpt``). An outer step unrolls U inner steps, scores each copy
by its mean inner loss normalised by the loss at the start of its run (``objective="log"``:
the mean of its logarithm, so that a halving counts the same at every scale), and estimates
the meta-gradient as

    g = sum_k (L+_k - L-_k) xi_k / (2 K sigma^2),

where ``xi_k`` accumulates the pair's perturbations since its inner run started (this is what
makes the truncated estimate unbiased). With ``balance``, each family's differences
``L+_k - L-_k`` are divided by their root mean square over the family's pairs first, so every
family weighs the same in the meta-gradient whatever the scale of its scores. With
``weighting="late"`` the loss at step t of a run of length T counts 2t/T times (the objective
leans towards the end of training, where a step-size schedule shows). ``subset``
restricts the perturbations, hence the updates, to part of the meta-parameters.

Inner runs have log-uniform lengths and random start offsets, and restart with a new task
instance when they end. Weight reparameterisation (``reparam > 0``) trains every tensor of a
copy as ``p = s * q`` with its own ``log s ~ U(-reparam, reparam)``: the optimizer steps ``q``
and sees ``s * grad``, so the same step means a different change of the function, and the
meta-parameters cannot rely on one parameter scale. The outer optimizer is AdamW with linear
warm-up, cosine decay and gradient-norm clipping.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._layout import HIDDEN_SIZE, OUTPUT_SIZE, PACKED_NUMEL
from .batched import META_NUMEL, BatchedSmallFCLOpt
from .tasks import TeacherStudentMLP

# Meta-parameter subsets PES can train (indices into theta): everything, or the "head": the
# output layer (W2, b2) and the 7 decay offsets, 73 numbers whose effect on the step is first
# order (e.g. the weights from the schedule units to the magnitude output). Fewer perturbed
# dimensions mean a far less noisy ES estimate for the same number of pairs.
SUBSETS = {"all": slice(0, META_NUMEL),
           "head": slice(PACKED_NUMEL - (HIDDEN_SIZE + 1) * OUTPUT_SIZE, META_NUMEL)}


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
    objective: str = "log"  # "log": mean log normalised loss; "loss": mean normalised loss
    reparam: float = 0.0  # half-width of log s for the weight reparameterisation
    balance: bool = True  # normalise each family's antithetic differences by their RMS
    subset: str = "all"  # which meta-parameters are perturbed and trained: "all" or "head"
    weighting: str = "uniform"  # inner step t of a run of length T counts 1 ("uniform") or 2t/T ("late")

    def __post_init__(self):
        if self.objective not in ("log", "loss"):
            raise ValueError(f"objective must be 'log' or 'loss', got {self.objective!r}")
        for name in ("pairs", "unroll", "min_inner", "max_inner", "outer_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_inner > self.max_inner:
            raise ValueError(f"min_inner ({self.min_inner}) must be <= max_inner ({self.max_inner})")
        if self.weighting not in ("uniform", "late"):
            raise ValueError(f"weighting must be 'uniform' or 'late', got {self.weighting!r}")
        if self.subset not in SUBSETS:
            raise ValueError(f"subset must be one of {sorted(SUBSETS)}, got {self.subset!r}")
        if not self.sigma > 0 or not self.reparam >= 0:
            raise ValueError(f"sigma must be > 0 and reparam >= 0, got {self.sigma}, {self.reparam}")


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
        # Per copy and tensor: p = scale * q (all ones without reparameterisation).
        self.scales = [torch.ones((2 * k,) + (1,) * (p.dim() - 1)) for p in self.params]
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
        for p, s, f in zip(self.params, self.scales, fresh):
            if self.config.reparam > 0:
                log_s = (2 * torch.rand(n, generator=self.gen) - 1) * self.config.reparam
                s[both] = torch.exp(torch.cat([log_s, log_s])).view(-1, *s.shape[1:])
            p.data[both] = torch.cat([f, f]) / s[both]
        self.x[both] = torch.cat([x, x])
        self.y[both] = torch.cat([y, y])
        self.inner.reset(both)
        self.xi[pairs] = 0
        self.length[pairs] = self._lengths(n)
        # Random start offsets desynchronise the pairs' restarts (the first runs are shorter).
        self.t[pairs] = (torch.rand(n, generator=self.gen) * self.length[pairs]).long() if offsets else 0
        params = [(p * s)[both] for p, s in zip(self.params, self.scales)]
        self.start_loss[both] = self.family.loss(params, self.x[both], self.y[both]).clamp_min(1e-8)

    def loss(self, xb: Tensor, yb: Tensor) -> Tensor:
        """Every copy's loss on its batch, through its reparameterisation."""
        return self.family.loss([p * s for p, s in zip(self.params, self.scales)], xb, yb)

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
        for j in range(cfg.unroll):
            xb, yb = self._batch()
            with torch.enable_grad():
                loss = self.loss(xb, yb)
                grads = torch.autograd.grad(loss.sum(), self.params)
            self.inner.step(grads, thetas, lr=cfg.inner_lr)
            ratio = loss.detach() / self.start_loss
            score = ratio.clamp_min(1e-30).log() if cfg.objective == "log" else ratio
            if cfg.weighting == "late":
                score = score * (2 * (self.t + j + 1) / self.length).repeat(2)
            total += score
        scores = total / cfg.unroll
        self.xi += eps
        diff = scores[:k] - scores[k:]
        finite = torch.isfinite(diff)
        diff = torch.where(finite, diff, torch.zeros_like(diff))  # a diverged pair gives no signal
        if cfg.balance:
            # Each family's differences in units of their own RMS: families whose score moves
            # a lot (classification losses falling by decades) do not drown the others.
            diff = diff / diff.square().mean().sqrt().clamp_min(1e-12)
        contribution = (diff.unsqueeze(1) * self.xi).sum(0)
        self.t += cfg.unroll
        done = ((self.t >= self.length) | ~finite).nonzero().flatten()
        if len(done):
            self.restart(done)
        return contribution, scores

    def state_dict(self) -> dict:
        return {
            "params": [p.detach().clone() for p in self.params],
            "scales": [s.clone() for s in self.scales],
            "inner_state": [{k: v.clone() for k, v in st.items()} for st in self.inner.state],
            "inner_steps": self.inner.steps.clone(),
            "x": self.x.clone(), "y": self.y.clone(), "xi": self.xi.clone(),
            "length": self.length.clone(), "t": self.t.clone(), "start_loss": self.start_loss.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.params, state["params"]):
            p.data.copy_(v)
        for s, v in zip(self.scales, state["scales"]):
            s.copy_(v)
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
        """One outer step; returns the mean score (the meta-loss) of the unroll's copies."""
        cfg = self.config
        theta = self.theta.detach()
        grad = torch.zeros(META_NUMEL)
        scores = []
        for group in self.groups:
            eps = torch.zeros(cfg.pairs, META_NUMEL)
            part = eps[:, SUBSETS[cfg.subset]]
            part.copy_(cfg.sigma * torch.randn(part.shape, generator=self.gen))
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
    """Geometric mean over copies of the final full-data loss after ``steps`` steps with
    ``theta``, normalised by the initial loss (same seed, same tasks for every theta); a copy
    that diverged counts as infinitely bad."""
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
    return geometric_mean(family.loss(params, x, y) / start)


def geometric_mean(values: Tensor | list[float]) -> float:
    """The geometric mean of positive losses; infinite if any is not finite (a diverged run)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if not torch.isfinite(t).all():
        return float("inf")
    return float(t.clamp_min(1e-30).log().mean().exp())
