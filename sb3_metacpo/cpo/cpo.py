"""CPO (Achiam et al., 2017) as an SB3 on-policy algorithm, on one env or on a whole task distribution."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sb3_metacpo.common.adaptation import AdaptationMixin
from sb3_metacpo.common.checks import (
    as_python_scalars,
    check,
    check_cpo_step_hyperparameters,
    check_learn_arguments,
    check_policy_kwargs,
    check_positive_ints,
    check_positive_reals,
    check_seed,
    check_tensorboard,
    check_tensorboard_log,
    check_vec_env_cls,
    check_verbose,
    is_int,
    is_real,
)
from sb3_metacpo.common.cpo_update import CPOConfig, Params, PreparedBatch, cpo_update, prepare_batch
from sb3_metacpo.common.envs import (
    EnvWorkerError,
    ResampleTaskOnReset,
    SafeEnv,
    failed_vec_env,
    make_safe_vec_env,
    vec_env_time_limit,
)
from sb3_metacpo.common.policies import (
    CPOPolicy,
    check_critic_targets,
    check_flat_action_space,
    check_flat_observation_space,
)
from sb3_metacpo.common.profiling import phase
from sb3_metacpo.common.rollouts import (
    EpisodeRecord,
    RolloutSampler,
    RolloutStorage,
    TaskBatch,
    array_observations,
    box_space,
    check_actions,
)
from sb3_metacpo.common.safe_algorithm import DEFAULT_COST_LIMIT, SafeAlgorithmMixin, saved_env_id
from sb3_metacpo.common.serialization import ArchiveError
from sb3_metacpo.common.threads import with_limited_blas_threads
from sb3_metacpo.tasks.base import Task, TaskDistribution, list_task_distributions, make_task_distribution
from sb3_metacpo.tasks.monitor import NO_EPISODE_COST, episode_cost
from sb3_metacpo.tasks.task_env import REPLAY_OPTION, TaskEnv

SelfCPO = TypeVar("SelfCPO", bound="CPO")
#: Numeric constructor arguments (numpy scalars are turned into Python numbers once validated).
_NUMERIC_HYPERPARAMETERS = (
    "n_steps",
    "batch_size",
    "gamma",
    "cost_gamma",
    "gae_lambda",
    "target_kl",
    "cost_limit",
    "cg_max_steps",
    "cg_damping",
    "fvp_sample_freq",
    "line_search_max_iter",
    "line_search_shrinking_factor",
    "cost_confidence",
    "n_critic_updates",
    "n_envs_requested",
    "_stats_window_size",  # SB3's name of stats_window_size
)
__all__ = ["CPO", "DEFAULT_COST_LIMIT"]


# misc: save() returns the Path it wrote and save/load take paths only (the safe archive), deliberately narrower than
# BaseAlgorithm's (None, file objects too); the mixin's own "type: ignore[override]" cannot reach the combined class.
class CPO(AdaptationMixin, SafeAlgorithmMixin, OnPolicyAlgorithm):  # type: ignore[misc]
    """Constrained Policy Optimization: trust-region policy steps that keep the expected episode cost under a limit.

    Every update solves CPO's convex program (the shared step,
    :func:`~sb3_metacpo.common.constrained_step.constrained_step`: the TRPO step when the whole trust region is
    feasible, the dual solution when the constraint binds, a pure cost-decreasing recovery step when it cannot be met)
    with a backtracking line search. The reward and cost critics are MLPs trained by regression on GAE lambda-returns
    after each update.

    ``env`` may be a single env (a gymnasium env, a VecEnv of :class:`~sb3_metacpo.tasks.monitor.CostMonitor`-
    wrapped envs, or an id such as ``"SafetyPointGoal1Gymnasium-v0"``) or a task distribution (a
    :class:`~sb3_metacpo.tasks.base.TaskDistribution` or a registered family name): then every env draws a new
    training task at each reset, which makes CPO the multi-task pretraining baseline of the Meta-CPO benchmark.

    :param policy: the policy class or alias (``"MlpPolicy"``: Gaussian actor, reward critic, cost critic)
    :param env: the env or task distribution to train on (see above)
    :param learning_rate: Adam learning rate of the critics, or a schedule of the progress remaining (SB3's: applied
        before every critic fit, logged as ``train/learning_rate``); the actor moves by CPO steps, not by a learning rate
    :param n_steps: env steps per env per update. The constraint value is the mean cost of the episodes a rollout
        completes, so let ``n_steps * n_envs`` cover several episodes: with 2 episodes per update on
        SafetyPointGoal1 (the default 2048 steps) the estimate is too noisy for the limit to hold (docs: Results);
        OmniSafe uses 20,000 steps (20 episodes)
    :param batch_size: minibatch size of critic training
    :param gamma: discount factor of the reward
    :param cost_gamma: discount factor of the cost advantages; 1 (default) matches the constraint, which is on the
        undiscounted episode cost
    :param gae_lambda: GAE lambda, for reward and cost advantages
    :param target_kl: trust-region size delta, in mean KL between the old and the new policy
    :param cost_limit: limit on the expected undiscounted episode cost of ``info["cost"]`` (default: the family's
        suggestion for a task distribution, 25 otherwise), or a mapping from cost names to limits, e.g.
        ``{"cost_hazards": 10.0, "cost_vases_contact": 5.0}``: one constraint per name, each read from ``info[name]``
    :param cg_max_steps: conjugate-gradient iterations for H^-1 g and H^-1 a
    :param cg_damping: damping added to the Fisher matrix
    :param fvp_sample_freq: Fisher-vector products use every ``fvp_sample_freq``-th sample of a batch (OmniSafe's
        ``fvp_sample_freq``; the TRPO paper used 10 % of the data): cheaper conjugate gradient on large batches
    :param line_search_max_iter: backtracking steps of the line search
    :param line_search_shrinking_factor: step shrinking factor of the line search
    :param dual_solver: ``"auto"`` (default: ``"analytic"`` up to 8 constraints, the convex program above),
        ``"analytic"`` (exact: the closed form of the CPO dual on each set of active constraints, the best kept; up to
        8 constraints; about 0.5 ms per step with one, 2.5 ms with several) or ``"cvxpylayers"`` (the dual as a
        differentiable convex program solved by SCS, any number of constraints; 3-10 ms per step, tens of ms where
        SCS needs many iterations; the paper's solver); they agree to the convex solver's precision (~1e-9 relative)
    :param cost_confidence: κ ≥ 0: the constraint value is the upper confidence bound J_C + κ·SE(J_C) over the
        rollout's completed episodes (0, the default: CPO's plain estimate; with fewer than two, J_C)
    :param recovery: when to take CPO's recovery step (the step that lowers the cost most, ignoring the reward):
        ``"linearised"`` (CPO's rule, the default) only when no point of the trust region meets the linearised
        constraint; ``"violated"`` also whenever the constraint value (with ``cost_confidence``) is above its limit;
        ``"confident"`` also whenever the lower confidence bound J_C − κ·SE is above it. A policy that starts far
        above the limit can stay there under CPO's rule: the linear model of a noisy cost gradient claims the limit
        is within reach, and the dual step spends most of the trust region on the reward
    :param n_critic_updates: epochs of critic training per update
    :param n_envs: envs built for an env id or a task distribution (ignored for an env object)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``, for an env id or a task distribution
    :param policy_kwargs: extra arguments of the policy (e.g. ``net_arch``, ``normalize_observations``)
    :param stats_window_size: episodes averaged for the rollout logs
    :param tensorboard_log: tensorboard log directory (None: no tensorboard)
    :param verbose: 0 silent, 1 training logs, 2 debug
    :param seed: seed of torch, numpy, the envs and (when ``env`` is a family name) the task distribution
    :param device: torch device
    :param _init_setup_model: build the networks at construction (False when loading)
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": CPOPolicy}
    policy: CPOPolicy

    def __init__(
        self,
        policy: str | type[CPOPolicy],
        env: SafeEnv | None,
        learning_rate: float = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cost_gamma: float = 1.0,
        gae_lambda: float = 0.95,
        target_kl: float = 0.01,
        cost_limit: float | Mapping[str, float] | None = None,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        fvp_sample_freq: int = 1,
        line_search_max_iter: int = 10,
        line_search_shrinking_factor: float = 0.8,
        dual_solver: Literal["auto", "analytic", "cvxpylayers"] = "auto",
        cost_confidence: float = 0.0,
        recovery: Literal["linearised", "violated", "confident"] = "linearised",
        n_critic_updates: int = 10,
        n_envs: int = 1,
        vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_seed(seed)  # envs and a family's task distribution are seeded from it before anything else
        check_verbose(verbose)  # SB3's constructor compares it with 1
        check_vec_env_cls(vec_env_cls)  # used to build the envs, before the other hyperparameters are validated
        seed = None if seed is None else int(seed)
        if is_int(n_envs):
            n_envs = int(n_envs)
        self.seed = seed
        self.cost_limit = cost_limit
        self.n_envs_requested = n_envs
        self.vec_env_cls = vec_env_cls
        self.task_distribution: TaskDistribution | None = None
        #: what its envs were built from, as JSON (an id, its task distribution or a task of it; None for env objects
        #: and VecEnvs): saved, so that ``load`` without an env builds them again
        self.env_source: dict[str, Any] | None = None
        self.task_distribution_name: str | None = None
        self.task_distribution_params: dict[str, Any] | None = None
        self.adapted_params: Params | None = None
        self.adaptation_history: list[dict[str, Any]] = []
        self._adaptation_sampler_cache: RolloutSampler | None = None
        #: how often a failed SubprocVecEnv of the model's was rebuilt (:meth:`_rebuild_failed_env`)
        self._env_rebuilds = 0
        if env is None and _init_setup_model:  # SB3 failed later, reading the spaces it had not set
            raise ValueError(
                "env is required: pass an env, a VecEnv, an env id, a TaskDistribution or the registered name of one "
                f"(a saved model without its env: {type(self).__name__}.load(path, env=...))"
            )
        vec_env = None if env is None else self._make_env(env)
        try:  # a refused argument closes again the envs built from an id, a family or a task
            if vec_env is not None:  # the env's own spaces, before SB3 transposes images or asks for MultiInputPolicy
                try:
                    check_flat_observation_space(vec_env.observation_space)
                    check_flat_action_space(vec_env.action_space)  # SB3 asserted, naming no fix
                except TypeError as error:
                    raise TypeError(f"env={env!r}: {error}") from None
            super().__init__(
                policy,
                vec_env,  # type: ignore[arg-type]
                learning_rate=learning_rate,
                n_steps=n_steps,
                gamma=gamma,
                gae_lambda=gae_lambda,
                ent_coef=0.0,
                vf_coef=0.0,
                max_grad_norm=0.0,
                use_sde=False,
                sde_sample_freq=-1,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                policy_kwargs=policy_kwargs,
                verbose=verbose,
                seed=seed,
                device=device,
                _init_setup_model=False,
                supported_action_spaces=(gym.spaces.Box,),
            )
            self.batch_size = batch_size
            self.cost_gamma = cost_gamma
            self.target_kl = target_kl
            self.cost_limit = cost_limit
            self.cg_max_steps = cg_max_steps
            self.cg_damping = cg_damping
            self.fvp_sample_freq = fvp_sample_freq
            self.line_search_max_iter = line_search_max_iter
            self.line_search_shrinking_factor = line_search_shrinking_factor
            self.dual_solver = dual_solver
            self.cost_confidence = cost_confidence
            self.recovery = recovery
            self.n_critic_updates = n_critic_updates
            if _init_setup_model:
                self._validate_hyperparameters()
                self._setup_model()
                self._warn_if_not_savable()
        except BaseException:
            if vec_env is not None and not isinstance(env, (VecEnv, gym.Env)):
                vec_env.close()
            raise

    # --- set-up -----------------------------------------------------------------------------------------------
    def _validate_hyperparameters(self) -> None:
        check_positive_ints(self, "batch_size", "n_critic_updates")
        n_envs = self.n_envs_requested
        check(is_int(n_envs) and n_envs >= 1, f"n_envs must be a positive integer, got {n_envs!r}")
        check(
            is_int(self.n_steps) and self.n_steps >= 2,
            f"n_steps must be an integer >= 2 (env steps per env per update), got {self.n_steps!r}",
        )
        check_positive_reals(self, "target_kl")
        check(
            callable(self.learning_rate) or (is_real(self.learning_rate) and self.learning_rate >= 0),
            f"learning_rate must be >= 0 (a finite number or a schedule), got {self.learning_rate!r}",
        )
        if callable(self.learning_rate):  # its start value, now (SB3 builds the critics' optimiser with it)
            start = self.learning_rate(1.0)
            try:  # as SB3's FloatSchedule reads it (a 0-d numpy array or tensor is a number too)
                start = float(start)
            except (TypeError, ValueError):
                pass
            check(
                is_real(start) and start >= 0,
                f"learning_rate: the schedule gives {start!r} at progress remaining 1; a learning rate must be a "
                "finite number >= 0",
            )
        check_cpo_step_hyperparameters(self)
        check_verbose(self.verbose)  # a value given to load
        check_tensorboard_log(self.tensorboard_log)
        self._check_policy_class()
        check_policy_kwargs(self.policy_kwargs, self.policy_class)
        self._check_constraints()
        as_python_scalars(self, *_NUMERIC_HYPERPARAMETERS)

    def _make_env(self, env: SafeEnv) -> VecEnv:
        """A cost-monitored VecEnv for ``env``; a family name or a distribution becomes the training distribution."""
        if isinstance(env, str) and env in list_task_distributions():
            env = make_task_distribution(env, seed=0 if self.seed is None else self.seed)
        if isinstance(env, TaskDistribution):
            self._remember_task_distribution(env)
        distribution = self._get_task_distribution()
        if isinstance(env, str):
            self.env_source = {"id": env}
        elif isinstance(env, TaskDistribution):
            self.env_source = {"task_distribution": True}
        elif isinstance(env, Task):
            self.env_source = {"task": env.to_dict()}
        else:
            self.env_source = None
        vec_env = make_safe_vec_env(env, self.n_envs_requested, self.vec_env_cls, distribution)
        if self.seed is not None and not isinstance(env, (gym.Env, VecEnv)):
            vec_env.seed(self.seed)
        return vec_env

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy_kwargs = {**self.policy_kwargs, "n_costs": len(self.constraints)}
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self._check_policy_class(self.policy)  # a factory's product (a class was checked before)
        # SB3's RolloutBuffer has no costs: rollouts are kept as a TaskBatch in self._rollout instead.
        self.rollout_buffer = None  # type: ignore[assignment]
        self._rollout: TaskBatch | None = None

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "task_distribution", "_rollout", "_adaptation_sampler_cache"]

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        resets = reset_num_timesteps or self._last_obs is None  # SB3 resets the envs then
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        self._resume_random_streams(reset_num_timesteps)
        if resets or getattr(self, "_episode_step_at_rollout_start", None) is None:
            self._episode_step_at_rollout_start = np.zeros(self.n_envs, dtype=np.int64)
        return result

    def set_env(self, env: SafeEnv, force_reset: bool = True) -> None:  # type: ignore[override]
        """Train on ``env`` from now on: anything the constructor accepts, or a task of the model's family
        (fine-tuning on one task with CPO's own updates; the benchmark adapts through :meth:`adapt`). The number of
        envs may change, with ``force_reset=True`` (the default). An env that is refused (e.g. other spaces) leaves
        the model as it was. Another family starts its own adaptation episodes (the adaptations' sampler is
        closed)."""
        names = ("task_distribution", "task_distribution_name", "task_distribution_params", "env_source", "n_envs")
        before = {name: getattr(self, name) for name in names}
        vec_env: VecEnv | None = None
        try:
            vec_env = self._make_env(env)
            distribution = self._get_task_distribution()
            if distribution is not None:  # the named costs must be reported there (else the first episode's end fails)
                self.constraints.check_reported(distribution.cost_names, f"the task family {distribution.name}")
            if not force_reset and self._last_obs is not None and vec_env.num_envs != self.n_envs:
                raise ValueError(
                    f"set_env(force_reset=False) with {vec_env.num_envs} envs: the model's last observations are those "
                    f"of its {self.n_envs} envs, so a different number of envs needs force_reset=True"
                )
            self.n_envs = vec_env.num_envs
            super().set_env(vec_env, force_reset)
            if self.task_distribution is not before["task_distribution"]:
                self._forget_adaptation_episodes()
        except BaseException:
            for name, value in before.items():  # the family, its cost limit and the saved env source stay the old ones
                setattr(self, name, value)
            if vec_env is not None and not isinstance(env, (VecEnv, gym.Env)):  # the user's own env stays open
                vec_env.close()
            raise

    def _episode_length(self) -> int:
        """The episode length (the cost critic's time scale, and J_C's when a rollout completes no episode): the
        env's time limit (registered, or a ``TimeLimit`` wrapper's), the task family's, else the longest episode seen
        so far, else the rollout."""
        assert self.env is not None
        limit = vec_env_time_limit(self.env)
        if limit is not None:
            return limit
        distribution = self._get_task_distribution()
        if distribution is not None:
            return distribution.max_episode_steps
        lengths = [int(info["l"]) for info in self.ep_info_buffer or []]
        return max(lengths) if lengths else self.n_steps

    # --- training ---------------------------------------------------------------------------------------------
    def collect_rollouts(  # type: ignore[override]
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: Any, n_rollout_steps: int
    ) -> bool:
        """Collect ``n_rollout_steps`` steps per env into a :class:`RolloutStorage`; episodes run on across rollouts."""
        assert self._last_obs is not None
        self.policy.set_training_mode(False)
        observation_space = box_space(self.observation_space, "observation")
        action_space = box_space(self.action_space, "action")
        storage = RolloutStorage(
            n_rollout_steps, env.num_envs, observation_space.shape, action_space.shape, self.constraints.names
        )
        episodes: list[EpisodeRecord] = []
        low, high = action_space.low, action_space.high
        callback.on_rollout_start()
        act = self.policy.numpy_actor({name: value.unsqueeze(0) for name, value in self.policy.actor_params().items()})
        with phase("sampling"):
            # Callbacks read these locals: SB3's names (actions, clipped_actions, new_obs, rewards, dones, infos,
            # n_steps) and MetaCPO's obs (SB3's obs_tensor, as a numpy array).
            for n_steps in range(n_rollout_steps):
                obs = array_observations(self._last_obs)
                actions = act(obs)
                check_actions(n_steps, actions)
                clipped_actions = actions.clip(low, high)  # np.clip, without its dispatch (every step)
                vec_obs, rewards, dones, infos = env.step(clipped_actions)
                new_obs = array_observations(vec_obs)
                self.num_timesteps += env.num_envs
                self._update_info_buffer(infos, dones)
                ended = storage.add(n_steps, obs, actions, rewards, new_obs, dones, infos)
                episodes.extend(episode for _, episode in ended)
                self._last_obs = new_obs
                self._last_episode_starts = dones
                callback.update_locals(locals())
                if not callback.on_step():  # the envs have stepped: a later learn() goes on from where they are
                    self._episode_step_at_rollout_start = self._episode_steps_after(storage, n_steps + 1)
                    return False
        self._rollout = storage.batch(None, slice(None), episodes, first_steps=self._episode_step_at_rollout_start)
        # Episodes run on across rollouts: where each env's current episode stands for the next rollout.
        self._episode_step_at_rollout_start = self._episode_steps_after(storage, n_rollout_steps)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _episode_steps_after(self, storage: RolloutStorage, n_rows: int) -> np.ndarray:
        """Each env's step index within its episode after the first ``n_rows`` steps of ``storage`` (a rollout that
        began at ``_episode_step_at_rollout_start``): the steps since its last episode end, else its start plus
        ``n_rows``."""
        dones = storage.terminated[:n_rows] | storage.truncated[:n_rows]
        since_last_done = np.argmax(dones[::-1], axis=0)  # rows after each env's last episode end
        return np.where(dones.any(axis=0), since_last_done, self._episode_step_at_rollout_start + n_rows)

    def train(self) -> None:
        """One CPO update of the actor on the last rollout, then critic regression and normalisation statistics."""
        batch = self._rollout
        assert batch is not None, "train() needs a rollout: call learn()"
        params = self.policy.actor_params()
        with phase("advantages"):
            prepared = self._prepare_batch(batch, params, self._episode_length(), with_critic=True)
        # What the update writes after the actor step is checked before it: the learning rate, the critics' targets
        # and the observation statistics (a bad one raises with nothing changed)
        # SB3's: the schedule's value now (train/learning_rate), at progress >= 0 (the last update of a run that
        # overshoots its budget would otherwise read the schedule past its end, e.g. a negative linear rate)
        self._current_progress_remaining = max(self._current_progress_remaining, 0.0)
        self._check_learning_rate_now()
        reward_targets = th.as_tensor(prepared.reward_returns, device=self.device).float()
        cost_targets = th.as_tensor(prepared.cost_returns, device=self.device).float()
        check_critic_targets(reward_targets, cost_targets)
        obs_stats = self.policy.obs_stats_after(batch.observations.reshape(-1, batch.observations.shape[-1]))
        with phase("cpo_update"):
            new_params, result = cpo_update(
                self.policy.actor_mean_log_std,
                params,
                prepared,
                self._cpo_config(self.target_kl),
                fisher=self.policy.fisher_product,
            )
        self._write_back(params, new_params)
        with phase("critic_training"):
            self.policy.set_obs_stats(obs_stats)
            self._update_learning_rate(self.policy.optimizer)
            loss = self.policy.fit_critics(
                prepared.observations.float(),
                reward_targets,
                cost_targets,
                self.n_critic_updates,
                self.batch_size,
                prepared.time_fractions.float(),  # type: ignore[union-attr]
            )
        self._n_updates += 1
        record = self.logger.record
        self._record_step(result)
        assert prepared.explained_variance is not None
        record("train/explained_variance", float(prepared.explained_variance[0]))  # SB3's key: the reward critic's
        for index, value in enumerate(prepared.constraint):
            suffix = self.constraints.log_suffix(index)
            record(f"train/constraint{suffix}", float(value))
            record(f"train/cost_explained_variance{suffix}", float(prepared.explained_variance[1 + index]))
        record("train/value_loss", loss)
        record("train/std", self.policy.log_std.exp().mean().item())
        record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _prepare_batch(self, batch: TaskBatch, params: Params, episode_length: int, with_critic: bool) -> PreparedBatch:
        return prepare_batch(
            batch,
            self.policy.actor_mean_log_std,
            params,
            self.policy.critic_values if with_critic else None,
            self.gamma,
            self.gae_lambda,
            self.constraints.limits,
            episode_length,
            self.cost_gamma,
            self.cost_confidence,
            self.recovery,
        )

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        """SB3's episode statistics, plus each episode's cost (``"c"``, also when a plain SB3 ``Monitor`` outside the
        :class:`CostMonitor` rebuilt ``info["episode"]`` without it, as ``make_vec_env`` does) and its named cost
        sums (``info["episode_costs"]``)."""
        for info in infos:  # SB3 appends each info["episode"] itself: complete it first
            entry = info.get("episode")
            if entry is None:
                continue
            cost = episode_cost(info)
            if cost is None:
                raise KeyError(NO_EPISODE_COST)
            entry["c"] = cost
            entry["episode_costs"] = info.get("episode_costs", {"cost": cost})
        super()._update_info_buffer(infos, dones)

    # --- adaptation: fine-tuning by the same CPO updates, on a per-batch linear baseline ------------------------
    def _adaptation_defaults(self) -> tuple[int, int]:
        return 1, self.n_steps * self.n_envs

    def _adaptation_config(self, target_kl: float | None = None) -> CPOConfig:
        return self._cpo_config(self.target_kl if target_kl is None else target_kl)

    def _prepare_adaptation_batch(self, batch: TaskBatch, params: Params, episode_length: int) -> PreparedBatch:
        return self._prepare_batch(batch, params, episode_length, with_critic=False)

    def dump_logs(self, iteration: int = 0) -> None:
        """SB3's logs plus ``rollout/ep_cost_mean`` (and ``rollout/ep_<name>_mean`` per reported cost signal)."""
        self._record_rollout_costs()
        super().dump_logs(iteration)

    @with_limited_blas_threads
    def learn(
        self: SelfCPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "CPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfCPO:
        """Train for ``total_timesteps`` env steps (SB3's ``learn``). A model adapted by :meth:`adapt` forgets its
        adaptation here: ``predict`` acts with the trained parameters again."""
        check_learn_arguments(total_timesteps, log_interval, callback, reset_num_timesteps, progress_bar, tb_log_name)
        check_tensorboard(self)
        if self.env is None:  # SB3 asserted without a message
            raise ValueError(
                "this CPO has no env to train on (a model loaded from an archive of one trained on an env object, which "
                "is not saved): pass env= to CPO.load, or call set_env"
            )
        if self.adapted_params is not None:
            self.reset_adaptation()
        self._rebuild_failed_env()
        return super().learn(int(total_timesteps), callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)

    def _rebuild_failed_env(self) -> None:
        """Replace a ``SubprocVecEnv`` whose worker failed in an earlier ``learn`` (every later step of it fails) by a
        fresh one built from what the model built it from (:attr:`env_source`), seeded with ``seed + k·n_envs`` at
        the k-th rebuild (new episode streams, neither a replay of the first ones nor another env's), and start its
        episodes anew; a VecEnv the user gave cannot be rebuilt: an :class:`EnvWorkerError` saying to pass one."""
        env = self.env
        if not failed_vec_env(env):
            return
        source = None if self.env_source is None else self._saved_env(self.env_source, "the model's env source")
        if source is None:
            raise EnvWorkerError(
                f"a worker of this {type(self).__name__}'s SubprocVecEnv failed earlier, and the model cannot rebuild "
                "a VecEnv it did not build: pass a new env with set_env"
            )
        env.close()
        self._env_rebuilds += 1
        vec_env = make_safe_vec_env(source, self.n_envs, self.vec_env_cls, self._get_task_distribution())
        if self.seed is not None:
            vec_env.seed(self.seed + self._env_rebuilds * self.n_envs)
        self.env = vec_env
        self._last_obs = None  # type: ignore[assignment]  # SB3's _setup_learn resets the new envs

    # --- random streams of the envs, for a resumed run ------------------------------------------------------------
    def _sampler_rng_states(self) -> dict[str, Any]:
        """For envs of a task family: each env's episode-seed stream, its task stream when it draws a task per
        episode, and the episode in flight (its seed and task), so that a resumed run restarts that episode and then
        continues the streams instead of drawing the first episodes of ``seed`` again. None for other envs (ids,
        env objects), whose random state is their own. A save inside :meth:`adapt` (a callback's) describes the
        training envs, not the adaptation's."""
        env = self.env if self._training_env is None else self._training_env
        if env is None or failed_vec_env(env) or not all(env.env_is_wrapped(TaskEnv)):
            return {}  # a failed VecEnv's workers cannot answer: the envs it is rebuilt with start from the seed
        in_flight = env.get_attr("episode_seed")
        if any(seed is None for seed in in_flight):  # not reset yet: the streams are still to be seeded from seed
            return {}
        resampling = env.env_is_wrapped(ResampleTaskOnReset)
        episode_streams = env.env_method("episode_rng_state")
        tasks = [task.to_dict() for task in env.get_attr("task")]
        task_streams = [
            env.env_method("task_rng_state", indices=[index])[0] if draws else None for index, draws in enumerate(resampling)
        ]
        return {
            "envs": [
                {"episode_stream": stream, "task_stream": task_stream, "episode_seed": seed, "task": task}
                for stream, task_stream, seed, task in zip(episode_streams, task_streams, in_flight, tasks, strict=True)
            ]
        }

    def _set_sampler_rng_states(self, states: Mapping[str, Any]) -> None:
        """Continue :meth:`_sampler_rng_states` on resuming: the envs, just reset from ``seed`` by SB3's
        ``_setup_learn``, are set back to the saved streams and restart their episodes in flight."""
        saved = states.get("envs")
        env = self.env
        if not saved or env is None:
            return
        distribution = self._get_task_distribution()
        same_kind = (
            len(saved) == env.num_envs
            and distribution is not None
            and all(env.env_is_wrapped(TaskEnv))
            and [state["task_stream"] is not None for state in saved] == env.env_is_wrapped(ResampleTaskOnReset)
        )
        if not same_kind:
            warnings.warn(
                f"the archive's env streams are for {len(saved)} task envs, this model has {env.num_envs} envs of "
                "another kind: they start from the model's seed, and the first episodes repeat the run's first ones",
                stacklevel=3,
            )
            return
        assert distribution is not None
        for index, state in enumerate(saved):
            env.env_method("set_task", distribution.task_from_dict(state["task"]), indices=[index])
            env.env_method("set_episode_rng_state", state["episode_stream"], indices=[index])
            if state["task_stream"] is not None:
                env.env_method("set_task_rng_state", state["task_stream"], indices=[index])
        env.set_options([{REPLAY_OPTION: int(state["episode_seed"])} for state in saved])
        self._last_obs = env.reset()  # type: ignore[assignment]
        self._last_episode_starts = np.ones((env.num_envs,), dtype=bool)

    def _saved_env(self, source: Any, path: str | os.PathLike[str]) -> Any:
        """The env of the archive's ``env_source`` (:attr:`env_source`: an env id, the task distribution or a task
        of it; None for an env object or a VecEnv, which were not saved)."""
        if source is None:
            return None
        distribution = self._get_task_distribution()
        env_id = saved_env_id(source)
        if env_id is not None:
            return env_id
        if isinstance(source, dict) and source == {"task_distribution": True} and distribution is not None:
            return distribution
        elif isinstance(source, dict) and set(source) == {"task"} and distribution is not None:
            try:
                task = distribution.task_from_dict(source["task"])
                distribution.validate_task(task)
            except (TypeError, ValueError) as error:
                raise ArchiveError(f"{path}: the saved task is not one of {distribution.name}: {error}") from error
            return task
        raise ArchiveError(f"{path}: env_source {source!r} does not name an env id, the task distribution or a task")

    def _use_env_after_load(self, env: Any, force_reset: bool, overridden: set[str], saved: bool = False) -> None:
        # another env than the archive's: load has already dropped the saved episode streams (not this env's)
        if not saved and self.n_envs_requested > 1 and "n_envs" not in overridden and not isinstance(env, (gym.Env, VecEnv)):
            # An env the model builds (a task to fine-tune on, a distribution, an id) gets the saved number of envs,
            # and an update is n_steps steps of each: say so, as a run meant for one env would take n_envs x longer.
            warnings.warn(
                f"{type(self).__name__}.load builds {self.n_envs_requested} envs for the {type(env).__name__} "
                f"(the saved n_envs): one update is n_steps x n_envs = {self.n_steps * self.n_envs_requested} env "
                "steps. Pass n_envs= to load to choose the number of envs",
                stacklevel=3,
            )
        self.set_env(env, force_reset)
