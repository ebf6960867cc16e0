"""Task families on real envs: building, seeding, layouts, held-out sets and error messages."""

import dataclasses
import math
import pickle
import subprocess
import sys

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env

from sb3_metacpo.tasks import (
    ParamRange,
    PointButtonHazardTask,
    Task,
    TaskDistribution,
    TaskEnv,
    Toy2DNavTask,
    list_task_distributions,
    make_task_distribution,
)
from sb3_metacpo.tasks.monitor import CostMonitor

FAMILIES = ["PointButtonHazard", "CarCircle", "PointGoalHazard", "HalfCheetahVelocity", "Toy2DNav"]
SHORT = 40  # short episodes keep the real MuJoCo envs fast in tests


def short_dist(name, **kwargs):
    return make_task_distribution(name, max_episode_steps=SHORT, **kwargs)


def geom_names(env, prefix):
    model = env.unwrapped.task.model
    return [model.geom(i).name for i in range(model.ngeom) if model.geom(i).name.startswith(prefix)]


def test_registry_lists_all_families():
    assert set(FAMILIES) <= set(list_task_distributions())


@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_steps_and_reports_cost(name):
    dist = short_dist(name)
    env = dist.make_env(dist.sample(1)[0])
    assert isinstance(env, CostMonitor)
    obs, info = env.reset(seed=3)
    assert obs.shape == env.observation_space.shape and obs.dtype == np.float32
    assert isinstance(info["episode_seed"], int)
    total_cost, rng = 0.0, np.random.default_rng(0)
    for step in range(1, SHORT + 1):  # noqa: B007 (the episode length is checked after the loop)
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        assert np.isfinite(reward) and info["cost"] >= 0.0
        total_cost += info["cost"]
        if terminated or truncated:
            break
    assert terminated or truncated
    assert info["episode"]["l"] == step
    assert info["episode"]["c"] == pytest.approx(total_cost)
    env.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_check_env_passes(name):
    dist = short_dist(name)
    env = dist.make_env(dist.test_tasks(1)[0])
    check_env(env, warn=True, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_train_and_test_tasks_are_disjoint_and_reproducible(name):
    dist = make_task_distribution(name, seed=7)
    train = dist.sample(30) + dist.sample(30)
    test = dist.test_tasks(10)
    assert not set(train) & set(test)
    assert all(dist.is_training_task(task) for task in train)
    assert not any(dist.is_training_task(task) for task in test)
    again = make_task_distribution(name, seed=7)
    assert again.sample(30) + again.sample(30) == train
    assert make_task_distribution(name, seed=8).sample(30) != train[:30]
    # the held-out set does not depend on the training seed, and shorter sets are prefixes
    assert make_task_distribution(name, seed=8).test_tasks(3) == test[:3]
    for task in train[:3] + test[:3]:
        dist.validate_task(task)
        assert dist.task_from_dict(task.to_dict()) == task
        assert pickle.loads(pickle.dumps(task)) == task


def test_no_training_seed_draws_a_held_out_sets_stream():
    """A training seed equal to test_seed (2024 by default) drew the test tasks' stream: the i-th training task had the
    i-th test task's parameters wherever the ranges agree, its layout too (a test task was a training task with more
    hazards). A resampling env seeded with test_seed (CPO on a family with seed 2024, or env j of seed 2024 - j) drew
    the unseen tasks, task for task. Other seeds keep their streams."""
    from sb3_metacpo.common.envs import ResampleTaskOnReset

    dist = make_task_distribution("Toy2DNav", seed=2024)
    assert dist.test_seed == 2024
    train, test, unseen = dist.sample(20), dist.test_tasks(20), dist.unseen_tasks(20)
    layouts = {task.layout_seed for task in train}
    assert not layouts & {task.layout_seed for task in test} and not layouts & {task.layout_seed for task in unseen}
    assert not {task.goal_angle for task in train} & {task.goal_angle for task in test}
    env = ResampleTaskOnReset(dist)
    drawn = []
    for episode in range(5):
        env.reset(seed=2024 if episode == 0 else None)
        drawn.append(env.task)
    assert not {task.layout_seed for task in drawn} & {task.layout_seed for task in unseen}
    # any other seed: the stream is numpy's default_rng of it, as before
    other = make_task_distribution("Toy2DNav", seed=7)
    assert other.sample(3) == make_task_distribution("Toy2DNav", seed=0).sample(3, np.random.default_rng(7))


def test_an_entropy_numpy_pads_to_a_held_out_sets_stream_draws_a_stream_of_its_own():
    """numpy seeds (a, b, 0) as (a, b): the guard compared tuples, so ``training_rng((test_seed, 1, 0))`` drew the
    unseen tasks and ``training_rng((test_seed, 0))`` the test tasks (tasks audit)."""
    dist = make_task_distribution("Toy2DNav", seed=0)
    unseen = {task.layout_seed for task in dist.unseen_tasks(20)}
    test = {task.layout_seed for task in dist.test_tasks(20)}
    for entropy in [(dist.test_seed, 1, 0), (dist.test_seed, 1, 0, 0), (dist.test_seed, 0), (dist.test_seed, 0, 0)]:
        drawn = {task.layout_seed for task in dist.sample(20, dist.training_rng(entropy))}
        assert not drawn & (unseen | test), entropy
    # streams the guard does not touch stay numpy's
    assert dist.sample(3, dist.training_rng((5, 1))) == dist.sample(3, np.random.default_rng((5, 1)))


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_first_observations(name):
    dist = short_dist(name)
    task = dist.sample(1)[0]
    first = []
    for _ in range(2):
        env = dist.make_env(task)
        obs0, info0 = env.reset(seed=11)
        obs1, info1 = env.reset()
        first.append((obs0, obs1, info0["episode_seed"], info1["episode_seed"]))
        env.close()
    (a0, a1, s0, s1), (b0, b1, t0, t1) = first
    np.testing.assert_array_equal(a0, b0)
    np.testing.assert_array_equal(a1, b1)
    assert (s0, s1) == (t0, t1) and s0 != s1  # every episode gets its own recorded seed


def test_button_world_matches_task_parameters():
    dist = short_dist("PointButtonHazard")
    for task in [PointButtonHazardTask(n_buttons=3, n_hazards=5, extent=1.5, layout_seed=1), dist.test_tasks(1)[0]]:
        env = dist.make_env(task)
        env.reset(seed=0)
        assert len(geom_names(env, "hazard")) == task.n_hazards
        assert len(geom_names(env, "button")) == task.n_buttons
        layout = env.unwrapped.task.world_info.layout
        assert all(np.all(np.abs(xy) <= task.extent) for xy in layout.values())
        env.close()


@pytest.mark.parametrize("name", ["PointButtonHazard", "PointGoalHazard"])
def test_layout_is_fixed_per_task_while_starts_vary(name):
    dist = short_dist(name)
    task_a, task_b = dist.sample(2)
    env = dist.make_env(task_a)
    layouts, starts = [], []
    for seed in (0, 1):
        env.reset(seed=seed)
        layout = dict(env.unwrapped.task.world_info.layout)
        starts.append(layout.pop("agent"))
        layouts.append({k: v for k, v in layout.items() if k != "goal" or name == "PointGoalHazard"})
    assert layouts[0].keys() == layouts[1].keys()
    for key in layouts[0]:
        np.testing.assert_allclose(layouts[0][key], layouts[1][key], atol=1e-6)
    assert not np.allclose(starts[0], starts[1])
    other = dist.make_env(task_b)
    other.reset(seed=0)
    other_layout = other.unwrapped.task.world_info.layout
    assert not np.allclose(other_layout["hazard0"], layouts[0]["hazard0"])
    env.close()
    other.close()


def test_circle_walls_follow_the_task():
    dist = short_dist("CarCircle")
    narrow = dataclasses.replace(dist.sample(1)[0], radius=1.2, wall_distance=0.5)
    env = dist.make_env(narrow)
    env.reset(seed=0)
    task = env.unwrapped.task
    assert task.circle.radius == pytest.approx(1.2)
    assert task.sigwalls.locate_factor == pytest.approx(0.5)
    for x, expected in ((0.3, 0.0), (0.7, 1.0), (-0.7, 1.0)):
        task.data.qpos[0] = x  # place the car's free joint; the next step's cost follows the task's walls
        mujoco.mj_forward(task.model, task.data)
        _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
        assert info["cost"] == expected
    env.close()


def test_velocity_task_sets_threshold_and_target():
    dist = short_dist("HalfCheetahVelocity")
    task = dist.test_tasks(1)[0]
    env = dist.make_env(task)
    env.reset(seed=0)
    inner = env.unwrapped
    assert inner._velocity_threshold == task.velocity_threshold
    _, reward, _, _, info = env.step(np.zeros(6, dtype=np.float32))
    assert reward == pytest.approx(-abs(info["x_velocity"] - task.target_velocity))
    assert info["cost"] == float(info["x_velocity"] > task.velocity_threshold)
    env.close()


def test_toy_hazards_and_cost():
    task = Toy2DNavTask(goal_angle=0.0, goal_distance=1.0, n_hazards=3, hazard_radius=0.15, layout_seed=5)
    centers = task.hazard_centers()
    assert centers.shape == (3, 2)
    np.testing.assert_array_equal(centers, task.hazard_centers())  # layout is a function of the task
    dist = make_task_distribution("Toy2DNav")
    env = dist.make_env(task)
    env.reset(seed=0)
    inner = env.unwrapped
    inner._position = centers[0] - np.array([0.05, 0.0])
    _, reward, _, _, info = env.step(np.array([0.5, 0.0], dtype=np.float32))  # stays inside hazard 0
    assert info["cost"] == 1.0
    assert reward == pytest.approx(-np.linalg.norm(inner._position - task.goal))
    inner._position = task.goal.copy()
    _, reward, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    assert info["cost"] == 0.0 and reward == pytest.approx(0.0)


def test_toy_renders_rgb():
    dist = make_task_distribution("Toy2DNav")
    env = dist.make_env(dist.sample(1)[0], render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert (frame == (220, 40, 40)).all(axis=-1).any()  # the point is drawn


def test_set_task_switches_world_in_place():
    dist = short_dist("Toy2DNav")
    task_a, task_b = dist.sample(2)
    env = dist.make_env(task_a)
    task_env = env.env.env  # CostMonitor -> EpisodeCostRecorder -> TaskEnv
    assert isinstance(task_env, TaskEnv)
    task_env.set_task(task_b)
    env.reset(seed=0)
    assert env.unwrapped.task == task_b
    np.testing.assert_allclose(env.unwrapped._goal, task_b.goal)


def test_unknown_family_lists_known_ones():
    with pytest.raises(ValueError, match=r"known ones are: .*PointButtonHazard.*Toy2DNav"):
        make_task_distribution("PointButon")


def test_out_of_range_task_names_parameter_and_range():
    dist = make_task_distribution("PointButtonHazard")
    with pytest.raises(ValueError, match=r"n_buttons=0 is out of range; valid range is \[2, 10\]"):
        dist.make_env(PointButtonHazardTask(n_buttons=0, n_hazards=3, extent=1.5))
    with pytest.raises(ValueError, match=r"n_hazards=2.5 must be an integer"):
        dist.validate_task(PointButtonHazardTask(n_buttons=3, n_hazards=2.5, extent=1.5))
    with pytest.raises(TypeError, match="builds PointButtonHazardTask tasks, got Toy2DNavTask"):
        dist.validate_task(Toy2DNavTask())


def test_bad_overrides_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"train_ranges\['extent'\] = \[0.5, 2\] is outside the valid range \[1, 3\]"):
        make_task_distribution("PointButtonHazard", train_ranges={"extent": (0.5, 2.0)})
    with pytest.raises(ValueError, match="has no parameter 'n_walls'"):
        make_task_distribution("PointButtonHazard", train_ranges={"n_walls": (1, 2)})
    with pytest.raises(ValueError, match="overlap the training ranges in every parameter"):
        make_task_distribution("Toy2DNav", test_ranges={"n_hazards": (1, 3), "hazard_radius": (0.1, 0.15)})
    with pytest.raises(ValueError, match="max_episode_steps must be a positive integer"):
        make_task_distribution("Toy2DNav", max_episode_steps=0)
    with pytest.raises(ValueError, match="need finite low <= high"):
        ParamRange(2.0, 1.0)
    # tasks audit: these gave an AttributeError, a bare float() error, one task and a refusal of a numpy number
    with pytest.raises(TypeError, match="train_ranges must be a mapping of parameter names to ranges, got list"):
        make_task_distribution("Toy2DNav", train_ranges=[("n_hazards", (1, 2))])
    with pytest.raises(TypeError, match=r"a parameter range's bounds must be real numbers, got \('a', 0.6\)"):
        make_task_distribution("Toy2DNav", train_ranges={"goal_distance": ("a", 0.6)})
    with pytest.raises(TypeError, match="a ParamRange or a \\(low, high\\) pair, got 'ab'"):
        make_task_distribution("Toy2DNav", train_ranges={"goal_distance": "ab"})
    dist = make_task_distribution("Toy2DNav", speed_limit=np.float32(0.5))
    assert dist.speed_limit == 0.5 and type(dist.speed_limit) is float
    for bad, error in ((True, TypeError), (1.0, TypeError), (0, ValueError)):
        with pytest.raises(error, match="n must be an integer >= 1"):
            dist.sample(bad)  # type: ignore[arg-type]
    assert len(dist.sample(np.int64(2))) == 2


def test_overrides_change_sampled_tasks():
    dist = make_task_distribution("Toy2DNav", train_ranges={"n_hazards": (2, 2)}, max_episode_steps=10)
    assert {task.n_hazards for task in dist.sample(20)} == {2}
    assert dist.get_params()["train_ranges"]["n_hazards"] == (2, 2)
    rebuilt = make_task_distribution("Toy2DNav", **dist.get_params())
    assert rebuilt.sample(5) == make_task_distribution("Toy2DNav", **dist.get_params()).sample(5)


def test_env_without_cost_is_rejected():
    env = CostMonitor(gym.make("Pendulum-v1"))
    env.reset(seed=0)
    with pytest.raises(KeyError, match=r"reports no cost.*info\['cost'\]"):
        env.step(np.zeros(1, dtype=np.float32))


def test_missing_safety_gymnasium_gives_install_command(monkeypatch):
    import importlib.util

    from sb3_metacpo.tasks import compat

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "safety_gymnasium" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps safety-gymnasium==1\.0\.0"):
        compat.import_safety_gymnasium()


def test_toy_goal_geometry():
    task = Toy2DNavTask(goal_angle=math.pi / 2, goal_distance=0.7)
    np.testing.assert_allclose(task.goal, [0.0, 0.7], atol=1e-12)


@pytest.mark.parametrize("family", ["HalfCheetahVelocity", "PointGoalHazard"])
def test_a_family_builds_first_thing_in_a_fresh_process(family):
    # Every family applies the safety-gymnasium patches itself, whatever was imported before (here: nothing).
    code = (
        f"from sb3_metacpo import make_task_distribution as m; d = m({family!r}); d.make_env(d.test_tasks(1)[0]).reset(seed=0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_integer_ranges_draw_only_the_integers_inside_them():
    """An integer range with fractional bounds drew int(low) (2.3..2.7 gave 2, outside it), and the disjointness
    check compared the real bounds: held-out n_hazards 8.5..12 passed as disjoint from training 4..8 and drew 8."""
    with pytest.raises(ValueError, match=r"integer range \[2.3, 2.7\] contains no integer"):
        ParamRange(2.3, 2.7, integer=True)
    rng = np.random.default_rng(0)
    assert {ParamRange(2.5, 4.2, integer=True).sample(rng) for _ in range(200)} == {3, 4}
    assert not ParamRange(4.5, 6, integer=True).overlaps(ParamRange(1, 4.9, integer=True))  # {5, 6} and {1..4}
    assert ParamRange(4.5, 6).overlaps(ParamRange(1, 4.9))  # real ranges: by their bounds
    dist = make_task_distribution("PointGoalHazard", test_ranges={"n_hazards": (8.5, 12), "extent": (1.25, 1.75)})
    held_out = dist.test_tasks(40)
    assert not any(dist.is_training_task(task) for task in held_out)
    assert {task.n_hazards for task in held_out} <= set(range(9, 13))


def test_a_toy_task_without_room_for_its_hazards_is_an_error_not_a_hang():
    dist = make_task_distribution("Toy2DNav", seed=0)
    task = dataclasses.replace(dist.test_tasks(1)[0], goal_distance=0.3, hazard_radius=0.02)
    dist.validate_task(task)  # within the family's limits
    with pytest.raises(ValueError, match="no place for its hazards clear of the start and the goal"):
        dist.make_env(task)


@pytest.mark.parametrize("family", ["Toy2DNav", "PointGoalHazard"])
def test_an_episode_is_replayed_from_its_seed(family):
    """info["episode_seed"] promised replays, but reset(seed=s) seeds the stream that draws episode seeds:
    reset(options={"episode_seed": s}) starts episode s again, and leaves the stream where it was."""
    dist = make_task_distribution(family, seed=0)
    task = dist.test_tasks(1)[0]
    actions = np.random.default_rng(1).uniform(-1, 1, (20, *dist.spaces[1].shape)).astype(np.float32)

    def episode(env, **reset_kwargs):
        observation, info = env.reset(**reset_kwargs)
        trace = [observation]
        for action in actions:
            observation, reward, *_ = env.step(action)
            trace += [observation, np.float32(reward)]
        return info["episode_seed"], np.concatenate([np.ravel(x) for x in trace])

    env, reference = dist.make_env(task), dist.make_env(task)
    seed, first = episode(env, seed=5)
    episode(env)  # a second episode
    replayed_seed, replayed = episode(env, options={"episode_seed": seed})
    assert replayed_seed == seed
    np.testing.assert_array_equal(replayed, first)
    # the stream went on as if the replay had not happened: the next episode is the third of a fresh run
    episode(reference, seed=5)
    episode(reference)
    np.testing.assert_array_equal(episode(env)[1], episode(reference)[1])
    with pytest.raises(ValueError, match=r"options\['episode_seed'\] must be an episode seed"):
        env.reset(options={"episode_seed": -1})


def test_distribution_seeds_stay_below_2_to_the_32():
    """numpy splits larger seeds into 32-bit words: seed 2024 + 2**32 drew the unseen tasks' (2024, 1) stream, so
    the training tasks were the unseen ones."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        make_task_distribution("Toy2DNav", seed=2024 + 2**32)
    dist = make_task_distribution("Toy2DNav", seed=2**32 - 1)
    assert dist.sample(3) != dist.unseen_tasks(3)


def test_a_range_with_another_integer_flag_than_its_parameter_is_refused():
    """The flag of a ParamRange given by the user did not survive get_params (bounds only): a reloaded distribution
    sampled integers where the original sampled reals, or the reverse."""
    with pytest.raises(ValueError, match="goal_distance is a real parameter"):
        make_task_distribution("Toy2DNav", train_ranges={"goal_distance": ParamRange(0.5, 1.5, integer=True)})
    with pytest.raises(ValueError, match="n_hazards is an integer parameter"):
        make_task_distribution("Toy2DNav", train_ranges={"n_hazards": ParamRange(1, 3)})
    dist = make_task_distribution("Toy2DNav", train_ranges={"n_hazards": ParamRange(1, 3, integer=True)})
    assert make_task_distribution("Toy2DNav", **dist.get_params()).sample(5) == dist.sample(5)


@dataclasses.dataclass(frozen=True)
class WidthTask(Task):
    """A task whose env's observation has ``width`` entries: a family that breaks the same-spaces rule."""

    family = "WidthFamily"
    width: int = 2


class WidthEnv(gym.Env):
    def __init__(self, width: int) -> None:
        self.observation_space = gym.spaces.Box(-1, 1, (width,), np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        return np.zeros(self.observation_space.shape, np.float32), 0.0, False, False, {"cost": 0.0}


class WidthFamily(TaskDistribution):
    name = "WidthFamily"
    task_cls = WidthTask
    limits = {"width": ParamRange(1, 3, integer=True)}
    default_train_ranges = {"width": ParamRange(1, 2, integer=True)}
    default_test_ranges = {"width": ParamRange(3, 3, integer=True)}
    default_max_episode_steps = 10
    default_cost_limit = 1.0

    def _make_base_env(self, task, render_mode=None):
        return gym.wrappers.TimeLimit(WidthEnv(task.width), self.max_episode_steps)


def test_a_task_with_other_spaces_is_an_error_naming_it(tmp_path):
    """Observations of another shape were broadcast into the rollout buffers without a word (MetaCPO trained on)."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_metacpo import CPO, MetaCPO
    from sb3_metacpo.common.envs import EnvWorkerError

    dist = WidthFamily(seed=0)
    assert dist.spaces[0].shape == (3,)  # the first env built: the held-out task's
    with pytest.raises(
        ValueError,
        match=r"WidthFamily: the env of WidthTask\(.*width=1\) has observation/action shapes \(1,\)/\(1,\), "
        r"but the family's envs have \(3,\)/\(1,\)",
    ):
        dist.make_env(WidthTask(width=1))
    env = dist.make_env(dist.test_tasks(1)[0])
    task_env = env.env.env  # CostMonitor -> EpisodeCostRecorder -> TaskEnv
    assert isinstance(task_env, TaskEnv)
    with pytest.raises(ValueError, match="every task of a family must have the same spaces"):
        task_env.set_task(WidthTask(width=2))
    assert task_env.task == dist.test_tasks(1)[0] and env.reset()[0].shape == (3,)  # it kept its task and world
    model = MetaCPO("MlpPolicy", WidthFamily(seed=0), meta_batch_size=2, n_steps=20, seed=0, policy_kwargs=dict(net_arch=[8]))
    with pytest.raises(ValueError, match="every task of a family must have the same spaces"):
        model.learn(200)
    for attempt in range(3):  # CPO's resampling workers draw their tasks from unseeded streams: each checks its own
        with pytest.raises(EnvWorkerError, match="every task of a family must have the same spaces"):
            CPO("MlpPolicy", WidthFamily(seed=attempt), n_steps=20, n_envs=2, seed=0, vec_env_cls=SubprocVecEnv).learn(400)
    monitored = dist.make_env(dist.test_tasks(1)[0])  # a task that fails the check opens no monitor file
    with pytest.raises(ValueError):
        dist.make_env(WidthTask(width=1), monitor_file=str(tmp_path / "width"))
    assert not list(tmp_path.iterdir())
    monitored.close()


def test_a_task_of_numpy_numbers_is_saved_with_its_model(tmp_path):
    """A task built with numpy numbers passed validation and trained, then ``save`` failed (``to_dict``, documented
    JSON serialisable, gave ``np.float32``): the training was lost. Its dict holds Python numbers of the same values."""
    import json

    from sb3_metacpo import CPO
    from sb3_metacpo.tasks.toy import Toy2DNavTask

    task = Toy2DNavTask(
        goal_angle=np.float32(0.5), goal_distance=np.float64(0.7), n_hazards=np.int64(2), layout_seed=np.uint32(3)
    )
    as_dict = json.loads(json.dumps(task.to_dict()))
    assert as_dict == {
        "family": "Toy2DNav",
        "layout_seed": 3,
        "goal_angle": float(np.float32(0.5)),
        "goal_distance": 0.7,
        "n_hazards": 2,
        "hazard_radius": 0.15,
    }
    model = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=100, seed=0)
    model.set_env(task)
    model.learn(100)
    model.save(tmp_path / "model")
    assert CPO.load(tmp_path / "model").env_source == {"task": as_dict}
