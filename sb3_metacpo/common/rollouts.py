"""Collect on-policy rollouts for several tasks at once through one SB3 VecEnv.

Envs are assigned to tasks (``TaskEnv.set_task`` switches an env's world in place, also inside ``SubprocVecEnv``
workers), the policy is queried once per step for all envs, and the data are returned per task, time-major, with
the episode boundaries a correct GAE needs: ``terminated`` (no bootstrap), ``truncated`` (bootstrap from the
terminal observation) and the batch end (bootstrap from the observation after the last step).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs

from sb3_metacpo.common.advantages import episode_steps
from sb3_metacpo.common.constraints import close_cost_names
from sb3_metacpo.common.envs import EnvFactory, EnvWorkerError, reporting_vec_env_cls
from sb3_metacpo.common.policies import NumpyActor
from sb3_metacpo.tasks.base import Task, TaskDistribution
from sb3_metacpo.tasks.monitor import NO_EPISODE_COST, TOTAL_COST, cost_number, episode_cost, is_cost_key

_FLOAT32_MAX = float(np.finfo(np.float32).max)

#: ``act(observations, task_indices) -> actions``: observations ``(n_envs, *obs_shape)``, task_indices ``(n_envs,)``
#: index into the task list given to :meth:`RolloutSampler.collect`; returns raw (unclipped) actions
#: ``(n_envs, *action_shape)``.
ActFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: What a sampler acts with, a :class:`~sb3_metacpo.common.policies.NumpyActor` (one parameter set per task of the
#: collect; what every sampler accepts, and the only policy a remote sampler can ship to its workers) or an
#: :data:`ActFn` (local samplers only).
RolloutPolicy = NumpyActor | ActFn


def array_observations(obs: VecEnvObs) -> np.ndarray:
    """A VecEnv's observations as the one array a flat Box observation space gives (dict and tuple spaces are not
    supported: the policies need flat Box observations)."""
    if not isinstance(obs, np.ndarray):
        raise TypeError(f"expected the observations of a flat Box space (one array), got {type(obs).__name__}")
    return obs


def box_space(space: spaces.Space, what: str) -> spaces.Box:
    """``space`` as a Box (the algorithms' observation and action spaces), or a ``TypeError`` naming ``what``."""
    if not isinstance(space, spaces.Box):
        raise TypeError(f"the {what} space must be a Box, got {space}")
    return space


@dataclass(frozen=True)
class VecStep:
    """One VecEnv step of a collect, as handed to its ``on_step`` callback (SB3's names for the ``locals`` of a
    rollout): ``obs`` before the step, the raw ``actions`` (before clipping), ``new_obs`` (reset where done),
    ``rewards``, ``dones``, ``infos``, the step index ``t`` of the round and each env's task index ``task_indices``."""

    obs: np.ndarray
    actions: np.ndarray
    new_obs: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]
    t: int
    task_indices: np.ndarray


#: ``on_step(step) -> bool | None``: called after every VecEnv step of a collect; returning ``False`` stops it.
OnStep = Callable[[VecStep], object]


class CollectionStopped(Exception):
    """Raised by :meth:`RolloutSampler.collect` when its ``on_step`` returned False (e.g. an SB3 callback asked to
    stop); the partial data are dropped."""


@dataclass
class EpisodeRecord:
    """A completed episode: undiscounted return and cost (``info["cost"]``), length, the seed of its start state, how
    it ended, the undiscounted sums of the constrained cost signals (``costs``, in the sampler's order) and of every
    cost signal the env reported (``all_costs``, by name: ``cost`` and each ``cost_<type>``, constrained or not)."""

    reward: float
    cost: float
    length: int
    seed: int | None  # None for envs that do not report ``info["episode_seed"]``
    terminated: bool
    costs: tuple[float, ...] = ()
    all_costs: dict[str, float] = field(default_factory=dict)

    def cost_sums(self, names: Sequence[str]) -> dict[str, float]:
        """Every cost signal's episode sum by name (``names``: those of ``costs``, the constrained ones, whose sums
        stand in for a record built without ``all_costs``)."""
        return dict(self.all_costs) if self.all_costs else dict(zip(names, self.costs, strict=True))


