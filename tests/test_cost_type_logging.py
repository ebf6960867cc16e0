"""``rollout/ep_<name>_mean`` for every cost signal the envs report, constrained or not.

The oracle is a callback that sums the step infos' costs per episode itself (from SB3's ``locals``), independently of
the monitors and the episode records the algorithms log from."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
from bandits import Bandit
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.tasks.monitor import CostMonitor


class EpisodeCostSums(BaseCallback):
    """Every episode's sum of each ``cost*`` info entry, summed here from the step infos."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[int, dict[str, float]] = {}
        self.episodes: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        for index, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"], strict=True)):
            sums = self.running.setdefault(index, {})
            for key, value in info.items():
                if key == "cost" or key.startswith("cost_"):
                    sums[key] = sums.get(key, 0.0) + float(value)
            if done:
                self.episodes.append(self.running.pop(index))
        return True


def last_row(path):
    with open(path / "progress.csv", newline="") as file:
        return list(csv.DictReader(file))[-1]


def three_cost_bandit() -> gym.Env:
    """Two costs of their own and safety-gymnasium's ``cost_sum`` (the total again) beside ``cost``."""

    def info_of(action: np.ndarray) -> dict[str, float]:
        cost_a, cost_b = float(action[0] > 0), float(action[1] > 0.5)
        return {"cost": cost_a + cost_b, "cost_sum": cost_a + cost_b, "cost_a": cost_a, "cost_b": cost_b}

    return CostMonitor(gym.wrappers.TimeLimit(Bandit(lambda a: a[0] + a[1], info_of, action_dim=2), 20))


def test_metacpo_logs_every_reported_cost_type_not_only_the_constrained_ones(tmp_path):
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, speed_limit=0.5)
    model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.set_logger(configure(str(tmp_path), ["csv"]))
    oracle = EpisodeCostSums()
    model.learn(400, callback=oracle)
    row = last_row(tmp_path)
    assert len(oracle.episodes) == 8  # all of them in the 100-episode window
    for name in ("cost_hazards", "cost_speed"):
        expected = np.mean([episode[name] for episode in oracle.episodes])
        assert float(row[f"rollout/ep_{name}_mean"]) == pytest.approx(expected, rel=1e-6)
    assert float(row["rollout/ep_cost_mean"]) == pytest.approx(np.mean([e["cost"] for e in oracle.episodes]), rel=1e-6)
    assert any(episode["cost_speed"] > 0 for episode in oracle.episodes)  # the check sees a non-zero cost


@pytest.mark.parametrize("cost_limit", [5.0, {"cost_sum": 5.0}])
def test_cpo_logs_every_reported_cost_type_and_safety_gymnasiums_total_only_when_constrained(cost_limit, tmp_path):
    model = CPO("MlpPolicy", three_cost_bandit(), n_steps=200, seed=0, cost_limit=cost_limit)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    oracle = EpisodeCostSums()
    model.learn(400, callback=oracle)
    row = last_row(tmp_path)
    assert len(oracle.episodes) == 20
    for name in ("cost_a", "cost_b"):
        expected = np.mean([episode[name] for episode in oracle.episodes])
        assert float(row[f"rollout/ep_{name}_mean"]) == pytest.approx(expected, rel=1e-6)
    assert ("rollout/ep_cost_sum_mean" in row) == isinstance(cost_limit, dict)
    if isinstance(cost_limit, dict):
        expected = np.mean([episode["cost_sum"] for episode in oracle.episodes])
        assert float(row["rollout/ep_cost_sum_mean"]) == pytest.approx(expected, rel=1e-6)
