"""Adaptation to one task by a few CPO updates, as every algorithm of the package offers it (the ``Adaptable``
protocol, after garage's meta-evaluator, which asks an algorithm for its exploration policy and its adapted policy):

* :meth:`~AdaptationMixin.adaptation_steps` yields the parameters after 0, 1, …, K updates on a task;
* :meth:`~AdaptationMixin.evaluate_params` evaluates any of them on fresh episodes (reward *and* cost);
* :meth:`~AdaptationMixin.adapt` keeps the adapted parameters for ``predict``; :meth:`~AdaptationMixin.reset_adaptation`
  forgets them.

Adaptation never changes the model's own parameters. MetaCPO and MetaTRPO adapt their meta-policy (with their inner
settings); CPO adapts its policy (fine-tuning by the same CPO updates), so benchmarks treat every method alike.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from sb3_metacpo.common.checks import check, check_adaptation_arguments, check_callback, is_bool, is_int
from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.cpo_update import CPOConfig, Params, PreparedBatch, cpo_update
from sb3_metacpo.common.envs import make_safe_vec_env, vec_env_time_limit
from sb3_metacpo.common.policies import CPOPolicy, NumpyActor
from sb3_metacpo.common.rollouts import CollectionStopped, OnStep, RolloutSampler, TaskBatch, VecStep
from sb3_metacpo.common.threads import with_limited_blas_threads
from sb3_metacpo.tasks.base import Task, TaskDistribution, list_task_distributions, make_task_distribution
from sb3_metacpo.tasks.monitor import TOTAL_COST

SelfAdaptable = TypeVar("SelfAdaptable", bound="AdaptationMixin")
#: What adaptation and evaluation accept as a task (an env, a VecEnv, a task of the model's family or a family name).
AdaptationEnv = gym.Env | VecEnv | Task | str


@dataclass(frozen=True)
class PolicyEvaluation:
    """Episode statistics of one policy on one task.

    :ivar ep_rew_mean: mean undiscounted episode return
    :ivar ep_cost_mean: mean undiscounted episode cost (``info["cost"]``)
    :ivar n_episodes: completed episodes
    :ivar ep_cost_sem: standard error of ``ep_cost_mean``
    :ivar ep_costs: mean episode sum of every constrained cost, by name
    :ivar episode_costs: the total cost of every episode
    :ivar episode_rewards: the return of every episode
    """

    ep_rew_mean: float
    ep_cost_mean: float
    n_episodes: int
    ep_cost_sem: float
    ep_costs: dict[str, float] = field(default_factory=dict)
    episode_costs: tuple[float, ...] = ()
    episode_rewards: tuple[float, ...] = ()


@runtime_checkable
class Adaptable(Protocol):
    """An algorithm that adapts to a task and evaluates its policies: what meta-evaluation needs."""

    def adaptation_steps(
        self,
        env: AdaptationEnv,
        n_updates: int | None = None,
        n_steps: int | None = None,
        on_step: OnStep | None = None,
        target_kl: float | None = None,
    ) -> Iterator[tuple[int, Params]]: ...

    def evaluate_params(
        self, env: AdaptationEnv, params: Params, n_episodes: int = 5, deterministic: bool = False
    ) -> PolicyEvaluation: ...

    def adaptation_settings(
        self, n_updates: int | None = None, n_steps: int | None = None, target_kl: float | None = None
    ) -> tuple[int, int, float]: ...


def step_locals(step: VecStep) -> dict[str, Any]:
    """The ``locals`` SB3 callbacks read at an env step (as in SB3's ``collect_rollouts``)."""
    return {
        "obs": step.obs,
        "actions": step.actions,
        "new_obs": step.new_obs,
        "rewards": step.rewards,
        "dones": step.dones,
        "infos": step.infos,
        "n_steps": step.t,
        "task_indices": step.task_indices,
    }


class AdaptationMixin(ABC):
    """The adaptation API of an algorithm with a :class:`~sb3_metacpo.common.policies.CPOPolicy` (mixed into CPO and
    MetaCPO)."""

    policy: CPOPolicy
    seed: int | None
    observation_space: gym.Space
    action_space: gym.Space
    device: th.device
    adapted_params: Params | None
    adaptation_history: list[dict[str, Any]]
    _adaptation_sampler_cache: RolloutSampler | None
    #: a loaded model's adaptation episode stream, continued by the first cached sampler (then None)
    _saved_adaptation_streams: list[dict[str, Any]] | None = None
    env: VecEnv | None
    num_timesteps: int
    verbose: int
    logger: Logger
    #: the model's own env while :meth:`adapt` shows the adaptation's as ``env`` (what a save inside it describes)
    _training_env: VecEnv | None = None
    #: while :meth:`adapt` runs, the adaptation history from before the call (what ``save`` writes meanwhile)
    _history_before_adapt: list[dict[str, Any]] | None = None

    # Provided by the algorithm.
    constraints: CostConstraints
    task_distribution: TaskDistribution | None

    @abstractmethod
    def _adaptation_defaults(self) -> tuple[int, int]:
        """(updates, env steps per update) of :meth:`adapt` when not given."""

    @abstractmethod
    def _adaptation_config(self, target_kl: float | None = None) -> CPOConfig:
        """The settings of the adaptation updates (MetaCPO: its inner ones; CPO: its own), with the trust region
        ``target_kl`` if given."""

    @abstractmethod
    def _prepare_adaptation_batch(self, batch: TaskBatch, params: Params, episode_length: int) -> PreparedBatch:
        """Advantages and constraint values of an adaptation batch (each algorithm picks its baseline)."""

    # --- acting -----------------------------------------------------------------------------------------------
    def _act_fn(self, params_per_task: Sequence[Params], deterministic: bool = False) -> NumpyActor:
        """The sampler's policy: one batched forward for all envs, each env acting with its task's parameters (a
        picklable :class:`~sb3_metacpo.common.policies.NumpyActor`; its noise seed is drawn from torch's generator
        now, and each env's noise is decided by that seed and the env's index, whichever process runs it)."""
        stacked = {name: th.stack([params[name].detach() for params in params_per_task]) for name in params_per_task[0]}
        return self.policy.numpy_actor_sets(stacked, deterministic)

    # --- adaptation -------------------------------------------------------------------------------------------
    @with_limited_blas_threads
    def adapt(
        self: SelfAdaptable,
        env: AdaptationEnv,
        n_updates: int | None = None,
        n_steps: int | None = None,
        callback: MaybeCallback = None,
        progress_bar: bool = False,
        target_kl: float | None = None,
    ) -> SelfAdaptable:
        """Run ``n_updates`` CPO updates from the model's parameters on ``env`` and act with the result in ``predict``.

        The model's own parameters are not changed (call :meth:`reset_adaptation` to act with them again). The
        per-update statistics are in ``adaptation_history``: for each update, the batch it used (collected by
        the policy before the update): mean episode reward and cost (NaN when the batch completed no episode), the
        CPO case, the accepted fraction and the KL.
        If anything fails, the model is left as it was: its adapted parameters, ``predict`` and
        ``adaptation_history`` are those from before the call.

        Callbacks get SB3's ``locals`` at every env step (``obs``, ``actions``, ``new_obs``, ``rewards``, ``dones``,
        ``infos``); one that returns False stops the adaptation after the updates completed so far, which
        ``predict`` then uses (none completed: the model's own parameters). While the model adapts, its env
        (``get_env()``, the callbacks' ``training_env``) is the adaptation's one-env VecEnv, and ``locals`` hold
        ``total_timesteps`` (``num_timesteps`` plus the steps of the call) for SB3's ``ProgressBarCallback``. What
        they record with ``self.logger`` is written when ``adapt`` returns (one dump at the model's
        ``num_timesteps``, which adaptation does not advance); a model without a logger yet (never trained, or just
        loaded) gets SB3's default one (standard output at ``verbose >= 1``). ``learn`` forgets an adaptation.

        Random streams: on tasks of the model's family the episodes come from one stream of the model's (seeded from
        its seed), which goes on from one adaptation or evaluation to the next and is saved with the model; the action
        noise is seeded from torch's global generator, as SB3's stochastic ``predict`` samples from it: seeding torch
        makes an adaptation reproducible, and an adaptation between two ``learn`` calls changes the rest of training
        as any other use of that generator does.

        :param env: a gymnasium env reporting ``info["cost"]``, or a VecEnv whose envs are wrapped in
            :class:`~sb3_metacpo.tasks.monitor.CostMonitor` (e.g. built with a distribution's ``make_env``: the
            episode cost cannot be recorded from outside a VecEnv) (not the model's own training env, which
            adaptation would reset and step under the training run), a registered gymnasium id (e.g.
            ``"SafetyPointGoal1Gymnasium-v0"``), a task of the model's family, or the name of a registered family
            (its first held-out task: for the model's own family, that of the model's distribution, with its
            ``test_seed`` and ranges; a model built on an env adapts on that task's env)
        :param n_updates: CPO updates (default: the algorithm's, e.g. MetaCPO's ``n_inner_updates``)
        :param n_steps: env steps per update (default: the algorithm's, MetaCPO's ``n_steps``, CPO's
            ``n_steps * n_envs``, the env steps of one of its training updates)
        :param callback: SB3 callback(s), called at every env step
        :param progress_bar: show a progress bar over the updates
        :param target_kl: the updates' trust region (default: the algorithm's, MetaCPO's ``inner_target_kl``, CPO's
            ``target_kl``), e.g. one for every method of a comparison
        """
        check_adaptation_arguments(n_updates, n_steps, target_kl)  # before the callbacks start
        check_callback(callback)
        check(is_bool(progress_bar), f"progress_bar must be True or False, got {progress_bar!r}")
        n_updates, n_steps = self._adaptation_sizes(n_updates, n_steps)
        sampler, task = self._adaptation_sampler(env)
        history_before = list(self.adaptation_history)
        self._history_before_adapt = history_before  # a save from a callback writes the model as it was before
        # While it adapts, the model's env is the adaptation's, whose steps the callbacks are shown: SB3's callbacks
        # read it (training_env) at every step, e.g. StopTrainingOnMaxEpisodes counts episodes per env of it
        self._training_env, self.env = self.env, sampler.vec_env
        self._ensure_logger()
        try:
            callbacks: BaseCallback = self._init_callback(callback, progress_bar=False)  # type: ignore[attr-defined]
            total_timesteps = self.num_timesteps + n_updates * n_steps  # SB3's callbacks read it in locals()
            callbacks.on_training_start(locals(), globals())

            def on_step(step: VecStep) -> bool:
                callbacks.update_locals({"self": self, **step_locals(step)})
                return callbacks.on_step()

            steps = self._adaptation_steps(sampler, task, n_updates, n_steps, on_step, target_kl)
            adapted: Params | None = None
            for _, params in tqdm(steps, total=n_updates + 1, desc="adapting", disable=not progress_bar):
                adapted = params
            callbacks.on_training_end()
        except BaseException:
            self.adaptation_history = history_before
            self.logger.name_to_value.clear()  # what the callbacks recorded: not left for the next learn's logs
            self.logger.name_to_count.clear()
            self.logger.name_to_excluded.clear()
            raise
        finally:
            self.env, self._training_env = self._training_env, None
            self._history_before_adapt = None
        self.adapted_params = adapted
        self.policy.set_actor_override(adapted)
        if self.logger.name_to_value:  # what the callbacks recorded, written now (not in the next learn's row)
            self.logger.dump(step=self.num_timesteps)
        return self

    def _ensure_logger(self) -> None:
        """Give a model that has no logger yet (never trained, or just loaded) SB3's default one: standard output at
        ``verbose >= 1``, else none (callbacks of ``adapt`` may record). Not a custom logger: ``learn`` still
        configures its own."""
        if getattr(self, "_logger", None) is None:
            outputs: list[KVWriter] = [HumanOutputFormat(sys.stdout)] if self.verbose >= 1 else []
            self._logger = Logger(folder=None, output_formats=outputs)

    @with_limited_blas_threads
    def adaptation_steps(
        self,
        env: AdaptationEnv,
        n_updates: int | None = None,
        n_steps: int | None = None,
        on_step: OnStep | None = None,
        target_kl: float | None = None,
    ) -> Iterator[tuple[int, Params]]:
        """Yield ``(k, parameters after k updates)`` for k = 0 .. n_updates, adapting from the model's parameters.

        ``adaptation_history`` is rebuilt along the way. Nothing else of the model changes (not even ``predict``).
        ``on_step`` gets every env step (a :class:`~sb3_metacpo.common.rollouts.VecStep`); if it returns False
        the iteration ends after the updates completed so far. ``n_updates``, ``n_steps`` and ``target_kl`` as in
        :meth:`adapt`. The arguments are checked and the env is set up at the call, before the first value is asked
        for.
        """
        check_adaptation_arguments(n_updates, n_steps, target_kl)
        n_updates, n_steps = self._adaptation_sizes(n_updates, n_steps)
        sampler, task = self._adaptation_sampler(env)
        return self._adaptation_steps(sampler, task, n_updates, n_steps, on_step, target_kl)

    def adaptation_settings(
        self, n_updates: int | None = None, n_steps: int | None = None, target_kl: float | None = None
    ) -> tuple[int, int, float]:
        """The updates, env steps per update and trust region an adaptation given these arguments uses (None stands
        for the algorithm's own, as in :meth:`adapt`)."""
        check_adaptation_arguments(n_updates, n_steps, target_kl)
        n_updates, n_steps = self._adaptation_sizes(n_updates, n_steps)
        return n_updates, n_steps, float(self._adaptation_config(target_kl).step.target_kl)

    def _adaptation_sizes(self, n_updates: int | None, n_steps: int | None) -> tuple[int, int]:
        """``n_updates`` and ``n_steps`` of an adaptation, None standing for the algorithm's own."""
        default_updates, default_steps = self._adaptation_defaults()
        return (
            default_updates if n_updates is None else int(n_updates),
            default_steps if n_steps is None else int(n_steps),
        )

    @with_limited_blas_threads
    def _adaptation_steps(
        self,
        sampler: RolloutSampler,
        task: Task | None,
        n_updates: int,
        n_steps: int,
        on_step: OnStep | None,
        target_kl: float | None,
    ) -> Iterator[tuple[int, Params]]:
        """:meth:`adaptation_steps` on the one-env sampler of the env to adapt to (``task``: its task, if any)."""
        # J_C of a batch without a completed episode is its mean step cost times the episode length.
        distribution = self.task_distribution
        fallback = distribution.max_episode_steps if distribution is not None else n_steps
        episode_length = self._sampler_episode_length(sampler, fallback)
        params = {name: value.detach().clone() for name, value in self.policy.actor_params().items()}
        config = self._adaptation_config(target_kl)
        history: list[dict[str, Any]] = []
        self.adaptation_history = history
        yield 0, params
        for k in range(1, n_updates + 1):
            try:
                (batch,) = sampler.collect([task], self._act_fn([params]), n_steps, on_step)
            except CollectionStopped:
                return
            prepared = self._prepare_adaptation_batch(batch, params, episode_length)
            new_params, result = cpo_update(
                self.policy.actor_mean_log_std, params, prepared, config, fisher=self.policy.fisher_product
            )
            params = {name: value.detach() for name, value in new_params.items()}
            # Episode means of the batch; NaN, all three, when it completed no episode (the update then used the
            # step means times the episode length, which are not episode means)
            completed = bool(batch.episodes)
            history.append(
                {
                    "update": k,
                    "ep_rew_mean": prepared.episode_reward if completed else float("nan"),
                    "ep_cost_mean": float(batch.episode_costs.mean()) if completed else float("nan"),
                    "ep_costs": {
                        name: cost if completed else float("nan")
                        for name, cost in zip(self.constraints.names, prepared.episode_costs.tolist(), strict=True)
                    },
                    "n_episodes": prepared.n_episodes,
                    "cost_limit": self.constraints.limit_of(TOTAL_COST),  # None if only named costs are limited
                    "cpo_case": result.case,
                    "fraction": result.fraction,
                    "kl": result.kl,
                    "rejection": result.rejection,
                }
            )
            yield k, params

    @with_limited_blas_threads
    def evaluate_params(
        self,
        env: AdaptationEnv,
        params: Params,
        n_episodes: int = 5,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> PolicyEvaluation:
        """Episode reward and cost of the actor at ``params`` over at least ``n_episodes`` fresh episodes (the
        stochastic policy by default: its cost is what the CPO updates constrain).

        :param env: what :meth:`adapt` takes (an env, a VecEnv, a task of the model's family or a family name)
        :param params: actor parameters, e.g. from :meth:`adaptation_steps` or ``policy.actor_params()``
        :param n_episodes: the least number of completed episodes (each env of a VecEnv runs whole episodes)
        :param deterministic: act with the mean action instead of sampling
        :param seed: evaluate on the episodes of this seed (a fresh env stream: every model given the same seed sees
            the same start states); None: for a task of the model's family, the model's own adaptation stream goes
            on (new start states); for an env object, the env is seeded with the model's seed at every call, so the
            start states are those of every other call with ``seed=None`` (:meth:`adapt`'s first batch included):
            pass a seed of its own for evaluation episodes apart from the adaptation's
        """
        if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
            raise ValueError(f"n_episodes must be a positive integer, got {n_episodes!r}")
        if not (seed is None or (is_int(seed) and 0 <= seed < 2**63)):  # it seeds the episode streams only
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self._check_actor_params(params)
        sampler, task = self._adaptation_sampler(env, fresh_seed=seed)
        act = self._act_fn([params], deterministic=deterministic)
        try:
            # each of the sampler's envs runs whole episodes of its share of the steps: enough for n_episodes in all
            per_env = math.ceil(int(n_episodes) / sampler.vec_env.num_envs)
            n_steps = per_env * sampler.vec_env.num_envs * self._sampler_episode_length(sampler)
            (batch,) = sampler.collect([task], act, n_steps)
        finally:
            if seed is not None and isinstance(env, (Task, str)):
                sampler.close()
        costs = batch.episode_costs
        sem = float(costs.std(ddof=1) / np.sqrt(len(costs))) if len(costs) > 1 else float("nan")
        per_name = batch.episode_constraint_costs.mean(0) if batch.episodes else np.full(len(self.constraints), np.nan)
        return PolicyEvaluation(
            ep_rew_mean=float(batch.episode_rewards.mean()),
            ep_cost_mean=float(costs.mean()),
            n_episodes=len(batch.episodes),
            ep_cost_sem=sem,
            ep_costs=dict(zip(self.constraints.names, per_name.tolist(), strict=True)),
            episode_costs=tuple(costs.tolist()),
            episode_rewards=tuple(batch.episode_rewards.tolist()),
        )

    def _check_actor_params(self, params: Any) -> None:
        """``params`` are finite actor parameters with the actor's names and shapes (else a ``ValueError`` naming
        the problem, before any env step)."""
        expected = self.policy.actor_params()
        if not isinstance(params, Mapping) or set(params) != set(expected):
            given = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(
                f"params must map the actor's parameter names {sorted(expected)} to tensors (e.g. from "
                f"adaptation_steps or policy.actor_params()), got {given}"
            )
        for name, value in expected.items():
            given = params[name]
            if not isinstance(given, th.Tensor) or given.shape != value.shape:
                shape = tuple(given.shape) if isinstance(given, th.Tensor) else type(given).__name__
                raise ValueError(f"params[{name!r}] must be a tensor of shape {tuple(value.shape)}, got {shape}")
            if not bool(th.isfinite(given).all()):
                raise ValueError(f"params[{name!r}] has non-finite values: the actor cannot act with them")

    def reset_adaptation(self) -> None:
        """Forget the adapted parameters: ``predict`` acts with the model's own parameters again."""
        self.adapted_params = None
        self.adaptation_history = []
        self.policy.set_actor_override(None)

    def close(self) -> None:
        """Release the envs and workers the model built for its own sampling: the adaptations' sampler and, for MetaCPO
        and MetaTRPO, the training sampler (its VecEnv, its ``SubprocVecEnv`` workers or its Ray actors, which hold
        Ray's CPUs until then). The model stays usable and its episode streams go on: the next ``learn``, ``adapt`` or
        evaluation builds fresh samplers that continue them, so a run with a ``close`` in between gives the run
        without it, and ``save`` after ``close`` keeps the streams. Until then MetaCPO's ``get_env()`` is None. CPO's
        training env (also one it built from an id or a family) and an env given to ``adapt`` are not closed, as SB3
        never closes a model's env: ``model.get_env().close()`` when done training."""
        cache = self._adaptation_sampler_cache
        if cache is not None:
            self._saved_adaptation_streams = cache.episode_rng_states()
            self._adaptation_sampler_cache = None
            cache.close()

    def _forget_adaptation_episodes(self) -> None:
        """Close the adaptations' sampler and drop their episode stream: another family's adaptations start their
        own (from the model's seed)."""
        if self._adaptation_sampler_cache is not None:
            self._adaptation_sampler_cache.close()
        self._adaptation_sampler_cache = self._saved_adaptation_streams = None

    def _adaptation_rng_states(self) -> list[dict[str, Any]] | None:
        """The episode stream of the adaptations on tasks of the model's family (they share one one-env sampler, whose
        episodes go on from one adaptation or evaluation to the next), for an archive: None before the first."""
        cache = self._adaptation_sampler_cache
        return cache.episode_rng_states() if cache is not None else self._saved_adaptation_streams

    # --- the env of an adaptation ---------------------------------------------------------------------------------
    @staticmethod
    def _sampler_episode_length(sampler: RolloutSampler, fallback: int | None = None) -> int:
        """The episode length of the sampler's envs: the family's, the env's time limit, else ``fallback``."""
        if sampler.distribution is not None:
            return sampler.distribution.max_episode_steps
        limit = vec_env_time_limit(sampler.vec_env)
        if limit is not None:
            return limit
        if fallback is None:
            raise ValueError("cannot tell the episode length of this env: give it a TimeLimit (max_episode_steps)")
        return fallback

    def _adaptation_sampler(self, env: AdaptationEnv, fresh_seed: int | None = None) -> tuple[RolloutSampler, Task | None]:
        """A one-env sampler for ``env`` (cached for tasks of the model's family: each env runs whole episodes; a new
        one seeded with ``fresh_seed`` when given)."""
        seed = (0 if self.seed is None else self.seed) if fresh_seed is None else fresh_seed
        names = self.constraints.names
        if isinstance(env, str):
            own = self.task_distribution
            if own is not None and own.name == env:  # the model's family: its distribution's first held-out task
                env = own.test_tasks(1)[0]
            elif env in list_task_distributions():  # another family's first held-out task (refused below as a task
                family = make_task_distribution(env)  # of another family; a model built on an env adapts on its env)
                task = family.test_tasks(1)[0]
                env = task if own is not None else family.make_env(task)
            else:
                env = make_safe_vec_env(env)  # a registered gymnasium id, e.g. a standard safety-gymnasium one
        if env is not None and env is self.env:
            raise ValueError(
                "adapt and evaluate_params need another env than the model's own training env: they reset and step "
                "it, under the training run (whose next learn would go on from an observation the env left); pass a "
                "new env built the same way, or a task of the model's family"
            )
        if isinstance(env, Task):
            distribution = self.task_distribution
            if distribution is None:
                raise ValueError("this model has no task distribution: pass an env instead of a task")
            if not isinstance(env, distribution.task_cls):
                raise TypeError(f"a {type(env).__name__} is not a task of the model's family {distribution.name}")
            distribution.validate_task(env)
            if fresh_seed is not None:
                return RolloutSampler(distribution, n_envs=1, seed=seed, cost_names=names), env
            if self._adaptation_sampler_cache is None:
                self._adaptation_sampler_cache = RolloutSampler(distribution, n_envs=1, seed=seed, cost_names=names)
                if self._saved_adaptation_streams is not None:  # a loaded model's: continue its stream
                    self._adaptation_sampler_cache.set_episode_rng_states(self._saved_adaptation_streams)
                    self._saved_adaptation_streams = None
            return self._adaptation_sampler_cache, env
        if not isinstance(env, (gym.Env, VecEnv)):
            raise TypeError(
                "adapt needs a gymnasium env, a VecEnv, a task of the model's family or a family name, "
                f"got {type(env).__name__}"
            )
        env = make_safe_vec_env(env)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise TypeError(f"{type(self).__name__} needs a Box action space, the env has {env.action_space}")
        if env.observation_space.shape != self.observation_space.shape or env.action_space.shape != self.action_space.shape:
            raise ValueError(
                f"the env's observation/action shapes {env.observation_space.shape}/{env.action_space.shape} differ from "
                f"the model's {self.observation_space.shape}/{self.action_space.shape}"
            )
        return RolloutSampler(None, vec_env=env, seed=seed, cost_names=names), None
