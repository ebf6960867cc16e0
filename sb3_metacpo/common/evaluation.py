"""Safe evaluation: episode reward *and* cost, and meta-evaluation on held-out tasks before and after adaptation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from sb3_metacpo.common.adaptation import Adaptable
from sb3_metacpo.common.checks import (
    check,
    check_adaptation_arguments,
    check_meta_evaluation_arguments,
    check_verbose,
    is_bool,
    is_int,
)
from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.envs import make_safe_vec_env
from sb3_metacpo.tasks.base import Task
from sb3_metacpo.tasks.monitor import TOTAL_COST, episode_cost


def evaluate_safe_policy(
    model: BaseAlgorithm,
    env: gym.Env | VecEnv,
    n_eval_episodes: int = 10,
    deterministic: bool = False,
) -> tuple[float, float, float, float]:
    """Mean and standard deviation over ``n_eval_episodes`` episodes of the episode reward and of the episode cost of
    ``model`` on ``env`` (SB3's ``evaluate_policy`` with the cost beside it).

    The stochastic policy by default, as everywhere in the package: its cost is what CPO constrains (SB3's
    ``evaluate_policy`` defaults to the mean action, whose cost can be far lower; pass ``deterministic=True`` for it).
    The standard deviations are the episodes' spread (``np.std``, as SB3's), not standard errors: divide by
    √(n_eval_episodes − 1) for one. ``env`` must report ``info["cost"]``; a gymnasium env is wrapped in a
    :class:`~sb3_metacpo.tasks.monitor.CostMonitor` when it has none, a VecEnv's envs must have one already (the
    episode cost cannot be recorded from outside a VecEnv).

    :return: (mean reward, std reward, mean cost, std cost)
    """
    check(
        is_int(n_eval_episodes) and n_eval_episodes >= 1,
        f"n_eval_episodes must be a positive integer, got {n_eval_episodes!r}",
    )
    env = make_safe_vec_env(env)
    costs: list[float] = []

    def record_costs(locals_: dict[str, Any], _globals: dict[str, Any]) -> None:
        info = locals_["info"]
        if locals_["done"] and "episode" in info:
            cost = episode_cost(info)
            if cost is None:
                raise KeyError("the env reports no episode cost: wrap it in sb3_metacpo.tasks.monitor.CostMonitor")
            costs.append(cost)

    rewards, _ = evaluate_policy(
        model,
        env,
        n_eval_episodes=n_eval_episodes,
        deterministic=deterministic,
        return_episode_rewards=True,
        callback=record_costs,
        warn=False,
    )
    return float(np.mean(rewards)), float(np.std(rewards)), float(np.mean(costs)), float(np.std(costs))


@dataclass
class AdaptationRecord:
    """Performance on one held-out task after ``n_updates`` adaptation updates (0: before adaptation).

    ``adaptation_ep_cost_mean`` is the mean episode cost of the batch the ``n_updates``-th update was computed from
    (the cost paid while adapting; NaN for 0 updates and when that batch completed no episode)."""

    task: Task
    n_updates: int
    ep_rew_mean: float
    ep_cost_mean: float
    n_episodes: int
    ep_cost_sem: float = float("nan")
    ep_costs: dict[str, float] | None = None
    adaptation_ep_cost_mean: float = float("nan")


def check_tasks_of_model(model: BaseAlgorithm, tasks: Sequence[Task]) -> None:
    """The evaluation callbacks' held-out ``tasks`` are tasks of ``model``'s family (checked when training starts,
    not at the first evaluation, ``eval_freq`` iterations into training)."""
    distribution = getattr(model, "task_distribution", None)
    if distribution is None and hasattr(model, "_get_task_distribution"):
        distribution = model._get_task_distribution()
    if distribution is None:
        raise ValueError(f"the {type(model).__name__} has no task distribution to evaluate held-out tasks of")
    for task in tasks:
        distribution.validate_task(task)  # a TypeError names another family's task


def adaptable_model(model: BaseAlgorithm) -> tuple[Adaptable, CostConstraints]:
    """``model`` as an :class:`~sb3_metacpo.common.adaptation.Adaptable` algorithm and its cost constraints (every
    named cost and its limit), or a ``TypeError`` for a model of another library (e.g. SB3's PPO given to a
    meta-evaluation callback)."""
    from sb3_metacpo.common.safe_algorithm import SafeAlgorithmMixin

    if not isinstance(model, Adaptable) or not isinstance(model, SafeAlgorithmMixin):
        raise TypeError(
            f"meta-evaluation needs a model of this package (MetaCPO, MetaTRPO or CPO), got {type(model).__name__}"
        )
    return model, model.constraints


def record_costs(record: AdaptationRecord) -> dict[str, float]:
    """A record's mean episode cost by name: the total cost ``cost`` and every constrained cost."""
    return {TOTAL_COST: record.ep_cost_mean, **(record.ep_costs or {})}


