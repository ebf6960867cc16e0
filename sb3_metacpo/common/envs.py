"""Vectorised safe-RL envs for the algorithms: standard env ids, single tasks and multi-task training.

Every env is wrapped in a :class:`CostMonitor`, so episode costs reach ``info["episode"]["c"]``. Env factories are
small picklable classes, so ``SubprocVecEnv`` workers build their env (and apply the safety-gymnasium compatibility
patches) in their own process.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sb3_metacpo.tasks.base import Task, TaskDistribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.monitor import CostMonitor
from sb3_metacpo.tasks.task_env import TaskEnv

#: What the algorithms accept as an env: a gymnasium env, a VecEnv, an env id, a task distribution, or a task.
SafeEnv = gym.Env | VecEnv | str | TaskDistribution | Task


class ResampleTaskOnReset(gym.Wrapper):
    """A task env that switches to a freshly drawn training task of its distribution at every reset.

    Task draws come from their own stream, seeded by the first ``reset(seed=...)`` (separately from the episode
    seeds), so a seeded VecEnv sees the same task sequence on every run.
    """

    def __init__(self, distribution: TaskDistribution) -> None:
        self._rng = np.random.default_rng()
        self.distribution = distribution
        super().__init__(distribution.make_env(distribution.sample(1, self._rng)[0]))
        task_env = self.env
        while not isinstance(task_env, TaskEnv):
            task_env = task_env.env  # type: ignore[attr-defined]
        self._task_env = task_env

    @property
    def task(self) -> Task:
        return self._task_env.task

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if seed is not None:
            self._rng = np.random.default_rng((seed, 1))
        self._task_env.set_task(self.distribution.sample(1, self._rng)[0])
        return self.env.reset(seed=seed, options=options)


class EnvFactory:
    """Picklable env constructor: an env id, a task, or (``task=None``) a distribution's resampling env."""

    def __init__(self, env_id: str | None = None, distribution: TaskDistribution | None = None, task: Task | None = None):
        self.env_id, self.distribution, self.task = env_id, distribution, task

    def __call__(self) -> gym.Env:
        if self.distribution is not None:
            if self.task is None:
                return ResampleTaskOnReset(self.distribution)
            return self.distribution.make_env(self.task)
        assert self.env_id is not None
        if self.env_id.startswith("Safety"):
            import_safety_gymnasium()  # registers the safety-gymnasium ids, after the compatibility patches
        return CostMonitor(gym.make(self.env_id))


def make_safe_vec_env(
    env: SafeEnv,
    n_envs: int = 1,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
    distribution: TaskDistribution | None = None,
) -> VecEnv:
    """A VecEnv of ``env`` whose envs report episode costs.

    :param env: a gymnasium env (wrapped in a :class:`CostMonitor` unless it already is), a VecEnv of
        cost-monitored envs (returned as is), a gymnasium id (e.g. ``"SafetyPointGoal1Gymnasium-v0"``), a
        :class:`TaskDistribution` (every env trains on a new task drawn at each reset) or a :class:`Task` of
        ``distribution``
    :param n_envs: number of envs for ids, distributions and tasks
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``, for ids, distributions and tasks
    :param distribution: the family of a :class:`Task` ``env``
    """
    if isinstance(env, VecEnv):
        if not all(env.env_is_wrapped(CostMonitor)):
            raise ValueError(
                "the VecEnv's envs must be wrapped in sb3_metacpo.tasks.monitor.CostMonitor (SB3's Monitor drops the "
                "episode cost); or pass the env id, a gymnasium env or a TaskDistribution instead"
            )
        return env
    if isinstance(env, gym.Env):
        if not is_wrapped(env, CostMonitor):
            if is_wrapped(env, Monitor):
                raise ValueError(
                    "the env is wrapped in SB3's Monitor, which drops the episode cost: wrap it in "
                    "sb3_metacpo.tasks.monitor.CostMonitor instead"
                )
            env = CostMonitor(env)
        return DummyVecEnv([lambda: env])
    if isinstance(n_envs, bool) or not isinstance(n_envs, (int, np.integer)) or n_envs < 1:
        raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
    if isinstance(env, TaskDistribution):
        factory = EnvFactory(distribution=env)
    elif isinstance(env, Task):
        if distribution is None:
            raise ValueError(f"a {type(env).__name__} needs its TaskDistribution to build its env")
        distribution.validate_task(env)
        factory = EnvFactory(distribution=distribution, task=env)
    elif isinstance(env, str):
        factory = EnvFactory(env_id=env)
    else:
        raise TypeError(
            f"env must be a gymnasium env, a VecEnv, an env id, a TaskDistribution or a Task, got {type(env).__name__}"
        )
    return (vec_env_cls or DummyVecEnv)([factory] * int(n_envs))  # type: ignore[arg-type]
