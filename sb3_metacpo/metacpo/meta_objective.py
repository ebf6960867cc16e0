"""The meta-objective of Meta-CPO, defined once: its value and its gradient for the meta-gradient, and its value at
candidate meta-parameters for the outer line search.

F(θ) = mean over tasks of the reward surrogate of the adapted policy φᵢᴷ(θ) on its validation batch. The
meta-constraints G(θ) are built from the cost surrogates L_Cj(φᵢᵏ(θ)) and constraint values b_ikj of every task i
and adaptation stage k (φᵢ⁰ = θ; stage k's batch was collected by φᵢᵏ, stage K's is the validation batch), one
set per cost signal j, according to ``mode``:

* ``"mean"`` (the paper's): the mean over tasks of the post-adaptation constraint value, one constraint per cost;
  θ itself and the intermediate policies are not constrained, and violations on some tasks average out with
  slack on others.
* ``"stages"``: the mean over tasks at *every* stage, K + 1 constraints per cost: what a user pays before and
  during adaptation is constrained too.
* ``"stages_cvar"``: at every stage, the mean over the worst ⌈α·M⌉ tasks (by constraint value, a CVaR over tasks):
  a tail measure, so that the tasks that violate are not averaged away by the others.

Each constraint's value is b = b(data) + L − L(data) with the mean (or CVaR) taken alike of both, so its gradient
is that of the aggregated cost surrogates (for the CVaR, with the selected tasks held fixed; the outer line search
evaluates its candidates with the same tasks, so that b(θ) + L(candidate) − L(θ) is that function's value).

φᵢᴷ(θ) is the replay of task i's stored inner updates from θ on its stored batches with the stored line-search
fractions (:func:`~sb3_metacpo.common.cpo_update.replay_updates`): exactly differentiable in second-order mode; in
first-order mode the update Jacobian is the identity, so φᵢᴷ(θ + Δ) = φᵢᴷ(θ) + Δ, the objective whose gradient the
first-order meta-gradient is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch as th

from sb3_metacpo.common.constrained_step import CostScales, StepResult
from sb3_metacpo.common.cpo_update import (
    ActorFn,
    CPOConfig,
    FisherFn,
    Params,
    PreparedBatch,
    add_flat,
    constraint_values,
    cost_scales,
    detached,
    replay_updates,
    surrogates,
)

META_CONSTRAINT_MODES = ("mean", "stages", "stages_cvar")


@dataclass
class TaskAdaptation:
    """One task's inner loop in a meta-iteration.

    :ivar stages: the parameters φ⁰ = θ, φ¹, …, φᴷ (in second-order mode with their graph back to θ)
    :ivar batches: the batch each stage collected: K inner batches, then the validation batch of φᴷ
    :ivar fractions: the accepted line-search fraction of each inner update
    :ivar steps: each inner update's step result (for logging)
    """

    stages: list[Params]
    batches: list[PreparedBatch]
    fractions: list[float] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)


@dataclass(frozen=True)
class MetaValue:
    """The meta-objective at some meta-parameters: F (scalar), the meta-constraint surrogates L (c,) and the
    meta-constraint values b (c,), which carry the gradient of L (b = b(data) + L − L(data)).

    ``reward_terms`` (one per task) and ``cost_terms`` (per task and constrained stage, (m,)) are the terms F and L
    aggregate, stacked into ``reward_stack`` (tasks,) and ``cost_stack`` (tasks, stages, m); kept for
    :meth:`MetaObjective.gradients`."""

    reward: th.Tensor
    cost_surrogates: th.Tensor
    constraints: th.Tensor
    reward_stack: th.Tensor
    cost_stack: th.Tensor
    reward_terms: tuple[th.Tensor, ...]
    cost_terms: tuple[tuple[th.Tensor, ...], ...]
    #: (c,) the outer step recovers whenever a constraint value exceeds its margin, aggregated over tasks as the
    #: constraint values are (None: CPO's rule; see ``prepare_batch``'s ``recovery``)
    recovery_margins: th.Tensor | None = None
    #: ``"stages_cvar"``: the tasks the CVaR averages, (⌈α·M⌉, stages, m) indices into the tasks (None otherwise)
    selection: th.Tensor | None = None


class MetaObjective:
    """F(θ) and G(θ) of one meta-iteration's tasks (see the module docstring).

    :param actor: the functional actor
    :param tasks: the meta-iteration's inner loops, in task order
    :param inner_config: the inner updates' settings (to replay them)
    :param second_order: exact meta-gradient through the inner updates (else the identity Jacobian)
    :param fisher: the Fisher-vector products of the inner updates
    :param mode: how the meta-constraints are built (:data:`META_CONSTRAINT_MODES`)
    :param cvar_alpha: the share of tasks ``"stages_cvar"`` averages over (the worst ones)
    :param cost_names: names of the cost signals (for :attr:`constraint_names`)
    """

    def __init__(
        self,
        actor: ActorFn,
        tasks: Sequence[TaskAdaptation],
        inner_config: CPOConfig,
        *,
        second_order: bool,
        fisher: FisherFn | None,
        mode: str = "mean",
        cvar_alpha: float = 0.5,
        cost_names: Sequence[str] = ("cost",),
    ) -> None:
        if mode not in META_CONSTRAINT_MODES:
            raise ValueError(f"Unknown meta-constraint mode {mode!r}; expected one of {META_CONSTRAINT_MODES}")
        if not 0 < cvar_alpha <= 1:
            raise ValueError(f"cvar_alpha must be in (0, 1], got {cvar_alpha!r}")
        self.actor, self.tasks, self.inner_config = actor, list(tasks), inner_config
        self.second_order, self.fisher, self.mode, self.cvar_alpha = second_order, fisher, mode, cvar_alpha
        n_stages = len(self.tasks[0].stages) if self.tasks else 1
        self.stages = [n_stages - 1] if mode == "mean" else list(range(n_stages))
        #: One name per meta-constraint, in order: the cost name, prefixed by its stage except in ``"mean"`` mode.
        self.constraint_names = [
            name if mode == "mean" else f"stage{stage}_{name}" for stage in self.stages for name in cost_names
        ]

    def value(self, stages_per_task: Sequence[Sequence[Params]], selection: th.Tensor | None = None) -> MetaValue:
        """F, L and b at the given stage parameters of every task (the live ones, or those of a candidate θ).

        ``selection`` (``"stages_cvar"``): the tasks to average, e.g. the live value's, so that a candidate's b and L
        are those of the function whose gradient the outer step follows, with θ's worst tasks held fixed (None: the
        worst tasks at these parameters)."""
        rewards, costs, constraints = [], [], []  # costs/constraints: [task][stage] -> (m,)
        for task, stages in zip(self.tasks, stages_per_task, strict=True):
            task_costs, task_constraints = [], []
            for stage in self.stages:
                reward, cost = surrogates(self.actor, stages[stage], task.batches[stage])
                task_costs.append(cost)
                task_constraints.append(constraint_values(task.batches[stage], cost))
            rewards.append(reward)  # the last stage's: the validation batch of φᴷ
            costs.append(tuple(task_costs))
            constraints.append(th.stack(task_constraints))
        reward_stack, cost_stack = th.stack(rewards), th.stack([th.stack(task_costs) for task_costs in costs])
        cost, constraint = cost_stack, th.stack(constraints)  # (tasks, stages, m)
        margins = [[task.batches[stage].recovery_margin for stage in self.stages] for task in self.tasks]
        margin = None
        if not any(value is None for stage_margins in margins for value in stage_margins):
            margin = th.as_tensor(np.asarray(margins, dtype=np.float64), dtype=constraint.dtype, device=constraint.device)
        worst = None
        if self.mode == "stages_cvar":
            n_worst = max(1, math.ceil(self.cvar_alpha * len(self.tasks)))
            worst = constraint.detach().argsort(dim=0, descending=True)[:n_worst] if selection is None else selection
            cost, constraint = cost.gather(0, worst), constraint.gather(0, worst)
            margin = None if margin is None else margin.gather(0, worst)
        return MetaValue(
            reward_stack.mean(),
            cost.mean(0).reshape(-1),
            constraint.mean(0).reshape(-1),
            reward_stack,
            cost_stack,
            tuple(rewards),
            tuple(costs),
            None if margin is None else margin.mean(0).reshape(-1),
            worst,
        )

    def gradients(self, value: MetaValue, theta: Sequence[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """dF/dθ and the rows dL_c/dθ: one vector-Jacobian product per scalar, never a loop over parameters.

        Each product starts from the per-task terms its scalar depends on, weighted by the aggregation's derivative
        (a cheap backward through the mean or the CVaR's selection): a backward from the aggregate itself would also
        run, with zero cotangents, through every other term's graph, e.g. through every task's inner updates for the
        constraint on θ's own cost. The same vector-Jacobian products, summed in another order."""
        theta = list(theta)
        # The weights come from the stacks; the products start from the terms themselves (indexing a stack would
        # lead the backward through the stack to every term again).
        (reward_weights,) = th.autograd.grad(value.reward, value.reward_stack, retain_graph=True)
        reward_grad = _weighted_grad(list(zip(value.reward_terms, reward_weights, strict=True)), theta)
        rows = []
        for cost in value.cost_surrogates:
            (weights,) = th.autograd.grad(cost, value.cost_stack, retain_graph=True)
            terms = [
                (term, weights[i, k])
                for i, task_terms in enumerate(value.cost_terms)
                for k, term in enumerate(task_terms)
                if bool(weights[i, k].any())
            ]
            rows.append(_weighted_grad(terms, theta))
        return reward_grad, th.stack(rows) if rows else reward_grad.new_zeros(0, reward_grad.numel())

    def constraint_scales(self) -> CostScales:
        """The size of each meta-constraint's cost signal, in the order of :attr:`constraint_names`: that cost's, over
        its stage's batches of every task (:func:`~sb3_metacpo.common.cpo_update.cost_scales`)."""
        per_stage = [cost_scales([task.batches[stage] for task in self.tasks]) for stage in self.stages]
        return CostScales(th.cat([s.signal for s in per_stage]), th.cat([s.advantages for s in per_stage]))

    def stages_at(self, theta: Params, step: th.Tensor) -> list[list[Params]]:
        """Every task's stage parameters at the candidate θ + ``step`` (no graph kept)."""
        if not self.second_order:  # the inner steps held fixed
            return [[add_flat(detached(params), step) for params in task.stages] for task in self.tasks]
        candidate = add_flat(detached(theta), step)
        with th.enable_grad():  # the replayed updates differentiate their surrogates (not the result)
            return [
                [
                    detached(params)
                    for params in replay_updates(
                        self.actor,
                        candidate,
                        task.batches[:-1],
                        self.inner_config,
                        task.fractions,
                        differentiable=False,
                        fisher=self.fisher,
                    )
                ]
                for task in self.tasks
            ]


def _weighted_grad(terms: Sequence[tuple[th.Tensor, th.Tensor]], theta: list[th.Tensor]) -> th.Tensor:
    """Σ wᵀ d(term)/dθ over the ``(term, w)`` pairs, flat (zeros where no term depends on a parameter)."""
    used = [(term, weight) for term, weight in terms if term.requires_grad]
    if not used:
        return th.cat([param.detach().new_zeros(param.numel()) for param in theta])
    grads = th.autograd.grad(
        [term for term, _ in used], theta, [weight for _, weight in used], retain_graph=True, allow_unused=True
    )
    return th.cat([(th.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(theta, grads, strict=True)])
