"""Relaxed Group-wise Splitting Method (RGSM) for channel pruning.

The weights are split into groups g (``ChannelFamily`` groups: the paper's conv input-channel slices, or
coupled removable channels). With u = prox(w), one training step is

    loss + Σ_g lambda2_g·||w_g||_2        (group lasso, via ``regularize`` after backward)
    optimizer.step()
    w <- w - lr·beta·(w - u)              (``pull``, after the optimizer step)

and at every epoch end w <- u (``project``). Shaped like Torch-Pruning's regularizers: plain tensors in,
no I/O, and a ``state_dict`` so a run can be checkpointed mid-way.

The prox: u = argmin_v  Σ_g lambda1_g·[v_g ≠ 0] + (beta/2)·||v - w||²
-------------------------------------------------------------------
Within one family all groups have the same size, hence the same lambda1_g = lam. A kept group costs lam
and is best left unchanged (v_g = w_g); a dropped group costs (beta/2)·||w_g||². So for a fixed number k
of kept groups the best choice is the k largest norms, and

    cost(k) = lam·k + (beta/2)·Σ_{i > k} s_(i),     s_(1) >= s_(2) >= ... the sorted squared norms.

Unconstrained (k in 0..n) the increments lam - (beta/2)·s_(k+1) grow with k, so the minimum keeps exactly
the groups with ||w_g|| > sqrt(2·lam/beta): the paper's group hard threshold. With ``align`` a the family's
width must stay usable by the hardware: k ranges over the multiples of a (and n itself, the dense width)
that are >= ``min_keep``, and the minimiser is found by evaluating cost(k) on that set from the prefix sums
(ties go to the smaller k, which for a = 1 is the hard threshold's "<= is dropped"). ``project`` applies
the same rule, so the final widths are aligned.

The soft variant (``prox="soft"``, the reference code's unused ``rgsm_ls``) replaces the group-l0 prox by
the group-lasso one, u_g = w_g·max(||w_g|| - lambda1/beta, 0)/||w_g||: kept groups shrink too, so the
epoch-end projection biases every weight toward zero, where the hard prox leaves kept groups untouched.

Group costs: coupled groups differ in size and in what they cost (a residual channel of stage 3 spans
five conv slices, a block-internal one two; a stage-1 weight is applied at 32x32 positions, a stage-3
weight at 8x8). Family f gets a ``scale`` c_f (``groups.group_costs``: its group's MACs, or weights,
relative to an average paper group), and its groups get lambda1·c_f -- the threshold scales by sqrt(c_f).
The l0 term then prices every removed MAC (or weight) alike, and groups of iid weights with a given RMS
are judged alike whatever their size. The group lasso weight is lambda2·sqrt(c_f) (Yuan & Lin, 2006).
Without ``scales`` (the paper's grouping) every group gets lambda1 and lambda2 unchanged.

A budget instead of lambda1 (``budget``, pipeline/algorithms/budget.py): the prox keeps, per family, the k_f
groups of largest norm, with the widths k_f chosen jointly -- the least (beta/2)·Σ dropped ||w_g||² whose
network cost (MACs, parameters or latency) stays within the budget's limit -- so every projection lands inside
the budget by construction. lambda1 is then unused; lambda2 still weighs the group lasso.

Coupled groups overlap (a conv weight element belongs to its output channel's group and its input
channel's group). Each family's decision is made on the current w, and u zeroes every element that any
dropped group contains -- the exact prox for disjoint groups, its usual approximation for overlapping ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .budget import Problem, group_loss, solve
from .groups import ChannelFamily, input_channel_family


@dataclass(frozen=True)
class Budget:
    """Widths chosen jointly under a cost limit: ``problem.options[f]`` are family f's allowed widths (in the
    sparsifier's family order), ``limit`` the cost no projection may exceed, ``reference`` the dense cost."""
    problem: Problem
    limit: float
    reference: float
    kind: str = "macs"

    def widths(self, sq_norms: list[torch.Tensor], beta: float) -> list[int]:
        """The cheapest-loss widths for these group norms (ValueError if no layout fits the limit)."""
        losses = [group_loss(s.detach().double().cpu().numpy(), o, beta) for s, o in zip(sq_norms, self.problem.options)]
        choice = solve(self.problem, losses, self.limit)
        if choice is None:
            raise ValueError(f"no layout fits the {self.kind} budget {self.limit:.4g}")
        return self.problem.widths(choice)

    def cost_of(self, widths: list[int]) -> float | None:
        """The cost of a layout on the allowed widths (None when a width is not one of them)."""
        try:
            return self.problem.cost([o.index(k) for o, k in zip(self.problem.options, widths)])
        except ValueError:
            return None


