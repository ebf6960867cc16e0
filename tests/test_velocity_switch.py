"""HalfCheetahVelocity switches tasks in place: episodes bit for bit those of an env built for the task."""

import os

import numpy as np
import pytest

from sb3_metacpo.tasks import TaskEnv, make_task_distribution, velocity
from sb3_metacpo.tasks.velocity import HalfCheetahVelocityTask


def _episodes(env, seed, n_steps=90):
    """Observations, rewards, infos and flags of ``n_steps`` seeded random steps from a seeded reset (60-step
    episodes, so one reset on the way)."""
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(n_steps, 6)).astype(np.float32)
    obs, info = env.reset(seed=seed)
    trace = [obs.tobytes(), sorted(info.items())]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        trace += [obs.tobytes(), np.float64(reward).tobytes(), terminated, truncated]
        trace += [(key, _bits(value)) for key, value in sorted(info.items()) if key != "episode"]
        if terminated or truncated:
            obs, info = env.reset()
            trace += [obs.tobytes(), sorted(info.items())]
    return trace


def _bits(value):
    """A value of ``info`` as comparable bits (dicts, e.g. ``episode_costs``, entry by entry)."""
    if isinstance(value, dict):
        return sorted((key, _bits(item)) for key, item in value.items())
    array = np.asarray(value)
    return array.dtype.str, array.tobytes()


def _task_env(env):
    task_env = env.env.env  # CostMonitor -> EpisodeCostRecorder -> TaskEnv
    assert isinstance(task_env, TaskEnv)
    return task_env


def test_switch_in_place_gives_the_built_envs_episodes():
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    tasks = [*dist.sample(3, np.random.default_rng(0)), *dist.test_tasks(1)]
    switched = dist.make_env(tasks[0])
    base = switched.unwrapped
    _episodes(switched, 11, n_steps=25)  # the switch comes mid-episode: the reset after it starts afresh
    for seed, task in enumerate(tasks[1:]):
        _task_env(switched).set_task(task)
        assert switched.unwrapped is base  # switched in place, not rebuilt
        built = dist.make_env(task)
        assert _episodes(switched, seed) == _episodes(built, seed)
        # the task's reward and cost, not the first task's
        assert (built.unwrapped._target_velocity, built.unwrapped._velocity_threshold) == (
            task.target_velocity,
            task.velocity_threshold,
        )
        assert (base._target_velocity, base._velocity_threshold) == (task.target_velocity, task.velocity_threshold)
        built.close()
    switched.close()


def test_switch_in_place_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(velocity, "SWITCH_IN_PLACE", False)
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    task_a, task_b = dist.sample(2, np.random.default_rng(1))
    env = dist.make_env(task_a)
    base = env.unwrapped
    _task_env(env).set_task(task_b)
    assert env.unwrapped is not base  # rebuilt
    built = dist.make_env(task_b)
    assert _episodes(env, 3) == _episodes(built, 3)
    env.close()
    built.close()


@pytest.mark.parametrize("switch_in_place", [True, False])
def test_rewards_and_costs_follow_the_new_task(monkeypatch, switch_in_place):
    """An independent check of the switched env's reward and cost: the task's formulas on the step's velocity."""
    monkeypatch.setattr(velocity, "SWITCH_IN_PLACE", switch_in_place)
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    task_a = HalfCheetahVelocityTask(target_velocity=4.0, velocity_threshold=5.0)
    task_b = HalfCheetahVelocityTask(target_velocity=0.5, velocity_threshold=0.1)
    env = dist.make_env(task_a)
    _task_env(env).set_task(task_b)
    env.reset(seed=4)
    costs = []
    for action in np.random.default_rng(4).uniform(-1, 1, size=(60, 6)).astype(np.float32):
        _, reward, _, _, info = env.step(action)
        assert reward == -abs(info["x_velocity"] - task_b.target_velocity) + info["reward_ctrl"]
        assert info["cost"] == float(info["x_velocity"] > task_b.velocity_threshold)
        costs.append(info["cost"])
    assert 0 < sum(costs) < len(costs)  # the new threshold is crossed, and not at every step
    env.close()


