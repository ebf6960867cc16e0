"""Episode-cost monitoring: SB3's ``Monitor`` keeps only the last value of an info key, not its episode sum."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
from stable_baselines3.common.monitor import Monitor


class EpisodeCostRecorder(gym.Wrapper):
    """Sums ``info["cost"]`` over the episode and writes the sum to ``info["c"]`` on the episode's last step."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._episode_cost = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._episode_cost = 0.0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        if "cost" not in info:
            raise KeyError(
                f"{self.env} reports no cost: a safe-RL env must put the per-step cost in info['cost']. For "
                "safety-gymnasium use the 'Safety...Gymnasium-v0' ids or wrap with SafetyGymnasium2Gymnasium"
            )
        self._episode_cost += float(info["cost"])
        if terminated or truncated:
            info["c"] = self._episode_cost
        return observation, reward, terminated, truncated, info


class CostMonitor(Monitor):
    """SB3 ``Monitor`` that also records the episode cost as ``"c"`` beside ``"r"``, ``"l"`` and ``"t"``.

    ``info["episode"]`` (and the CSV file, when ``filename`` is given) then carries the undiscounted episode cost,
    which the algorithms log as ``rollout/ep_cost_mean``. Extra ``info_keywords`` are recorded as in ``Monitor``.
    """

    def __init__(
        self,
        env: gym.Env,
        filename: str | None = None,
        allow_early_resets: bool = True,
        reset_keywords: tuple[str, ...] = (),
        info_keywords: tuple[str, ...] = (),
        override_existing: bool = True,
    ) -> None:
        super().__init__(
            EpisodeCostRecorder(env),
            filename=filename,
            allow_early_resets=allow_early_resets,
            reset_keywords=reset_keywords,
            info_keywords=("c", *info_keywords),
            override_existing=override_existing,
        )
