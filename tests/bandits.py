"""One-state test envs whose reward and ``info`` (the costs) are functions of the action."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np


class Bandit(gym.Env):
    """A single zero observation and no end of its own (wrap it in a ``TimeLimit``); the reward and the ``info`` of a
    step are ``reward_of(action)`` and ``info_of(action)``."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(
        self,
        reward_of: Callable[[np.ndarray], float],
        info_of: Callable[[np.ndarray], dict[str, Any]],
        action_dim: int = 1,
        action_high: float = 1.0,
    ) -> None:
        self.reward_of, self.info_of = reward_of, info_of
        self.action_space = gym.spaces.Box(-action_high, action_high, (action_dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(1, np.float32), float(self.reward_of(action)), False, False, self.info_of(action)


def costly_bandit() -> Bandit:
    """Reward = action, cost 1 whenever the action is positive: the reward pulls straight into the cost."""
    return Bandit(lambda a: a[0], lambda a: {"cost": float(a[0] > 0)}, action_high=3.0)


def two_cost_bandit() -> Bandit:
    """Two independent costly bandits: reward a₀ + a₁, cost_a = 1 when a₀ > 0, cost_b = 1 when a₁ > 0. The reward
    pulls each action into its own cost, so a limit on one cost says nothing about the other."""

    def info_of(action: np.ndarray) -> dict[str, Any]:
        cost_a, cost_b = float(action[0] > 0), float(action[1] > 0)
        return {"cost": cost_a + cost_b, "cost_a": cost_a, "cost_b": cost_b}

    return Bandit(lambda a: a[0] + a[1], info_of, action_dim=2, action_high=3.0)
