"""Advantage estimation for reward and cost: GAE that respects episode boundaries, and a per-batch linear baseline."""

from __future__ import annotations

import numpy as np


def episode_steps(dones: np.ndarray) -> np.ndarray:
    """Index of every step within its episode, shape (T, E); batches start at the start of episodes."""
    steps = np.zeros(dones.shape, dtype=np.int64)
    for t in range(1, dones.shape[0]):
        steps[t] = np.where(dones[t - 1], 0, steps[t - 1] + 1)
    return steps


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    dones: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> np.ndarray:
    """GAE(gamma, lambda) advantages, shape (T, E).

    ``next_values[t]`` is the value of the observation after step ``t`` (the terminal observation where an episode
    ended). A terminated episode gets no bootstrap; a truncated one (time limit) and the batch end bootstrap from
    ``next_values``. The recursion never crosses an episode boundary (``dones``).
    """
    advantages = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        running = delta + gamma * gae_lambda * (1.0 - dones[t]) * running
        advantages[t] = running
    return advantages


def discounted_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted returns-to-go within each episode of the batch (no bootstrap), shape (T, E)."""
    returns = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * (1.0 - dones[t]) * running
        returns[t] = running
    return returns


class LinearFeatureBaseline:
    """Per-batch linear value baseline on ``[obs, obs^2, tau, tau^2, tau^3, 1]`` (tau = step / episode length).

    Fitted by ridge regression to the batch's own discounted returns, so it is specific to the task the batch came
    from even when the observation does not identify the task (as in MAML's baselines).
    """

    def __init__(self, episode_length: int, reg_coeff: float = 1e-5) -> None:
        self.episode_length = episode_length
        self.reg_coeff = reg_coeff
        self.coefficients: np.ndarray | None = None

    def _features(self, observations: np.ndarray, steps: np.ndarray) -> np.ndarray:
        obs = np.clip(observations.reshape(-1, observations.shape[-1]).astype(np.float64), -10, 10)
        tau = steps.reshape(-1, 1).astype(np.float64) / self.episode_length
        return np.concatenate([obs, obs**2, tau, tau**2, tau**3, np.ones_like(tau)], axis=1)

    def fit(self, observations: np.ndarray, steps: np.ndarray, returns: np.ndarray) -> None:
        features = self._features(observations, steps)
        gram = features.T @ features + self.reg_coeff * np.eye(features.shape[1])
        self.coefficients = np.linalg.lstsq(gram, features.T @ returns.reshape(-1), rcond=None)[0]

    def predict(self, observations: np.ndarray, steps: np.ndarray) -> np.ndarray:
        if self.coefficients is None:
            raise RuntimeError("fit the baseline before predicting")
        return (self._features(observations, steps) @ self.coefficients).reshape(steps.shape)
