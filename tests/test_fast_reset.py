"""Navigation envs move the bodies of their compiled MuJoCo model at reset instead of recompiling it (``FAST_RESET``);
episodes must be bitwise identical to upstream's reset, which compiles a new model every episode."""

import os

import mujoco
import numpy as np
import pytest
from model_compare import assert_bitwise, model_arrays, skybox_arrays

from sb3_metacpo.tasks import make_task_distribution, safety_gym

FAMILIES = [("PointButtonHazard", {}), ("PointButtonHazard", {"n_gremlins": 3}), ("PointGoalHazard", {}), ("CarCircle", {})]
MAX_STEPS = 50
EPISODES = [60, 20, 60, 60]  # steps tried per episode: 60 is cut at MAX_STEPS (truncation), 20 resets mid-episode


def make_env(name, fast, monkeypatch, render_mode=None, skybox=True, **options):
    """The env of a task of ``name``; with the skybox by default, so that models compare bit for bit with upstream's
    compile of its XML (``test_worlds_never_rendered_compile_without_the_skybox`` compares those without)."""
    monkeypatch.setattr(safety_gym, "FAST_RESET", fast)  # read when the env is made
    monkeypatch.setattr(safety_gym, "UNRENDERED_SKYBOX", skybox)
    dist = make_task_distribution(name, seed=0, max_episode_steps=MAX_STEPS, **options)
    return dist.make_env(dist.sample(1)[0], render_mode=render_mode)


def rollout(env):
    """The seeded episodes' transitions, every model array after each reset and whether each later reset kept the
    model object."""
    rng = np.random.default_rng(0)
    transitions, models, kept, model = [], [], [], None
    for episode, n_steps in enumerate(EPISODES):
        obs, info = env.reset(seed=7) if episode == 0 else env.reset()
        transitions.append((obs, info["episode_seed"]))
        models.append(model_arrays(env.unwrapped.task.model))
        if model is not None:
            kept.append(env.unwrapped.task.model is model)
        model = env.unwrapped.task.model
        for _ in range(n_steps):
            obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            transitions.append((obs, reward, info["cost"], terminated, truncated))
            if terminated or truncated:
                break
    return transitions, models, kept


@pytest.mark.parametrize(("name", "options"), FAMILIES)
def test_fast_reset_replays_upstream_episodes_exactly(name, options, monkeypatch):
    """Also with gremlins: their mocap geoms, inertial frames and welds' reference poses are set in place, and the
    episodes' resets come after the gremlins have moved."""
    fast_env = make_env(name, True, monkeypatch, **options)
    stock_env = make_env(name, False, monkeypatch, **options)
    fast, fast_models, fast_kept = rollout(fast_env)
    stock, stock_models, stock_kept = rollout(stock_env)
    assert all(fast_kept) and not any(stock_kept)  # only the stock resets recompiled
    assert any(len(step) == 5 and step[4] for step in stock)  # the sequence does include a truncation
    for fast_step, stock_step in zip(fast, stock, strict=True):
        assert len(fast_step) == len(stock_step)
        np.testing.assert_array_equal(fast_step[0], stock_step[0])
        assert fast_step[0].tobytes() == stock_step[0].tobytes()
        assert fast_step[1:] == stock_step[1:]
    # the poses, inertial frames, qpos0, welds, camera and constants set in place are exactly the compiled ones
    for fast_model, stock_model in zip(fast_models, stock_models, strict=True):
        assert_bitwise(fast_model, stock_model)
    if options.get("n_gremlins"):  # the gremlins did move away from where the next reset puts them
        assert not np.array_equal(fast_env.unwrapped.task.data.mocap_pos, 0.0)


