"""Navigation envs move the bodies of their compiled MuJoCo model at reset instead of recompiling it (``FAST_RESET``);
episodes must be bitwise identical to upstream's reset, which compiles a new model every episode."""

import os

import numpy as np
import pytest

from sb3_metacpo.tasks import make_task_distribution, safety_gym

FAMILIES = ["PointButtonHazard", "PointGoalHazard", "CarCircle"]
MAX_STEPS = 50
EPISODES = [60, 20, 60, 60]  # steps tried per episode: 60 is cut at MAX_STEPS (truncation), 20 resets mid-episode


def make_env(name, fast, monkeypatch, render_mode=None):
    monkeypatch.setattr(safety_gym, "FAST_RESET", fast)  # read when the env is made
    dist = make_task_distribution(name, seed=0, max_episode_steps=MAX_STEPS)
    return dist.make_env(dist.sample(1)[0], render_mode=render_mode)


def model_arrays(env):
    """Copies of the model's arrays but the textures' pixels (~190 MB of skybox that no reset changes)."""
    model = env.unwrapped.task.model
    names = [name for name in dir(model) if name != "tex_data" and isinstance(getattr(model, name), np.ndarray)]
    return {name: getattr(model, name).copy() for name in names}


def rollout(env):
    """The seeded episodes' transitions, every model array after each reset and whether each later reset kept the
    model object."""
    rng = np.random.default_rng(0)
    transitions, models, kept, model = [], [], [], None
    for episode, n_steps in enumerate(EPISODES):
        obs, info = env.reset(seed=7) if episode == 0 else env.reset()
        transitions.append((obs, info["episode_seed"]))
        models.append(model_arrays(env))
        if model is not None:
            kept.append(env.unwrapped.task.model is model)
        model = env.unwrapped.task.model
        for _ in range(n_steps):
            obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            transitions.append((obs, reward, info["cost"], terminated, truncated))
            if terminated or truncated:
                break
    return transitions, models, kept


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_reset_replays_upstream_episodes_exactly(name, monkeypatch):
    fast_env, stock_env = make_env(name, True, monkeypatch), make_env(name, False, monkeypatch)
    fast, fast_models, fast_kept = rollout(fast_env)
    stock, stock_models, stock_kept = rollout(stock_env)
    assert all(fast_kept) and not any(stock_kept)  # only the stock resets recompiled
    assert any(len(step) == 5 and step[4] for step in stock)  # the sequence does include a truncation
    for fast_step, stock_step in zip(fast, stock, strict=True):
        assert len(fast_step) == len(stock_step)
        np.testing.assert_array_equal(fast_step[0], stock_step[0])
        assert fast_step[1:] == stock_step[1:]
    # the poses, inertial frames, qpos0 and camera set in place are exactly the compiled ones
    for fast_model, stock_model in zip(fast_models, stock_models, strict=True):
        for key, value in stock_model.items():
            np.testing.assert_array_equal(fast_model[key], value, err_msg=key)


def test_reset_reuses_the_model_until_the_xml_changes(monkeypatch):
    env = make_env("PointButtonHazard", True, monkeypatch)
    env.reset(seed=0)
    task = env.unwrapped.task
    model, data, start = task.model, task.data, task.model.body("agent").pos.copy()
    env.reset()
    assert task.model is model and task.data is data  # not recompiled...
    assert not np.array_equal(model.body("agent").pos, start)  # ...but the robot starts elsewhere
    task.hazards.color = np.array([1.0, 0.5, 0.0, 0.25])  # a change the XML holds: upstream's path compiles it
    env.reset()
    assert task.model is not model
    np.testing.assert_array_equal(task.model.geom("hazard0").rgba, [1.0, 0.5, 0.0, 0.25])
    model = task.model
    env.reset()
    assert task.model is model  # ...and is reused again from then on


def test_set_task_then_fast_reset(monkeypatch):
    env = make_env("PointGoalHazard", True, monkeypatch)
    env.reset(seed=0)
    model = env.unwrapped.task.model
    task_env = env.env.env  # CostMonitor -> EpisodeCostRecorder -> TaskEnv
    other = make_task_distribution("PointGoalHazard", seed=1).sample(1)[0]
    task_env.set_task(other)
    env.reset(seed=0)
    task = env.unwrapped.task
    assert task.model is not model
    hazards = [task.model.geom(i).name for i in range(task.model.ngeom) if task.model.geom(i).name.startswith("hazard")]
    assert len(hazards) == other.n_hazards
    model = task.model
    env.reset()
    assert task.model is model


def test_rendering_after_fast_reset(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))  # headless rendering
    frames = []
    for fast in (True, False):
        env = make_env("PointButtonHazard", fast, monkeypatch, render_mode="rgb_array")
        env.reset(seed=0)
        try:
            env.render()
        except Exception as error:  # whichever way OpenGL is missing, there is nothing to test
            pytest.skip(f"no OpenGL rendering here: {error}")
        env.reset()
        frames.append(env.render())
        env.step(np.ones(2, dtype=np.float32))
        frames.append(env.render())
        if fast:
            assert env.unwrapped.task.viewer.model is env.unwrapped.task.model
    assert frames[0].shape == (256, 256, 3)
    np.testing.assert_array_equal(frames[0], frames[2])  # the reused model renders the new episode as upstream's does
    np.testing.assert_array_equal(frames[1], frames[3])
