"""Navigation tasks compute observations, costs and goal checks on arrays (``FAST_STEP``); episodes must be bitwise
identical to upstream's code (the oracle): float64 observations, rewards, every per-type cost in ``info``,
terminations and truncations, over whole episodes with resets and task switches, for every family and both robots,
and for the standard ids built by the library against stock ``safety_gymnasium.make``.

Actions come from a scripted driver that heads for the world's objects in turn (goal, buttons, hazards, vases,
gremlins), so that the episodes include goal presses, wrong-button presses, hazard and vase costs; the tests check
that they do."""

import dataclasses
from collections import Counter

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from model_compare import assert_bitwise, model_arrays, skybox_arrays

from sb3_metacpo.common.envs import EnvFactory
from sb3_metacpo.tasks import TaskEnv, make_task_distribution, safety_gym
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.fast_step import FastStepMixin

KINDS = {"PointButtonHazard": "button", "PointGoalHazard": "goal", "CarCircle": "circle"}
MAX_STEPS = 100


class Driver:
    """Seeded noisy steering (the same actions go to both envs; targets are read from the stock env): towards the
    goal for ``goal_steps`` steps, then for 30 steps towards another object (button, hazard, vase, gremlin), and so on; in
    the Circle task alternately for 50 steps towards points beyond the walls at ``x = +-3``."""

    PREFIXES = ("button", "hazard", "vase", "gremlin")

    def __init__(self, seed: int, prefixes: tuple[str, ...] = PREFIXES, goal_steps: int = 40) -> None:
        self.rng = np.random.default_rng(seed)
        self.prefixes = prefixes
        self.goal_steps = goal_steps
        self.left = 0  # steps left towards the current target
        self.current = ""

    def target(self, task) -> np.ndarray:
        names = [task.model.body(i).name for i in range(task.model.nbody)]
        if self.left == 0:
            if "goal" not in names:
                self.current, self.left = ("right" if self.current == "left" else "left"), 50
            elif self.current != "goal" and self.goal_steps:
                self.current, self.left = "goal", self.goal_steps
            else:
                others = [name for name in names if name.startswith(self.prefixes) and not name.endswith("mocap")]
                self.current, self.left = (others[self.rng.integers(len(others))] if others else "goal"), 30
        self.left -= 1
        if self.current in ("left", "right"):
            return np.array([3.0 if self.current == "right" else -3.0, 0.0, 0.0])
        return task.data.body(self.current).xpos

    def __call__(self, task) -> np.ndarray:
        target = self.target(task)
        agent = task.data.body("agent")
        vec = (target - agent.xpos) @ agent.xmat.reshape(3, 3)
        if type(task.agent).__name__ == "Point":
            angle = np.arctan2(vec[1], vec[0])
            action = np.array([1.0 if abs(angle) < 0.6 else 0.1, np.clip(3 * angle, -1, 1)])
        else:  # the car drives along its -y axis; [1, -1] turns it left
            angle = np.arctan2(vec[0], -vec[1])
            turn, forward = np.clip(2 * angle, -1, 1), 1.0 if abs(angle) < 0.6 else 0.0
            action = np.array([forward + turn, forward - turn])
        return np.clip(action + self.rng.normal(0, 0.2, 2), -1, 1)

    def new_episode(self) -> None:
        self.left = 0
        self.current = ""


def compare_step(fast, stock, events: Counter) -> None:
    """One (obs, reward, terminated, truncated, info) pair of the 5-tuple API, bitwise."""
    np.testing.assert_array_equal(fast[0], stock[0])
    assert fast[0].dtype == stock[0].dtype == np.float64
    assert fast[1:4] == stock[1:4]
    assert type(fast[1]) is type(stock[1])
    assert fast[4] == stock[4]  # every per-type cost, cost_sum, cost and goal_met
    assert sorted(fast[4]) == sorted(stock[4])
    events.update(key for key, value in stock[4].items() if key.startswith("cost_") and value > 0)
    events.update(key for key in ("goal_met",) if key in stock[4])
    events.update(name for name, flag in (("terminated", stock[2]), ("truncated", stock[3])) if flag)


