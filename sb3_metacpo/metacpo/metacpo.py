"""Meta-CPO: meta-learn an initial policy whose few CPO updates on a new task give high reward under a cost limit."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.utils import safe_mean
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from tqdm.auto import tqdm

from sb3_metacpo.common.adaptation import (
    CPOConfig,
    Params,
    PreparedBatch,
    StepInfo,
    adapt_on_batches,
    add_flat,
    cpo_update,
    flatten,
    gaussian_kl,
    prepare_batch,
    surrogates,
)
from sb3_metacpo.common.checks import check, check_cpo_step_hyperparameters, check_positive_ints
from sb3_metacpo.common.cpo_step import backtracking_line_search, conjugate_gradient, cpo_direction, flat_grad
from sb3_metacpo.common.envs import make_safe_vec_env
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.profiling import phase
from sb3_metacpo.common.sampler import TaskBatch, TaskSampler
from sb3_metacpo.tasks.base import Task, TaskDistribution, make_task_distribution

SelfMetaCPO = TypeVar("SelfMetaCPO", bound="MetaCPO")


class MetaCPO(BaseAlgorithm):
    """Meta-CPO (Cho & Sun, AAAI-24): MAML-style meta-learning where every inner and outer update is a CPO step.

    Each meta-iteration samples ``meta_batch_size`` training tasks. Per task, ``n_inner_updates`` CPO steps adapt a
    functional copy of the meta-parameters theta (never theta itself), each on a fresh batch of ``n_steps`` env steps;
    a validation batch is then collected with the adapted policy. The meta-objective is the mean validation reward
    surrogate, the meta-constraint the mean post-adaptation constraint value; the outer update is a CPO step on theta
    (trust region ``outer_target_kl`` in the Fisher metric of pi_theta on the pre-adaptation data), whose line search
    re-runs the inner updates from each candidate theta on the stored batches.

    :param policy: the policy class or alias (``"MlpPolicy"``: Gaussian actor, reward critic, cost critic)
    :param env: the task distribution: a :class:`TaskDistribution` or the registered name of one
    :param meta_batch_size: training tasks per meta-iteration (M)
    :param n_inner_updates: CPO updates per task in the inner loop and, by default, in :meth:`adapt` (K)
    :param n_steps: env steps per task per batch (each inner update, and the validation batch)
    :param inner_target_kl: trust-region size delta of the inner (adaptation) updates, in mean KL
    :param outer_target_kl: trust-region size delta_theta of the outer (meta) update, in mean KL
    :param cost_limit: limit on the expected undiscounted episode cost (defaults to the family's suggestion)
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
    :param dual_solver: ``"analytic"`` (closed form of the CPO dual, ~0.1 ms) or ``"cvxpylayers"`` (the dual as a
        differentiable convex program, a few ms per solve); they agree to solver precision
    :param critic: ``"linear"``: a linear baseline fitted to each batch (task-specific even when the observation
        does not identify the task); ``"mlp"``: the policy's reward and cost critics, shared across tasks and trained
        on every batch
    :param critic_learning_rate: Adam learning rate of the MLP critics
    :param n_critic_updates: epochs of critic training per meta-iteration (``critic="mlp"``)
    :param critic_batch_size: minibatch size of critic training (``critic="mlp"``)
    :param n_envs: envs sampling in parallel (default: ``meta_batch_size``, one env per task)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``
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
        cost_limit: float | None = None,
        gamma: float = 0.99,
        cost_gamma: float = 1.0,
        gae_lambda: float = 0.95,
        cg_max_steps: int = 10,
        cg_damping: float = 0.1,
        fvp_sample_freq: int = 1,
        line_search_max_iter: int = 10,
        line_search_shrinking_factor: float = 0.8,
        meta_gradient: Literal["second_order", "first_order"] = "second_order",
        dual_solver: Literal["analytic", "cvxpylayers"] = "analytic",
        critic: Literal["linear", "mlp"] = "linear",
        critic_learning_rate: float = 1e-3,
        n_critic_updates: int = 5,
        critic_batch_size: int = 256,
        n_envs: int | None = None,
        vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
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
        self.critic = critic
        self.critic_learning_rate = critic_learning_rate
        self.n_critic_updates = n_critic_updates
        self.critic_batch_size = critic_batch_size
        self.n_envs_requested = n_envs
        self.vec_env_cls = vec_env_cls
        self.task_distribution: TaskDistribution | None = None
        self.task_distribution_name: str | None = None
        self.task_distribution_params: dict[str, Any] | None = None
        self.sampler: TaskSampler | None = None
        self._task_sampler: TaskSampler | None = None
        self.adapted_params: Params | None = None
        self.adaptation_history: list[dict[str, Any]] = []
        if env is not None:
            self.set_task_distribution(env)
        elif _init_setup_model:
            raise ValueError("env is required: pass a TaskDistribution or the registered name of one")
        if _init_setup_model:
            self._validate_hyperparameters()
            self._setup_model()

    # --- set-up -----------------------------------------------------------------------------------------------
    def _validate_hyperparameters(self) -> None:
        check_positive_ints(self, "meta_batch_size", "n_inner_updates", "n_steps", "n_critic_updates", "critic_batch_size")
        for name in ("inner_target_kl", "outer_target_kl", "critic_learning_rate"):
            value = getattr(self, name)
            check(value > 0, f"{name} must be > 0, got {value!r}")
        check_cpo_step_hyperparameters(self)
        check(
            self.meta_gradient in ("second_order", "first_order"),
            f"meta_gradient must be 'second_order' or 'first_order', got {self.meta_gradient!r}",
        )
        check(self.critic in ("linear", "mlp"), f"critic must be 'linear' or 'mlp', got {self.critic!r}")
        check(
            self.n_envs_requested is None or (isinstance(self.n_envs_requested, int) and self.n_envs_requested >= 1),
            f"n_envs must be a positive integer or None, got {self.n_envs_requested!r}",
        )

    def set_task_distribution(self, env: TaskDistribution | str) -> None:
        """Use ``env`` (a :class:`TaskDistribution` or a registered family name) for training and evaluation."""
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
        self.observation_space, self.action_space = observation_space, action_space
        self.task_distribution = env
        self.task_distribution_name = env.name
        self.task_distribution_params = env.get_params()
        for sampler in (self.sampler, self._task_sampler):
            if sampler is not None:
                sampler.close()
        self.sampler = self._task_sampler = None
        self.env = None

    def _setup_model(self) -> None:
        if self.task_distribution is None and self.task_distribution_name is not None:
            self.task_distribution = make_task_distribution(self.task_distribution_name, **self.task_distribution_params)
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        if not isinstance(self.policy, CPOPolicy):
            raise TypeError(f"{type(self).__name__} needs a CPOPolicy (e.g. 'MlpPolicy'), got {type(self.policy).__name__}")
        if self.adapted_params is not None:
            self.policy.set_actor_override(self.adapted_params)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "task_distribution", "sampler", "_task_sampler"]

    @property
    def effective_cost_limit(self) -> float:
        if self.cost_limit is not None:
            return float(self.cost_limit)
        assert self.task_distribution is not None
        return float(self.task_distribution.default_cost_limit)

    def _config(self, target_kl: float) -> CPOConfig:
        return CPOConfig(
            target_kl=target_kl,
            cost_limit=self.effective_cost_limit,
            constrained=self._constrained,
            cg_max_steps=self.cg_max_steps,
            cg_damping=self.cg_damping,
            fvp_sample_freq=self.fvp_sample_freq,
            dual_solver=self.dual_solver,
            line_search_max_iter=self.line_search_max_iter,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
        )

    def _get_sampler(self) -> TaskSampler:
        if self.sampler is None:
            if self.task_distribution is None:
                raise ValueError("no task distribution: call set_task_distribution(...) first")
            self.sampler = TaskSampler(
                self.task_distribution,
                n_envs=self.n_envs_requested or self.meta_batch_size,
                vec_env_cls=self.vec_env_cls or DummyVecEnv,
                seed=0 if self.seed is None else self.seed,
            )
            self.env = self.sampler.vec_env
            self.n_envs = self.env.num_envs
        return self.sampler

    # --- acting -----------------------------------------------------------------------------------------------
    def _actor(self, observations: th.Tensor, params: Params) -> tuple[th.Tensor, th.Tensor]:
        return self.policy.actor_mean_log_std(observations, params)

    def _act_fn(self, params_per_task: Sequence[Params], deterministic: bool = False) -> Any:
        """The sampler's policy: one batched forward for all envs, each env acting with its task's parameters."""
        stacked = {name: th.stack([params[name].detach() for params in params_per_task]) for name in params_per_task[0]}
        per_env_cache: dict[bytes, Any] = {}  # the env-to-task assignment is fixed within a collect

        def act(observations: np.ndarray, task_indices: np.ndarray) -> np.ndarray:
            key = task_indices.tobytes()
            if key not in per_env_cache:
                index = th.as_tensor(task_indices, device=self.device)
                per_env = {name: value[index] for name, value in stacked.items()}
                per_env_cache[key] = self.policy.numpy_actor(per_env, deterministic)
            return per_env_cache[key](observations)

        return act

    def _prepare(self, batch: TaskBatch, params: Params) -> PreparedBatch:
        assert self.task_distribution is not None
        with phase("advantages"):
            return prepare_batch(
                batch,
                self._actor,
                params,
                None if self.critic == "linear" else self.policy.critic_values,
                self.gamma,
                self.gae_lambda,
                self.effective_cost_limit,
                self.task_distribution.max_episode_steps,
                self.cost_gamma,
            )

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
        self._last_obs = None  # the sampler resets its envs itself
        return super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)

    def learn(
        self: SelfMetaCPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MetaCPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMetaCPO:
        """Meta-train for at least ``total_timesteps`` env steps (whole meta-iterations)."""
        total_timesteps, callback = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        callback.on_training_start(locals(), globals())
        iteration = 0
        while self.num_timesteps < total_timesteps:
            continue_training = self._meta_iteration(callback)
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            if log_interval is not None and iteration % log_interval == 0:
                self.dump_logs(iteration)
            if not continue_training:
                break
        callback.on_training_end()
        return self

    def _collect(self, tasks: Sequence[Task], params: Sequence[Params], callback: BaseCallback) -> list[TaskBatch]:
        sampler = self._get_sampler()

        def on_step() -> None:
            self.num_timesteps += sampler.n_envs
            callback.update_locals({"self": self})
            if not callback.on_step():
                self._stop_requested = True

        callback.on_rollout_start()
        with phase("sampling"):
            batches = sampler.collect(tasks, self._act_fn(params), self.n_steps, on_step)
        callback.on_rollout_end()
        for batch in batches:
            assert self.ep_info_buffer is not None
            self.ep_info_buffer.extend({"r": e.reward, "l": e.length, "c": e.cost} for e in batch.episodes)
        return batches

    def _meta_iteration(self, callback: BaseCallback) -> bool:
        """One meta-iteration; returns False when a callback asked to stop."""
        assert self.task_distribution is not None
        self._stop_requested = False
        second_order = self.meta_gradient == "second_order"
        inner_config = self._config(self.inner_target_kl)
        tasks = self.task_distribution.sample(self.meta_batch_size)
        theta = self.policy.actor_params()
        adapted: list[Params] = [theta] * len(tasks)
        inner_batches: list[list[PreparedBatch]] = [[] for _ in tasks]
        fractions: list[list[float]] = [[] for _ in tasks]
        inner_infos: list[StepInfo] = []
        raw_batches: list[TaskBatch] = []
        self.policy.set_training_mode(False)

        for _ in range(self.n_inner_updates):
            batches = self._collect(tasks, adapted, callback)
            raw_batches.extend(batches)
            for index, batch in enumerate(batches):
                prepared = self._prepare(batch, adapted[index])
                with phase("inner_update"):
                    adapted[index], info = cpo_update(
                        self._actor, adapted[index], prepared, inner_config, second_order, fisher=self.policy.fisher_product
                    )
                inner_batches[index].append(prepared)
                fractions[index].append(info.fraction)
                inner_infos.append(info)
        validation_raw = self._collect(tasks, adapted, callback)
        raw_batches.extend(validation_raw)
        validation = [self._prepare(batch, params) for batch, params in zip(validation_raw, adapted, strict=True)]

        with phase("meta_gradient"):
            # Meta-gradients: one backward pass per task and objective (vector-Jacobian products through phi^K(theta)).
            theta_list = list(theta.values())
            meta_reward_grad = th.zeros_like(flatten(theta))
            meta_cost_grad = th.zeros_like(meta_reward_grad)
            reward_values, cost_values = [], []
            for params, batch in zip(adapted, validation, strict=True):
                reward_surrogate, cost_surrogate = surrogates(self._actor, params, batch)
                meta_reward_grad += flat_grad(reward_surrogate, theta_list, retain_graph=True) / len(tasks)
                if self._constrained:
                    meta_cost_grad += flat_grad(cost_surrogate, theta_list) / len(tasks)
                reward_values.append(reward_surrogate.item())
                cost_values.append(cost_surrogate.item())
            meta_constraint = float(np.mean([batch.constraint for batch in validation]))

        with phase("outer_step"):
            # Outer CPO step in the Fisher metric of pi_theta on the pre-adaptation data.
            detached_theta = {name: value.detach() for name, value in theta.items()}
            pre_observations = th.cat([batches[0].observations for batches in inner_batches])
            fisher_observations = pre_observations[:: self.fvp_sample_freq]
            fvp = self.policy.fisher_product(detached_theta, fisher_observations, self.cg_damping)
            v = conjugate_gradient(fvp, meta_reward_grad, self.cg_max_steps)
            q = meta_reward_grad @ v
            if self._constrained:
                w = conjugate_gradient(fvp, meta_cost_grad, self.cg_max_steps)
                b = th.as_tensor(meta_constraint, dtype=q.dtype, device=q.device)
                result = cpo_direction(
                    v, w, q, meta_reward_grad @ w, meta_cost_grad @ w, b, self.outer_target_kl, solver=self.dual_solver
                )
            else:
                result = cpo_direction(v, None, q, None, None, None, self.outer_target_kl, has_cost=False)
            assert isinstance(result.case, str)
        step = result.x.detach()
        with th.no_grad():
            old_mean, old_log_std = self._actor(pre_observations, detached_theta)

        def evaluate(fraction: float) -> tuple[float, float, float]:
            candidate = add_flat(detached_theta, fraction * step)
            rewards, costs = [], []
            for task_batches, task_fractions, batch, params in zip(inner_batches, fractions, validation, adapted, strict=True):
                if second_order:  # re-adapt from the candidate: the exact post-adaptation objective
                    with th.enable_grad():
                        params = adapt_on_batches(
                            self._actor,
                            candidate,
                            task_batches,
                            inner_config,
                            False,
                            task_fractions,
                            self.policy.fisher_product,
                        )
                else:  # the inner steps held fixed: the objective whose gradient the first-order meta-gradient is
                    params = add_flat({name: value.detach() for name, value in params.items()}, fraction * step)
                reward_surrogate, cost_surrogate = surrogates(self._actor, params, batch)
                rewards.append(reward_surrogate.item())
                costs.append(cost_surrogate.item())
            mean, log_std = self._actor(pre_observations, candidate)
            kl = float(gaussian_kl(old_mean, old_log_std, mean, log_std).mean())
            return kl, float(np.mean(rewards)), float(np.mean(costs))

        with phase("outer_line_search"):
            search = backtracking_line_search(
                evaluate,
                float(np.mean(reward_values)),
                float(np.mean(cost_values)),
                result.case,
                meta_constraint if bool(result.cost_informative) else None,
                self.outer_target_kl,
                self.line_search_max_iter,
                self.line_search_shrinking_factor,
            )
        with th.no_grad():
            for name, value in add_flat(detached_theta, search.fraction * step).items():
                theta[name].copy_(value)

        with phase("critic_training"):
            all_observations = np.concatenate([b.observations.reshape(-1, b.observations.shape[-1]) for b in raw_batches])
            self.policy.update_obs_stats(all_observations)
            if self.critic == "mlp":
                self._train_critics([b for task in inner_batches for b in task] + validation)
        self._n_updates += 1
        self._log_iteration(inner_infos, inner_batches, validation, result, search, meta_constraint)
        return not self._stop_requested

    def _train_critics(self, prepared: Sequence[PreparedBatch]) -> None:
        """Fit the shared reward and cost critics to the GAE lambda-returns of this meta-iteration's batches."""
        # Observations and targets come from the same batches in the same order.
        observations = th.cat([p.observations for p in prepared]).float()
        reward_targets = th.as_tensor(np.concatenate([p.reward_returns for p in prepared]), device=self.device).float()
        cost_targets = th.as_tensor(np.concatenate([p.cost_returns for p in prepared]), device=self.device).float()
        epochs, batch_size = self.n_critic_updates, self.critic_batch_size
        loss = self.policy.fit_critics(observations, reward_targets, cost_targets, epochs, batch_size)
        self.logger.record("train/value_loss", loss)

    def _log_iteration(
        self,
        inner_infos: Sequence[StepInfo],
        inner_batches: Sequence[Sequence[PreparedBatch]],
        validation: Sequence[PreparedBatch],
        result: Any,
        search: Any,
        meta_constraint: float,
    ) -> None:
        pre = [batches[0] for batches in inner_batches]
        record = self.logger.record
        record("meta/pre_adapt_ep_rew_mean", float(np.mean([b.episode_reward for b in pre])))
        record("meta/pre_adapt_ep_cost_mean", float(np.mean([b.episode_cost for b in pre])))
        record("meta/post_adapt_ep_rew_mean", float(np.mean([b.episode_reward for b in validation])))
        record("meta/post_adapt_ep_cost_mean", float(np.mean([b.episode_cost for b in validation])))
        record("meta/cost_limit", self.effective_cost_limit)
        record("meta/constraint", meta_constraint)
        for case in ("trpo", "dual", "recovery"):
            record(f"train/inner_{case}_frac", float(np.mean([info.case == case for info in inner_infos])))
        record("train/inner_accept_frac", float(np.mean([info.accepted for info in inner_infos])))
        record("train/inner_kl", float(np.nanmean([info.kl if info.accepted else np.nan for info in inner_infos] + [0.0])))
        record("train/cpo_case", result.case)
        record("train/lambda", float(result.lam))
        record("train/nu", float(result.nu))
        record("train/kl", search.kl)
        record("train/line_search_fraction", search.fraction)
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
            self.logger.record("rollout/ep_cost_mean", safe_mean([info["c"] for info in self.ep_info_buffer]))
            self.logger.record("rollout/ep_len_mean", safe_mean([info["l"] for info in self.ep_info_buffer]))
        self.logger.record("time/fps", fps)
        self.logger.record("time/time_elapsed", int(time_elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    # --- adaptation -------------------------------------------------------------------------------------------
    def adapt(
        self: SelfMetaCPO,
        env: gym.Env | VecEnv | Task | str,
        n_updates: int | None = None,
        n_steps: int | None = None,
        callback: MaybeCallback = None,
        progress_bar: bool = False,
    ) -> SelfMetaCPO:
        """Run ``n_updates`` CPO updates from the meta-parameters on ``env`` and act with the result in ``predict``.

        The meta-parameters are not changed (call :meth:`reset_adaptation` to act with them again). The per-update
        statistics are in :attr:`adaptation_history`: for each update, the batch it used (collected by the policy
        before the update): mean episode reward and cost, the CPO case, the accepted step fraction and the KL.

        :param env: a gymnasium env or VecEnv reporting ``info["cost"]``, a task of the model's family, or the name
            of a registered family (its first held-out task)
        :param n_updates: CPO updates (default: ``n_inner_updates``)
        :param n_steps: env steps per update (default: ``n_steps``)
        :param callback: SB3 callback(s), called at every env step
        :param progress_bar: show a progress bar over the updates
        """
        callback = self._init_callback(callback, progress_bar=False)
        callback.on_training_start(locals(), globals())
        steps = self.adaptation_steps(env, n_updates, n_steps, on_step=callback.on_step)
        total = (self.n_inner_updates if n_updates is None else n_updates) + 1
        for _, params in tqdm(steps, total=total, desc="adapting", disable=not progress_bar):
            self.adapted_params = params
        callback.on_training_end()
        self.policy.set_actor_override(self.adapted_params)
        return self

    def adaptation_steps(
        self,
        env: gym.Env | VecEnv | Task | str,
        n_updates: int | None = None,
        n_steps: int | None = None,
        on_step: Callable[[], object] | None = None,
    ) -> Iterator[tuple[int, Params]]:
        """Yield ``(k, parameters after k updates)`` for k = 0 .. n_updates, adapting from the meta-parameters.

        :attr:`adaptation_history` is rebuilt along the way. Nothing of the model changes (not even ``predict``).
        """
        n_updates = self.n_inner_updates if n_updates is None else n_updates
        n_steps = self.n_steps if n_steps is None else n_steps
        check(isinstance(n_updates, int) and n_updates >= 0, f"n_updates must be an integer >= 0, got {n_updates!r}")
        check(isinstance(n_steps, int) and n_steps >= 1, f"n_steps must be a positive integer, got {n_steps!r}")
        sampler, task = self._adaptation_sampler(env)
        params = {name: value.detach().clone() for name, value in self.policy.actor_params().items()}
        config = self._config(self.inner_target_kl)
        self.adaptation_history = []
        yield 0, params
        for k in range(1, n_updates + 1):
            (batch,) = sampler.collect([task], self._act_fn([params]), n_steps, on_step)
            prepared = self._prepare(batch, params)
            params, info = cpo_update(self._actor, params, prepared, config, fisher=self.policy.fisher_product)
            params = {name: value.detach() for name, value in params.items()}
            self.adaptation_history.append(
                {
                    "update": k,
                    "ep_rew_mean": prepared.episode_reward,
                    "ep_cost_mean": prepared.episode_cost,
                    "cost_limit": self.effective_cost_limit,
                    "cpo_case": info.case,
                    "fraction": info.fraction,
                    "kl": info.kl,
                }
            )
            yield k, params

    def evaluate_params(
        self, env: gym.Env | VecEnv | Task | str, params: Params, n_episodes: int = 5, deterministic: bool = False
    ) -> tuple[float, float, int]:
        """Mean episode reward and cost of the actor at ``params`` over at least ``n_episodes`` fresh episodes."""
        sampler, task = self._adaptation_sampler(env)
        act = self._act_fn([params], deterministic=deterministic)
        (batch,) = sampler.collect([task], act, n_episodes * self._episode_length(sampler))
        return float(batch.episode_rewards.mean()), float(batch.episode_costs.mean()), len(batch.episodes)

    def _episode_length(self, sampler: TaskSampler) -> int:
        if sampler.distribution is not None:
            return sampler.distribution.max_episode_steps
        spec = sampler.vec_env.get_attr("spec")[0]
        if spec is None or spec.max_episode_steps is None:
            raise ValueError("cannot tell the episode length of this env: give it a TimeLimit (max_episode_steps)")
        return int(spec.max_episode_steps)

    def _adaptation_sampler(self, env: gym.Env | VecEnv | Task | str) -> tuple[TaskSampler, Task | None]:
        """A one-env sampler for ``env`` (cached for tasks of the model's family: each env runs whole episodes)."""
        seed = 0 if self.seed is None else self.seed
        if isinstance(env, str):
            env = make_task_distribution(env).test_tasks(1)[0]
        if isinstance(env, Task):
            assert self.task_distribution is not None
            if not isinstance(env, self.task_distribution.task_cls):
                raise TypeError(f"a {type(env).__name__} is not a task of the model's family {self.task_distribution.name}")
            if self._task_sampler is None:
                self._task_sampler = TaskSampler(self.task_distribution, n_envs=1, seed=seed)
            return self._task_sampler, env
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
        return TaskSampler(None, vec_env=env, seed=seed), None

    def reset_adaptation(self) -> None:
        """Forget the adapted parameters: ``predict`` acts with the meta-policy again."""
        self.adapted_params = None
        self.adaptation_history = []
        self.policy.set_actor_override(None)

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfMetaCPO],
        path: str,
        env: TaskDistribution | str | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfMetaCPO:
        """Load a saved model; ``env`` optionally replaces the saved task distribution (same spaces)."""
        model = super().load(path, None, device, custom_objects, print_system_info, force_reset, **kwargs)
        if env is not None:
            model.set_task_distribution(env)
        return model