@dataclass
class TaskBatch:
    """On-policy data of one task, time-major: arrays are (n_steps, n_envs, ...) for this task's envs."""

    task: Task | None
    observations: np.ndarray
    actions: np.ndarray  # as sampled by the policy (before clipping to the action space)
    rewards: np.ndarray
    costs: np.ndarray  # (n_steps, n_envs, m): one column per constrained cost signal
    terminated: np.ndarray  # the episode ended at this step by termination
    truncated: np.ndarray  # the episode ended at this step by the time limit
    next_observations: np.ndarray  # observation after each step (the terminal one where an episode ended)
    episodes: list[EpisodeRecord] = field(default_factory=list)
    episode_steps: np.ndarray | None = None  # (n_steps, n_envs): index of each step within its episode

    @property
    def n_steps(self) -> int:
        """Total env steps in the batch."""
        return int(self.rewards.size)

    @property
    def dones(self) -> np.ndarray:
        return self.terminated | self.truncated

    @property
    def episode_rewards(self) -> np.ndarray:
        return np.array([episode.reward for episode in self.episodes])

    @property
    def episode_costs(self) -> np.ndarray:
        """Total cost (``info["cost"]``) of each completed episode."""
        return np.array([episode.cost for episode in self.episodes])

    @property
    def episode_constraint_costs(self) -> np.ndarray:
        """Sums of the constrained cost signals of each completed episode, shape (n_episodes, m)."""
        return np.array([episode.costs for episode in self.episodes]).reshape(len(self.episodes), self.costs.shape[-1])


