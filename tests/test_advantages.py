"""Advantage estimation against explicit sums over each episode's future (an independent oracle)."""

import numpy as np
import pytest

from sb3_metacpo.common.advantages import (
    LinearFeatureBaseline,
    compute_gae,
    discounted_returns,
    episode_steps,
    linear_baseline_values,
)


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


def test_linear_baseline_values_equal_one_ridge_regression_per_target():
    """The shared features and Gram matrix give, bit for bit, one baseline fitted per target; and each fit is the
    ridge regression written out with numpy (the normal equations on the documented features)."""
    rng = np.random.default_rng(1)
    obs, next_obs = rng.normal(size=(40, 3, 4)), rng.normal(size=(40, 3, 4))
    steps = np.tile(np.arange(40)[:, None], (1, 3))
    targets = [rng.normal(size=(40, 3)) for _ in range(3)]
    fitted = linear_baseline_values(obs, next_obs, steps, targets, episode_length=40)
    for target, (values, next_values) in zip(targets, fitted, strict=True):
        baseline = LinearFeatureBaseline(episode_length=40)
        baseline.fit(obs, steps, target)
        np.testing.assert_array_equal(values, baseline.predict(obs, steps))
        np.testing.assert_array_equal(next_values, baseline.predict(next_obs, steps + 1))

        def features(o: np.ndarray, s: np.ndarray) -> np.ndarray:
            x, tau = np.clip(o.reshape(-1, 4), -10, 10), s.reshape(-1, 1) / 40
            return np.hstack([x, x**2, tau, tau**2, tau**3, np.ones_like(tau)])

        phi = features(obs, steps)
        coefficients = np.linalg.solve(phi.T @ phi + 1e-5 * np.eye(phi.shape[1]), phi.T @ target.reshape(-1))
        np.testing.assert_allclose(values.reshape(-1), phi @ coefficients, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(next_values.reshape(-1), features(next_obs, steps + 1) @ coefficients, atol=1e-6)