def lockstep(fast_env, stock_env, n_steps: int, driver: Driver, events: Counter, seed: int | None, on_reset=None):
    """Reset both envs (seeded or continuing their seed streams), then step them with the same actions, resetting
    at episode ends, and compare everything (and call ``on_reset(fast_env, stock_env)`` after every reset)."""
    driver.new_episode()
    fast_obs, _ = fast_env.reset(seed=seed)
    stock_obs, _ = stock_env.reset(seed=seed)
    np.testing.assert_array_equal(fast_obs, stock_obs)
    if on_reset is not None:
        on_reset(fast_env, stock_env)
    for _ in range(n_steps):
        action = driver(stock_env.unwrapped.task)
        fast, stock = fast_env.step(action), stock_env.step(action)
        compare_step(fast, stock, events)
        if stock[2] or stock[3]:
            events["reset"] += 1
            driver.new_episode()
            fast_obs, _ = fast_env.reset()
            stock_obs, _ = stock_env.reset()
            np.testing.assert_array_equal(fast_obs, stock_obs)
            if on_reset is not None:
                on_reset(fast_env, stock_env)


def navigation_env(name, robot, task, fast, monkeypatch, **options):
    monkeypatch.setattr(safety_gym, "FAST_STEP", fast)  # read when the env is made
    monkeypatch.setattr(safety_gym, "FAST_RESET", fast)  # the stock side is upstream's code throughout
    env = safety_gym._make_navigation_env(KINDS[name], robot, task, MAX_STEPS, None, **options)
    assert isinstance(env.unwrapped.task, FastStepMixin) == fast
    return env


@pytest.mark.parametrize(
    ("name", "robot"),
    [
        ("PointButtonHazard", "Point"),
        ("PointButtonHazard", "Car"),
        ("PointGoalHazard", "Point"),
        ("PointGoalHazard", "Car"),
        ("CarCircle", "Car"),
        ("CarCircle", "Point"),
    ],
)
def test_fast_step_replays_upstream_episodes_exactly(name, robot, monkeypatch):
    """Two tasks of the family (a switch rebuilds the env, as ``TaskEnv.set_task`` does), several episodes each.
    Button and Goal tasks in a small arena, where the short episodes reach the goal and touch hazards and buttons."""
    dist = make_task_distribution(name, seed=0, max_episode_steps=MAX_STEPS)
    events = Counter()
    driver = Driver(seed=1)
    tasks = dist.sample(2)
    if KINDS[name] != "circle":
        tasks = [dataclasses.replace(task, extent=1.25) for task in tasks]
    for task_number, task in enumerate(tasks):
        fast_env = navigation_env(name, robot, task, True, monkeypatch)
        stock_env = navigation_env(name, robot, task, False, monkeypatch)
        lockstep(fast_env, stock_env, 210, driver, events, seed=task_number)
    assert events["truncated"] and events["reset"] >= 3
    expected = {
        "button": ["cost_hazards", "cost_buttons", "goal_met"],
        "goal": ["cost_hazards", "goal_met"],
        "circle": ["cost_out_of_boundary"],
    }[KINDS[name]]
    assert all(events[key] for key in expected), events  # the episodes did exercise every cost and the goal check


def test_fast_step_through_task_env_set_task(monkeypatch):
    """The families' own env stack: ``TaskEnv.set_task`` switches tasks in place, float64 steps compared below
    TaskEnv (which casts observations to float32), per-episode seeds from TaskEnv."""
    dist = make_task_distribution("PointGoalHazard", seed=0, max_episode_steps=MAX_STEPS)
    tasks = [dataclasses.replace(task, extent=1.25) for task in dist.sample(2)]
    envs = []
    for fast in (True, False):
        monkeypatch.setattr(safety_gym, "FAST_STEP", fast)
        monkeypatch.setattr(safety_gym, "FAST_RESET", fast)
        envs.append(TaskEnv(dist, tasks[0]))
    events, driver = Counter(), Driver(seed=2)
    for number, task in enumerate(tasks[:2]):
        for fast, env in zip((True, False), envs, strict=True):
            monkeypatch.setattr(safety_gym, "FAST_STEP", fast)
            monkeypatch.setattr(safety_gym, "FAST_RESET", fast)
            env.set_task(task)
            assert isinstance(env.unwrapped.task, FastStepMixin) == fast
        seeds = [env.reset(seed=number)[1]["episode_seed"] for env in envs]
        assert seeds[0] == seeds[1]
        lockstep(envs[0].env, envs[1].env, 130, driver, events, seed=seeds[0])
    assert events["cost_hazards"] and events["truncated"] and events["reset"] >= 2, events