class RolloutStorage:
    """Time-major arrays of a rollout of ``n_envs`` envs, filled step by step from VecEnv outputs.

    ``cost_names`` are the info keys of the constrained cost signals (default: the total ``"cost"``). Non-finite
    observations, rewards or costs raise a ``ValueError`` naming the env index, the step and the quantity, before
    they are stored.
    """

    def __init__(
        self,
        horizon: int,
        n_envs: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        cost_names: Sequence[str] = (TOTAL_COST,),
        env_offset: int = 0,
    ) -> None:
        self.cost_names = tuple(cost_names)
        #: the index of this storage's first env among the sampler's (a Ray worker's block), for error messages
        self.env_offset = env_offset
        self.observations = np.zeros((horizon, n_envs, *obs_shape), dtype=np.float32)
        self.next_observations = np.zeros_like(self.observations)
        self.actions = np.zeros((horizon, n_envs, *action_shape), dtype=np.float32)
        self.rewards = np.zeros((horizon, n_envs), dtype=np.float32)
        self.costs = np.zeros((horizon, n_envs, len(self.cost_names)), dtype=np.float32)
        self.terminated = np.zeros((horizon, n_envs), dtype=bool)
        self.truncated = np.zeros((horizon, n_envs), dtype=bool)
        # per cost name and env: the steps whose info lacked the name (a name missing at every step of every env of a
        # batch is an error there, before any update: a misspelled cost_limit name on a plain env)
        self.cost_missing = np.zeros((len(self.cost_names), n_envs), dtype=np.int64)
        self._last_infos: Sequence[dict[str, Any]] = []

    def add(
        self,
        t: int,
        observations: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_observations: np.ndarray,
        dones: np.ndarray,
        infos: Sequence[dict[str, Any]],
    ) -> list[tuple[int, EpisodeRecord]]:
        """Store step ``t`` (``next_observations`` as returned by the VecEnv, i.e. already reset where done);
        returns ``(env index, episode)`` for every episode that ended at this step."""
        # Checked as stored, in float32: a finite float64 beyond float32's range would be stored as inf.
        self.observations[t] = observations
        self.actions[t] = actions
        self.rewards[t] = rewards
        self.next_observations[t] = next_observations
        if t == 0:  # later observations are the previous step's next observations, checked there
            _check_finite(t, "observation", self.observations[t], self.env_offset)
        _check_finite(t, "reward", self.rewards[t], self.env_offset)
        _check_finite(t, "next observation", self.next_observations[t], self.env_offset)
        self._last_infos = infos  # what the envs report, for batch()'s error
        ended = []
        for index, info in enumerate(infos):
            for column, name in enumerate(self.cost_names):
                if name not in info:
                    # A per-type cost may skip steps (safety-gymnasium's Button task omits cost_buttons for a few steps
                    # after a press): 0 there, but an episode that never reports it is an error (below).
                    self.costs[t, index, column] = 0.0
                    self.cost_missing[column, index] += 1
                    continue
                value = cost_number(info[name])
                if value is None:
                    raise TypeError(
                        f"env {index + self.env_offset} reported {name}={info[name]!r} at step {t} of the rollout: a "
                        "constrained cost signal must be a number (a Python or numpy number or bool) at every step"
                    )
                if not abs(value) <= _FLOAT32_MAX:  # NaN, inf, or beyond the float32 storage's range
                    raise ValueError(
                        f"env {index + self.env_offset} reported a non-finite {name} ({value}; the storage is float32, "
                        f"finite up to {_FLOAT32_MAX:.4g}) at step {t} of the rollout"
                    )
                self.costs[t, index, column] = value
            if dones[index]:
                is_truncated = info.get("TimeLimit.truncated", False)
                self.truncated[t, index] = is_truncated
                self.terminated[t, index] = not is_truncated
                self.next_observations[t, index] = info["terminal_observation"]
                _check_finite(t, "terminal observation", self.next_observations[t, index][None], index + self.env_offset)
                cost = episode_cost(info)
                if "episode" not in info or cost is None:
                    raise KeyError(NO_EPISODE_COST)
                episode = info["episode"]
                episode_costs = info.get("episode_costs", {TOTAL_COST: cost})
                # A named cost the episode never reported counts 0, as a step that does not report it (an env may
                # report a cost only on the steps that pay it); a name no env reports in a whole rollout is refused
                # by batch() before any update.
                record = EpisodeRecord(
                    episode["r"],
                    cost,
                    episode["l"],
                    info.get("episode_seed"),
                    not is_truncated,
                    tuple(float(episode_costs.get(name, 0.0)) for name in self.cost_names),
                    {name: float(value) for name, value in episode_costs.items()},
                )
                ended.append((index, record))
        return ended

    def batch(
        self,
        task: Task | None,
        columns: np.ndarray | slice,
        episodes: list[EpisodeRecord],
        first_steps: np.ndarray | None = None,
    ) -> TaskBatch:
        """The rollout of the envs selected by ``columns`` as a :class:`TaskBatch`.

        ``first_steps``: the index within its episode of each selected env's first step (default: 0, the rollout
        starts fresh episodes). A constrained cost that no selected env reported at any step raises a ``KeyError``
        (a ``cost_limit`` name the envs do not report, caught here before any update even when no episode ended)."""
        never = (self.cost_missing[:, columns] == len(self.rewards)).all(axis=1)
        if never.any():
            names = [name for name, missing in zip(self.cost_names, never, strict=True) if missing]
            indices = np.arange(self.rewards.shape[1])[columns]
            infos = self._last_infos
            reported = sorted({key for i in indices if i < len(infos) for key in infos[i] if is_cost_key(key)})
            raise KeyError(
                f"no env reported {names} in its info at any of the rollout's {len(self.rewards)} steps (envs "
                f"{indices.tolist()}; at the last step they reported {reported}): cost_limit may name only costs the "
                "envs report (safety-gymnasium's: 'cost' and 'cost_<type>', e.g. 'cost_hazards'), and an env that reports a "
                "cost only on the steps that pay it must report it as 0 at the others; this batch updated nothing"
                + close_cost_names(names, reported)
            )
        dones = self.terminated[:, columns] | self.truncated[:, columns]
        steps = episode_steps(dones)
        if first_steps is not None:  # the first episode of each env continues from an earlier rollout
            before_first_done = np.cumsum(np.vstack([np.zeros((1, dones.shape[1]), bool), dones[:-1]]), axis=0) == 0
            steps = steps + np.where(before_first_done, np.asarray(first_steps)[None, :], 0)
        return TaskBatch(
            task=task,
            observations=self.observations[:, columns],
            actions=self.actions[:, columns],
            rewards=self.rewards[:, columns],
            costs=self.costs[:, columns],
            terminated=self.terminated[:, columns],
            truncated=self.truncated[:, columns],
            next_observations=self.next_observations[:, columns],
            episodes=episodes,
            episode_steps=steps,
        )


