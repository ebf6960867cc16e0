"""Meta-CPO: meta-learn an initial policy whose few CPO updates on a new task give high reward under a cost limit."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.utils import safe_mean
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metacpo.common.adaptation import AdaptationMixin, step_locals
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
    check_verbose,
    is_int,
    is_real,
)
from sb3_metacpo.common.constrained_step import LineSearch, StepResult, constrained_step
from sb3_metacpo.common.cpo_update import (
    CPOConfig,
    Params,
    PreparedBatch,
    add_flat,
    cpo_update,
    detached,
    gaussian_kl,
    prepare_batch,
    representable_std,
)
from sb3_metacpo.common.policies import CPOPolicy, ObsStats, check_critic_targets
from sb3_metacpo.common.profiling import phase
from sb3_metacpo.common.ray_sampler import RaySampler, RemoteEnvs, check_ray_sampler_options, import_ray
from sb3_metacpo.common.rollouts import (
    CollectionStopped,
    RolloutSampler,
    Sampler,
    TaskBatch,
    VecStep,
    initial_episode_streams,
    meta_iteration_steps,
    round_plan,
)
from sb3_metacpo.common.safe_algorithm import SafeAlgorithmMixin
from sb3_metacpo.common.threads import with_limited_blas_threads
from sb3_metacpo.metacpo.meta_objective import META_CONSTRAINT_MODES, MetaObjective, MetaValue, TaskAdaptation
from sb3_metacpo.tasks.base import Task, TaskDistribution, make_task_distribution
from sb3_metacpo.tasks.monitor import TOTAL_COST


@dataclasses.dataclass(frozen=True)
class CriticData:
    """The MLP critics' regression data of one meta-iteration (inputs, targets, times within the episodes)."""

    observations: th.Tensor
    reward_targets: th.Tensor
    cost_targets: th.Tensor
    times: th.Tensor


SelfMetaCPO = TypeVar("SelfMetaCPO", bound="MetaCPO")
#: Numeric constructor arguments (numpy scalars are turned into Python numbers once validated).
_NUMERIC_HYPERPARAMETERS = (
    "meta_batch_size",
    "n_inner_updates",
    "n_steps",
    "inner_target_kl",
    "outer_target_kl",
    "cost_limit",
    "gamma",
    "cost_gamma",
    "gae_lambda",
    "cg_max_steps",
    "cg_damping",
    "fvp_sample_freq",
    "line_search_max_iter",
    "line_search_shrinking_factor",
    "meta_constraint_alpha",
    "cost_confidence",
    "critic_learning_rate",
    "n_critic_updates",
    "critic_batch_size",
    "n_envs_requested",
    "_stats_window_size",  # SB3's name of stats_window_size
)