@pytest.mark.parametrize("name", ["PointButtonHazard", "PointGoalHazard", "CarCircle"])
def test_worlds_never_rendered_compile_without_the_skybox(name, monkeypatch):
    """Without a render mode the world leaves out the 191 MB skybox (a compile of a new world is then ~1 ms instead of
    ~0.27 s): every other model array is bit for bit upstream's compile with it, and so are the episodes."""
    plain = make_env(name, True, monkeypatch, skybox=False)
    full = make_env(name, True, monkeypatch, skybox=True)
    stock = make_env(name, False, monkeypatch)  # upstream's world: always with the skybox
    runs = [rollout(env) for env in (plain, stock, full)]
    for env in (plain, stock, full):
        assert env.unwrapped.task.world.xml_string.count('type="skybox"') == (env is not plain)
    assert plain.unwrapped.task.model.ntex == full.unwrapped.task.model.ntex - 1
    sizes = ("nq", "nv", "nu", "nbody", "njnt", "ngeom", "nsite", "ncam", "nmat", "nsensor", "nsensordata", "neq", "nmocap")
    for size in sizes:
        assert getattr(plain.unwrapped.task.model, size) == getattr(full.unwrapped.task.model, size), size
    assert plain.unwrapped.task.model.tex_data.nbytes < 1e6 < 1e8 < full.unwrapped.task.model.tex_data.nbytes
    (plain_steps, plain_models, kept), (stock_steps, stock_models, _) = runs[0], runs[1]
    assert all(kept)
    for plain_step, stock_step in zip(plain_steps, stock_steps, strict=True):
        assert plain_step[0].tobytes() == stock_step[0].tobytes()
        assert plain_step[1:] == stock_step[1:]
    for plain_model, stock_model in zip(plain_models, stock_models, strict=True):
        differ = {key for key, value in stock_model.items() if plain_model[key].tobytes() != value.tobytes()}
        assert plain_model.keys() == stock_model.keys()
        assert differ <= skybox_arrays(stock_model), differ - skybox_arrays(stock_model)
        assert "mat_texid" in differ  # the comparison did see the missing texture
    # A rendered env, and the module switch, keep it.
    assert make_env(name, True, monkeypatch, render_mode="rgb_array", skybox=False).unwrapped.task.world.skybox
    assert make_env(name, True, monkeypatch, skybox=True).unwrapped.task.world.skybox


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


def test_identity_rotations_give_the_compilers_frame_flags(monkeypatch):
    """Rotations of 0 and 2 pi (identity quaternions of either sign) make inertial frames and gremlins' mocap geoms
    coincide in rotation with their bodies' frames within the compiler's 1e-6 (``mjSAMEFRAME_BODYROT``, which
    ``mj_kinematics`` reads), where random rotations do not: the flags set in place follow the compiler's, both ways."""
    envs = [make_env("PointButtonHazard", fast, monkeypatch, n_gremlins=3) for fast in (True, False)]
    identity = {"on": False}

    def rotations(random_rots):
        def generate_rots(num):
            return [2 * np.pi * (i % 2) for i in range(num)] if identity["on"] else random_rots(num)

        return generate_rots

    for env in envs:
        generator = env.unwrapped.task.random_generator
        monkeypatch.setattr(generator, "generate_rots", rotations(generator.generate_rots))
        env.reset(seed=3)
    model = envs[0].unwrapped.task.model
    actions = np.random.default_rng(0).uniform(-1, 1, (40, 2))  # (episodes of 50 steps)
    flags = []
    for on in (True, False, True):
        identity["on"] = on
        for env in envs:
            env.reset()
        assert envs[0].unwrapped.task.model is model
        assert_bitwise(model_arrays(model), model_arrays(envs[1].unwrapped.task.model))
        mocaps = [model.body(f"gremlin{i}mocap") for i in range(3)]
        flags.append([int(model.body_sameframe[body.id]) for body in mocaps])
        flags[-1] += [int(model.geom_sameframe[body.geomadr[0]]) for body in mocaps]
        for action in actions:  # the same episode; the gremlins move away before the next reset
            fast_step, stock_step = (env.step(action) for env in envs)
            assert fast_step[0].tobytes() == stock_step[0].tobytes() and fast_step[1:4] == stock_step[1:4]
    bodyrot = int(mujoco.mjtSameFrame.mjSAMEFRAME_BODYROT)
    assert flags[0] == flags[2] == [bodyrot] * 6 and bodyrot not in flags[1]