@pytest.mark.parametrize(("name", "option"), [("PointGoalHazard", "n_vases"), ("PointButtonHazard", "n_gremlins")])
def test_second_cost_type_options(name, option, monkeypatch):
    """``n_vases`` / ``n_gremlins`` add upstream's constrained vases / gremlins and their per-type costs; fast and
    upstream code agree on them too."""
    dist = make_task_distribution(name, seed=0, max_episode_steps=MAX_STEPS, **{option: 3})
    assert dist.get_params()[option] == 3
    assert option not in make_task_distribution(name).get_params()  # defaults: today's parameters and layouts
    assert make_task_distribution(name, **dist.get_params()).get_params() == dist.get_params()
    with pytest.raises(ValueError, match=option):
        make_task_distribution(name, **{option: -1})
    task = dist.sample(1)[0]
    fast_env = navigation_env(name, "Point", task, True, monkeypatch, **{option: 3})
    stock_env = navigation_env(name, "Point", task, False, monkeypatch, **{option: 3})
    events, models = Counter(), SameModels()
    prefix = {"n_vases": "vase", "n_gremlins": "gremlin"}[option]
    lockstep(fast_env, stock_env, 200, Driver(seed=3, prefixes=(prefix,), goal_steps=0), events, seed=0, on_reset=models)
    keys = {"n_vases": ["cost_vases_contact", "cost_vases_velocity"], "n_gremlins": ["cost_gremlins"]}[option]
    assert all(events[key] for key in keys), events
    assert events["reset"] >= 1 and models.all_reused()  # vases' and gremlins' worlds are not recompiled
    env = dist.make_env(task)
    env.reset(seed=0)
    objects = [env.unwrapped.task.model.body(i).name for i in range(env.unwrapped.task.model.nbody)]
    assert len([n for n in objects if n.startswith(prefix) and not n.endswith("mocap")]) == 3


@pytest.mark.parametrize("name", ["PointGoalHazard", "PointButtonHazard"])
def test_fast_step_handles_a_task_without_hazards(name, monkeypatch):
    """Upstream's pseudo-lidar raises on an empty object list (``n_hazards=0``, within the families' limits); the fast
    one reads zeros (the one documented difference)."""
    task = dataclasses.replace(make_task_distribution(name, seed=0).sample(1)[0], n_hazards=0, extent=1.5)
    with pytest.raises(AssertionError, match="Bad pos"):
        navigation_env(name, "Point", task, False, monkeypatch).reset(seed=0)
    env = navigation_env(name, "Point", task, True, monkeypatch)
    obs, _ = env.reset(seed=0)
    space = env.unwrapped.task.obs_info.obs_space_dict
    sizes = [int(np.prod(box.shape)) for box in space.spaces.values()]
    start = sum(sizes[: list(space.spaces).index("hazards_lidar")])
    np.testing.assert_array_equal(obs[start : start + 16], 0.0)
    assert env.step(np.zeros(2))[4]["cost_hazards"] == 0.0


STANDARD_IDS = [
    f"Safety{robot}{task}{level}" for level in "012" for task in ("Goal", "Button", "Circle") for robot in ("Point", "Car")
]


class SameModels:
    """An ``on_reset`` for ``lockstep``: with ``FAST_RESET`` the poses set in the kept model are bit for bit the
    compiled ones (every array but the skybox's pixels, and its other arrays where the fast world, never rendered, has
    none; the statistics and options included); keeps the fast env's models."""

    def __init__(self) -> None:
        self.models = []

    def __call__(self, fast_env, stock_env) -> None:
        fast_model, stock_model = fast_env.unwrapped.task.model, stock_env.unwrapped.task.model
        self.models.append(fast_model)
        # a world never rendered has no skybox (tests/test_fast_reset.py): every other array is upstream's
        fast_arrays, stock_arrays = model_arrays(fast_model), model_arrays(stock_model)
        ignore = skybox_arrays(stock_arrays) if fast_model.ntex < stock_model.ntex else set()
        assert_bitwise(fast_arrays, stock_arrays, ignore)

    def all_reused(self) -> bool:
        return len(self.models) > 1 and all(later is self.models[0] for later in self.models[1:])