# misc: save() returns the Path it wrote and save/load take paths only (the safe archive), deliberately narrower than
# BaseAlgorithm's (None, file objects too); the mixin's own "type: ignore[override]" cannot reach the combined class.
class MetaCPO(AdaptationMixin, SafeAlgorithmMixin, BaseAlgorithm):  # type: ignore[misc]
    """Meta-CPO (Cho & Sun, AAAI-24): MAML-style meta-learning where every inner and outer update is a CPO step.

    Each meta-iteration samples ``meta_batch_size`` training tasks. Per task, ``n_inner_updates`` CPO steps adapt a
    functional copy of the meta-parameters theta (never theta itself), each on a fresh batch of ``n_steps`` env steps;
    a validation batch is then collected with the adapted policy. The meta-objective is the mean validation reward
    surrogate; the meta-constraints are, by default (``meta_constraint="stages"``), the mean constraint value of every
    stage (before and after each inner update; ``"stages_cvar"``: over the worst tasks; ``"mean"``, the paper's: the
    mean post-adaptation value only); the outer update is a CPO step on theta
    (trust region ``outer_target_kl`` in the Fisher metric of pi_theta on the pre-adaptation data), whose line search
    re-runs the inner updates from each candidate theta on the stored batches.

    :param policy: the policy class or alias (``"MlpPolicy"``: Gaussian actor, reward critic, cost critic)
    :param env: the task distribution: a :class:`~sb3_metacpo.tasks.base.TaskDistribution` or the registered name of one
    :param meta_batch_size: training tasks per meta-iteration (M)
    :param n_inner_updates: CPO updates per task in the inner loop and, by default, in :meth:`adapt` (K)
    :param n_steps: env steps per task per batch (each inner update, and the validation batch)
    :param inner_target_kl: trust-region size delta of the inner (adaptation) updates, in mean KL
    :param outer_target_kl: trust-region size delta_theta of the outer (meta) update, in mean KL
    :param cost_limit: limit on the expected undiscounted episode cost of ``info["cost"]`` (default: the family's
        suggestion), or a mapping from cost names to limits, e.g. ``{"cost_hazards": 10.0, "cost_speed": 5.0}``, one
        constraint per name (each read from ``info[name]``; the family must report it)
    :param gamma: discount factor of the reward
    :param cost_gamma: discount factor of the cost advantages; 1 (default) matches the constraint, which is on the
        undiscounted episode cost
    :param gae_lambda: GAE lambda, for reward and cost advantages
    :param cg_max_steps: conjugate-gradient iterations for H^-1 g and H^-1 a
    :param cg_damping: damping added to the Fisher matrix
    :param fvp_sample_freq: Fisher-vector products use every ``fvp_sample_freq``-th sample of a batch (OmniSafe's
        ``fvp_sample_freq``; the TRPO paper used 10 % of the data): cheaper conjugate gradient on large batches
    :param line_search_max_iter: backtracking steps of the line searches
    :param line_search_shrinking_factor: step shrinking factor of the line searches
    :param meta_gradient: ``"second_order"`` (exact: differentiate through the inner CPO updates, including
        conjugate gradient and the dual solution) or ``"first_order"`` (inner Jacobian taken as the identity, also in
        the outer line search; cheaper)
    :param dual_solver: ``"auto"`` (default: ``"analytic"`` up to 8 constraints, the convex program above),
        ``"analytic"`` (exact: the closed form of the CPO dual on each set of active constraints, the best kept; up to
        8 constraints; about 0.5 ms per step with one, 2.5 ms with several) or ``"cvxpylayers"`` (the dual as a
        differentiable convex program solved by SCS, any number of constraints; 3-10 ms per step, tens of ms where
        SCS needs many iterations; the paper's solver); they agree to the convex solver's precision (~1e-9 relative)
    :param meta_constraint: how the outer step's constraints are built from the tasks' adaptation (see
        :mod:`sb3_metacpo.metacpo.meta_objective`): ``"stages"`` (default: per cost, the mean over tasks at every
        stage, θ's own cost and each adapted policy's), ``"stages_cvar"`` (per stage, the mean over the worst
        ``meta_constraint_alpha`` share of tasks) or ``"mean"`` (the paper's: the mean post-adaptation value only)
    :param meta_constraint_alpha: the share of tasks ``"stages_cvar"`` averages over
    :param cost_confidence: κ ≥ 0: every constraint value (inner, adaptation and outer) is the upper confidence
        bound J_C + κ·SE(J_C) over the batch's episodes instead of J_C (0: the plain estimate, as in the paper); a
        batch with fewer than two completed episodes has no standard error and takes J_C: with ``n_steps`` of at most
        one episode per task, κ has no effect
    :param recovery: when a step, inner or outer, takes CPO's recovery step (the step that lowers the cost most,
        ignoring the reward): ``"linearised"`` (CPO's rule, the default) only when no point of the trust region meets
        the linearised constraint; ``"violated"`` also whenever the constraint value (with ``cost_confidence``) is
        above its limit; ``"confident"`` also whenever the lower confidence bound J_C − κ·SE is above it (the outer
        step: its per-task bounds aggregated as the meta-constraint aggregates the values). A policy that starts far
        above the limit can stay there under CPO's rule: the linear model of a noisy cost gradient claims the limit
        is within reach, and the dual step spends most of the trust region on the reward
    :param critic: ``"linear"``: a linear baseline fitted to each batch (task-specific even when the observation
        does not identify the task); ``"mlp"``: the policy's reward and cost critics, shared across tasks and trained
        on every batch
    :param critic_learning_rate: Adam learning rate of the MLP critics
    :param n_critic_updates: epochs of critic training per meta-iteration (``critic="mlp"``)
    :param critic_batch_size: minibatch size of critic training (``critic="mlp"``)
    :param n_envs: envs sampling in parallel (default: ``meta_batch_size``, one env per task)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv`` (local sampler only)
    :param sampler: where the envs run: ``"local"`` (default: a VecEnv of ``vec_env_cls`` in this process or its
        subprocesses) or ``"ray"`` (Ray actors, possibly on a cluster; ``pip install sb3-metacpo[ray]``, see
        :class:`~sb3_metacpo.common.ray_sampler.RaySampler`). Both give the same batches, hence the same training,
        for the same seed; with Ray, callbacks see each collect's steps after the workers answered
    :param sampler_kwargs: options of the Ray sampler: ``num_workers`` (actors sharing the ``n_envs`` envs,
        default 1), ``num_cpus_per_worker`` (1), ``max_restarts`` (3), ``max_retries`` (3), ``ray_init_kwargs``
        (arguments of ``ray.init`` when no Ray is running), ``measure_transfer`` (False)
    :param policy_kwargs: extra arguments of the policy (e.g. ``net_arch``, ``normalize_observations``)
    :param stats_window_size: episodes averaged for the rollout logs
    :param tensorboard_log: tensorboard log directory (None: no tensorboard)
    :param verbose: 0 silent, 1 training logs, 2 debug
    :param seed: seed of torch, numpy, the env samplers and (when ``env`` is a name) the task distribution
    :param device: torch device
    :param _init_setup_model: build the networks at construction (False when loading)
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": CPOPolicy}
    policy: CPOPolicy
    #: MetaTRPO removes the cost constraint from every update.
    _constrained: ClassVar[bool] = True

    def __init__(
        self,
        policy: str | type[CPOPolicy],
        env: TaskDistribution | str | None,
        meta_batch_size: int = 8,
        n_inner_updates: int = 1,
        n_steps: int = 1000,
        inner_target_kl: float = 0.05,
        outer_target_kl: float = 0.01,
        cost_limit: float | Mapping[str, float] | None = None,
        gamma: float = 0.99,
        cost_gamma: float = 1.0,
        gae_lambda: float = 0.95,
        cg_max_steps: int = 10,
        cg_damping: float = 0.1,
        fvp_sample_freq: int = 1,
        line_search_max_iter: int = 10,
        line_search_shrinking_factor: float = 0.8,
        meta_gradient: Literal["second_order", "first_order"] = "second_order",
        dual_solver: Literal["auto", "analytic", "cvxpylayers"] = "auto",
        meta_constraint: Literal["stages", "stages_cvar", "mean"] = "stages",
        meta_constraint_alpha: float = 0.5,
        cost_confidence: float = 1.0,
        recovery: Literal["linearised", "violated", "confident"] = "linearised",
        critic: Literal["linear", "mlp"] = "linear",
        critic_learning_rate: float = 1e-3,
        n_critic_updates: int = 5,
        critic_batch_size: int = 256,
        n_envs: int | None = None,
        vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
        sampler: Literal["local", "ray"] = "local",
        sampler_kwargs: dict[str, Any] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_seed(seed)  # the task distribution of a family name is seeded from it before anything else
        check_verbose(verbose)  # SB3's constructor compares it with 1
        seed = None if seed is None else int(seed)
        super().__init__(
            policy,
            None,
            learning_rate=critic_learning_rate,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            supported_action_spaces=(gym.spaces.Box,),
        )
        self.meta_batch_size = meta_batch_size
        self.n_inner_updates = n_inner_updates
        self.n_steps = n_steps
        self.inner_target_kl = inner_target_kl
        self.outer_target_kl = outer_target_kl
        self.cost_limit = cost_limit
        self.gamma = gamma
        self.cost_gamma = cost_gamma
        self.gae_lambda = gae_lambda
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.fvp_sample_freq = fvp_sample_freq
        self.line_search_max_iter = line_search_max_iter
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.meta_gradient = meta_gradient
        self.dual_solver = dual_solver
        self.meta_constraint = meta_constraint
        self.meta_constraint_alpha = meta_constraint_alpha
        self.cost_confidence = cost_confidence
        self.recovery = recovery
        self.critic = critic
        self.critic_learning_rate = critic_learning_rate
        self.n_critic_updates = n_critic_updates
        self.critic_batch_size = critic_batch_size
        self.n_envs_requested = n_envs
        self.vec_env_cls = vec_env_cls
        self.sampler_type = sampler
        self.sampler_kwargs = sampler_kwargs
        self.task_distribution: TaskDistribution | None = None
        self.task_distribution_name: str | None = None
        self.task_distribution_params: dict[str, Any] | None = None
        self.sampler: Sampler | None = None
        self._adaptation_sampler_cache: RolloutSampler | None = None
        #: the episode streams of the training sampler that close() released, for the next one
        self._closed_sampler_streams: list[dict[str, Any]] | None = None
        self.adapted_params: Params | None = None
        self.adaptation_history: list[dict[str, Any]] = []
        if env is not None:
            self.set_task_distribution(env)
        elif _init_setup_model:
            raise ValueError("env is required: pass a TaskDistribution or the registered name of one")
        if _init_setup_model:
            self._validate_hyperparameters()
            self._setup_model()
            self._warn_if_not_savable()
            self._warn_if_no_episode_completes()

    # --- set-up -----------------------------------------------------------------------------------------------
    def _validate_hyperparameters(self) -> None:
        check_positive_ints(self, "meta_batch_size", "n_inner_updates", "n_critic_updates", "critic_batch_size")
        check(
            is_int(self.n_steps) and self.n_steps >= 2,
            f"n_steps must be an integer >= 2 (env steps per task batch), got {self.n_steps!r}",
        )
        check_positive_reals(self, "inner_target_kl", "outer_target_kl", "critic_learning_rate")
        check_cpo_step_hyperparameters(self)
        check_verbose(self.verbose)  # a value given to load
        check_tensorboard_log(self.tensorboard_log)
        self._check_policy_class()
        check_policy_kwargs(self.policy_kwargs, self.policy_class)
        check(
            self.meta_gradient in ("second_order", "first_order"),
            f"meta_gradient must be 'second_order' or 'first_order', got {self.meta_gradient!r}",
        )
        check(
            self.meta_constraint in META_CONSTRAINT_MODES,
            f"meta_constraint must be one of {META_CONSTRAINT_MODES}, got {self.meta_constraint!r}",
        )
        check(self.critic in ("linear", "mlp"), f"critic must be 'linear' or 'mlp', got {self.critic!r}")
        alpha = self.meta_constraint_alpha
        check(is_real(alpha) and 0 < alpha <= 1, f"meta_constraint_alpha must be in (0, 1], got {alpha!r}")
        check(
            self.n_envs_requested is None or (is_int(self.n_envs_requested) and self.n_envs_requested >= 1),
            f"n_envs must be a positive integer or None, got {self.n_envs_requested!r}",
        )
        self._check_sampler()
        self._check_constraints()
        as_python_scalars(self, *_NUMERIC_HYPERPARAMETERS)
        n_outer = len(self.constraints) * (1 if self.meta_constraint == "mean" else self.n_inner_updates + 1)
        if self._constrained:
            self._check_dual_solver(n_outer, f"meta_constraint={self.meta_constraint!r} gives the outer step {n_outer}")

    def _check_sampler(self) -> None:
        check(self.sampler_type in ("local", "ray"), f"sampler must be 'local' or 'ray', got {self.sampler_type!r}")
        options = self.sampler_kwargs
        check(
            options is None or (isinstance(options, dict) and all(isinstance(key, str) for key in options)),
            f"sampler_kwargs must be a dict of options or None, got {options!r}",
        )
        if self.sampler_type == "local":
            check(not options, f"sampler_kwargs are options of sampler='ray'; the local sampler takes none, got {options!r}")
            return
        check(
            self.vec_env_cls is None,
            f"vec_env_cls chooses the local sampler's VecEnv; with sampler='ray' every worker runs a DummyVecEnv of its "
            f"envs (leave vec_env_cls=None), got {self.vec_env_cls!r}",
        )
        check_ray_sampler_options(self.n_envs_requested or self.meta_batch_size, **(options or {}))
        if options:  # numpy numbers as Python ones (Ray's options refuse numpy types; saved as plain JSON)
            self.sampler_kwargs = {
                key: value.item() if isinstance(value, np.generic) else value for key, value in options.items()
            }
        import_ray()  # a clear ImportError now rather than at the first learn

    def set_env(self, env: TaskDistribution | str, force_reset: bool = True) -> None:  # type: ignore[override]
        """SB3's ``set_env`` for a meta-learner: train on ``env``, a :class:`~sb3_metacpo.tasks.base.TaskDistribution`
        or a registered family name, from now on (:meth:`set_task_distribution`; every collect starts fresh episodes,
        so ``force_reset`` changes nothing). A single env is refused: meta-training draws new tasks every iteration;
        adapt to one env with :meth:`adapt`. ``get_env()`` gives the sampler's VecEnv, which the next ``learn``
        builds for the new distribution: None until then (unlike SB3, which returns the env given)."""
        if not isinstance(env, (TaskDistribution, str)):
            raise TypeError(
                f"{type(self).__name__}.set_env takes a TaskDistribution or a registered family name (meta-training "
                f"draws new tasks every iteration; adapt(env) adapts to one env), got {type(env).__name__}"
            )
        self.set_task_distribution(env)

    def set_task_distribution(self, env: TaskDistribution | str) -> None:
        """Use ``env`` (a :class:`~sb3_metacpo.tasks.base.TaskDistribution` or a registered family name) for training
        and evaluation."""
        if isinstance(env, str):
            env = make_task_distribution(env, seed=0 if self.seed is None else self.seed)
        if not isinstance(env, TaskDistribution):
            raise TypeError(
                f"{type(self).__name__} trains on a task distribution: pass a TaskDistribution or the name of a "
                f"registered family (see sb3_metacpo.tasks.list_task_distributions()), got {type(env).__name__}"
            )
        observation_space, action_space = env.spaces
        if hasattr(self, "observation_space") and self.observation_space is not None and self.policy is not None:
            if observation_space.shape != self.observation_space.shape or action_space.shape != self.action_space.shape:
                raise ValueError(
                    f"{env.name} has observation/action shapes {observation_space.shape}/{action_space.shape}, but "
                    f"the model was built for {self.observation_space.shape}/{self.action_space.shape}"
                )
            # a built model switching family (set_env, load(env=...)): its named costs must be reported there (else
            # the first episode's end fails), checked before anything changes
            self.constraints.check_reported(env.cost_names, f"the task family {env.name}")
        self.observation_space, self.action_space = observation_space, action_space
        self._remember_task_distribution(env)
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = self._closed_sampler_streams = None  # another family's envs start their own streams
        self._forget_adaptation_episodes()  # and its adaptations theirs
        self.env = None

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's ``set_random_seed`` (Python, numpy, torch, the action space) and, as SB3 seeds the env, the training
        envs' episode-seed streams, which restart from ``seed`` as a model built with it starts them (env ``j``'s
        stream ``default_rng(seed + j)``), whether or not the sampler exists yet. The training tasks are the task
        distribution's own stream (its ``seed``), as they are whatever the model's constructor ``seed``. A loaded
        model then trains on from these seeds, not from the archive's streams. None: nothing changes."""
        super().set_random_seed(seed)
        if seed is None:
            return
        n_envs = self.sampler.n_envs if self.sampler is not None else self.n_envs_requested or self.meta_batch_size
        streams = initial_episode_streams(int(seed), n_envs)
        sampler = self.sampler
        if sampler is not None and getattr(sampler, "_broken", False):  # its rebuild would seed itself: a new one
            self.sampler, self.env = None, None
            sampler.close()
        if self.sampler is not None:
            self.sampler.set_episode_rng_states(streams)
        else:  # the sampler built at the next learn starts with them
            self._closed_sampler_streams = streams

    def _setup_model(self) -> None:
        self._get_task_distribution()
        self._setup_lr_schedule()
        super().set_random_seed(self.seed)  # the sampler, built at the first learn, is seeded from self.seed
        self.n_envs = self.n_envs_requested or self.meta_batch_size  # the sampler's, built at the first learn
        self.policy_kwargs = {**self.policy_kwargs, "n_costs": len(self.constraints)}
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self._check_policy_class(self.policy)  # a factory's product (a class was checked before)
        if self.adapted_params is not None:
            self.policy.set_actor_override(self.adapted_params)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "task_distribution", "sampler", "_adaptation_sampler_cache"]

    def _warn_if_no_episode_completes(self) -> None:
        """Every batch starts fresh episodes: with fewer steps per env than an episode, none completes."""
        distribution = self._get_task_distribution()
        if distribution is None:
            return
        horizon = round_plan(self.meta_batch_size, self.n_envs, self.n_steps)[0][2]  # the longest of a collect's rounds
        if horizon < distribution.max_episode_steps:
            warnings.warn(
                f"n_steps={self.n_steps} gives each env {horizon} steps per batch, fewer than an episode of "
                f"{distribution.name} ({distribution.max_episode_steps} steps): no batch completes an episode, so "
                f"meta-training sees only the first {horizon} steps of each and J_C is their mean step cost times the "
                "episode length; size n_steps in whole episodes per env",
                stacklevel=3,
            )

    def _get_sampler(self) -> Sampler:
        if self.sampler is None:
            distribution = self._get_task_distribution()
            if distribution is None:
                raise ValueError("no task distribution: call set_task_distribution(...) first")
            n_envs = self.n_envs_requested or self.meta_batch_size
            seed = 0 if self.seed is None else self.seed
            if self.sampler_type == "ray":
                self.sampler = RaySampler(
                    distribution, n_envs=n_envs, seed=seed, cost_names=self.constraints.names, **(self.sampler_kwargs or {})
                )
            else:
                self.sampler = RolloutSampler(
                    distribution,
                    n_envs=n_envs,
                    vec_env_cls=self.vec_env_cls or DummyVecEnv,
                    seed=seed,
                    cost_names=self.constraints.names,
                )
            if self._closed_sampler_streams is not None:  # the envs of a sampler closed by close(): go on with them
                self.sampler.set_episode_rng_states(self._closed_sampler_streams)
                self._closed_sampler_streams = None
        self.sampler.ensure_usable()  # a VecEnv broken by a failed env is rebuilt
        # SB3's env: the local sampler's VecEnv, or what the driver knows of remote envs (their number and spaces)
        if isinstance(self.sampler, RolloutSampler):
            self.env = self.sampler.vec_env
        elif isinstance(self.sampler, RaySampler) and not (
            isinstance(self.env, RemoteEnvs) and self.env.sampler is self.sampler
        ):
            self.env = RemoteEnvs(self.sampler)  # type: ignore[assignment]
        self.n_envs = self.sampler.n_envs
        return self.sampler

    # --- batches ----------------------------------------------------------------------------------------------
    def _actor(self, observations: th.Tensor, params: Params) -> tuple[th.Tensor, th.Tensor]:
        return self.policy.actor_mean_log_std(observations, params)

    def _prepare(self, batch: TaskBatch, params: Params, episode_length: int | None = None) -> PreparedBatch:
        distribution = self._get_task_distribution()
        assert distribution is not None or episode_length is not None
        with phase("advantages"):
            return prepare_batch(
                batch,
                self._actor,
                params,
                None if self.critic == "linear" else self.policy.critic_values,
                self.gamma,
                self.gae_lambda,
                self.constraints.limits,
                episode_length or distribution.max_episode_steps,  # type: ignore[union-attr]
                self.cost_gamma,
                self.cost_confidence,
                self.recovery,
            )

    # --- adaptation (the inner updates' settings) -------------------------------------------------------------
    def _adaptation_defaults(self) -> tuple[int, int]:
        return self.n_inner_updates, self.n_steps

    def _inner_config(self) -> CPOConfig:
        """The inner updates' settings in meta-training (and in the outer line search's replays of them): with the
        second-order meta-gradient, conjugate gradient runs all its iterations (``cg_residual_tol=0``), so that the
        inner update is one smooth function of θ whose derivative the meta-gradient is; :meth:`adapt` keeps the
        tolerance (every method adapts alike)."""
        config = self._cpo_config(self.inner_target_kl)
        if self.meta_gradient != "second_order":
            return config
        return dataclasses.replace(config, step=dataclasses.replace(config.step, cg_residual_tol=0.0))

    def _adaptation_config(self, target_kl: float | None = None) -> CPOConfig:
        return self._cpo_config(self.inner_target_kl if target_kl is None else target_kl)

    def _prepare_adaptation_batch(self, batch: TaskBatch, params: Params, episode_length: int) -> PreparedBatch:
        return self._prepare(batch, params, episode_length)

    # --- training ---------------------------------------------------------------------------------------------
    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        self._get_sampler()
        # Training continued in this process: keep the episode streams where it left them, as a resumed archive does
        # (SB3's env reset below draws a seed from each env's stream, and the next collect starts fresh episodes)
        continued = not reset_num_timesteps and self.num_timesteps > 0 and getattr(self, "_resume_rng", None) is None
        streams = self._sampler_rng_states() if continued else None
        self._last_obs = None  # the sampler resets its envs itself (SB3 resets self.env below: each env draws a seed)
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        self._resume_random_streams(reset_num_timesteps)  # after SB3's env reset, which draws episode seeds
        if streams is not None:
            self._set_sampler_rng_states(streams)
        return result

    @with_limited_blas_threads
    def learn(
        self: SelfMetaCPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MetaCPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMetaCPO:
        """Meta-train for at least ``total_timesteps`` env steps (whole meta-iterations).

        A model adapted by :meth:`adapt` forgets its adaptation here: ``predict`` acts with the meta-parameters
        again (the adapted parameters were computed from the θ that training is about to change); call
        :meth:`adapt` again after training to act with an adapted policy.

        :param total_timesteps: env steps to train for at least (rounded up to whole meta-iterations)
        :param callback: SB3's: a ``BaseCallback``, a list of them or a function ``(locals, globals) -> bool``; its
            ``_on_step`` runs at every env step of the collect, and returning False stops training
        :param log_interval: log (and dump) every ``log_interval`` meta-iterations; None: never
        :param tb_log_name: the TensorBoard run's name (with ``tensorboard_log``)
        :param reset_num_timesteps: whether ``num_timesteps`` starts from 0 (False: continue counting, SB3's resume)
        :param progress_bar: show a progress bar (needs tqdm and rich)
        :return: the model
        """
        check_learn_arguments(total_timesteps, log_interval, callback, reset_num_timesteps, progress_bar, tb_log_name)
        check_tensorboard(self)
        total_timesteps = int(total_timesteps)
        if self.adapted_params is not None:
            self.reset_adaptation()
        total_timesteps, callback = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        # the callbacks (SB3's progress bar) are told the steps the whole meta-iterations will take
        per_iteration = self._steps_per_meta_iteration()
        planned = self.num_timesteps + math.ceil(max(total_timesteps - self.num_timesteps, 0) / per_iteration) * per_iteration
        callback.on_training_start({**locals(), "total_timesteps": planned}, globals())
        iteration = 0
        while self.num_timesteps < total_timesteps:
            if not self._meta_iteration(callback):
                break
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            if log_interval is not None and iteration % log_interval == 0:
                self.dump_logs(iteration)
        callback.on_training_end()
        return self

    def _steps_per_meta_iteration(self) -> int:
        """Env steps of one meta-iteration: K + 1 collects of every round of the sampler's envs."""
        return meta_iteration_steps(self.meta_batch_size, self.n_envs, self.n_steps, self.n_inner_updates)

    def _collect(self, tasks: Sequence[Task], params: Sequence[Params], callback: BaseCallback) -> list[TaskBatch]:
        """One batch per task; the callback gets SB3's ``locals`` at every env step. Raises
        :class:`CollectionStopped` when it returns False."""
        sampler = self._get_sampler()

        def on_step(step: VecStep) -> bool:
            self.num_timesteps += sampler.n_envs
            callback.update_locals({"self": self, "tasks": tasks, **step_locals(step)})
            return callback.on_step()

        with phase("sampling"):
            batches = sampler.collect(tasks, self._act_fn(params), self.n_steps, on_step)
        names = self.constraints.names
        for batch in batches:
            assert self.ep_info_buffer is not None
            self.ep_info_buffer.extend(
                {"r": e.reward, "l": e.length, "c": e.cost, "episode_costs": e.cost_sums(names)} for e in batch.episodes
            )
        return batches

    def _meta_iteration(self, callback: BaseCallback) -> bool:
        """One meta-iteration; returns False, before any update, when a callback asked to stop.

        The callback's rollout (``on_rollout_start`` … ``on_rollout_end``) is all the data of the meta-update, as
        SB3's rollout is the data of one update."""
        self.policy.set_training_mode(False)
        distribution = self._get_task_distribution()
        assert distribution is not None
        theta = self.policy.actor_params()
        callback.on_rollout_start()
        try:
            adaptations, raw_batches = self._adapt_to_tasks(distribution.sample(self.meta_batch_size), theta, callback)
        except CollectionStopped:
            return False
        callback.update_locals({"self": self})
        callback.on_rollout_end()
        objective = MetaObjective(
            self._actor,
            adaptations,
            self._inner_config(),
            second_order=self.meta_gradient == "second_order",
            fisher=self.policy.fisher_product,
            mode=self.meta_constraint,
            cvar_alpha=self.meta_constraint_alpha,
            cost_names=self.constraints.names,
        )
        with phase("meta_gradient"):
            value = objective.value([adaptation.stages for adaptation in adaptations])
            reward_grad, cost_grads = objective.gradients(value, list(theta.values()))
        result = self._outer_step(objective, theta, value, reward_grad, cost_grads)
        statistics = self._checked_statistics(raw_batches, adaptations)  # a bad one raises with nothing changed
        self._write_back(theta, add_flat(detached(theta), result.step.detach()))
        with phase("critic_training"):
            self._update_statistics(statistics)
        self._n_updates += 1
        self._log_iteration(adaptations, raw_batches, value, result, objective.constraint_names)
        return True

    def _adapt_to_tasks(
        self, tasks: Sequence[Task], theta: Params, callback: BaseCallback
    ) -> tuple[list[TaskAdaptation], list[TaskBatch]]:
        """The inner loop: per task, K CPO updates from θ, each on a fresh batch, then a validation batch."""
        differentiable = self.meta_gradient == "second_order"
        config = self._inner_config()
        adaptations = [TaskAdaptation(stages=[theta], batches=[]) for _ in tasks]
        raw_batches: list[TaskBatch] = []
        for stage in range(self.n_inner_updates + 1):
            batches = self._collect(tasks, [adaptation.stages[-1] for adaptation in adaptations], callback)
            raw_batches.extend(batches)
            for adaptation, batch in zip(adaptations, batches, strict=True):
                adaptation.batches.append(self._prepare(batch, adaptation.stages[-1]))
                if stage == self.n_inner_updates:
                    continue  # the validation batch
                with phase("inner_update"):
                    params, result = cpo_update(
                        self._actor,
                        adaptation.stages[-1],
                        adaptation.batches[-1],
                        config,
                        differentiable=differentiable,
                        fisher=self.policy.fisher_product,
                    )
                adaptation.stages.append(params)
                adaptation.fractions.append(result.fraction)
                adaptation.steps.append(result)
        return adaptations, raw_batches

    def _outer_step(
        self, objective: MetaObjective, theta: Params, value: MetaValue, reward_grad: th.Tensor, cost_grads: th.Tensor
    ) -> StepResult:
        """The outer CPO step on θ, in the Fisher metric of π_θ on the pre-adaptation data, with the meta-objective's
        line search (its value at each candidate θ)."""
        start = detached(theta)
        pre_observations = th.cat([adaptation.batches[0].observations for adaptation in objective.tasks])
        fvp = self.policy.fisher_product(start, pre_observations[:: self.fvp_sample_freq], self.cg_damping)
        with th.no_grad():
            reference = self._actor(pre_observations, start)

        def evaluate(step: th.Tensor) -> tuple[float, float, list[float]]:
            mean, log_std = self._actor(pre_observations, add_flat(start, step))
            if not representable_std(log_std):  # rejected: no policy update could ever leave such a std again
                return math.inf, math.nan, [math.nan] * len(value.cost_surrogates)
            # with the live value's CVaR tasks: the line search adds L(candidate) − L(θ) to b(θ), task for task
            candidate = objective.value(objective.stages_at(start, step), selection=value.selection)
            kl = float(gaussian_kl(*reference, mean, log_std).mean())
            return kl, float(candidate.reward), candidate.cost_surrogates.tolist()

        constrained = self._constrained and cost_grads.shape[0] > 0
        search = LineSearch(
            evaluate, float(value.reward.detach()), value.cost_surrogates.detach().tolist() if constrained else []
        )
        with phase("outer_step"):
            return constrained_step(
                reward_grad,
                cost_grads if constrained else None,
                value.constraints.detach() if constrained else None,
                fvp,
                self._cpo_config(self.outer_target_kl, len(objective.constraint_names)).step,
                search,
                value.recovery_margins if constrained else None,
                objective.constraint_scales() if constrained else None,
            )

    def _checked_statistics(
        self, raw_batches: Sequence[TaskBatch], adaptations: Sequence[TaskAdaptation]
    ) -> tuple[ObsStats | None, CriticData | None]:
        """What :meth:`_update_statistics` stores, computed and checked before the meta-update is written: the
        observation statistics from this meta-iteration's data and, with ``critic="mlp"``, the critics' regression
        data (the learning rate, the targets: a bad one raises a ``ValueError`` with nothing changed)."""
        all_observations = np.concatenate([b.observations.reshape(-1, b.observations.shape[-1]) for b in raw_batches])
        obs_stats = self.policy.obs_stats_after(all_observations)
        if self.critic != "mlp":
            return obs_stats, None
        prepared = [batch for adaptation in adaptations for batch in adaptation.batches]
        self._check_learning_rate_now()
        data = CriticData(
            observations=th.cat([p.observations for p in prepared]).float(),
            reward_targets=th.as_tensor(np.concatenate([p.reward_returns for p in prepared]), device=self.device).float(),
            cost_targets=th.as_tensor(np.concatenate([p.cost_returns for p in prepared]), device=self.device).float(),
            times=th.cat([p.time_fractions for p in prepared]).float(),  # type: ignore[misc]
        )
        check_critic_targets(data.reward_targets, data.cost_targets)
        return obs_stats, data

    def _update_statistics(self, statistics: tuple[ObsStats | None, CriticData | None]) -> None:
        """Store the observation statistics and fit the shared reward and cost critics (``critic="mlp"``) to the GAE
        lambda-returns of this meta-iteration's batches (:meth:`_checked_statistics`)."""
        obs_stats, data = statistics
        self.policy.set_obs_stats(obs_stats)
        if data is None:
            return
        self._update_learning_rate(self.policy.optimizer)  # critic_learning_rate (e.g. given to load) now
        loss = self.policy.fit_critics(
            data.observations,
            data.reward_targets,
            data.cost_targets,
            self.n_critic_updates,
            self.critic_batch_size,
            data.times,
        )
        self.logger.record("train/value_loss", loss)

    def _log_iteration(
        self,
        adaptations: Sequence[TaskAdaptation],
        raw_batches: Sequence[TaskBatch],
        value: MetaValue,
        result: StepResult,
        names: Sequence[str],
    ) -> None:
        record = self.logger.record
        constraints = self.constraints
        pre = [adaptation.batches[0] for adaptation in adaptations]
        post = [adaptation.batches[-1] for adaptation in adaptations]
        record("meta/pre_adapt_ep_rew_mean", float(np.mean([b.episode_reward for b in pre])))
        record("meta/post_adapt_ep_rew_mean", float(np.mean([b.episode_reward for b in post])))
        if TOTAL_COST not in constraints.names:  # the total cost too, as rollout/ep_cost_mean (unconstrained here)
            n_tasks = len(adaptations)  # raw_batches: stage after stage, the tasks in order
            for key, batches in (("pre", raw_batches[:n_tasks]), ("post", raw_batches[-n_tasks:])):
                task_means = [float(np.mean(batch.episode_costs)) for batch in batches if batch.episodes]
                record(f"meta/{key}_adapt_ep_cost_mean", float(np.mean(task_means)) if task_means else float("nan"))
        for index, name in enumerate(constraints.names):
            suffix = constraints.log_suffix(index)
            record(f"meta/pre_adapt_ep_{name}_mean", float(np.mean([b.episode_costs[index] for b in pre])))
            record(f"meta/post_adapt_ep_{name}_mean", float(np.mean([b.episode_costs[index] for b in post])))
            record(f"meta/cost_limit{suffix}", constraints.limits[index])
        for name, constraint in zip(names, value.constraints.detach().tolist(), strict=True):
            record("meta/constraint" if name == "cost" else f"meta/constraint_{name}", constraint)
        inner = [step for adaptation in adaptations for step in adaptation.steps]
        for case in ("trpo", "dual", "recovery"):
            record(f"train/inner_{case}_frac", float(np.mean([step.case == case for step in inner])))
        record("train/inner_accept_frac", float(np.mean([step.accepted for step in inner])))
        causes = Counter(step.rejection for step in inner if step.rejection is not None)
        summary = "; ".join(f"{cause} x{count}" for cause, count in sorted(causes.items())) or "none"
        record("train/inner_step_rejections", summary, exclude=("tensorboard",))
        accepted_kls = [step.kl for step in inner if step.accepted]
        record("train/inner_kl", float(np.mean(accepted_kls)) if accepted_kls else 0.0)
        self._record_step(result, names)
        record("train/n_updates", self._n_updates, exclude="tensorboard")
        record("train/std", self.policy.log_std.exp().mean().item())

    def dump_logs(self, iteration: int = 0) -> None:
        """Write the time and rollout statistics (SB3 keys plus ``rollout/ep_cost_mean``) and dump the logger."""
        assert self.ep_info_buffer is not None
        time_elapsed = max((time.time_ns() - self.start_time) / 1e9, sys.float_info.epsilon)
        fps = int((self.num_timesteps - self._num_timesteps_at_start) / time_elapsed)
        if iteration > 0:
            self.logger.record("time/iterations", iteration, exclude="tensorboard")
        if len(self.ep_info_buffer) > 0:
            self.logger.record("rollout/ep_rew_mean", safe_mean([info["r"] for info in self.ep_info_buffer]))
            self.logger.record("rollout/ep_len_mean", safe_mean([info["l"] for info in self.ep_info_buffer]))
        self._record_rollout_costs()
        self.logger.record("time/fps", fps)
        self.logger.record("time/time_elapsed", int(time_elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    def _use_env_after_load(self, env: Any, force_reset: bool, overridden: set[str], saved: bool = False) -> None:
        self.set_task_distribution(env)

    def close(self) -> None:
        super().close()
        sampler = self.sampler
        if sampler is None:
            return
        try:
            self._closed_sampler_streams = sampler.episode_rng_states()
        finally:
            self.sampler, self.env = None, None
            sampler.close()

    def _sampler_rng_states(self) -> dict[str, Any]:
        if self.sampler is None:
            return {} if self._closed_sampler_streams is None else {"training": list(self._closed_sampler_streams)}
        return {"training": self.sampler.episode_rng_states()}

    def _set_sampler_rng_states(self, states: Mapping[str, Any]) -> None:
        if "training" not in states:
            return
        sampler = self._get_sampler()
        if len(states["training"]) != sampler.n_envs:  # loaded with another n_envs: the streams are not these envs'
            warnings.warn(
                f"the archive's episode streams are for {len(states['training'])} envs, this model has {sampler.n_envs}: "
                "its envs start from the model's seed (the resumed run is not the uninterrupted one's continuation)",
                stacklevel=3,
            )
            return
        sampler.set_episode_rng_states(states["training"])