def test_worlds_built_in_threads_keep_their_own_skybox_choice(monkeypatch):
    """The skybox-free build's stand-in for ``xmltodict`` in upstream's world module acts on its own thread's build:
    worlds built at the same time in threads, with and without the skybox, each get what they asked for, and outside
    a build the stand-ins are upstream's modules' functions."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import xmltodict
    import yaml

    envs = [make_env("PointGoalHazard", True, monkeypatch, skybox=index % 2 == 0) for index in range(6)]

    def first_reset(env):
        env.reset(seed=0)
        return env.unwrapped.task.model.ntex

    with ThreadPoolExecutor(max_workers=6) as pool:
        counts = list(pool.map(first_reset, envs))
    assert counts == [2, 1, 2, 1, 2, 1]
    module = sys.modules["safety_gymnasium.world"]
    document = {"mujoco": {"asset": {"texture": [{"@type": "skybox", "@name": "s"}, {"@type": "2d", "@name": "t"}]}}}
    assert module.xmltodict.unparse(document) == xmltodict.unparse(document) and "skybox" in xmltodict.unparse(document)
    assert module.xmltodict.parse is xmltodict.parse and module.yaml.FullLoader is yaml.FullLoader
    assert module.yaml.load("a: [1, 2]", Loader=yaml.FullLoader) == {"a": [1, 2]}


def test_an_upstream_world_built_while_a_skybox_free_world_builds_in_another_thread_keeps_its_skybox(monkeypatch):
    """The skybox-free build put its stand-in into upstream's world module for the whole build, under a lock that
    only other ReusingWorld builds took: a stock env (upstream's own World) built on another thread meanwhile compiled
    without the skybox and rendered other frames. Here the stock build runs while the library's build waits inside."""
    import threading

    from sb3_metacpo.tasks.compat import import_safety_gymnasium
    from sb3_metacpo.tasks.safety_gym import _YamlParsingOnce

    safety_gymnasium = import_safety_gymnasium()
    library_env = make_env("PointGoalHazard", True, monkeypatch, skybox=False)
    inside, stock_built = threading.Event(), threading.Event()
    original = _YamlParsingOnce.load

    def load(self, stream, Loader):
        if threading.current_thread().name == "library build":  # the library's build waits inside for the stock one
            inside.set()
            assert stock_built.wait(timeout=120)
        return original(self, stream, Loader)

    monkeypatch.setattr(_YamlParsingOnce, "load", load)
    library = threading.Thread(target=lambda: library_env.reset(seed=0), name="library build")
    stock = safety_gymnasium.make("SafetyPointGoal1-v0")
    library.start()
    try:
        assert inside.wait(timeout=120)
        stock.reset(seed=0)  # upstream's World.build, on this thread, while the library's build is under way
    finally:
        stock_built.set()
        library.join()
    assert stock.unwrapped.task.model.ntex == 2  # the skybox's texture and the floor's
    assert library_env.unwrapped.task.model.ntex == 1  # the library's world without it, as asked


def test_worlds_parse_upstreams_assets_once_and_write_the_same_xml(monkeypatch):
    """A world's build reads upstream's ``configs/assets.yaml`` through a stand-in that parses it once per process and
    hands each build a deep copy: worlds of several tasks, built one after the other (and built again), write the XML
    that upstream's build of the same task writes, so no build changed what the next one reads."""

    from sb3_metacpo.tasks.safety_gym import _YamlParsingOnce

    cases = [("PointButtonHazard", {"n_gremlins": 2}), ("PointGoalHazard", {"n_vases": 2}), ("CarCircle", {})]
    for _ in range(2):
        for name, options in cases:
            worlds = []
            for fast in (True, False):
                env = make_env(name, fast, monkeypatch, **options)
                env.reset(seed=0)
                worlds.append(env.unwrapped.task.world)
            assert type(worlds[0]).__name__ == "ReusingWorld" and type(worlds[1]).__name__ == "World"
            assert worlds[0].xml_string == worlds[1].xml_string
            assert worlds[0].xml == worlds[1].xml
    assert len(_YamlParsingOnce._parsed) == 1
