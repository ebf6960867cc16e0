"""MetaCPO behind the SB3 API: training, callbacks, logging, adaptation, save/load and input validation."""

import csv
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import sb3_metacpo.common.evaluation as evaluation_module
from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.envs import make_safe_vec_env
from sb3_metacpo.common.evaluation import AdaptationRecord, MetaEvalCallback, evaluate_safe_policy, meta_evaluate

SMALL = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))


def toy(**kwargs):
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, **kwargs)


def read_log(path):
    with open(path / "progress.csv", newline="") as file:
        return list(csv.DictReader(file))


def snapshot(model):
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


class CountingCallback(BaseCallback):
    def __init__(self, stop_after=None):
        super().__init__()
        self.stop_after = stop_after
        self.calls = 0

    def _on_step(self):
        self.calls += 1
        return self.stop_after is None or self.calls < self.stop_after


def test_learn_logs_sb3_and_safety_keys(tmp_path):
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = CountingCallback()
    model.learn(total_timesteps=1200, callback=callback)
    # 2 tasks x (1 inner + 1 validation batch) x 100 steps = 400 steps per meta-iteration
    assert model.num_timesteps == 1200 and model._n_updates == 3
    assert callback.calls == model.num_timesteps // model.n_envs
    log = read_log(tmp_path)
    for key in (
        "rollout/ep_rew_mean",
        "rollout/ep_cost_mean",
        "train/kl",
        "train/cpo_case",
        "train/lambda",
        "train/nu_stage0_cost",  # the default meta-constraints: one per adaptation stage
        "train/nu_stage1_cost",
        "meta/constraint_stage0_cost",
        "meta/constraint_stage1_cost",
        "train/step_rejection",
        "train/line_search_fraction",
        "meta/pre_adapt_ep_cost_mean",
        "meta/post_adapt_ep_rew_mean",
        "meta/cost_limit",
        "time/fps",
    ):
        assert key in log[0], key
    assert {row["train/cpo_case"] for row in log} <= {"trpo", "dual", "recovery"}
    assert len(log) == 3
    # The paper's meta-constraint: one, on the mean post-adaptation cost.
    paper = MetaCPO("MlpPolicy", toy(), meta_constraint="mean", cost_confidence=0.0, **SMALL)
    paper.set_logger(configure(str(tmp_path / "paper"), ["csv"]))
    paper.learn(total_timesteps=400)
    assert {"train/nu", "meta/constraint"} <= set(read_log(tmp_path / "paper")[0])


def test_callback_can_stop_training_and_progress_bar_runs():
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.learn(total_timesteps=10_000, callback=CountingCallback(stop_after=5), progress_bar=True)
    # Stopped at the 5th env step: before any update (issue 12: not one meta-update later).
    assert model._n_updates == 0 and model.num_timesteps == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(meta_gradient="first_order"),
        dict(fvp_sample_freq=4),
        dict(dual_solver="cvxpylayers"),
        dict(critic="mlp", n_critic_updates=2),
        dict(n_inner_updates=2, n_envs=4),
        dict(vec_env_cls=SubprocVecEnv),
        dict(recovery="violated"),
        dict(recovery="confident", meta_constraint="stages_cvar"),
    ],
)
def test_variants_train(kwargs):
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, **kwargs})
    before = snapshot(model)
    model.learn(total_timesteps=400 * (kwargs.get("n_inner_updates", 1) + 1) // 2)
    after = model.policy.state_dict()
    assert any(not th.equal(before[k], after[k]) for k in before)  # theta (or the statistics) moved
    assert all(th.isfinite(v).all() for v in after.values())
    model.sampler.close()


def test_adapt_keeps_theta_and_changes_predict():
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    model.learn(400)
    theta = snapshot(model)
    obs = np.random.default_rng(0).uniform(-1, 1, (16, 2)).astype(np.float32)
    meta_actions, _ = model.predict(obs, deterministic=True)
    task = dist.test_tasks(1)[0]
    assert model.adapt(dist.make_env(task), n_updates=2, n_steps=100) is model
    assert all(th.equal(theta[k], v) for k, v in model.policy.state_dict().items())  # bit-identical
    adapted_actions, _ = model.predict(obs, deterministic=True)
    assert not np.allclose(adapted_actions, meta_actions)
    assert [h["update"] for h in model.adaptation_history] == [1, 2]
    assert {"ep_rew_mean", "ep_cost_mean", "cost_limit", "cpo_case", "fraction", "kl"} <= set(model.adaptation_history[0])
    model.reset_adaptation()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], meta_actions)
    # a task of the family and a family name are accepted too
    model.adapt(task, n_updates=1, n_steps=100)
    model.adapt("Toy2DNav", n_updates=1, n_steps=100)
    assert all(th.equal(theta[k], v) for k, v in model.policy.state_dict().items())