def top_k_mask(sq_norms: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` groups of largest norm (ties: the earlier group)."""
    order = torch.sort(sq_norms.detach(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return rank < k


def group_hard_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero every input-channel group W[:, i] whose l2 norm is <= ``threshold``; keep the others unchanged."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    keep = (norms > threshold).to(weight.dtype)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight * keep.view(shape)


def group_soft_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The group-lasso prox: scale every input-channel group W[:, i] by max(||W[:, i]|| - threshold, 0)/||W[:, i]||."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight * soft_group_factors(norms, threshold).view(shape)


def soft_group_factors(norms: torch.Tensor, threshold) -> torch.Tensor:
    """max(||w_g|| - t, 0)/||w_g|| per group (0 for a zero group)."""
    return torch.where(norms > threshold, 1 - threshold / norms.clamp_min(1e-30), torch.zeros_like(norms))


def group_lasso_grad(weight: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Gradient of Σ_i ||W[:, i]||_2, taking the subgradient 0 at a zero group."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    scale = torch.where(norms > eps, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return weight * scale.view(shape)


def allowed_widths(n: int, align: int = 1, min_keep: int = 0) -> list[int]:
    """Kept-group counts the aligned prox may choose: multiples of ``align`` >= ``min_keep``, and ``n``."""
    return [k for k in range(n + 1) if (k % align == 0 and k >= min(min_keep, n)) or k == n]


def aligned_group_l0_keep(sq_norms: torch.Tensor, lam: float, beta: float, align: int = 1,
                          min_keep: int = 0) -> torch.Tensor:
    """Boolean mask of the groups the aligned group-l0 prox keeps (derivation in the module docstring)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if align == 1 and min_keep == 0:
        # the unconstrained case is the plain hard threshold: stay on the tensor's device (no host sync per step)
        return 0.5 * beta * sq_norms > lam
    # all on the tensor's device, k included: on a GPU no step waits for the host
    n = sq_norms.numel()
    s = sq_norms.detach().double()
    order = torch.sort(s, descending=True, stable=True).indices
    dropped_after = s.sum() - torch.cat([torch.zeros(1, dtype=s.dtype, device=s.device), torch.cumsum(s[order], 0)])
    ks = torch.tensor(allowed_widths(n, align, min_keep), device=s.device)
    cost = lam * ks.double() + 0.5 * beta * dropped_after[ks]
    k = ks[torch.argmin(cost)]   # argmin returns the first minimum: ties keep fewer groups
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=s.device)   # each group's place in the sorted order
    return rank < k


class RGSM:
    """RGSM over ``groups``: a list of ``ChannelFamily`` or, for the paper's grouping, bare conv weights."""

    def __init__(self, groups, *, beta: float, lambda1: float, lambda2: float, align: int = 1, min_keep: int = 0,
                 scales: list[float] | None = None, prox: str = "hard", budget: Budget | None = None,
                 budget_every: int = 1):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if prox not in ("hard", "soft"):
            raise ValueError(f"prox must be 'hard' (group l0) or 'soft' (group lasso), got {prox!r}")
        if prox == "soft" and (align != 1 or min_keep or budget is not None):
            raise ValueError("the soft (group-lasso) prox has no aligned variant (nor a budgeted one): use align=1, "
                             "min_keep=0, no budget")
        self.prox = prox
        self.budget = budget
        groups = list(groups)
        self.families: list[ChannelFamily] = (
            groups if all(isinstance(g, ChannelFamily) for g in groups)
            else [input_channel_family(f"weight{i}", w) for i, w in enumerate(groups)])
        self.beta = float(beta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.align = int(align)
        self.min_keep = int(min_keep)
        self.scales = [1.0] * len(self.families) if scales is None else [float(x) for x in scales]
        if len(self.scales) != len(self.families) or not all(x > 0 for x in self.scales):
            raise ValueError(f"need one positive scale per family ({len(self.families)}), got {scales!r}")
        if budget is not None and len(budget.problem.options) != len(self.families):
            raise ValueError(f"the budget has widths for {len(budget.problem.options)} families, the sparsifier "
                             f"{len(self.families)}")
        self.projections = 0
        # The budget's widths are re-solved every ``budget_every`` pulls (1: every step, exact) and at every
        # projection; in between, each family keeps its k largest groups of the current weights. A big network's
        # solve (MobileNetV2: ~0.5 s) would otherwise dominate the step.
        if budget_every < 1:
            raise ValueError(f"budget_every must be >= 1, got {budget_every}")
        self.budget_every = int(budget_every)
        self._budget_widths: list[int] | None = None
        self._pulls_since_solve = 0

    @property
    def weights(self) -> list[torch.Tensor]:
        seen = {}
        for f in self.families:
            for s in f.slices:
                seen.setdefault(id(s.tensor), s.tensor)
        return list(seen.values())

    @property
    def threshold(self) -> float:
        """The group-norm threshold of a group of scale 1: sqrt(2·lambda1/beta) (hard), lambda1/beta (soft)."""
        if self.prox == "soft":
            return self.lambda1 / self.beta
        return math.sqrt(2.0 * self.lambda1 / self.beta)

    def describe(self) -> str:
        if self.budget is not None:
            return (f"RGSM ({len(self.families)} families) to a {self.budget.kind} budget: at most "
                    f"{self.budget.limit:.6g} (dense {self.budget.reference:.6g}, "
                    f"{self.budget.reference / self.budget.limit:.3g}x less), widths chosen jointly")
        rule = f"sqrt(2*{self.lambda1}/{self.beta})" if self.prox == "hard" else \
            f"{self.lambda1}/{self.beta} (group soft threshold)"
        scaled = any(c != 1.0 for c in self.scales)
        return (f"RGSM ({len(self.families)} families, align {self.align}) threshold {rule} = {self.threshold:.4g}"
                + (" for an average paper group (scaled per family by its cost)" if scaled else ""))

    def family_thresholds(self) -> list[float]:
        # hard: the l0 price lambda1·c gives threshold sqrt(2·lambda1·c/beta); soft: a group-lasso weight
        # lambda1·sqrt(c) (Yuan & Lin) gives threshold lambda1·sqrt(c)/beta -- both scale by sqrt(c)
        return [self.threshold * math.sqrt(c) for c in self.scales]

    @torch.no_grad()
    def keep_masks(self) -> list[torch.Tensor]:
        """Per family, which groups u keeps (computed from the current w)."""
        if self.prox == "soft":
            return [f.sq_norms().sqrt() > t for f, t in zip(self.families, self.family_thresholds())]
        if self.budget is not None:
            sq = [f.sq_norms() for f in self.families]
            if self._budget_widths is None or self._pulls_since_solve >= self.budget_every:
                self._budget_widths, self._pulls_since_solve = self.budget.widths(sq, self.beta), 0
            return [top_k_mask(s, k) for s, k in zip(sq, self._budget_widths)]
        return [aligned_group_l0_keep(f.sq_norms(), self.lambda1 * c, self.beta, self.align, self.min_keep)
                for f, c in zip(self.families, self.scales)]

    @torch.no_grad()
    def group_factors(self) -> list[torch.Tensor]:
        """Per family, u_g = factor_g · w_g: 0/1 for the hard prox, the group-lasso shrink for the soft one."""
        if self.prox == "soft":
            return [soft_group_factors(f.sq_norms().sqrt(), t) for f, t in zip(self.families, self.family_thresholds())]
        return [k.to(self.families[0].slices[0].tensor.dtype) for k in self.keep_masks()]

    @torch.no_grad()
    def _u_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, factor of its shape) with u = tensor * factor."""
        masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for family, keep in zip(self.families, self.group_factors()):
            # skipping an all-kept family saves work on the CPU; on a GPU the test itself would be a host sync
            # per family and step, and multiplying by ones changes nothing
            if self.prox == "hard" and keep.device.type == "cpu" and bool(keep.all()):
                continue
            for s in family.slices:
                t, m = masks.get(id(s.tensor), (s.tensor, None))
                factor = s.along_dim(keep, fill=1.0)
                masks[id(s.tensor)] = (t, factor if m is None else m * factor)
        return list(masks.values())

    @torch.no_grad()
    def regularize(self) -> None:
        """Add ∂ Σ_g lambda2_g·||w_g|| to the gradients. Call after ``backward()``, before ``step()``."""
        if self.lambda2 == 0:
            return
        for family, c in zip(self.families, self.scales):
            norms = family.sq_norms().sqrt()
            weight = self.lambda2 * math.sqrt(c)
            scale = torch.where(norms > 0, weight / norms.clamp_min(1e-30), torch.zeros_like(norms))
            for s in family.slices:
                t = s.tensor
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
                t.grad.add_(t * s.along_dim(scale, fill=0.0))

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        """w <- w - lr·beta·(w - u): relax w toward its group-sparse copy. Call after ``optimizer.step()``."""
        for t, mask in self._u_masks():
            t.sub_(t * (1 - mask), alpha=lr * self.beta)
        self._pulls_since_solve += 1

    @torch.no_grad()
    def project(self) -> None:
        """w <- u. Call at every epoch end."""
        self._budget_widths = None   # the projection lands on a freshly solved layout
        for t, mask in self._u_masks():
            t.mul_(mask)
        self.projections += 1

    def before_batch(self) -> None:
        pass

    def end_epoch(self, last: bool = False) -> None:
        self.project()

    def kept_widths(self) -> dict[str, int]:
        """Family name -> number of nonzero groups now."""
        return {f.name: int((f.sq_norms() > 0).sum()) for f in self.families}

    def budget_status(self) -> dict:
        """The budget's cost of the current widths and dense ÷ that (after a projection the widths are a
        solved layout); empty without a budget."""
        if self.budget is None:
            return {}
        cost = self.budget.cost_of(list(self.kept_widths().values()))
        if cost is None:
            return {}
        return {f"{self.budget.kind}_cost": cost, "cost_ratio": self.budget.reference / cost}

    def state_dict(self) -> dict:
        return {"prox": self.prox, "beta": self.beta, "lambda1": self.lambda1, "lambda2": self.lambda2, "align": self.align,
                "min_keep": self.min_keep, "scales": list(self.scales), "projections": self.projections,
                **({"budget_limit": self.budget.limit} if self.budget is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.lambda1, self.lambda2 = state["beta"], state["lambda1"], state["lambda2"]
        self.prox = state.get("prox", "hard")
        self.align, self.min_keep = state.get("align", 1), state.get("min_keep", 0)
        scales = state.get("scales")
        if scales is not None and len(scales) != len(self.families):
            raise ValueError(f"state has {len(scales)} family scales, this sparsifier {len(self.families)} families")
        self.scales = [1.0] * len(self.families) if scales is None else [float(x) for x in scales]
        self.projections = state["projections"]