@pytest.mark.parametrize("env_id", STANDARD_IDS)
def test_standard_ids_built_by_the_library_match_stock(env_id, monkeypatch):
    """``make_safe_vec_env``'s factory gives the standard ids the fast step and reset; stock ``safety_gymnasium.make``
    is the oracle (same seeds, same actions), over random layouts re-drawn at every reset."""
    safety_gymnasium = import_safety_gymnasium()
    monkeypatch.setattr(safety_gym, "FAST_STEP", True)
    monkeypatch.setattr(safety_gym, "FAST_RESET", True)
    ours = EnvFactory(env_id=f"{env_id}Gymnasium-v0")()
    stock = safety_gymnasium.make(f"{env_id}-v0", max_episode_steps=MAX_STEPS)
    assert isinstance(ours.unwrapped.task, FastStepMixin) and not isinstance(stock.unwrapped.task, FastStepMixin)
    ours = gym.wrappers.TimeLimit(ours, MAX_STEPS)

    class Stock5(gym.Wrapper):  # the stock env in the 5-tuple API, its cost in info["cost"] as the library's
        def step(self, action):
            obs, reward, cost, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {**info, "cost": cost}

    class Ours(gym.Wrapper):  # CostMonitor adds its episode summary at episode ends; compare the env's own info
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {k: v for k, v in info.items() if k not in ("episode",)}

    events, models = Counter(), SameModels()
    driver = Driver(seed=4, goal_steps=0)
    lockstep(Ours(ours), Stock5(stock), 2 * MAX_STEPS + 10, driver, events, seed=5, on_reset=models)
    assert events["reset"] >= 2
    assert models.all_reused()  # random layouts are poses, gremlins' (Button) included: no reset recompiled
    if env_id.endswith("0"):  # level 0: a goal, buttons or a circle, nothing that costs
        return
    if "Button" in env_id:  # the gremlins had moved before the resets
        assert events["cost_gremlins"] or not np.array_equal(ours.unwrapped.task.data.mocap_pos, 0.0)
    if "Point" in env_id:  # (the Car, slower to steer, touches nothing in these short random layouts)
        expected = "cost_out_of_boundary" if "Circle" in env_id else "cost_hazards"
        assert events[expected], events


def test_fast_step_switch_off_gives_upstream_classes(monkeypatch):
    monkeypatch.setattr(safety_gym, "FAST_STEP", False)
    env = EnvFactory(env_id="SafetyPointGoal1Gymnasium-v0")()
    assert not isinstance(env.unwrapped.task, FastStepMixin)
    dist = make_task_distribution("CarCircle", seed=0)
    assert not isinstance(dist.make_env(dist.sample(1)[0]).unwrapped.task, FastStepMixin)
    assert safety_gym.fast_standard_env(gym.make("CartPole-v1")).unwrapped.__class__.__name__ == "CartPoleEnv"


@pytest.mark.parametrize(("max_dist", "alias"), [(3, True), (None, True), (6, False)])
def test_batched_pseudo_lidar_is_upstreams(max_dist, alias, monkeypatch):
    """The batched lidar against upstream's ``_obs_lidar_pseudo`` on random agent poses and object sets, also with the
    exponential (``max_dist=None``) and non-aliased variants no family uses."""
    from sb3_metacpo.tasks.fast_step import pseudo_lidar

    dist = make_task_distribution("PointGoalHazard", seed=0)
    env = navigation_env("PointGoalHazard", "Car", dist.sample(1)[0], False, monkeypatch)
    env.reset(seed=0)
    task = env.unwrapped.task
    task.lidar_conf.max_dist, task.lidar_conf.alias = max_dist, alias
    rng = np.random.default_rng(0)
    for _ in range(100):
        task.data.qpos[:2] = rng.uniform(-2, 2, 2)  # the car's free joint: position and a random orientation
        quat = rng.normal(size=4)
        task.data.qpos[3:7] = quat / np.linalg.norm(quat)
        mujoco.mj_forward(task.model, task.data)
        groups = [rng.uniform(-3, 3, (int(rng.integers(1, 6)), 3)) for _ in range(3)]
        expected = [task._obs_lidar_pseudo(list(positions)) for positions in groups]
        batch = pseudo_lidar(
            np.concatenate(groups)[:, :2],
            np.concatenate([np.full(len(positions), g) for g, positions in enumerate(groups)]),
            3,
            task.agent.pos,
            task.agent.mat,
            task.lidar_conf,
        )
        np.testing.assert_array_equal(batch, expected)