def mean_costs(records: Sequence[AdaptationRecord], names: Sequence[str]) -> dict[str, float]:
    """The mean over ``records`` (e.g. tasks) of each named cost's mean episode sum."""
    return {name: float(np.mean([record_costs(record)[name] for record in records])) for name in names}


def meta_evaluate(
    model: Adaptable,
    tasks: Sequence[Task],
    n_updates: int | None = None,
    n_steps: int | None = None,
    n_eval_episodes: int = 5,
    deterministic: bool = False,
    progress_bar: bool = False,
    target_kl: float | None = None,
) -> list[AdaptationRecord]:
    """Evaluate on each task before adaptation and after every adaptation update (as garage's MetaEvaluator).

    Works for every :class:`~sb3_metacpo.common.adaptation.Adaptable` algorithm (MetaCPO, MetaTRPO, CPO).
    Adaptation starts from the model's parameters on each task and never changes them, nor the model's adapted
    parameters and ``adaptation_history`` from an earlier :meth:`~sb3_metacpo.MetaCPO.adapt`; evaluation episodes are
    separate from the adaptation batches. ``tasks`` are tasks of the model's family. The stochastic policy is
    evaluated by default, as its cost is what the CPO updates constrain. ``n_updates``, ``n_steps`` and
    ``target_kl`` (the adaptation updates' trust region) are those of
    :meth:`~sb3_metacpo.common.adaptation.AdaptationMixin.adapt` (None: the model's own): give every method of a
    comparison the same ones.

    :param model: the algorithm to adapt and evaluate
    :param tasks: tasks of the model's family
    :param n_updates: adaptation updates per task (None: the model's own)
    :param n_steps: env steps per adaptation update (None: the model's own, as ``adapt``'s: MetaCPO's ``n_steps``,
        CPO's ``n_steps * n_envs``)
    :param n_eval_episodes: evaluation episodes per task and stage
    :param deterministic: evaluate the mean action instead of the stochastic policy
    :param progress_bar: show a progress bar over the tasks
    :param target_kl: the adaptation updates' trust region (None: the model's own)
    :return: one record per task and stage (k = 0 .. n_updates), in task order
    """
    # before any adaptation changes the model
    tasks = check_meta_evaluation_arguments(tasks, n_updates, n_steps, n_eval_episodes)
    check_adaptation_arguments(None, None, target_kl)
    records = []
    history_before = list(getattr(model, "adaptation_history", []))  # the model's adapt() keeps its own history
    try:
        for task in tqdm(tasks, desc="meta-evaluating", disable=not progress_bar):
            steps = model.adaptation_steps(task, n_updates, n_steps, target_kl=target_kl)
            for k, params in steps:
                result = model.evaluate_params(task, params, n_eval_episodes, deterministic)
                history = getattr(model, "adaptation_history", [])
                paid = history[k - 1]["ep_cost_mean"] if 0 < k <= len(history) else float("nan")
                records.append(
                    AdaptationRecord(
                        task,
                        k,
                        result.ep_rew_mean,
                        result.ep_cost_mean,
                        result.n_episodes,
                        result.ep_cost_sem,
                        result.ep_costs,
                        paid,
                    )
                )
    finally:
        if hasattr(model, "adaptation_history"):
            model.adaptation_history = history_before
    return records


