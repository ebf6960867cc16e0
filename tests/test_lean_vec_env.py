"""LeanDummyVecEnv against SB3's DummyVecEnv (the oracle): the same observations, rewards, dones and infos, step by
step, through terminations, time-limit truncations and resets; info dicts are copies."""

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metacpo.common.envs import LeanDummyVecEnv, ReportingSubprocVecEnv, reporting_vec_env_cls
from sb3_metacpo.tasks import make_task_distribution


def _envs(n: int) -> list:
    dist = make_task_distribution("Toy2DNav", seed=0)
    tasks = dist.sample(n)
    return [lambda task=task: dist.make_env(task) for task in tasks]


def _compare(a, b, key: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for name in a:
            if not (key == "episode" and name == "t"):  # the monitor's wall-clock time
                _compare(a[name], b[name], name)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_lean_steps_exactly_as_sb3_dummy_vec_env():
    lean, plain = LeanDummyVecEnv(_envs(3)), DummyVecEnv(_envs(3))
    lean.seed(7)
    plain.seed(7)
    np.testing.assert_array_equal(lean.reset(), plain.reset())
    rng = np.random.default_rng(0)
    dones_seen = 0
    for _ in range(250):  # Toy2DNav episodes last 100 steps: several ends per env
        actions = rng.uniform(-1, 1, (3, *lean.action_space.shape)).astype(np.float32)
        obs_a, rew_a, done_a, infos_a = lean.step(actions)
        obs_b, rew_b, done_b, infos_b = plain.step(actions)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
        np.testing.assert_array_equal(done_a, done_b)
        for info_a, info_b in zip(infos_a, infos_b, strict=True):
            _compare(info_a, info_b)
        dones_seen += int(done_a.sum())
        for index, info in enumerate(infos_a):
            assert info is not lean.buf_infos[index]  # the caller may change what it gets
        assert not np.shares_memory(obs_a, lean.buf_obs[None])  # a copy, as SB3's: the next step must not change it
    assert dones_seen >= 6


def test_lean_copies_dict_observations_as_sb3():
    """A Dict observation space (not what the algorithms use, but what the VecEnv accepts) gives SB3's copies."""
    import gymnasium as gym

    class DictEnv(gym.Env):
        observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (3,)), "n": gym.spaces.Discrete(5)})
        action_space = gym.spaces.Box(-1, 1, (1,))

        def _obs(self) -> dict:
            return {"x": self.np_random.uniform(-1, 1, 3).astype(np.float32), "n": int(self.np_random.integers(5))}

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self._obs(), {}

        def step(self, action):
            self.t += 1
            return self._obs(), float(action[0]), False, self.t == 4, {}

    lean, plain = LeanDummyVecEnv([DictEnv] * 2), DummyVecEnv([DictEnv] * 2)
    for env in (lean, plain):
        env.seed(3)
    obs_a, obs_b = lean.reset(), plain.reset()
    for _ in range(6):
        actions = np.full((2, 1), 0.5, dtype=np.float32)
        obs_a, _, done_a, _ = lean.step(actions)
        obs_b, _, done_b, _ = plain.step(actions)
        np.testing.assert_array_equal(done_a, done_b)
        assert obs_a.keys() == obs_b.keys()
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key])
            assert not np.shares_memory(obs_a[key], lean.buf_obs[key])


def test_the_algorithms_build_the_lean_class_for_dummy_vec_env():
    assert reporting_vec_env_cls(None) is LeanDummyVecEnv
    assert reporting_vec_env_cls(DummyVecEnv) is LeanDummyVecEnv
    assert reporting_vec_env_cls(SubprocVecEnv) is ReportingSubprocVecEnv

    class Mine(DummyVecEnv):
        pass

    assert reporting_vec_env_cls(Mine) is Mine  # a user's own class as given


def test_a_cost_the_monitor_refuses_names_the_env_among_several():
    """The cost monitor checks the cost inside the env's step, where the env's index is unknown: with several envs the
    error did not say which one (the reliability guide says it names the env index)."""
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).parent))
    from bad_inputs import FaultyEnv

    from sb3_metacpo.tasks.monitor import CostMonitor

    vec_env = LeanDummyVecEnv([lambda: CostMonitor(FaultyEnv()), lambda: CostMonitor(FaultyEnv("cost", float("nan")))])
    vec_env.reset()
    with pytest.raises(ValueError, match=r"^env 1 of the VecEnv: the env reported a non-finite cost \(nan\) at step 2"):
        for _ in range(3):
            vec_env.step(np.zeros((2, 2), np.float32))
    vec_env.close()