def test_a_replaced_world_is_freed_without_the_cyclic_garbage_collector():
    """Switching task replaces the world: the old one (its MuJoCo model and data, hundreds of MB over a run) must be
    freed by reference counting, not left to the cyclic collector (a reference cycle through the fast step's index
    held one dead world per task switch until a full collection, GBs over a long meta-training run)."""
    import gc
    import weakref

    from sb3_metacpo.tasks.task_env import TaskEnv

    dist = make_task_distribution("PointGoalHazard", seed=0, max_episode_steps=20)
    env = dist.make_env(dist.sample(1)[0])
    task_env = env
    while not isinstance(task_env, TaskEnv):
        task_env = task_env.env
    env.reset(seed=0)
    env.step(env.action_space.sample())  # builds the fast step's index
    old_world = weakref.ref(task_env.env.unwrapped.task)
    old_index = weakref.ref(task_env.env.unwrapped.task._fast_index_cache)  # holds the compiled model
    gc.disable()
    try:
        task_env.set_task(dist.sample(1)[0])
        assert old_world() is None
        assert old_index() is None
    finally:
        gc.enable()
    env.close()


def test_recompiled_models_leave_one_index_finalizer_per_task(monkeypatch):
    """With FAST_STEP on and FAST_RESET off, every reset compiles a new model, and each new index registered one more
    ``weakref.finalize`` on the task, kept as long as the env lived (21 after 21 resets)."""
    import gc
    import weakref

    monkeypatch.setattr(safety_gym, "FAST_STEP", True)
    monkeypatch.setattr(safety_gym, "FAST_RESET", False)
    env = EnvFactory(env_id="SafetyPointGoal1Gymnasium-v0")()
    task = env.unwrapped.task

    def live_finalizers():
        gc.collect()
        return sum(info.weakref() is task for info in weakref.finalize._registry.values())  # live finalizers on the task

    for seed in range(5):
        env.reset(seed=seed)
        env.step(np.zeros(2, dtype=np.float32))  # a new model each reset: a new index
        assert live_finalizers() == 1
    env.close()


def _without_hazards(monkeypatch, fast):
    """A PointGoalHazard task without hazards, with the switches set in this process: upstream's pseudo-lidar raises
    ``AssertionError: Bad pos []`` at its reset, the fast one reads zeros (the documented difference), which tells
    whose code an env in another process runs."""
    import dataclasses

    monkeypatch.setattr(safety_gym, "FAST_STEP", fast)
    monkeypatch.setattr(safety_gym, "FAST_RESET", fast)
    dist = make_task_distribution("PointGoalHazard", seed=0, max_episode_steps=20)
    return dist, dataclasses.replace(dist.sample(1)[0], n_hazards=0)


