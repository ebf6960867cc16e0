"""The multi-task sampler against a plain loop over the same env, on real envs."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metacpo.common.rollouts import RolloutSampler, RolloutStorage
from sb3_metacpo.tasks import make_task_distribution
from sb3_metacpo.tasks.monitor import CostMonitor


def linear_policy(obs_dim, act_dim, seed=0):
    """A deterministic policy, so the sampler and a plain loop must produce identical trajectories."""
    weights = np.random.default_rng(seed).normal(size=(obs_dim, act_dim)).astype(np.float32)

    def act(obs, task_indices=None):
        return 1.5 * np.tanh(obs @ weights + 0.3)  # partly outside [-1, 1]: the sampler must clip before stepping

    return act


def plain_loop(dist, task, act, n_steps, seed):
    env = dist.make_env(task)
    obs, _ = env.reset(seed=seed)
    rows, episodes = [], []
    for _ in range(n_steps):
        action = act(obs[None])[0]
        next_obs, reward, terminated, truncated, info = env.step(np.clip(action, -1, 1))
        rows.append((obs, action, reward, info["cost"], terminated, truncated))
        if terminated or truncated:
            episodes.append((info["episode"]["r"], info["episode"]["c"], info["episode"]["l"], info["episode_seed"]))
            next_obs, _ = env.reset()
        obs = next_obs
    env.close()
    return rows, episodes


@pytest.mark.parametrize(("name", "episode_steps", "n_steps"), [("Toy2DNav", 25, 110), ("PointButtonHazard", 30, 75)])
def test_batches_match_a_plain_loop(name, episode_steps, n_steps):
    dist = make_task_distribution(name, max_episode_steps=episode_steps)
    task = dist.sample(1)[0]
    act = linear_policy(dist.spaces[0].shape[0], dist.spaces[1].shape[0])
    sampler = RolloutSampler(dist, n_envs=1, seed=5)
    (batch,) = sampler.collect([task], act, n_steps)
    rows, episodes = plain_loop(dist, task, act, n_steps, seed=5)

    assert batch.observations.shape[:2] == (n_steps, 1) and batch.n_steps == n_steps
    np.testing.assert_allclose(batch.observations[:, 0], np.array([r[0] for r in rows]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch.actions[:, 0], np.array([r[1] for r in rows]), rtol=1e-6)
    np.testing.assert_allclose(batch.rewards[:, 0], np.array([r[2] for r in rows]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch.costs[:, 0, 0], np.array([r[3] for r in rows]))
    np.testing.assert_array_equal(batch.terminated[:, 0], np.array([r[4] for r in rows]))
    np.testing.assert_array_equal(batch.truncated[:, 0], np.array([r[5] for r in rows]))
    # episode boundaries: truncated exactly at the time limit, completed episodes recorded with their cost and seed
    assert list(np.flatnonzero(batch.dones[:, 0])) == list(range(episode_steps - 1, n_steps, episode_steps))
    assert len(batch.episodes) == n_steps // episode_steps == len(episodes)
    for record, (reward, cost, length, seed) in zip(batch.episodes, episodes, strict=True):
        assert (record.length, record.seed) == (length, seed)
        assert record.reward == pytest.approx(reward, rel=1e-5) and record.cost == cost
    # per-episode cost equals the sum of the step costs between boundaries
    ends = np.flatnonzero(batch.dones[:, 0])
    starts = np.r_[0, ends[:-1] + 1]
    assert [batch.costs[s : e + 1, 0, 0].sum() for s, e in zip(starts, ends, strict=True)] == list(batch.episode_costs)
    # next observations: the following observation inside an episode, the terminal one at a boundary
    inside = ~batch.dones[:-1, 0]
    np.testing.assert_array_equal(batch.next_observations[:-1, 0][inside], batch.observations[1:, 0][inside])
    sampler.close()


def test_several_tasks_at_once_get_their_own_envs():
    dist = make_task_distribution("Toy2DNav", max_episode_steps=20)
    tasks = dist.sample(3)
    seen = []

    def act(obs, task_indices):
        seen.append(task_indices.copy())
        return np.zeros((obs.shape[0], 2))

    sampler = RolloutSampler(dist, n_envs=6, seed=0)
    batches = sampler.collect(tasks, act, n_steps=40)
    np.testing.assert_array_equal(seen[0], [0, 1, 2, 0, 1, 2])
    assert [batch.task for batch in batches] == tasks
    for batch in batches:
        assert batch.observations.shape == (20, 2, 2) and len(batch.episodes) == 2
        # standing still: the reward is minus the distance of the start to this task's goal
        np.testing.assert_allclose(
            batch.rewards[0], -np.linalg.norm(batch.observations[0] - batch.task.goal, axis=-1), rtol=1e-5
        )
    # more tasks than envs: sampled in rounds, still one batch per task in order
    more = dist.sample(5)
    batches = sampler.collect(more, lambda obs, idx: np.zeros((obs.shape[0], 2)), n_steps=20)
    assert [batch.task for batch in batches] == more and all(batch.n_steps >= 20 for batch in batches)
    sampler.close()


def test_subprocess_workers_build_safety_gym_tasks_like_the_main_process():
    dist = make_task_distribution("PointGoalHazard", max_episode_steps=20)
    tasks = dist.sample(2)
    act = linear_policy(dist.spaces[0].shape[0], 2)
    local = RolloutSampler(dist, n_envs=2, seed=3).collect(tasks, act, 40)
    remote_sampler = RolloutSampler(dist, n_envs=2, vec_env_cls=SubprocVecEnv, seed=3)
    remote = remote_sampler.collect(tasks, act, 40)
    remote_sampler.close()
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.costs, b.costs)
        assert [e.seed for e in a.episodes] == [e.seed for e in b.episodes]


def test_bad_arguments():
    dist = make_task_distribution("Toy2DNav")
    with pytest.raises(ValueError, match="n_envs must be a positive integer"):
        RolloutSampler(dist, n_envs=0)
    with pytest.raises(TypeError, match="must be a TaskDistribution"):
        RolloutSampler("Toy2DNav")
    sampler = RolloutSampler(dist)
    with pytest.raises(ValueError, match="at least one task"):
        sampler.collect([], lambda o, i: o, 10)


class NumpyCosts(gym.Env):
    """Reports ``cost_h`` (1 on odd steps) as a numpy bool, a Python bool, a float and a 0-d array in turn."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        hit = self.t % 2 == 1
        value = [np.bool_(hit), hit, float(hit), np.array(float(hit))][self.t % 4]
        return np.zeros(1, np.float32), 0.0, False, False, {"cost": 0.0, "cost_h": value}


