"""SB3's ``make_vec_env`` on the package's envs: it wraps every env in a plain SB3 ``Monitor`` outside the
``CostMonitor``, which rebuilds ``info["episode"]`` without the cost; the cost must still reach training, the logs,
adaptation and evaluation."""

import csv

import pytest
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo import CPO, make_task_distribution
from sb3_metacpo.common.evaluation import evaluate_safe_policy
from sb3_metacpo.tasks.toy import Toy2DNavEnv

TINY = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))


def toy():
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def episodes(model):
    return [(info["r"], info["l"], info["c"], info["episode_costs"]["cost"]) for info in model.ep_info_buffer]


def test_cpo_trains_on_make_vec_env_with_the_same_costs_as_on_its_own_vec_env(tmp_path):
    dist = toy()
    task = dist.test_tasks(1)[0]
    wrapped = make_vec_env(lambda: dist.make_env(task), n_envs=2, seed=0)
    assert wrapped.envs[0].__class__ is Monitor  # SB3's, outside the CostMonitor
    model = CPO("MlpPolicy", wrapped, **TINY)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(400)
    assert model.num_timesteps == 400 and len(model.ep_info_buffer) >= 4

    plain = DummyVecEnv([lambda: dist.make_env(task)] * 2)
    plain.seed(0)
    reference = CPO("MlpPolicy", plain, **TINY)
    reference.learn(400)
    # the same episodes and costs as without SB3's outer Monitor (the cost is not 0 everywhere: it was measured)
    assert episodes(model) == episodes(reference)
    assert any(cost > 0 for _, _, cost, _ in episodes(model))
    with open(tmp_path / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["rollout/ep_cost_mean"] != ""

    # adaptation and evaluation read the cost through the outer Monitor too (on an env of their own: the model's
    # training env is refused, as adapting would step it under the training run)
    model.adapt(make_vec_env(lambda: dist.make_env(task), n_envs=2, seed=1), n_updates=1, n_steps=100)
    assert model.adaptation_history[-1]["ep_cost_mean"] >= 0
    _, _, mean_cost, _ = evaluate_safe_policy(model, wrapped, n_eval_episodes=2)
    assert mean_cost >= 0


def test_a_plain_monitor_alone_is_still_refused_with_the_way_out():
    task = toy().test_tasks(1)[0]
    vec_env = make_vec_env(lambda: Toy2DNavEnv(task), n_envs=1, seed=0)
    with pytest.raises(ValueError, match="CostMonitor"):
        CPO("MlpPolicy", vec_env, **TINY)