def test_the_history_of_a_batch_without_a_completed_episode_has_no_episode_means():
    """Its return and named costs used to be the step means times the episode length, its total cost NaN."""
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    task = dist.test_tasks(1)[0]
    model.adapt(task, n_updates=1, n_steps=20)  # 20 steps of 50-step episodes
    (record,) = model.adaptation_history
    assert record["n_episodes"] == 0
    assert math.isnan(record["ep_rew_mean"]) and math.isnan(record["ep_cost_mean"])
    assert all(math.isnan(cost) for cost in record["ep_costs"].values())
    model.adapt(task, n_updates=1, n_steps=100)
    (record,) = model.adaptation_history
    assert record["n_episodes"] >= 2 and math.isfinite(record["ep_rew_mean"]) and math.isfinite(record["ep_cost_mean"])
    assert record["ep_costs"] == {"cost": record["ep_cost_mean"]}


def test_adaptation_trust_region_and_evaluation_episodes():
    """adapt's target_kl is the adaptation updates' trust region (the accepted step's KL stays under it, the default
    being inner_target_kl); evaluate_params gives at least n_episodes on a VecEnv of several envs too (each env ran
    its share of n_episodes episodes' steps: 2 envs gave 0, 2 and 4 episodes for 1, 3 and 5)."""
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    task = dist.test_tasks(1)[0]
    kls = {}
    for target_kl in (None, 0.001, 0.2):
        model.adapt(task, n_updates=1, n_steps=200, target_kl=target_kl)
        kls[target_kl] = model.adaptation_history[0]["kl"]
    assert 0 < kls[0.001] <= 0.001 < kls[None] <= model.inner_target_kl < kls[0.2] <= 0.2
    with pytest.raises(ValueError, match="target_kl must be None or a finite number > 0"):
        model.adapt(task, n_updates=1, n_steps=200, target_kl=0.0)
    env = DummyVecEnv([lambda: dist.make_env(task)] * 2)
    for n_episodes in (1, 3, 5):
        assert model.evaluate_params(env, model.policy.actor_params(), n_episodes, seed=1).n_episodes >= n_episodes


def test_inner_kl_is_the_mean_kl_of_the_accepted_inner_steps(tmp_path, monkeypatch):
    """train/inner_kl averaged a made-up zero beside the accepted steps' KLs (1/(n+1) of their sum: 11 % low with the
    default 8 tasks); the oracle is the mean over the iteration's accepted inner steps."""
    kls = []
    original = MetaCPO._log_iteration

    def recording(self, adaptations, *args):
        kls.append([step.kl for adaptation in adaptations for step in adaptation.steps if step.accepted])
        return original(self, adaptations, *args)

    monkeypatch.setattr(MetaCPO, "_log_iteration", recording)
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "n_inner_updates": 2})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(1200)
    logged = [float(row["train/inner_kl"]) for row in read_log(tmp_path)]
    assert len(logged) == len(kls) == 2 and all(len(accepted) > 0 for accepted in kls)
    np.testing.assert_allclose(logged, [np.mean(accepted) for accepted in kls], rtol=1e-6)