def _check_finite(t: int, quantity: str, values: np.ndarray, env_offset: int = 0) -> None:
    """Raise a ``ValueError`` naming the first env whose ``quantity`` at step ``t`` is not finite (pass the values as
    stored: a finite float64 beyond float32's range is inf in the float32 storage)."""
    values = np.asarray(values)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        raise ValueError(
            f"env {int(bad[0]) + env_offset} returned a non-finite {quantity} at step {t} of the rollout: the policy, "
            "its normalisation statistics and the critics were left untouched; fix the env (or filter its output)"
        )


def check_actions(t: int, actions: np.ndarray, env_offset: int = 0) -> None:
    """Raise a ``ValueError`` naming the first env whose sampled action at step ``t`` is not finite, before the envs
    step (a NaN action reached the env, whose NaN reward was then reported as the env's fault)."""
    if not np.isfinite(actions).all():
        bad = np.flatnonzero(~np.isfinite(actions.reshape(len(actions), -1)).all(axis=1))
        raise ValueError(
            f"the policy returned a non-finite action for env {int(bad[0]) + env_offset} at step {t} of the rollout: its "
            "parameters or "
            "its acting code (a custom policy's numpy_actor_sets) produced it; the envs did not step and nothing was "
            "updated"
        )


def initial_episode_streams(seed: int, n_envs: int) -> list[dict[str, Any]]:
    """The episode-seed streams of ``n_envs`` envs seeded with ``seed`` (env ``j``: ``default_rng(seed + j)``, what
    ``VecEnv.seed(seed)`` gives the envs at their next reset), as bit-generator states."""
    return [dict(np.random.default_rng(seed + index).bit_generator.state) for index in range(n_envs)]


