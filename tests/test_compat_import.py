"""After ``import sb3_metacpo``, plain ``import safety_gymnasium`` works, and the patches leave no global state behind.

Import order matters here, so the checks run in a fresh interpreter.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# find_spec, not importorskip: importing safety_gymnasium before sb3_metacpo is exactly what fails upstream
pytestmark = pytest.mark.skipif(importlib.util.find_spec("safety_gymnasium") is None, reason="needs safety-gymnasium")

CHECKS = textwrap.dedent(
    """
    import dataclasses, sys
    original_get_field = dataclasses._get_field
    import gymnasium.envs.mujoco.mujoco_rendering as rendering
    original_marker = rendering.BaseRender._add_marker_to_scene

    import sb3_metacpo
    assert sb3_metacpo.__file__.startswith({root!r}), sb3_metacpo.__file__
    import safety_gymnasium
    import gymnasium

    # the ids of both registries build and step
    env = gymnasium.make("SafetyPointGoal1Gymnasium-v0")
    env.reset(seed=0)
    assert len(env.step(env.action_space.sample())) == 5
    env = safety_gymnasium.make("SafetyPointGoal1-v0", render_mode="rgb_array")
    env.reset(seed=0)
    assert len(env.step(env.action_space.sample())) == 6
    assert env.render().shape == (256, 256, 3)  # draws markers: needs the marker fix on mujoco >= 3.2

    # no global state left behind
    assert dataclasses._get_field is original_get_field
    assert rendering.BaseRender._add_marker_to_scene is original_marker
    assert "gymnasium_robotics" not in sys.modules
    try:
        import gymnasium_robotics  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("a gymnasium_robotics stub leaked")

    @dataclasses.dataclass
    class Plain:
        x: list = None
    try:
        import numpy as np
        @dataclasses.dataclass
        class WithArray:
            x: np.ndarray = np.zeros(2)
    except ValueError:
        pass
    else:
        raise AssertionError("the dataclass patch is still in force outside safety_gymnasium")
    print("ok")
    """
)


def test_plain_safety_gymnasium_import_after_sb3_metacpo():
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    result = subprocess.run(
        [sys.executable, "-c", CHECKS.format(root=str(ROOT))],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_import_leaves_the_heavy_optional_modules_unloaded():
    """``import sb3_metacpo`` (in a fresh interpreter) loads none of the modules it needs only later or optionally:
    scipy.signal (advantages), the solvers of the several-costs extra, safety-gymnasium and MuJoCo (navigation
    envs), Ray, matplotlib."""
    heavy = ["scipy.signal", "cvxpy", "cvxpylayers", "safety_gymnasium", "mujoco", "ray", "matplotlib"]
    code = f"import sys, sb3_metacpo; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


FIRST_ENV_FREED = """
import gc, weakref
from sb3_metacpo import make_task_distribution
dist = make_task_distribution("PointGoalHazard", seed=0, max_episode_steps=20)
env = dist.make_env(dist.sample(1)[0])  # the first navigation env of the process: it imports safety_gymnasium
env.reset(seed=0)
task = weakref.ref(env.unwrapped.task)
env.close()
del env
gc.collect()
print("freed" if task() is None else "kept")
"""


def test_the_env_that_first_imports_safety_gymnasium_is_freed():
    """gymnasium's mujoco_env keeps mujoco_py's ImportError, whose traceback's frames reach the caller of the import:
    the first navigation env of a process (whose construction imports safety_gymnasium) was kept for good, its MuJoCo
    model and data with it, whatever the user dropped."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = FIRST_ENV_FREED
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "freed"