def test_save_load_round_trip(tmp_path):
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    model.learn(400)
    obs = np.random.default_rng(1).uniform(-1, 1, (8, 2)).astype(np.float32)
    meta_actions = model.predict(obs, deterministic=True)[0]
    model.adapt(dist.test_tasks(1)[0], n_updates=1, n_steps=100)
    adapted_actions = model.predict(obs, deterministic=True)[0]
    model.save(tmp_path / "model")

    loaded = MetaCPO.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], adapted_actions)
    loaded.reset_adaptation()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], meta_actions)
    assert loaded.task_distribution.get_params() == dist.get_params()
    assert loaded.task_distribution.name == "Toy2DNav"
    for key in ("meta_batch_size", "n_steps", "inner_target_kl", "cost_limit", "meta_gradient", "seed"):
        assert getattr(loaded, key) == getattr(model, key)
    th.testing.assert_close(loaded.policy.obs_mean, model.policy.obs_mean)  # normalisation statistics
    theta = snapshot(loaded)
    loaded.adapt(dist.test_tasks(1)[0], n_updates=1, n_steps=100)  # adaptation works on a loaded model
    assert all(th.equal(theta[k], v) for k, v in loaded.policy.state_dict().items())
    loaded.learn(400, reset_num_timesteps=False)  # training resumes from the loaded model
    assert loaded.num_timesteps == 800


def test_evaluation_helpers_report_cost():
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    env = dist.make_env(dist.test_tasks(1)[0])
    mean_r, std_r, mean_c, std_c = evaluate_safe_policy(model, env, n_eval_episodes=3)
    assert np.isfinite([mean_r, std_r, mean_c, std_c]).all() and mean_c >= 0
    # the stochastic policy by default (it was the mean action, whose cost was 0 where the policy's is about 10)
    results = {}
    for deterministic in (None, False, True):
        vec_env = make_safe_vec_env(dist.make_env(dist.test_tasks(1)[0]))
        vec_env.seed(123)
        th.manual_seed(1)
        given = {} if deterministic is None else {"deterministic": deterministic}
        results[deterministic] = evaluate_safe_policy(model, vec_env, n_eval_episodes=5, **given)
    assert results[None] == results[False] != results[True]
    records = meta_evaluate(model, dist.test_tasks(2), n_updates=2, n_steps=100, n_eval_episodes=2)
    assert [(r.task, r.n_updates) for r in records] == [(t, k) for t in dist.test_tasks(2) for k in range(3)]
    assert all(r.n_episodes >= 2 for r in records)


def test_meta_eval_callback_logs_meta_test(tmp_path):
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = MetaEvalCallback(dist.test_tasks(2), eval_freq=1, n_updates=1, n_steps=100, n_eval_episodes=1)
    model.learn(800, callback=callback)
    assert len(callback.history) == 2
    # each evaluation is dumped at once (as SB3's EvalCallback), at the timestep of the model it evaluated
    rows = [row for row in read_log(tmp_path) if row.get("meta_test/under_limit_frac")]
    assert [int(row["time/total_timesteps"]) for row in rows] == [400, 800]
    assert all(row["meta_test/ep_rew_mean_0"] and row["meta_test/ep_cost_mean_1"] for row in rows)