def test_numpy_and_python_cost_values_count_alike():
    """The monitor's episode sums took only numbers.Real (not numpy bools or 0-d arrays) while the rollout storage
    took anything float() converts: the advantages and J_C then disagreed. Both count every numeric kind now, and a
    constrained cost that is not a number is an error naming it."""
    env = CostMonitor(gym.wrappers.TimeLimit(NumpyCosts(), 8))
    env.reset(seed=0)
    storage = RolloutStorage(8, 1, (1,), (1,), ("cost_h",))
    ended = []
    for t in range(8):
        observation, _, terminated, truncated, info = env.step(np.zeros(1, np.float32))
        done = terminated or truncated
        if done:
            info.update(terminal_observation=observation, **{"TimeLimit.truncated": truncated})
        ended += storage.add(t, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), observation[None], np.array([done]), [info])
    assert storage.costs[:, 0, 0].sum() == 4.0 and info["episode_costs"]["cost_h"] == 4.0
    assert [record.costs for _, record in ended] == [(4.0,)]
    with pytest.raises(TypeError, match=r"env 0 reported cost_h='high' at step 0 of the rollout: a constrained cost"):
        storage.add(
            0, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)), np.array([False]), [{"cost_h": "high"}]
        )


def test_callbacks_get_task_indices_into_the_collects_task_list():
    """With more tasks than envs (rounds), VecStep.task_indices counted within the round: in round 1, indices
    [0, 1] meant tasks 2 and 3 of the collect. Standing still, each step's reward is minus the distance of the
    position to the goal of the task its index names."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    tasks = dist.sample(4)
    steps = []
    sampler = RolloutSampler(dist, n_envs=2, seed=0)
    sampler.collect(tasks, lambda obs, idx: np.zeros((obs.shape[0], 2)), n_steps=20, on_step=steps.append)
    sampler.close()
    assert {tuple(step.task_indices) for step in steps} == {(0, 1), (2, 3)}
    for step in steps:
        goals = np.array([tasks[index].goal for index in step.task_indices])
        going_on = ~step.dones  # at an episode's end new_obs is the next episode's first observation
        distances = np.linalg.norm(step.new_obs - goals, axis=-1)
        np.testing.assert_allclose(step.rewards[going_on], -distances[going_on], rtol=1e-5, atol=1e-6)


def test_a_rebuilt_vec_env_draws_episode_streams_no_env_had():
    """A rebuild seeded the new VecEnv with seed + 1, so env j took env j + 1's stream of episode seeds (start
    states repeated); it takes seed + n_envs now: env j's stream is default_rng(seed + n_envs + j)."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    sampler = RolloutSampler(dist, n_envs=2, seed=100)
    sampler._rebuild()  # what collect does after an env failed
    (batch,) = sampler.collect(dist.sample(1), lambda obs, idx: np.zeros((obs.shape[0], 2)), n_steps=40)
    sampler.close()
    first_seeds = [int(np.random.default_rng(100 + 2 + j).integers(2**31 - 1)) for j in range(2)]
    assert set(first_seeds) <= {episode.seed for episode in batch.episodes}
    old_streams = {int(np.random.default_rng(100 + j).integers(2**31 - 1)) for j in range(2)}
    assert not old_streams & {episode.seed for episode in batch.episodes}


class _NaNRewardEnv(gym.Env):
    """A 1-D env whose reward is NaN at its 3rd step when ``bad``."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, bad: bool) -> None:
        self.bad, self.t = bad, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        reward = float("nan") if self.bad and self.t == 3 else 0.0
        return np.zeros(2, np.float32), reward, False, self.t >= 10, {"cost": 0.0}


def test_errors_name_the_env_by_its_index_among_the_samplers():
    """A Ray worker runs a block of the sampler's envs; its errors named the env by its index in the block (env 1 for
    the sampler's env 3: Ray audit). ``env_offset`` is the block's first index."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metacpo.common.rollouts import check_actions, run_round

    vec_env = DummyVecEnv([lambda: CostMonitor(_NaNRewardEnv(False)), lambda: CostMonitor(_NaNRewardEnv(True))])
    space_o, space_a = _NaNRewardEnv.observation_space, _NaNRewardEnv.action_space
    with pytest.raises(ValueError, match="env 3 returned a non-finite reward at step 2"):
        run_round(vec_env, lambda obs: np.zeros((2, 1), np.float32), 5, space_a, space_o, ("cost",), env_offset=2)
    with pytest.raises(ValueError, match="env 1 returned a non-finite reward at step 2"):  # no offset: the local sampler
        run_round(vec_env, lambda obs: np.zeros((2, 1), np.float32), 5, space_a, space_o, ("cost",))
    with pytest.raises(ValueError, match="non-finite action for env 5 at step 0"):
        check_actions(0, np.array([[0.0], [np.nan]], np.float32), env_offset=4)
