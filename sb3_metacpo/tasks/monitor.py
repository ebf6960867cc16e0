"""Episode-cost monitoring: SB3's ``Monitor`` keeps only the last value of an info key, not its episode sum."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor

#: The name of the total per-step cost every safe env reports in ``info`` (the one a float ``cost_limit`` limits).
TOTAL_COST = "cost"


#: safety-gymnasium's own name of the step's total cost, which it reports in ``info`` beside ``"cost"`` (the same
#: value): logged as a cost signal only when a ``cost_limit`` names it.
SAFETY_GYMNASIUM_TOTAL = "cost_sum"

_COST_PREFIX = f"{TOTAL_COST}_"


def is_cost_key(key: str) -> bool:
    """Whether an info key is a per-step cost signal: ``cost`` or ``cost_<type>`` (safety-gymnasium's names)."""
    return key == TOTAL_COST or key.startswith(_COST_PREFIX)


def cost_number(value: Any) -> float | None:
    """A cost signal's value as a float: a Python or numpy number or bool, or a 0-d numeric array; None for anything
    else (the monitor leaves such ``cost_*`` entries out of its sums, and a constrained one is an error)."""
    if type(value) is float:  # the common case, checked first: this runs for every cost of every env step
        return value
    if isinstance(value, (numbers.Real, np.bool_)):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf":
        return float(value)
    return None


#: The error of an episode end without an episode cost.
NO_EPISODE_COST = (
    "the env reports no episode cost: wrap each env in sb3_metacpo.tasks.monitor.CostMonitor (SB3's Monitor alone "
    "drops it), or build it with TaskDistribution.make_env; a wrapper that ends episodes (e.g. gymnasium's TimeLimit) "
    "goes inside the CostMonitor, which must see every episode end"
)


def episode_cost(info: Mapping[str, Any]) -> float | None:
    """The total cost of the episode that ended at this step (None when no :class:`CostMonitor` reported one).

    :class:`CostMonitor` puts it in ``info["episode"]["c"]`` and, through :class:`EpisodeCostRecorder`, in
    ``info["c"]``. The latter survives a plain SB3 ``Monitor`` wrapped *outside* the CostMonitor, which rebuilds
    ``info["episode"]`` with ``r``, ``l`` and ``t`` only: SB3's ``make_vec_env`` adds one around every env, so
    ``make_vec_env(lambda: distribution.make_env(task))`` has one.
    """
    episode = info.get("episode")
    if isinstance(episode, Mapping) and "c" in episode:
        return float(episode["c"])
    if "c" in info:
        return float(info["c"])
    return None


class EpisodeCostRecorder(gym.Wrapper):
    """Sums every cost signal of ``info`` (``"cost"`` and each ``"cost_<type>"``) over the episode.

    On the episode's last step it writes the sum of ``info["cost"]`` to ``info["c"]`` and every signal's sum to
    ``info["episode_costs"]`` (a dict by name). A non-finite cost raises a ``ValueError`` naming the step and the
    signal, before it reaches any statistic.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._episode_costs: dict[str, float] = {}
        self._steps = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._episode_costs = {}
        self._steps = 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        if TOTAL_COST not in info:
            raise KeyError(
                f"{self.env} reports no cost: a safe-RL env must put the per-step cost in info['cost']. For "
                "safety-gymnasium use the 'Safety...Gymnasium-v0' ids or wrap with SafetyGymnasium2Gymnasium"
            )
        for key, raw in info.items():
            if key != TOTAL_COST and not key.startswith(_COST_PREFIX):  # is_cost_key, inlined: every key of every step
                continue
            value = cost_number(raw)
            if value is None and key == TOTAL_COST:
                raise TypeError(
                    f"the env reported cost={raw!r} at step {self._steps} of the episode: info['cost'] must be a number "
                    "(a Python or numpy number or bool) at every step"
                )
            if value is not None:
                if not math.isfinite(value):
                    raise ValueError(f"the env reported a non-finite {key} ({value}) at step {self._steps} of the episode")
                self._episode_costs[key] = self._episode_costs.get(key, 0.0) + value
        self._steps += 1
        if terminated or truncated:
            info["c"] = self._episode_costs[TOTAL_COST]
            info["episode_costs"] = dict(self._episode_costs)
        return observation, reward, terminated, truncated, info


class CostMonitor(Monitor):
    """SB3 ``Monitor`` that also records the episode cost as ``"c"`` beside ``"r"``, ``"l"`` and ``"t"``.

    ``info["episode"]`` (and the CSV file, when ``filename`` is given) then carries the undiscounted episode cost,
    which the algorithms log as ``rollout/ep_cost_mean``; the episode sum of every named cost signal
    (``cost_hazards``, ...) is in ``info["episode_costs"]``. Extra ``info_keywords`` are recorded as in ``Monitor``.
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