def test_meta_eval_callback_passes_deterministic_and_target_kl_to_meta_evaluate(monkeypatch):
    """The callbacks page offered deterministic=True for both callbacks; MetaEvalCallback refused it."""
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    seen = []
    real = evaluation_module.meta_evaluate

    def recording(*args, **kwargs):
        seen.append((kwargs["deterministic"], kwargs["target_kl"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "meta_evaluate", recording)
    callback = MetaEvalCallback(dist.test_tasks(1), eval_freq=1, n_updates=0, n_eval_episodes=1, deterministic=True)
    model.learn(400, callback=callback)
    callback = MetaEvalCallback(dist.test_tasks(1), eval_freq=1, n_updates=1, n_steps=100, target_kl=0.05)
    model.learn(400, callback=callback)
    assert seen == [(True, None), (False, 0.05)]
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        MetaEvalCallback(dist.test_tasks(1), deterministic="yes")


def test_the_total_cost_is_logged_before_and_after_adaptation_when_only_named_costs_are_limited(tmp_path):
    """With a cost_limit mapping only the per-name keys were logged: the learning-curve plot lost its cost curve
    after adaptation."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, speed_limit=1.0)
    model = MetaCPO("MlpPolicy", dist, **{**SMALL, "cost_limit": {"cost_hazards": 5.0}})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(400)
    (row,) = read_log(tmp_path)
    for stage in ("pre", "post"):
        total, hazards = float(row[f"meta/{stage}_adapt_ep_cost_mean"]), float(row[f"meta/{stage}_adapt_ep_cost_hazards_mean"])
        assert np.isfinite(total) and total >= hazards  # the total sums the hazards and the speed costs
    assert "meta/cost_limit" not in row and float(row["meta/cost_limit_cost_hazards"]) == 5.0


def test_meta_eval_callback_does_not_evaluate_a_resumed_models_starting_point_again():
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    model.learn(800)  # 2 meta-iterations (its own run's last evaluation would be at 2)
    callback = MetaEvalCallback(dist.test_tasks(1), eval_freq=2, n_updates=0, n_eval_episodes=1)
    model.learn(800, reset_num_timesteps=False, callback=callback)
    assert model._n_updates == 4 and len(callback.history) == 1  # at 4 only (was 2 and 4)


def test_set_env_takes_a_task_distribution_and_refuses_a_single_env():
    """SB3's set_env was inherited: AttributeError on a fresh model, SB3's misleading Gym error for a distribution, and
    a VecEnv was accepted, then ignored by learn."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    other = make_task_distribution("Toy2DNav", seed=1, max_episode_steps=20)
    model.set_env(other)
    assert model.task_distribution is other
    model.learn(160)
    assert model._n_updates == 1 and model.sampler is not None and model.sampler.distribution is other
    with pytest.raises(TypeError, match="set_env takes a TaskDistribution or a registered family name"):
        model.set_env(DummyVecEnv([lambda: other.make_env(other.test_tasks(1)[0])]))


def test_meta_evaluate_keeps_the_models_adaptation_and_its_history():
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    task = dist.test_tasks(1)[0]
    model.adapt(task, n_updates=2, n_steps=100)
    history, adapted = list(model.adaptation_history), dict(model.adapted_params)
    meta_evaluate(model, dist.test_tasks(2), n_updates=1, n_steps=100, n_eval_episodes=1)
    assert model.adaptation_history == history and model.adapted_params == adapted
    with pytest.raises(ValueError, match="n_eval_episodes must be a positive integer"):
        meta_evaluate(model, [task], n_eval_episodes=0)
    assert model.adaptation_history == history and model.adapted_params == adapted


def test_adapting_to_the_models_own_family_by_name_uses_its_held_out_task():
    dist = toy(test_seed=7)
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    assert model._adaptation_sampler("Toy2DNav")[1] == dist.test_tasks(1)[0]  # not the default family's


def test_meta_eval_callback_counts_a_task_under_the_limits_only_when_every_cost_is(tmp_path, monkeypatch):
    """With cost_limit a mapping, a task is under the limits when each named cost is under its own: the second task's
    total cost (4) is under the first limit (5, what was compared before), its cost_speed (3) over its limit (2)."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, speed_limit=0.05)
    tasks = dist.test_tasks(2)
    named = [{"cost_hazards": 3.0, "cost_speed": 1.0}, {"cost_hazards": 1.0, "cost_speed": 3.0}]

    def evaluate(model, tasks, n_updates, n_steps, n_eval_episodes, deterministic=False, target_kl=None):
        return [
            AdaptationRecord(task, k, 1.0, 4.0, 1, ep_costs=costs)
            for task, costs in zip(tasks, named, strict=True)
            for k in range(n_updates + 1)
        ]

    monkeypatch.setattr(evaluation_module, "meta_evaluate", evaluate)
    model = MetaCPO("MlpPolicy", dist, cost_limit={"cost_hazards": 5.0, "cost_speed": 2.0}, **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(400, callback=MetaEvalCallback(tasks, eval_freq=1, n_updates=1))
    rows = [row for row in read_log(tmp_path) if row.get("meta_test/under_limit_frac")]
    assert [float(row["meta_test/under_limit_frac"]) for row in rows] == [0.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(meta_batch_size=0), "meta_batch_size must be a positive integer"),
        (dict(n_steps=1.5), "n_steps must be an integer >= 2"),
        (dict(inner_target_kl=0.0), "inner_target_kl must be a finite number > 0"),
        (dict(cost_limit=-1.0), "cost_limit: the limit of .cost. must be finite and >= 0"),
        (dict(meta_gradient="third_order"), "meta_gradient must be 'second_order' or 'first_order'"),
        (dict(dual_solver="scipy"), "dual_solver must be one of"),
        (dict(critic="gp"), "critic must be 'linear' or 'mlp'"),
        (dict(gamma=1.5), r"gamma must be in \(0, 1\]"),
        (dict(fvp_sample_freq=0), "fvp_sample_freq must be a positive integer"),
        (dict(line_search_shrinking_factor=1.0), r"line_search_shrinking_factor must be in \(0, 1\)"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaCPO("MlpPolicy", toy(), **kwargs)


def test_bad_envs_are_rejected():
    with pytest.raises(TypeError, match="trains on a task distribution"):
        MetaCPO("MlpPolicy", gym.make("Pendulum-v1"))
    with pytest.raises(ValueError, match="unknown task distribution 'Toy'; known ones are"):
        MetaCPO("MlpPolicy", "Toy")
    model = MetaCPO("MlpPolicy", "Toy2DNav", **SMALL)
    with pytest.raises(TypeError, match="needs a Box action space"):
        model.adapt(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="observation/action shapes"):
        model.adapt(gym.make("Pendulum-v1"))
    with pytest.raises(TypeError, match="is not a task of the model's family"):
        model.adapt(make_task_distribution("PointGoalHazard").test_tasks(1)[0])

    class NoCost(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

        def reset(self, *, seed=None, options=None):
            return np.zeros(2, np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), 0.0, False, False, {}

    with pytest.raises(KeyError, match="reports no cost"):
        model.adapt(NoCost(), n_updates=1, n_steps=10)
    with pytest.raises(ValueError, match="n_updates must be None or an integer >= 0"):
        model.adapt("Toy2DNav", n_updates=-1)


@pytest.mark.parametrize("activation_fn", [th.nn.Tanh, th.nn.ReLU, th.nn.ELU])  # numpy, numpy, through torch
def test_batched_acting_matches_acting_task_by_task(activation_fn):
    # One numpy pass with per-env parameters must equal each env's own torch forward with its task's parameters,
    # observation normalisation (with clipping) included; the noise is reproducible under the torch seed.
    model = MetaCPO(
        "MlpPolicy",
        toy(),
        meta_batch_size=3,
        n_steps=100,
        seed=0,
        policy_kwargs=dict(net_arch=[8, 8], activation_fn=activation_fn, clip_observations=1.5),
    )
    rng = np.random.default_rng(0)
    model.policy.update_obs_stats(rng.normal(0.3, 0.5, size=(50, 2)))
    theta = model.policy.actor_params()
    gen = th.Generator().manual_seed(0)
    params = [{k: v.detach() + 0.1 * th.randn(v.shape, generator=gen) for k, v in theta.items()} for _ in range(3)]
    obs = rng.normal(size=(7, 2))  # float64, as many envs emit
    tasks = np.array([0, 1, 2, 0, 1, 2, 0])
    actions = model._act_fn(params, deterministic=True)(obs, tasks)
    with th.no_grad():
        expected = [
            model.policy.actor_mean_log_std(th.as_tensor(obs[i : i + 1]), params[t])[0][0] for i, t in enumerate(tasks)
        ]
    np.testing.assert_allclose(actions, th.stack(expected).numpy(), rtol=1e-5, atol=1e-6)
    draws = []
    for _ in range(2):
        th.manual_seed(3)
        draws.append(model._act_fn(params)(obs, tasks))
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.allclose(draws[0], actions)


def test_actor_layers_with_parameters_are_rejected():
    with pytest.raises(ValueError, match="parameter-free activations"):
        MetaCPO(
            "MlpPolicy",
            toy(),
            policy_kwargs=dict(activation_fn=th.nn.PReLU),
            **{k: v for k, v in SMALL.items() if k != "policy_kwargs"},
        )


def test_a_critic_learning_rate_given_to_load_takes_effect(tmp_path):
    """The critic optimiser's saved state brought back the old learning rate: load(..., critic_learning_rate=...)
    changed the attribute, not the rate used."""
    model = MetaCPO("MlpPolicy", toy(), critic="mlp", critic_learning_rate=1e-3, **SMALL)
    model.learn(400)
    loaded = MetaCPO.load(model.save(tmp_path / "model"), critic_learning_rate=1e-5)
    loaded.learn(400, reset_num_timesteps=False)
    assert loaded.policy.optimizer.param_groups[0]["lr"] == 1e-5


def test_a_batch_shorter_than_an_episode_is_warned_about():
    """Each collect starts fresh episodes: with n_steps below the episode length no batch ever completes one."""
    short = make_task_distribution("Toy2DNav", seed=0)  # 100-step episodes
    with pytest.warns(UserWarning, match=r"n_steps=20 gives each env 20 steps per batch, fewer than an episode"):
        MetaCPO("MlpPolicy", short, meta_batch_size=2, n_steps=20, seed=0)
    with pytest.warns(UserWarning, match=r"n_steps=150 gives each env 75 steps per batch"):
        MetaCPO("MlpPolicy", short, meta_batch_size=2, n_envs=4, n_steps=150, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaCPO("MlpPolicy", short, meta_batch_size=2, n_steps=100, seed=0)
        MetaCPO("MlpPolicy", short, meta_batch_size=4, n_envs=2, n_steps=100, seed=0)


def test_n_envs_is_known_before_the_first_learn():
    """SB3's n_envs was missing (AttributeError) until learn built the sampler."""
    assert MetaCPO("MlpPolicy", toy(), **SMALL).n_envs == 2
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "n_envs": 4})
    assert model.n_envs == 4
    model.learn(400)
    assert model.n_envs == 4 and model.get_env().num_envs == 4


