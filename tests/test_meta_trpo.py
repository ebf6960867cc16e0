"""MetaTRPO: the same meta-learning machinery with the cost constraint removed."""

import csv

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure

from sb3_metacpo import MetaCPO, MetaTRPO, make_task_distribution
from sb3_metacpo.common.constrained_step import StepConfig
from sb3_metacpo.common.cpo_update import CPOConfig

SMALL = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))


def test_every_update_is_a_trpo_step(tmp_path):
    # A tiny cost limit: MetaCPO would have to take dual or recovery steps, MetaTRPO ignores the cost.
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaTRPO("MlpPolicy", dist, cost_limit=1e-3, **SMALL)
    assert isinstance(model, MetaCPO)
    assert model._cpo_config(0.05) == CPOConfig(StepConfig(target_kl=0.05), constrained=False)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(1200)
    with open(tmp_path / "progress.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {row["train/cpo_case"] for row in rows} == {"trpo"}
    assert all(float(row["train/inner_trpo_frac"]) == 1.0 for row in rows)
    assert all(float(row["rollout/ep_cost_mean"]) >= 0 for row in rows)  # the cost is still measured

    theta = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.adapt(dist.test_tasks(1)[0], n_updates=2, n_steps=100)
    assert {step["cpo_case"] for step in model.adaptation_history} == {"trpo"}
    assert all(th.equal(theta[k], v) for k, v in model.policy.state_dict().items())
    model.save(tmp_path / "meta_trpo")
    loaded = MetaTRPO.load(tmp_path / "meta_trpo")
    obs = np.zeros((3, 2), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_dual_solver_needs_nothing_installed_for_meta_trpo(monkeypatch):
    """MetaTRPO solves no dual (its dual_solver has no effect), yet dual_solver='cvxpylayers' required cvxpylayers."""
    import sb3_metacpo.common.safe_algorithm as safe_algorithm

    monkeypatch.setattr(safe_algorithm, "cvxpylayers_available", lambda: False)
    MetaTRPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), dual_solver="cvxpylayers")
    with pytest.raises(ImportError, match="needs cvxpy and cvxpylayers"):
        MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), dual_solver="cvxpylayers")
