"""A velocity task family on safety-gymnasium's HalfCheetah (fast: tens of thousands of MuJoCo steps/s)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import TimeLimit

from sb3_metacpo.tasks.base import ParamRange, Task, TaskDistribution, register_task_distribution
from sb3_metacpo.tasks.compat import fix_viewer_markers, import_safety_gymnasium

FAST_STEP = True
"""Whether HalfCheetahVelocity envs step with upstream's step written out in one method (safety-gymnasium's
``SafetyHalfCheetahVelocityEnv.step`` with gymnasium's simulation, control cost and observation: the same operations
on the same numbers, bitwise, ``tests/test_velocity_switch.py``), or call upstream's (``False``)."""

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
    import mujoco
    from safety_gymnasium.tasks.safe_velocity.safety_half_cheetah_velocity_v1 import SafetyHalfCheetahVelocityEnv
    from safety_gymnasium.utils.task_utils import add_velocity_marker, clear_viewer

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

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
            """Upstream's reset, then the velocity marker of the last episode taken off the viewer: the first frame
            of an episode showed it (after a switch in place, in the old task's cost colour, where a rebuilt env shows
            none; and a recording from the same seed began with another frame than the last one)."""
            result = super().reset(seed=seed, options=options)
            if self.mujoco_renderer.viewer:
                clear_viewer(self.mujoco_renderer.viewer)
            return result

        def step(self, action: Any) -> tuple:
            fix_viewer_markers(self.mujoco_renderer.viewer)  # safety-gymnasium's velocity marker, on mujoco >= 3.2
            if not FAST_STEP:
                observation, _, cost, terminated, truncated, info = super().step(action)
                reward = -abs(info["x_velocity"] - self._target_velocity) + info["reward_ctrl"]
                return observation, reward, cost, terminated, truncated, info
            return self._fast_step(action)

        def _fast_step(self, action: Any) -> tuple:
            """Upstream's step (safety-gymnasium's ``SafetyHalfCheetahVelocityEnv.step`` with gymnasium's
            ``do_simulation``, ``control_cost`` and ``_get_obs``) written out, with the target-velocity reward: the
            same operations on the same numbers, without five method calls and the copies of ``_get_obs`` (about
            5 µs of the ~45 µs of a step; ``tests/test_velocity_switch.py`` compares it with upstream's)."""
            model, data = self.model, self.data
            if np.shape(action) != (model.nu,):  # MujocoEnv.do_simulation's check
                raise ValueError(f"Action dimension mismatch. Expected {(model.nu,)}, found {np.array(action).shape}")
            x_position_before = data.qpos[0]
            data.ctrl[:] = action
            mujoco.mj_step(model, data, nstep=self.frame_skip)
            mujoco.mj_rnePostConstraint(model, data)  # as gymnasium's MujocoEnv (force-related quantities)
            x_position_after = data.qpos[0]
            x_velocity = (x_position_after - x_position_before) / (model.opt.timestep * self.frame_skip)
            ctrl_cost = self._ctrl_cost_weight * np.add.reduce(np.square(action), axis=None)  # control_cost's np.sum
            qpos = data.qpos
            if self._exclude_current_positions_from_observation:
                qpos = qpos[1:]
            observation = np.concatenate((qpos, data.qvel))
            info = {
                "x_position": x_position_after,
                "x_velocity": x_velocity,
                "reward_run": self._forward_reward_weight * x_velocity,
                "reward_ctrl": -ctrl_cost,
            }
            cost = float(x_velocity > self._velocity_threshold)
            if self.mujoco_renderer.viewer:
                clear_viewer(self.mujoco_renderer.viewer)
                add_velocity_marker(
                    viewer=self.mujoco_renderer.viewer,
                    pos=self.get_body_com("torso")[:3].copy(),
                    vel=x_velocity,
                    cost=cost,
                    velocity_threshold=self._velocity_threshold,
                )
            if self.render_mode == "human":
                self.render()
            reward = -abs(x_velocity - self._target_velocity) + info["reward_ctrl"]
            return observation, reward, cost, False, False, info

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