@pytest.mark.parametrize("fast_step", [True, False])
def test_step_is_upstreams_step_bit_for_bit(monkeypatch, fast_step):
    """The written-out step gives upstream's (safety-gymnasium's step, gymnasium's simulation, control cost and
    observation) with the target-velocity reward: the same observations, reward, cost, flags, info and MuJoCo state,
    bit for bit, and the same error for a wrong action shape (FAST_STEP = False: upstream's own step, the same)."""
    monkeypatch.setattr(velocity, "FAST_STEP", fast_step)
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    task = HalfCheetahVelocityTask(target_velocity=1.0, velocity_threshold=0.8)
    ours, upstream = dist.make_env(task).unwrapped, dist.make_env(task).unwrapped
    upstream_step = type(ours).__mro__[1].step  # safety-gymnasium's SafetyHalfCheetahVelocityEnv.step
    ours.reset(seed=5)
    upstream.reset(seed=5)
    actions = np.random.default_rng(5).uniform(-1.5, 1.5, size=(80, 6))
    for action in [*actions[:40], *actions[40:].astype(np.float32)]:  # float64, then float32 as training passes
        mine = ours.step(action)
        observation, _, cost, terminated, truncated, info = upstream_step(upstream, action)
        reward = -abs(info["x_velocity"] - task.target_velocity) + info["reward_ctrl"]
        assert _bits(mine[0]) == _bits(observation) and _bits(mine[1]) == _bits(reward)
        assert mine[2:5] == (cost, terminated, truncated) and type(mine[2]) is type(cost)
        assert list(mine[5]) == list(info) and all(_bits(mine[5][key]) == _bits(info[key]) for key in info)
        assert _bits(ours.data.qpos) == _bits(upstream.data.qpos) and _bits(ours.data.qvel) == _bits(upstream.data.qvel)
        assert _bits(ours.data.cacc) == _bits(upstream.data.cacc)  # mj_rnePostConstraint ran too
    with pytest.raises(ValueError, match=r"Action dimension mismatch. Expected \(6,\), found \(5,\)"):
        ours.step(np.zeros(5))
    ours.close()
    upstream.close()


def test_step_after_set_task_needs_a_reset():
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    task_a, task_b = dist.sample(2, np.random.default_rng(3))
    env = dist.make_env(task_a)
    env.reset(seed=0)
    env.step(np.zeros(6, dtype=np.float32))
    _task_env(env).set_task(task_a)  # the same task: nothing switched
    env.step(np.zeros(6, dtype=np.float32))
    _task_env(env).set_task(task_b)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before the next step"):
        env.step(np.zeros(6, dtype=np.float32))
    env.reset()
    env.step(np.zeros(6, dtype=np.float32))
    env.close()


def test_rendered_steps_draw_the_velocity_marker_as_upstream(monkeypatch):
    """Rendering with safety-gymnasium's velocity marker works on mujoco >= 3.2 (gymnasium 0.29's marker code sets the
    removed MjvGeom.texid), and the written-out step renders upstream's frames, also after a switch in place."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))  # headless rendering
    dist = make_task_distribution("HalfCheetahVelocity", max_episode_steps=60)
    task_a = HalfCheetahVelocityTask(target_velocity=1.0, velocity_threshold=0.3)
    task_b = HalfCheetahVelocityTask(target_velocity=2.0, velocity_threshold=2.4)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(8, 6)).astype(np.float32)
    frames = {}
    for fast in (True, False):
        monkeypatch.setattr(velocity, "FAST_STEP", fast)
        env = dist.make_env(task_a, render_mode="rgb_array")
        env.reset(seed=1)
        try:
            env.render()
        except Exception as error:  # whichever way OpenGL is missing, there is nothing to test
            pytest.skip(f"no OpenGL rendering here: {error}")
        frames[fast] = []
        for action in actions:
            env.step(action)
            frames[fast].append(env.render())  # the marker is drawn from the second rendered step on
        _task_env(env).set_task(task_b)
        env.reset(seed=2)
        frames[fast].append(env.render())  # the first frame showed the last episode's marker, in task_a's colour
        for action in actions[:3]:
            env.step(action)
            frames[fast].append(env.render())
        env.close()
    built = dist.make_env(task_b, render_mode="rgb_array")
    built.reset(seed=2)
    rebuilt_frames = [built.render()]
    for action in actions[:3]:
        built.step(action)
        rebuilt_frames.append(built.render())
    built.close()
    assert all(np.array_equal(a, b) for a, b in zip(frames[True], frames[False], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(frames[True][-4:], rebuilt_frames, strict=True))