def round_plan(n_tasks: int, n_envs: int, n_steps: int) -> list[tuple[int, np.ndarray, int]]:
    """How a sampler of ``n_envs`` envs collects ``n_tasks`` tasks: per round, ``(index of its first task, each
    env's task index within the round, horizon)``. Rounds take ``n_envs`` tasks each; in a round of M tasks env
    ``j`` runs task ``j % M`` for ``ceil(n_steps / (n_envs // M))`` steps."""
    plan = []
    for start in range(0, n_tasks, n_envs):
        m = min(n_envs, n_tasks - start)
        plan.append((start, np.arange(n_envs) % m, math.ceil(n_steps / (n_envs // m))))
    return plan


def meta_iteration_steps(meta_batch_size: int, n_envs: int, n_steps: int, n_inner_updates: int) -> int:
    """Env steps of one meta-iteration of ``meta_batch_size`` tasks on a sampler of ``n_envs`` envs: K + 1 collects
    (``n_inner_updates`` adaptation batches and the validation batch) of every round of :func:`round_plan`."""
    rounds = round_plan(meta_batch_size, n_envs, n_steps)
    return (n_inner_updates + 1) * sum(horizon * n_envs for _, _, horizon in rounds)


def bind_policy(
    act: RolloutPolicy, task_indices: np.ndarray, env_indices: np.ndarray, round_index: int, n_envs: int
) -> Callable[[np.ndarray], np.ndarray]:
    """The per-step function of one round of a sampler of ``n_envs`` envs: a :class:`NumpyActor` bound to the envs
    ``env_indices``, or ``act(obs, task_indices)``."""
    if isinstance(act, NumpyActor):
        return act.bind(task_indices, env_indices, round_index, n_envs)
    return lambda observations: act(observations, task_indices)


#: ``hook(t, obs, raw_actions, new_obs, rewards, dones, infos) -> bool | None``: called after every step of
#: :func:`run_round`; ``False`` stops the round with :class:`CollectionStopped`.
StepHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]], object]


def run_round(
    vec_env: VecEnv,
    act: Callable[[np.ndarray], np.ndarray],
    horizon: int,
    action_space: spaces.Box,
    observation_space: spaces.Box,
    cost_names: Sequence[str],
    hook: StepHook | None = None,
    env_offset: int = 0,
) -> tuple[RolloutStorage, list[tuple[int, int, EpisodeRecord]], np.ndarray]:
    """Reset ``vec_env`` and run ``act`` for ``horizon`` steps: the storage, ``(t, env index, episode)`` of every
    episode that ended (in step, then env order) and the VecEnv's observation after the last step. Errors name an
    env by its index among the sampler's: ``env_offset`` plus its index in ``vec_env`` (a Ray worker's block)."""
    n_envs = vec_env.num_envs
    storage = RolloutStorage(horizon, n_envs, observation_space.shape, action_space.shape, cost_names, env_offset)
    ended: list[tuple[int, int, EpisodeRecord]] = []
    low, high = action_space.low, action_space.high
    obs = array_observations(vec_env.reset())
    _check_finite(0, "observation after reset", obs, env_offset)
    for t in range(horizon):
        raw_actions = np.asarray(act(obs), dtype=np.float32).reshape(n_envs, *action_space.shape)
        check_actions(t, raw_actions, env_offset)
        vec_obs, rewards, dones, infos = vec_env.step(raw_actions.clip(low, high))  # np.clip, without its dispatch
        next_obs = array_observations(vec_obs)
        ended.extend(
            (t, index, episode) for index, episode in storage.add(t, obs, raw_actions, rewards, next_obs, dones, infos)
        )
        if hook is not None and hook(t, obs, raw_actions, next_obs, rewards, dones, list(infos)) is False:
            raise CollectionStopped(f"a callback stopped the collect at step {t}")
        obs = next_obs
    return storage, ended, obs


def round_batches(
    storage: RolloutStorage,
    tasks: Sequence[Task | None],
    owners: np.ndarray,
    ended: Sequence[tuple[int, int, EpisodeRecord]],
) -> list[TaskBatch]:
    """One batch per task of a round: env ``j``'s samples go to task ``owners[j]``, with the episodes that ended on
    its envs (``ended``: ``(t, env index, episode)`` in step, then env order)."""
    episodes: list[list[EpisodeRecord]] = [[] for _ in tasks]
    for _, index, episode in ended:
        episodes[owners[index]].append(episode)
    return [storage.batch(task, owners == index, episodes[index]) for index, task in enumerate(tasks)]


class Sampler(ABC):
    """What the algorithms collect rollouts with: a policy on several tasks of one
    :class:`~sb3_metacpo.tasks.base.TaskDistribution`.

    Implementations: :class:`RolloutSampler` (the envs in this process or in ``SubprocVecEnv`` workers, the default)
    and :class:`~sb3_metacpo.common.ray_sampler.RaySampler` (the envs in Ray actors). Every implementation runs the
    same ``n_envs`` logical envs with the same task assignment (:func:`round_plan`), the same episode-seed streams
    (:func:`initial_episode_streams`) and, given a :class:`NumpyActor`, the same action noise, so the same seed gives
    the same batches whichever sampler collects them.
    """

    distribution: TaskDistribution | None
    n_envs: int
    seed: int
    cost_names: tuple[str, ...]
    observation_space: spaces.Box
    action_space: spaces.Box

    @abstractmethod
    def collect(
        self, tasks: Sequence[Task | None], act: RolloutPolicy, n_steps: int, on_step: OnStep | None = None
    ) -> list[TaskBatch]:
        """Run ``act`` on every task for at least ``n_steps`` env steps each; one batch per task, in order.
        ``on_step`` gets every VecEnv step (a :class:`VecStep`); if it returns False, :class:`CollectionStopped`."""

    @abstractmethod
    def reset_envs(self) -> None:
        """Start fresh episodes on every env now (each env draws a seed from its episode stream), as SB3's ``learn``
        set-up does to an algorithm's env."""

    @abstractmethod
    def episode_rng_states(self) -> list[dict[str, Any]]:
        """The state of every env's episode-seed stream (JSON-serialisable), to continue it after a restart."""

    @abstractmethod
    def set_episode_rng_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue the episode-seed streams of :meth:`episode_rng_states`."""

    @abstractmethod
    def ensure_usable(self) -> None:
        """Repair what an earlier failed collect broke (e.g. rebuild a VecEnv whose worker died)."""

    @abstractmethod
    def close(self) -> None:
        """Release the envs (never raises for broken ones)."""


class RolloutSampler(Sampler):
    """Rollouts of a policy on several tasks of one :class:`~sb3_metacpo.tasks.base.TaskDistribution`, through one
    VecEnv of ``n_envs`` envs.

    With M tasks in :meth:`collect`: if M <= n_envs, every task gets ``n_envs // M`` envs (the remainder goes to the
    first tasks) and all tasks are sampled at once; otherwise tasks are sampled in rounds of ``n_envs``. Each task
    gets at least ``n_steps`` env steps. Every collect starts fresh episodes; each episode's start state comes from
    its own seed, drawn from per-env streams seeded by ``seed``.

    :param distribution: the task family
    :param n_envs: number of envs (choose a multiple of the number of tasks per collect to waste nothing)
    :param vec_env_cls: ``DummyVecEnv`` (one process) or ``SubprocVecEnv`` (one process per env)
    :param vec_env_kwargs: extra arguments of the VecEnv class (e.g. ``start_method``)
    :param seed: seed of the per-episode start-state seeds
    :param vec_env: an existing VecEnv to sample instead of building one (then ``distribution`` may be None and
        :meth:`collect` takes ``tasks=[None]``: the envs keep the worlds they have)
    :param cost_names: the info keys of the constrained cost signals (default: the total ``"cost"``)
    """

    def __init__(
        self,
        distribution: TaskDistribution | None,
        n_envs: int = 1,
        vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] = DummyVecEnv,
        vec_env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        vec_env: VecEnv | None = None,
        cost_names: Sequence[str] = (TOTAL_COST,),
    ) -> None:
        self.cost_names = tuple(cost_names)
        self._env_fns: list[EnvFactory] | None = None
        if vec_env is None:
            if not isinstance(distribution, TaskDistribution):
                raise TypeError(f"distribution must be a TaskDistribution, got {type(distribution).__name__}")
            if isinstance(n_envs, bool) or not isinstance(n_envs, (int, np.integer)) or n_envs < 1:
                raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
            self._initial_task: Task | None = distribution.test_tasks(1)[0]
            self._env_fns = [EnvFactory(distribution=distribution, task=self._initial_task)] * int(n_envs)
            self._vec_env_cls = reporting_vec_env_cls(vec_env_cls)
            self._vec_env_kwargs = dict(vec_env_kwargs or {})
            vec_env = self._vec_env_cls(self._env_fns, **self._vec_env_kwargs)  # type: ignore[arg-type]
        else:
            self._initial_task = None  # a given VecEnv runs whatever task its envs have: collect it with tasks=[None]
        self.distribution = distribution
        self.seed = seed
        self.n_rebuilds = 0
        self._broken = False
        self.vec_env: VecEnv = vec_env
        self.n_envs = vec_env.num_envs
        self.vec_env.seed(seed)
        self._env_tasks: list[Task | None] = [self._initial_task] * self.n_envs
        self.observation_space = box_space(self.vec_env.observation_space, "observation")
        self.action_space = box_space(self.vec_env.action_space, "action")

    def episode_rng_states(self) -> list[dict[str, Any]]:
        """The state of every env's episode-seed stream (JSON-serialisable), to continue it after a restart. An env
        whose seed (``vec_env.seed``, e.g. a new or rebuilt VecEnv's) its next reset has yet to apply has the stream
        that seed starts: its stream until then is unseeded. A VecEnv broken by a failed env worker (whose workers
        cannot answer) has the streams its rebuild starts."""
        if self._broken:
            return initial_episode_streams(self._rebuild_seed(), self.n_envs)
        try:
            states = list(self.vec_env.env_method("episode_rng_state"))
        except EnvWorkerError:  # a worker died since the last collect: that collect fails, and the rebuild follows
            return initial_episode_streams(self._rebuild_seed(), self.n_envs)
        pending = getattr(self.vec_env, "_seeds", [None] * self.n_envs)  # SB3's seeds for the next reset
        return [
            state if seed is None else initial_episode_streams(int(seed), 1)[0]
            for state, seed in zip(states, pending, strict=True)
        ]

    def set_episode_rng_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue the episode-seed streams of :meth:`episode_rng_states` (seeds pending from ``seed`` dropped)."""
        if len(states) != self.n_envs:
            raise ValueError(f"{len(states)} episode-stream states for a sampler of {self.n_envs} envs")
        self.vec_env._reset_seeds()  # seeds not yet applied would restart the streams at the next reset
        for index, state in enumerate(states):
            self.vec_env.env_method("set_episode_rng_state", state, indices=[index])

    def ensure_usable(self) -> None:
        """Rebuild the VecEnv if an env failed in an earlier collect (done by :meth:`collect` itself)."""
        if self._broken:
            self._rebuild()

    def _rebuild(self) -> None:
        """Replace a VecEnv broken by a failed env (its worker dead or its state unknown) by a fresh one, seeded
        with ``seed + n_rebuilds * n_envs`` (env ``j`` gets ``seed + n_rebuilds * n_envs + j``: fresh episode streams,
        neither a replay of the first ones nor another env's)."""
        if self._env_fns is None:
            raise EnvWorkerError(
                "an env of the VecEnv given to this sampler failed earlier and the sampler cannot rebuild a VecEnv "
                "it did not build: pass a new one"
            )
        self.close()
        seed = self._rebuild_seed()
        self.n_rebuilds += 1
        self.vec_env = self._vec_env_cls(self._env_fns, **self._vec_env_kwargs)  # type: ignore[arg-type]
        self.vec_env.seed(seed)
        self._env_tasks = [self._initial_task] * self.n_envs
        self._broken = False

    def _rebuild_seed(self) -> int:
        """The seed of the next rebuild's VecEnv: ``seed + (n_rebuilds + 1) * n_envs``."""
        return self.seed + (self.n_rebuilds + 1) * self.n_envs

    def _assign(self, tasks: Sequence[Task | None]) -> np.ndarray:
        """Point env i at task ``owners[i]`` (tasks get ``n_envs // M`` envs each, remainder to the first ones)."""
        owners = np.arange(self.n_envs) % len(tasks)
        for index, owner in enumerate(owners.tolist()):
            if self._env_tasks[index] != tasks[owner]:
                if self.distribution is None:
                    raise ValueError("this sampler wraps a given VecEnv and cannot switch tasks; collect with tasks=[None]")
                self.vec_env.env_method("set_task", tasks[owner], indices=[index])
                self._env_tasks[index] = tasks[owner]
        return owners

    def reset_envs(self) -> None:
        self.ensure_usable()
        self.vec_env.reset()

    def collect(
        self, tasks: Sequence[Task | None], act: RolloutPolicy, n_steps: int, on_step: OnStep | None = None
    ) -> list[TaskBatch]:
        """Run ``act`` on every task for at least ``n_steps`` env steps each; return one batch per task, in order.

        ``act`` is a :class:`~sb3_metacpo.common.policies.NumpyActor` with a parameter set per task, or an
        :data:`ActFn`. ``on_step`` is called with a :class:`VecStep` after every VecEnv step (e.g. to drive SB3
        callbacks and progress bars); if it returns ``False`` the collect stops and raises :class:`CollectionStopped`.
        """
        if not tasks:
            raise ValueError("collect needs at least one task")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.ensure_usable()
        batches: list[TaskBatch] = []
        try:
            for round_index, (start, owners, horizon) in enumerate(round_plan(len(tasks), self.n_envs, n_steps)):
                round_tasks = list(tasks[start : start + self.n_envs])
                policy = bind_policy(act, owners + start, np.arange(self.n_envs), round_index, self.n_envs)
                batches.extend(self._collect_round(round_tasks, owners, horizon, policy, on_step, start))
        except EnvWorkerError:
            self._broken = True  # rebuilt at the next collect
            raise
        return batches

    def _collect_round(
        self,
        tasks: list[Task | None],
        owners: np.ndarray,
        horizon: int,
        policy: Callable[[np.ndarray], np.ndarray],
        on_step: OnStep | None,
        task_offset: int = 0,
    ) -> list[TaskBatch]:
        """One round: ``owners`` index into the round's ``tasks``; ``task_offset`` is the round's first task in the
        collect's list (callbacks get task indices into that list)."""
        self._assign(tasks)
        hook: StepHook | None = None
        if on_step is not None:

            def hook(
                t: int,
                obs: np.ndarray,
                actions: np.ndarray,
                new_obs: np.ndarray,
                rewards: np.ndarray,
                dones: np.ndarray,
                infos: list[dict[str, Any]],
            ) -> object:
                return on_step(VecStep(obs, actions, new_obs, rewards, dones, infos, t, owners + task_offset))

        storage, ended, _ = run_round(
            self.vec_env, policy, horizon, self.action_space, self.observation_space, self.cost_names, hook
        )
        return round_batches(storage, tasks, owners, ended)

    def close(self) -> None:
        """Close the VecEnv (never raises for a broken one)."""
        try:
            self.vec_env.close()
        except (EnvWorkerError, EOFError, BrokenPipeError, ConnectionResetError):
            pass  # a broken VecEnv: its workers are gone already
