"""What every CPO-step algorithm of the package shares (CPO, MetaCPO, MetaTRPO): its cost constraints, its task
distribution, the settings of its CPO updates, writing an update back into the policy and the ``train/*`` and
``rollout/*`` safety logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.utils import safe_mean

from sb3_metacpo.common.constrained_step import StepConfig, StepResult
from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.cpo_update import CPOConfig, Params
from sb3_metacpo.tasks.base import TaskDistribution, make_task_distribution

#: Cost limit of plain envs (the safety-gymnasium benchmark's standard limit), when ``cost_limit`` is not given.
DEFAULT_COST_LIMIT = 25.0


class SafeAlgorithmMixin:
    """Mixed into SB3 algorithms that update their actor by CPO steps; expects the hyperparameters as attributes."""

    cost_limit: float | Mapping[str, float] | None
    dual_solver: str
    cg_max_steps: int
    cg_damping: float
    fvp_sample_freq: int
    line_search_max_iter: int
    line_search_shrinking_factor: float
    task_distribution: TaskDistribution | None
    task_distribution_name: str | None
    task_distribution_params: dict[str, Any] | None
    ep_info_buffer: Any
    logger: Any
    _constrained: bool = True

    # --- task distribution ----------------------------------------------------------------------------------
    def _remember_task_distribution(self, distribution: TaskDistribution) -> None:
        """Keep ``distribution`` and what rebuilds it after loading (its name and parameters)."""
        self.task_distribution = distribution
        self.task_distribution_name = distribution.name
        self.task_distribution_params = distribution.get_params()

    def _get_task_distribution(self) -> TaskDistribution | None:
        if self.task_distribution is None and self.task_distribution_name is not None:
            assert self.task_distribution_params is not None
            self.task_distribution = make_task_distribution(self.task_distribution_name, **self.task_distribution_params)
        return self.task_distribution

    # --- constraints ------------------------------------------------------------------------------------------
    @property
    def constraints(self) -> CostConstraints:
        """The cost constraints: ``cost_limit`` (a float on ``info["cost"]`` or a mapping of cost names to limits),
        by default the task family's suggested limit (25 for plain envs) on ``info["cost"]``."""
        if self.cost_limit is not None:
            return CostConstraints.from_cost_limit(self.cost_limit)
        distribution = self._get_task_distribution()
        default = distribution.default_cost_limit if distribution is not None else DEFAULT_COST_LIMIT
        return CostConstraints.from_cost_limit(float(default))

    @property
    def effective_cost_limit(self) -> float:
        """The limit of the first constraint (the only one unless ``cost_limit`` is a mapping)."""
        return self.constraints.limits[0]

    def _check_constraints(self) -> None:
        """Validate ``cost_limit`` (and, for a task family, that it reports every named cost), before any env step."""
        constraints = self.constraints
        distribution = self._get_task_distribution()
        if distribution is not None:
            constraints.check_reported(distribution.cost_names, f"the task family {distribution.name}")
        if self.dual_solver == "analytic" and len(constraints) > 1:
            raise ValueError(
                f"dual_solver='analytic' is the closed form of one constraint; cost_limit names {len(constraints)}: "
                "use dual_solver='cvxpylayers' or 'auto'"
            )

    # --- the CPO updates --------------------------------------------------------------------------------------
    def _cpo_config(self, target_kl: float, n_constraints: int | None = None) -> CPOConfig:
        """The settings of a CPO update with ``n_constraints`` constraints (default: one per cost constraint), which
        decides what ``dual_solver="auto"`` picks."""
        solver = self.dual_solver
        if solver == "auto":
            count = len(self.constraints) if n_constraints is None else n_constraints
            solver = "analytic" if count == 1 else "cvxpylayers"
        step = StepConfig(
            target_kl=target_kl,
            cg_max_steps=self.cg_max_steps,
            dual_solver=solver,
            line_search_max_iter=self.line_search_max_iter,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
        )
        return CPOConfig(step, self._constrained, self.cg_damping, self.fvp_sample_freq)

    @staticmethod
    def _write_back(params: Params, new_params: Params) -> None:
        """Copy an update into the module's parameters, refusing anything non-finite (no state changes then)."""
        if not all(bool(th.isfinite(value).all()) for value in new_params.values()):
            raise FloatingPointError("an update produced non-finite parameters; the policy was left unchanged")
        with th.no_grad():
            for name, value in new_params.items():
                params[name].copy_(value)

    # --- logs ---------------------------------------------------------------------------------------------------
    def _record_step(self, result: StepResult, names: Sequence[str] | None = None, prefix: str = "train/") -> None:
        """``train/cpo_case``, ``train/lambda``, ``train/nu`` (``train/nu_<name>`` per constraint other than the
        total cost; ``names`` default to the cost constraints'), ``train/kl``, ``train/line_search_fraction``,
        ``train/n_backtracks`` (how often the line search shrank the step) and the cause of a rejected step
        (``train/step_rejection``, ``"none"`` when accepted)."""
        record = self.logger.record
        names = list(self.constraints.names if names is None else names)
        record(f"{prefix}cpo_case", result.case)
        record(f"{prefix}lambda", result.lam)
        for name, nu in zip(names, result.nu, strict=False):
            record(f"{prefix}nu" if name == "cost" else f"{prefix}nu_{name}", nu)
        record(f"{prefix}kl", 0.0 if not result.accepted else result.kl)
        record(f"{prefix}line_search_fraction", result.fraction)
        record(f"{prefix}n_backtracks", result.n_backtracks)
        record(f"{prefix}step_rejection", result.rejection or "none", exclude=("tensorboard",))

    def _record_rollout_costs(self) -> None:
        """``rollout/ep_cost_mean`` (the total cost) and ``rollout/ep_<name>_mean`` for every other constrained cost."""
        if not self.ep_info_buffer:
            return
        self.logger.record("rollout/ep_cost_mean", safe_mean([info["c"] for info in self.ep_info_buffer]))
        for name in self.constraints.names:
            values = [info["episode_costs"][name] for info in self.ep_info_buffer if name in info.get("episode_costs", {})]
            if name != "cost" and values:
                self.logger.record(f"rollout/ep_{name}_mean", float(np.mean(values)))