def test_switches_set_before_making_the_envs_reach_subprocess_workers(monkeypatch):
    """The library's SubprocVecEnv starts its workers with forkserver or spawn, which import the modules afresh:
    FAST_STEP = False set before making the envs, as documented, was back to True in the workers."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_metacpo.common.envs import EnvWorkerError, make_safe_vec_env

    for fast in (False, True):
        dist, task = _without_hazards(monkeypatch, fast)
        vec_env = make_safe_vec_env(task, n_envs=1, vec_env_cls=SubprocVecEnv, distribution=dist)
        try:
            if fast:
                vec_env.reset()  # the fast path, in the worker too
            else:
                with pytest.raises(EnvWorkerError, match="Bad pos"):  # upstream's code, in the worker too
                    vec_env.reset()
        finally:
            vec_env.close()


def _standard_pair(env_id, monkeypatch):
    """The library's fast env and upstream's (FAST_STEP and FAST_RESET off) of a standard id, 5-tuple API both."""
    envs = []
    for fast in (True, False):
        monkeypatch.setattr(safety_gym, "FAST_STEP", fast)
        monkeypatch.setattr(safety_gym, "FAST_RESET", fast)
        envs.append(EnvFactory(env_id=f"{env_id}Gymnasium-v0")())
    assert isinstance(envs[0].unwrapped.task, FastStepMixin) and not isinstance(envs[1].unwrapped.task, FastStepMixin)
    return envs


OBSERVATION_CHANGES = {
    "hazards not on the lidar": ("SafetyPointGoal1", lambda task: setattr(task.hazards, "is_lidar_observed", False)),
    "a goal compass": ("SafetyPointGoal1", lambda task: setattr(task.goal, "is_comp_observed", True)),
    "32 lidar bins": ("SafetyPointGoal1", lambda task: setattr(task.lidar_conf, "num_bins", 32)),
    "no angle components": (
        "SafetyCarGoal1",
        lambda task: setattr(task.agent.sensor_conf, "sensors_angle_components", False),
    ),
}


@pytest.mark.parametrize("change", list(OBSERVATION_CHANGES))
def test_an_observation_config_changed_between_episodes_gives_upstreams_new_layout(change, monkeypatch):
    """Upstream reads the observation config at every ``obs()``; the fast path fixed the layout with the compiled
    model, which ``FAST_RESET`` keeps: after a change and ``build_observation_space()`` it gave the old layout (60
    values for upstream's 44 without the hazards' lidar) or raised (32 bins)."""
    env_id, apply = OBSERVATION_CHANGES[change]
    envs = _standard_pair(env_id, monkeypatch)
    rng = np.random.default_rng(0)
    for env in envs:
        env.reset(seed=0)
    actions = rng.uniform(-1, 1, (8, 2))
    for action in actions[:4]:
        for env in envs:
            env.step(action)
    for env in envs:  # the same change on both, between episodes
        apply(env.unwrapped.task)
        env.unwrapped.task.build_observation_space()
    (fast_obs, _), (stock_obs, _) = (env.reset(seed=1) for env in envs)
    assert fast_obs.shape != (60 if env_id == "SafetyPointGoal1" else 72,)  # the layout did change
    np.testing.assert_array_equal(fast_obs, stock_obs)
    for action in actions[4:]:
        fast, stock = (env.step(action) for env in envs)
        np.testing.assert_array_equal(fast[0], stock[0])
        assert fast[1:4] == stock[1:4]


def test_a_lidar_angle_rounded_up_to_two_pi_raises_as_upstreams():
    """An object dead ahead with an egocentric y of -1.4e-17: atan2 % 2π rounds to 2π and upstream's bin index is
    ``num_bins`` (its ``obs[bin]`` raises IndexError); the batched lidar wrote into the next object type's first bin."""
    from types import SimpleNamespace

    from sb3_metacpo.tasks.fast_step import pseudo_lidar

    conf = SimpleNamespace(num_bins=16, max_dist=3.0, exp_gain=1.0, alias=True)
    position = np.array([[1.0, -1.3877787807814457e-17]])
    angle = np.angle(complex(*position[0])) % (np.pi * 2)  # upstream's arithmetic, step by step
    upstream_bin = int(angle / ((np.pi * 2) / conf.num_bins))
    with pytest.raises(IndexError):
        np.zeros(conf.num_bins)[upstream_bin]
    with pytest.raises(IndexError, match="index 16 is out of bounds"):
        pseudo_lidar(position, np.array([0]), 2, np.zeros(3), np.eye(3), conf)  # group 0 of 2: no error before
    ahead = pseudo_lidar(np.array([[1.0, 0.0]]), np.array([0]), 2, np.zeros(3), np.eye(3), conf)
    assert ahead[0, 0] > 0 and not ahead[1].any()


def test_a_task_subclass_whose_specific_step_moves_a_body_is_observed_after_it(monkeypatch):
    """``fast_task_class`` takes subclasses of upstream's task classes: one whose ``specific_step`` moves the agent
    must be observed after the move, as upstream's ``obs()`` (its own forward pass) sees it; the fast path reused the
    physics step's forward pass (accelerometer and lidar off by up to 0.09)."""
    import_safety_gymnasium()
    from safety_gymnasium.tasks.safe_navigation.goal.goal_level1 import GoalLevel1

    from sb3_metacpo.tasks.fast_step import fast_task_class

    class Nudged(GoalLevel1):
        def specific_step(self):
            super().specific_step()
            self.data.qpos[0] += 0.05  # the Point's slide joint along x

    assert fast_task_class(Nudged).specific_step is not Nudged.specific_step  # wrapped: forward again after it
    assert fast_task_class(GoalLevel1).specific_step is GoalLevel1.specific_step  # upstream's own: nothing to redo
    fast_env, stock_env = _standard_pair("SafetyPointGoal1", monkeypatch)
    fast_env.unwrapped.task.__class__ = fast_task_class(Nudged)
    stock_env.unwrapped.task.__class__ = Nudged
    events = Counter()
    lockstep(fast_env, stock_env, 30, Driver(seed=2, goal_steps=0), events, seed=0)
