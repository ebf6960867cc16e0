"""The env wrapper shared by every task family: per-episode seeds, float32 spaces and in-place task switching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from sb3_metacpo.tasks.base import Task, TaskDistribution


#: ``reset(options={REPLAY_OPTION: seed})`` replays the episode whose ``info["episode_seed"]`` was ``seed``.
REPLAY_OPTION = "episode_seed"


def _float32_box(space: gym.Space) -> gym.spaces.Box:
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"task envs must have Box spaces, got {space}")
    return gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32)


def check_task_spaces(
    distribution: TaskDistribution, task: Task, spaces: tuple[gym.Space, gym.Space], expected: tuple[gym.Space, gym.Space]
) -> None:
    """A ``ValueError`` naming ``task`` when its env's observation or action shape is not the family's (every task of a
    family must have the same spaces: the policy and the rollout buffers are built for one shape, and numpy would
    broadcast a smaller observation into them without a word)."""
    shapes = tuple(space.shape for space in spaces)
    wanted = tuple(space.shape for space in expected)
    if shapes != wanted:
        raise ValueError(
            f"{distribution.name}: the env of {task} has observation/action shapes {shapes[0]}/{shapes[1]}, but the "
            f"family's envs have {wanted[0]}/{wanted[1]}: every task of a family must have the same spaces"
        )


class TaskEnv(gym.Wrapper):
    """Env of one task of a :class:`~sb3_metacpo.tasks.base.TaskDistribution`.

    * Every episode gets its own seed for the start state, drawn from a generator that ``reset(seed=...)`` seeds
      (gymnasium convention: seed once, then later resets continue the stream). The seed is reported as
      ``info["episode_seed"]`` on reset and on every step, and ``reset(options={"episode_seed": s})`` replays the
      episode of seed ``s`` (the same start state; the stream is left where it was).
    * The task's layout does not depend on episode seeds: it is fixed by the task's parameters and ``layout_seed``.
    * Observations and actions are exposed as float32 (what the policy uses); the world keeps its own dtype.
    * :meth:`set_task` switches to another task of the same family in place, so vectorised workers need not be
      restarted (``vec_env.env_method("set_task", task, indices=[i])``).
    """

    def __init__(self, distribution: TaskDistribution, task: Task, render_mode: str | None = None) -> None:
        super().__init__(distribution._make_base_env(task, render_mode=render_mode))
        self.distribution = distribution
        self.task = task
        self._render_mode = render_mode
        self.observation_space = _float32_box(self.env.observation_space)
        self.action_space = _float32_box(self.env.action_space)
        self._action_dtype = self.env.action_space.dtype
        self._episode_rng = np.random.default_rng()
        self.episode_seed: int | None = None
        self._switched = False  # set_task ran since the last reset: the next call must be a reset

    def set_task(self, task: Task) -> None:
        """Switch the world to ``task`` (a no-op when it is the current task); call ``reset`` afterwards.

        Families that can switch an env in place do so (e.g. HalfCheetahVelocity, where a task is two numbers of the
        reward and the cost); the others build the new task's env. A ``step`` before the next ``reset`` raises a
        ``RuntimeError`` either way (the old episode does not go on under the new task)."""
        if task == self.task:
            return
        self.distribution.validate_task(task)
        if not self.distribution._switch_base_env(self.env, task):
            env = self.distribution._make_base_env(task, render_mode=self._render_mode)
            try:  # checked before the current world is closed: on an error this env keeps its task
                spaces = (_float32_box(env.observation_space), _float32_box(env.action_space))
                check_task_spaces(self.distribution, task, spaces, (self.observation_space, self.action_space))
            except (TypeError, ValueError):
                env.close()
                raise
            self.env.close()
            self.env = env
        self.task = task
        self._switched = True

    def episode_rng_state(self) -> dict[str, Any]:
        """The state of the episode-seed stream (JSON-serialisable)."""
        return dict(self._episode_rng.bit_generator.state)

    def set_episode_rng_state(self, state: dict[str, Any]) -> None:
        """Continue the episode-seed stream from ``state`` (of :meth:`episode_rng_state`)."""
        self._episode_rng = np.random.default_rng()
        self._episode_rng.bit_generator.state = state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        options = dict(options) if options else {}
        replay = options.pop(REPLAY_OPTION, None)
        if seed is not None:
            self._episode_rng = np.random.default_rng(seed)
        if replay is None:
            self.episode_seed = int(self._episode_rng.integers(2**31 - 1))
        elif isinstance(replay, (int, np.integer)) and not isinstance(replay, bool) and 0 <= replay < 2**31 - 1:
            self.episode_seed = int(replay)
        else:
            raise ValueError(f"options['{REPLAY_OPTION}'] must be an episode seed (info['episode_seed']), got {replay!r}")
        observation, info = self.env.reset(seed=self.episode_seed, options=options or None)
        self._switched = False
        info["episode_seed"] = self.episode_seed
        return observation.astype(np.float32), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._switched:
            raise RuntimeError(f"set_task switched this env to {self.task}: call reset() before the next step")
        observation, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=self._action_dtype))
        info["episode_seed"] = self.episode_seed
        return observation.astype(np.float32), float(reward), bool(terminated), bool(truncated), info
