"""A velocity task family on safety-gymnasium's HalfCheetah (fast: tens of thousands of MuJoCo steps/s)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import gymnasium as gym
from gymnasium.wrappers import TimeLimit

from sb3_metacpo.tasks.base import ParamRange, Task, TaskDistribution, register_task_distribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium

SWITCH_IN_PLACE = True
"""Whether :meth:`TaskEnv.set_task <sb3_metacpo.tasks.task_env.TaskEnv.set_task>` switches a HalfCheetahVelocity env
to another task by setting its target velocity and velocity threshold, instead of building a new env (~3 ms: the
MuJoCo model compiled again from its XML, the same model). The episodes are bitwise the same either way
(``tests/test_velocity_switch.py``); set it to ``False`` to rebuild."""


@dataclass(frozen=True, kw_only=True)
class HalfCheetahVelocityTask(Task):
    """Run at ``target_velocity`` (m/s); cost 1 per step faster than ``velocity_threshold``."""

    family: ClassVar[str] = "HalfCheetahVelocity"
    target_velocity: float = 1.5
    velocity_threshold: float = 2.0


@functools.cache
def _env_class() -> type:
    import_safety_gymnasium()
    from safety_gymnasium.tasks.safe_velocity.safety_half_cheetah_velocity_v1 import SafetyHalfCheetahVelocityEnv

    class TargetVelocityHalfCheetah(SafetyHalfCheetahVelocityEnv):
        """Upstream's cost (speed above the threshold) with a target-velocity reward, as in MAML's HalfCheetah-Vel."""

        def __init__(self, target_velocity: float, velocity_threshold: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._target_velocity = target_velocity
            self._velocity_threshold = velocity_threshold

        def set_targets(self, target_velocity: float, velocity_threshold: float) -> None:
            """Switch to another task of the family: the reward's target and the cost's threshold (nothing else
            depends on the task)."""
            self._target_velocity = target_velocity
            self._velocity_threshold = velocity_threshold

        def step(self, action: Any) -> tuple:
            observation, _, cost, terminated, truncated, info = super().step(action)
            reward = -abs(info["x_velocity"] - self._target_velocity) + info["reward_ctrl"]
            return observation, reward, cost, terminated, truncated, info

    return TargetVelocityHalfCheetah


@register_task_distribution
class HalfCheetahVelocity(TaskDistribution):
    """HalfCheetah with a target velocity (reward ``-|v - target| - control cost``) and a velocity limit (cost 1
    per step above ``velocity_threshold``). Where the threshold is below the target, reward and cost conflict.
    Test tasks ask for higher speeds than any training task."""

    name = "HalfCheetahVelocity"
    task_cls = HalfCheetahVelocityTask
    limits: ClassVar[dict[str, ParamRange]] = {
        "target_velocity": ParamRange(0.0, 5.0),
        "velocity_threshold": ParamRange(0.1, 5.0),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "target_velocity": ParamRange(0.5, 2.0),
        "velocity_threshold": ParamRange(0.75, 2.5),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "target_velocity": ParamRange(2.25, 3.0),
        "velocity_threshold": ParamRange(1.75, 2.5),
    }
    default_max_episode_steps = 200
    default_cost_limit = 10.0

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        import_safety_gymnasium()  # the compatibility patches must precede the first safety_gymnasium import
        from safety_gymnasium.wrappers import SafetyGymnasium2Gymnasium

        assert isinstance(task, HalfCheetahVelocityTask)
        env = _env_class()(task.target_velocity, task.velocity_threshold, render_mode=render_mode)
        return TimeLimit(SafetyGymnasium2Gymnasium(env), self.max_episode_steps)

    def _switch_base_env(self, env: gym.Env, task: Task) -> bool:
        assert isinstance(task, HalfCheetahVelocityTask)
        base = env.unwrapped
        if not SWITCH_IN_PLACE or type(base) is not _env_class():
            return False
        cast(Any, base).set_targets(task.target_velocity, task.velocity_threshold)
        return True
