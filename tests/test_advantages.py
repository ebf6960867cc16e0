"""Advantage estimation against explicit sums over each episode's future (an independent oracle)."""

import numpy as np
import pytest

from sb3_metacpo.common.advantages import LinearFeatureBaseline, compute_gae, discounted_returns, episode_steps


def random_batch(seed, T=37, E=3):
    rng = np.random.default_rng(seed)
    dones = rng.random((T, E)) < 0.15
    terminated = dones & (rng.random((T, E)) < 0.5)
    return rng.normal(size=(T, E)), rng.normal(size=(T, E)), rng.normal(size=(T, E)), terminated, dones


def episode_end(dones, t, e):
    """Last step of the episode containing step t (the batch end if it does not end in the batch)."""
    end = t
    while end < len(dones) - 1 and not dones[end, e]:
        end += 1
    return end


@pytest.mark.parametrize("seed", range(5))
def test_gae_is_the_discounted_sum_of_td_errors_to_the_episode_end(seed):
    rewards, values, next_values, terminated, dones = random_batch(seed)
    gamma, lam = 0.97, 0.9
    advantages = compute_gae(rewards, values, next_values, terminated, dones, gamma, lam)
    T, E = rewards.shape
    for e in range(E):
        for t in range(T):
            deltas = [
                rewards[k, e] + gamma * next_values[k, e] * (not terminated[k, e]) - values[k, e]
                for k in range(t, episode_end(dones, t, e) + 1)
            ]
            expected = sum((gamma * lam) ** i * d for i, d in enumerate(deltas))
            assert advantages[t, e] == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_returns_and_steps_within_episodes(seed):
    rewards, _, _, _, dones = random_batch(seed)
    returns = discounted_returns(rewards, dones, 0.9)
    steps = episode_steps(dones)
    T, E = rewards.shape
    for e in range(E):
        start = 0
        for t in range(T):
            expected = sum(0.9**i * rewards[k, e] for i, k in enumerate(range(t, episode_end(dones, t, e) + 1)))
            assert returns[t, e] == pytest.approx(expected, rel=1e-10, abs=1e-10)
            assert steps[t, e] == t - start
            if dones[t, e]:
                start = t + 1


def test_linear_baseline_recovers_a_linear_function_of_its_features():
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, size=(50, 2, 3))
    steps = np.tile(np.arange(50)[:, None], (1, 2))
    target = 2.0 * obs[..., 0] - obs[..., 2] ** 2 + 0.5 * steps / 50
    baseline = LinearFeatureBaseline(episode_length=50)
    baseline.fit(obs, steps, target)
    np.testing.assert_allclose(baseline.predict(obs, steps), target, atol=1e-4)
    with pytest.raises(RuntimeError, match="fit the baseline"):
        LinearFeatureBaseline(10).predict(obs, steps)