class MetaEvalCallback(BaseCallback):
    """Every ``eval_freq`` meta-iterations (and at the end of training), meta-evaluate on held-out tasks and log
    under ``meta_test/``.

    Logs ``meta_test/ep_rew_mean_k`` and ``meta_test/ep_cost_mean_k`` after k = 0 .. n_updates adaptation updates,
    and ``meta_test/under_limit_frac``, the fraction of tasks at or under every cost limit of the model (each named
    cost against its own limit) after the last update. As SB3's ``EvalCallback``, each evaluation is written to the
    logger's outputs (CSV, TensorBoard...) at once, at the model's current timestep (so the one at the end of
    training is written too).

    :param tasks: held-out tasks of the model's family
    :param eval_freq: evaluate every ``eval_freq`` meta-iterations (updates, for CPO)
    :param n_updates: adaptation updates per task (None: the model's own, as :meth:`~sb3_metacpo.MetaCPO.adapt`'s)
    :param n_steps: env steps per adaptation update (None: the model's own, as ``adapt``'s: MetaCPO's ``n_steps``,
        CPO's ``n_steps * n_envs``)
    :param n_eval_episodes: evaluation episodes per task and stage
    :param deterministic: evaluate the mean action instead of the stochastic policy (whose cost CPO constrains)
    :param target_kl: the adaptation updates' trust region (None: the model's own, as :meth:`~sb3_metacpo.MetaCPO.adapt`'s)
    :param verbose: SB3's verbosity
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        eval_freq: int = 10,
        n_updates: int | None = None,
        n_steps: int | None = None,
        n_eval_episodes: int = 5,
        verbose: int = 0,
        deterministic: bool = False,
        target_kl: float | None = None,
    ) -> None:
        check_verbose(verbose)
        super().__init__(verbose)
        tasks = check_meta_evaluation_arguments(tasks, n_updates, n_steps, n_eval_episodes)
        check_adaptation_arguments(None, None, target_kl)
        check(
            is_int(eval_freq) and eval_freq >= 1, f"eval_freq must be a positive integer (meta-iterations), got {eval_freq!r}"
        )
        check(is_bool(deterministic), f"deterministic must be True or False, got {deterministic!r}")
        self.tasks = tasks
        self.eval_freq = int(eval_freq)
        self.n_updates = n_updates
        self.n_steps = n_steps
        self.n_eval_episodes = int(n_eval_episodes)
        self.deterministic = bool(deterministic)
        self.target_kl = target_kl
        self.history: list[list[AdaptationRecord]] = []
        self._last_evaluated = 0

    def _init_callback(self) -> None:
        check_tasks_of_model(self.model, self.tasks)
        self._last_evaluated = self.model._n_updates  # a resumed run does not evaluate its starting point again

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        # Rollouts start after each meta-update; evaluate once per ``eval_freq`` completed meta-iterations.
        n_updates = self.model._n_updates
        if n_updates > self._last_evaluated and n_updates % self.eval_freq == 0:
            self._last_evaluated = n_updates
            self.evaluate()

    def _on_training_end(self) -> None:
        if self.model._n_updates > self._last_evaluated:
            self._last_evaluated = self.model._n_updates
            self.evaluate()

    def evaluate(self) -> list[AdaptationRecord]:
        """Meta-evaluate now and record the results in the logger."""
        model, constraints = adaptable_model(self.model)
        with th.random.fork_rng(devices=[]):  # the actors' noise seeds: training's torch stream stays as it was
            records = meta_evaluate(
                model,
                self.tasks,
                self.n_updates,
                self.n_steps,
                self.n_eval_episodes,
                deterministic=self.deterministic,
                target_kl=self.target_kl,
            )
        self.history.append(records)
        last = max(record.n_updates for record in records)
        for k in range(last + 1):
            rows = [record for record in records if record.n_updates == k]
            self.logger.record(f"meta_test/ep_rew_mean_{k}", float(np.mean([r.ep_rew_mean for r in rows])))
            self.logger.record(f"meta_test/ep_cost_mean_{k}", float(np.mean([r.ep_cost_mean for r in rows])))
        final = [record for record in records if record.n_updates == last]
        under = [constraints.satisfied_by(record_costs(record)) for record in final]  # every constraint, per task
        self.logger.record("meta_test/under_limit_frac", float(np.mean(under)))
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(self.num_timesteps)
        return records