def _first_observations(model: MetaCPO, budget: int) -> list[np.ndarray]:
    seen: list[np.ndarray] = []

    class First(BaseCallback):
        def _on_step(self) -> bool:
            if not seen:
                seen.append(np.array(self.locals["obs"], copy=True))
            return True

    model.learn(budget, callback=First(), reset_num_timesteps=True)
    return seen


def test_set_random_seed_reseeds_the_training_envs_episodes():
    """SB3's set_random_seed seeds the env too; MetaCPO's sampler, built at the first learn, took the constructor's
    seed whatever set_random_seed said (SB3-ecosystem audit). The oracle: a model built with the seed (its first
    observations; the networks were initialised before the reseed, so the runs part after them)."""
    kwargs = dict(meta_batch_size=2, n_steps=100, policy_kwargs=dict(net_arch=[8]))
    toy = lambda: make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)  # noqa: E731  the same tasks
    reseeded = MetaCPO("MlpPolicy", toy(), seed=0, **kwargs)
    reseeded.set_random_seed(5)
    built = MetaCPO("MlpPolicy", toy(), seed=5, **kwargs)
    other = MetaCPO("MlpPolicy", toy(), seed=0, **kwargs)
    first = [_first_observations(model, 400)[0] for model in (reseeded, built, other)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])
    # after training, with the sampler built: the next episodes follow the seed, whatever came before
    other.set_random_seed(9)
    built.set_random_seed(9)
    np.testing.assert_array_equal(_first_observations(other, 400)[0], _first_observations(built, 400)[0])
