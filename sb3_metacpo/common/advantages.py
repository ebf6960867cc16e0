"""Advantage estimation for reward and cost: GAE that respects episode boundaries, and a per-batch linear baseline."""

from __future__ import annotations

import numpy as np


def _reverse_discounted_sum(x: np.ndarray, dones: np.ndarray, discount: float) -> np.ndarray:
    """``y[t] = x[t] + discount * y[t + 1]`` within each episode of each column (``y`` restarts after a done).

    One linear filter per episode segment instead of a Python loop over time steps."""
    from scipy.signal import lfilter  # imported on first use: scipy.signal alone takes ~1.7 s to import

    out = np.empty(x.shape, dtype=np.float64)
    for column in range(x.shape[1]):
        starts = np.flatnonzero(dones[:-1, column]) + 1
        pieces = np.split(np.asarray(x[:, column], dtype=np.float64), starts)
        out[:, column] = np.concatenate([lfilter([1.0], [1.0, -discount], piece[::-1])[::-1] for piece in pieces])
    return out


def episode_steps(dones: np.ndarray) -> np.ndarray:
    """Index of every step within its episode, shape (T, E); batches start at the start of episodes."""
    time_index = np.arange(dones.shape[0])[:, None]
    starts = np.zeros(dones.shape, dtype=bool)
    starts[0] = True
    starts[1:] = dones[:-1]
    return time_index - np.maximum.accumulate(np.where(starts, time_index, 0), axis=0)


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
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values
    return _reverse_discounted_sum(deltas, dones, gamma * gae_lambda)


def discounted_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted returns-to-go within each episode of the batch (no bootstrap), shape (T, E)."""
    return _reverse_discounted_sum(rewards, dones, gamma)


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

    def _gram(self, features: np.ndarray) -> np.ndarray:
        return features.T @ features + self.reg_coeff * np.eye(features.shape[1])

    def _solve(self, gram: np.ndarray, features: np.ndarray, returns: np.ndarray) -> None:
        self.coefficients = np.linalg.lstsq(gram, features.T @ returns.reshape(-1), rcond=None)[0]

    def _predict(self, features: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.coefficients is None:
            raise RuntimeError("fit the baseline before predicting")
        return (features @ self.coefficients).reshape(shape)

    def fit(self, observations: np.ndarray, steps: np.ndarray, returns: np.ndarray) -> None:
        features = self._features(observations, steps)
        self._solve(self._gram(features), features, returns)

    def predict(self, observations: np.ndarray, steps: np.ndarray) -> np.ndarray:
        return self._predict(self._features(observations, steps), steps.shape)


def linear_baseline_values(
    observations: np.ndarray,
    next_observations: np.ndarray,
    steps: np.ndarray,
    targets: list[np.ndarray],
    episode_length: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per target (returns shaped like ``steps``), a :class:`LinearFeatureBaseline` fitted to it: its values of
    ``observations`` (at ``steps``) and of ``next_observations`` (at ``steps + 1``).

    The same numbers as fitting and predicting with one baseline per target, with the features and their Gram matrix,
    which do not depend on the target, computed once for all targets."""
    baseline = LinearFeatureBaseline(episode_length)
    features = baseline._features(observations, steps)
    next_features = baseline._features(next_observations, steps + 1)
    gram = baseline._gram(features)
    values = []
    for target in targets:
        baseline._solve(gram, features, target)
        values.append((baseline._predict(features, steps.shape), baseline._predict(next_features, steps.shape)))
    return values
