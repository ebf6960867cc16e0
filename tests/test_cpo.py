"""CPO as an SB3 on-policy algorithm: the constraint holds where TRPO breaks it, envs of every kind, save/load."""

import csv
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from bandits import costly_bandit
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metacpo import CPO, make_task_distribution
from sb3_metacpo.common.envs import ResampleTaskOnReset, make_safe_vec_env, vec_env_time_limit
from sb3_metacpo.tasks.base import Task
from sb3_metacpo.tasks.monitor import CostMonitor

SMALL = dict(n_steps=200, seed=0, policy_kwargs=dict(net_arch=[16]))


def bandit_episode_stats(cost_limit):
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)
    model = CPO("MlpPolicy", env, n_steps=500, cost_limit=cost_limit, target_kl=0.02, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(10_000)
    episodes = list(model.ep_info_buffer)[-50:]
    return np.mean([e["r"] for e in episodes]), np.mean([e["c"] for e in episodes])


def test_cpo_keeps_the_cost_under_the_limit_where_trpo_does_not():
    # The initial policy (mean 0, std 1) costs 5 per episode, over the limit of 3: CPO must recover and then stay
    # near the boundary (the constrained optimum has the action's mean just below 0), while the unconstrained
    # update (limit never binding) pushes the action up and pays the cost at every step.
    reward, cost = bandit_episode_stats(3.0)
    assert cost <= 3.5
    assert reward > -5.0  # not a collapse to the most negative action (return -30)
    reward_free, cost_free = bandit_episode_stats(1e6)
    assert cost_free >= 9.0 and reward_free > 10.0


def test_a_zero_cost_limit_drives_the_cost_to_zero():
    # cost_limit=0 (no cost at all, a common safe-RL setting) is accepted, and CPO pushes the action below 0, where
    # no cost is paid: the initial policy pays about 5 per episode, every update's batch is over the limit.
    reward, cost = bandit_episode_stats(0.0)
    assert cost <= 0.1
    assert reward > -15.0  # pushed just below 0, not to the most negative action (return -30)


def test_recovery_violated_recovers_whenever_the_batch_is_over_the_limit(tmp_path):
    """The bandit's initial policy pays about 5 against a limit of 4.5, a violation the trust region can undo: CPO's
    rule takes the dual step (reward and cost traded), recovery='violated' the recovery step, which lowers the cost
    surrogate by the whole trust region (√(2δs)) and so moves the action's mean further down."""
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)
    cases, means = {}, {}
    for recovery in ("linearised", "violated"):
        model = CPO(
            "MlpPolicy",
            env,
            n_steps=500,
            cost_limit=4.5,
            target_kl=0.2,
            seed=0,
            recovery=recovery,
            policy_kwargs=dict(net_arch=[8]),
        )
        model.set_logger(configure(str(tmp_path / recovery), ["csv"]))
        model.learn(500)  # one update; its logs are recorded, dumped at the next rollout
        cases[recovery] = model.logger.name_to_value["train/cpo_case"]
        means[recovery] = float(model.predict(np.zeros(1, np.float32), deterministic=True)[0][0])
    assert cases == {"linearised": "dual", "violated": "recovery"}
    assert means["violated"] < means["linearised"]


def test_learn_logs_safety_keys(tmp_path):
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = CPO("MlpPolicy", dist, n_envs=2, **SMALL)
    assert model.effective_cost_limit == dist.default_cost_limit
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(1200)
    assert model.num_timesteps == 1200 and model._n_updates == 3  # 2 envs x 200 steps per update
    with open(tmp_path / "progress.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for key in (
        "rollout/ep_cost_mean",
        "rollout/ep_rew_mean",
        "train/cpo_case",
        "train/kl",
        "train/lambda",
        "train/nu",
        "train/line_search_fraction",
        "train/constraint",
        "train/value_loss",
        "train/explained_variance",
        "train/cost_explained_variance",
        "time/fps",
    ):
        assert key in rows[-1], key
    logged = [float(row["train/explained_variance"]) for row in rows if row["train/explained_variance"]]
    assert logged and all(value <= 1 for value in logged)  # 1 - Var(returns - values) / Var(returns)
    assert rows[-1]["train/cpo_case"] in ("trpo", "dual", "recovery")


def test_task_distribution_envs_draw_a_new_training_task_every_episode():
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    env = ResampleTaskOnReset(dist)
    tasks = []
    for episode in range(4):
        env.reset(seed=7 if episode == 0 else None)
        tasks.append(env.task)
    assert len(set(tasks)) == 4 and all(dist.is_training_task(task) for task in tasks)
    again = ResampleTaskOnReset(dist)
    again.reset(seed=7)
    assert again.task == tasks[0]  # the task stream is seeded by the first reset's seed


def test_multi_task_envs_of_neighbouring_seeds_draw_other_tasks():
    """SB3 seeds env j of a run of seed s with s + j, and the task stream was seeded by that alone: env j + 1 of seed 0
    trained on the tasks of env j of seed 1 (3 of 4 streams shared between seeds 0 and 1), and the distribution's
    seed played no part (tasks audit)."""

    def first_tasks(seed: int, distribution_seed: int) -> list[Task]:
        dist = make_task_distribution("Toy2DNav", seed=distribution_seed, max_episode_steps=20)
        vec_env = make_safe_vec_env(dist, n_envs=4)
        vec_env.seed(seed)
        vec_env.reset()
        tasks = vec_env.get_attr("task")
        vec_env.close()
        return tasks

    seed_0, seed_1 = first_tasks(0, 0), first_tasks(1, 1)
    assert len({*seed_0, *seed_1}) == 8
    assert not set(first_tasks(0, 5)) & set(seed_0)  # the distribution's seed counts
    assert not set(first_tasks(0, 7)) & set(first_tasks(1, 7))  # and so does the env's index, at a fixed one
    assert first_tasks(0, 0) == seed_0
    subprocess_envs = make_safe_vec_env(make_task_distribution("Toy2DNav", seed=0), n_envs=3, vec_env_cls=SubprocVecEnv)
    assert subprocess_envs.get_attr("index") == [0, 1, 2]
    subprocess_envs.close()


def test_save_load_and_fine_tune_on_a_held_out_task(tmp_path):
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = CPO("MlpPolicy", "Toy2DNav", **SMALL)
    model.learn(400)
    model.save(tmp_path / "cpo")
    task = dist.test_tasks(1)[0]
    loaded = CPO.load(tmp_path / "cpo", env=task, n_steps=100)
    obs = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    assert loaded.task_distribution is not None and loaded.effective_cost_limit == model.effective_cost_limit
    before = {k: v.clone() for k, v in loaded.policy.state_dict().items()}
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded.num_timesteps == 500
    assert any(not th.equal(before[k], v) for k, v in loaded.policy.state_dict().items())
    assert loaded.env.get_attr("task")[0] == task


def test_safety_gymnasium_id(tmp_path):
    model = CPO("MlpPolicy", "SafetyPointGoal1Gymnasium-v0", n_steps=64, seed=0)
    assert model.effective_cost_limit == 25.0
    model.learn(64)  # float64 observations of the standard env are cast for the float32 policy
    action, _ = model.predict(model.env.reset(), deterministic=True)
    assert action.shape == (1, 2)


def test_errors_name_the_problem():
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)
    with pytest.raises(ValueError, match="CostMonitor"):
        CPO("MlpPolicy", Monitor(env))
    with pytest.raises(ValueError, match="CostMonitor"):
        CPO("MlpPolicy", DummyVecEnv([lambda: gym.wrappers.TimeLimit(costly_bandit(), 10)]))
    with pytest.raises(ValueError, match="target_kl"):
        CPO("MlpPolicy", env, target_kl=0)
    with pytest.raises(ValueError, match="cost_limit"):
        CPO("MlpPolicy", env, cost_limit=-1)
    with pytest.raises(ValueError, match="dual_solver"):
        CPO("MlpPolicy", env, dual_solver="scipy")
    with pytest.raises(ValueError, match="fvp_sample_freq must be a positive integer"):
        CPO("MlpPolicy", env, fvp_sample_freq=1.5)
    with pytest.raises(ValueError, match="needs its TaskDistribution"):
        make_safe_vec_env(make_task_distribution("Toy2DNav").test_tasks(1)[0])
    with pytest.raises(TypeError, match="env must be"):
        make_safe_vec_env(42)
    vec = make_safe_vec_env(env)
    assert vec.env_is_wrapped(CostMonitor) == [True]


class LateCostEnv(gym.Env):
    """A cost of 1 at every step of the second half of each episode, whatever the agent does; a constant
    observation, so only the time within the episode tells the cost-to-go (T − max(t, T/2) from step t)."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    horizon = 20

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        cost = float(self.t >= self.horizon // 2)
        self.t += 1
        return np.zeros(1, np.float32), 0.0, False, False, {"cost": cost}


def test_cost_critic_matches_monte_carlo_cost_to_go():
    """The undiscounted cost-to-go of a time-limited task has a fixed point only without bootstrapping at the time
    limit and with the time as an input: the trained cost critic matches the Monte-Carlo values at every step
    (bootstrapping there made the start value grow without bound)."""
    env = gym.wrappers.TimeLimit(LateCostEnv(), LateCostEnv.horizon)
    model = CPO(
        "MlpPolicy", env, n_steps=200, cost_limit=100.0, seed=0, n_critic_updates=20, policy_kwargs=dict(net_arch=[32])
    )
    model.learn(40_000)
    times = np.arange(LateCostEnv.horizon)
    monte_carlo = LateCostEnv.horizon - np.maximum(times, LateCostEnv.horizon // 2)
    # The critic's regression targets (GAE lambda-returns) are the Monte-Carlo cost-to-go: a fixed point exists ...
    batch = model._rollout
    prepared = model._prepare_batch(batch, model.policy.actor_params(), LateCostEnv.horizon, with_critic=True)
    targets = prepared.cost_returns[:, 0].reshape(batch.rewards.shape)
    np.testing.assert_allclose(targets, monte_carlo[batch.episode_steps], atol=0.05)
    # ... and the critic approaches it (the start value stays at 10, where bootstrapping made it grow without bound).
    _, predicted = model.policy.critic_values(np.zeros((len(times), 1), np.float32), times / LateCostEnv.horizon)
    assert np.abs(predicted[:, 0] - monte_carlo).max() < 1.5, np.round(predicted[:, 0], 2)


def test_reward_critic_sees_normalised_observations_like_the_rest():
    """SB3's predict_values runs the base class's feature extraction, which skipped the policy's observation
    normalisation: the reward critic saw raw observations while the actor, the cost critic and forward() saw
    normalised ones. All of them normalise now (the definition written out as the oracle)."""
    model = CPO("MlpPolicy", gym.wrappers.TimeLimit(costly_bandit(), 10), **SMALL)
    policy = model.policy
    with th.no_grad():
        policy.obs_mean.fill_(50.0)
        policy.obs_var.fill_(400.0)
        obs = th.linspace(-100.0, 300.0, 9).reshape(-1, 1)
        normalised = th.clamp((obs - 50.0) / th.sqrt(th.tensor(400.0) + 1e-8), -10.0, 10.0)
        expected = policy.value_net(policy.mlp_extractor.forward_critic(normalised))
        assert th.equal(policy.predict_values(obs), expected)
        assert th.equal(policy.forward(obs)[1], expected)
        values, _ = policy.critic_values(obs.numpy(), np.zeros(len(obs)))
        np.testing.assert_array_equal(values, expected.numpy().reshape(-1))


def test_sb3_actor_paths_normalise_and_follow_the_override():
    """SB3's get_distribution, forward and evaluate_actions ran the base class's feature extraction (raw
    observations) and the module's own actor, also after adapt() had set adapted parameters for predict. All of them
    now give the Gaussian of the definition written out here: normalised observations through the actor at the
    override's parameters (the module's own without one)."""
    model = CPO("MlpPolicy", gym.wrappers.TimeLimit(costly_bandit(), 10), **SMALL)
    policy = model.policy
    with th.no_grad():
        policy.obs_mean.fill_(0.5)
        policy.obs_var.fill_(0.04)
    obs = th.linspace(-1.0, 1.0, 7).reshape(-1, 1)
    actions = th.linspace(-2.0, 2.0, 7).reshape(-1, 1)
    generator = th.Generator().manual_seed(0)
    own = {name: value.detach() for name, value in policy.actor_params().items()}
    override = {name: value + 0.3 * th.randn(value.shape, generator=generator) for name, value in own.items()}

    def gaussian(params):  # net_arch [16], tanh: one hidden layer, a linear mean head, a state-independent std
        x = th.clamp((obs - 0.5) / th.sqrt(th.tensor(0.04) + 1e-8), -10.0, 10.0)
        hidden = th.tanh(x @ params["mlp_extractor.policy_net.0.weight"].T + params["mlp_extractor.policy_net.0.bias"])
        mean = hidden @ params["action_net.weight"].T + params["action_net.bias"]
        return mean, params["log_std"].exp().expand_as(mean)

    def log_density(points, mean, std):
        return (-0.5 * ((points - mean) / std) ** 2 - std.log() - 0.5 * np.log(2 * np.pi)).sum(-1)

    for params in (None, override):
        policy.set_actor_override(params)
        with th.no_grad():
            mean, std = gaussian(params or own)
            distribution = policy.get_distribution(obs).distribution
            th.testing.assert_close(distribution.mean, mean)
            th.testing.assert_close(distribution.stddev, std)
            sampled, values, log_prob = policy.forward(obs, deterministic=True)
            th.testing.assert_close(sampled, mean)
            th.testing.assert_close(log_prob, log_density(mean, mean, std))
            assert th.equal(values, policy.predict_values(obs))
            values, log_prob, entropy = policy.evaluate_actions(obs, actions)
            th.testing.assert_close(log_prob, log_density(actions, mean, std))
            th.testing.assert_close(entropy, (0.5 + 0.5 * np.log(2 * np.pi) + std.log()).sum(-1))
            assert th.equal(values, policy.predict_values(obs))
            predicted, _ = policy.predict(obs.numpy(), deterministic=True)
            np.testing.assert_allclose(predicted, mean.clamp(-3.0, 3.0).numpy(), rtol=1e-6)
    # the mean differs with and without the override, so the loop checked two different actors
    assert not th.allclose(gaussian(override)[0], gaussian(own)[0])


class StepCounter(gym.Env):
    """Observes its own step index within the episode (ended by a TimeLimit)."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(1, self.t, np.float32), 0.0, False, False, {"cost": 0.0}


class StopAtStep(BaseCallback):
    def __init__(self, n_calls):
        super().__init__()
        self.stop_at = n_calls

    def _on_step(self):
        return self.n_calls != self.stop_at


def test_a_callback_stop_leaves_the_envs_where_a_later_learn_goes_on():
    """A callback that stops training mid-rollout after the envs stepped: the next learn() goes on from the envs'
    current observations and episode times (it went on from the observation before the last step, with the episode
    times of the rollout's start, so the cost critic's time input was off by the stopped rollout's steps)."""
    env = DummyVecEnv([lambda: CostMonitor(gym.wrappers.TimeLimit(StepCounter(), 7))] * 2)
    model = CPO("MlpPolicy", env, n_steps=5, seed=0, n_critic_updates=1, batch_size=8, policy_kwargs=dict(net_arch=[8]))
    batches, train = [], model.train

    def recording_train():
        batches.append(model._rollout)
        train()

    model.train = recording_train
    model.learn(30, callback=StopAtStep(7))  # one rollout of 5 steps, the second stopped after its 2nd step
    assert len(batches) == 1 and model.num_timesteps == 14
    model.learn(20, reset_num_timesteps=False)
    assert len(batches) == 3
    for batch in batches:
        np.testing.assert_array_equal(batch.episode_steps, batch.observations[..., 0])
        going_on = ~(batch.terminated | batch.truncated)
        np.testing.assert_array_equal(batch.next_observations[..., 0][going_on], batch.observations[..., 0][going_on] + 1)


def test_the_episode_length_is_a_hand_wrapped_time_limit():
    """An env object wrapped in a TimeLimit by hand has no registered spec: its limit sets the cost critic's time
    scale from the first update on (the longest episode seen so far stood in for it, e.g. the rollout's 200 steps
    before the first episode ended, then growing)."""
    limited = [lambda: CostMonitor(gym.wrappers.TimeLimit(StepCounter(), 7))]
    assert vec_env_time_limit(DummyVecEnv(limited)) == 7
    workers = SubprocVecEnv(limited, start_method="fork")
    assert vec_env_time_limit(workers) == 7
    workers.close()
    assert vec_env_time_limit(DummyVecEnv([lambda: CostMonitor(StepCounter())])) is None
    assert vec_env_time_limit(make_safe_vec_env("SafetyPointGoal1Gymnasium-v0")) == 1000  # the registered spec's
    model = CPO("MlpPolicy", DummyVecEnv(limited), n_steps=200, seed=0)
    assert model._episode_length() == 7


def test_the_critics_learning_rate_follows_its_schedule_and_load(tmp_path):
    """CPO built its critic optimiser at lr_schedule(1) and never applied the schedule again (nor logged
    train/learning_rate); a schedule at its end saved 0.0 (or below), which load refused; a learning_rate given to
    load was ignored (the optimiser's saved state kept the old one)."""
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)
    model = CPO("MlpPolicy", env, n_steps=100, seed=0, learning_rate=lambda progress: 1e-3 * progress)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    model.learn(300)
    # SB3's: the schedule at the progress of the last update (1 - 300/300 = 0 here, after 2/3 and 1/3)
    assert model.policy.optimizer.param_groups[0]["lr"] == 1e-3 * model._current_progress_remaining == 0.0
    with open(tmp_path / "log" / "progress.csv", newline="") as handle:
        assert {"train/learning_rate"} <= set(next(csv.DictReader(handle)))
    # the schedule ended at progress <= 0: saved as 0.0, not refused, and said (once per model: checkpoints save often)
    with pytest.warns(UserWarning, match="learning_rate is a schedule") as said:
        path = model.save(tmp_path / "model")
        model.save(tmp_path / "again")
    assert len([w for w in said if "learning_rate is a schedule" in str(w.message)]) == 1
    # loaded without a rate, the critics would never learn again: said at load
    with pytest.warns(UserWarning, match=r"saved with a learning-rate schedule.*0\.0 \(0: the critics no longer learn\)"):
        assert CPO.load(path, env=env).learning_rate == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rate given to load: nothing to say
        loaded = CPO.load(path, env=env, learning_rate=1e-5)
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded.policy.optimizer.param_groups[0]["lr"] == 1e-5


def test_a_refused_set_env_leaves_the_model_as_it_was(tmp_path):
    """The refused env's family (and its cost limit) and env source were kept: training went on against another
    limit, and the saved model could not be loaded."""
    model = CPO("MlpPolicy", "Toy2DNav", n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))
    before = (model.task_distribution, model.effective_cost_limit, model.env_source, model.n_envs)
    for other in ("PointGoalHazard", "Pendulum-v1"):
        with pytest.raises(ValueError, match="spaces do not match"):
            model.set_env(other)
        assert (model.task_distribution, model.effective_cost_limit, model.env_source, model.n_envs) == before
    CPO.load(model.save(tmp_path / "model")).learn(50)
    # a refused env of the user's own is left open (the refused-env path closed it)
    closed = []

    class PendulumWithCost(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {**info, "cost": 0.0}

        def close(self):
            closed.append(True)
            super().close()

    user_env = DummyVecEnv([lambda: CostMonitor(PendulumWithCost(gym.make("Pendulum-v1")))])
    with pytest.raises(ValueError, match="spaces do not match"):
        model.set_env(user_env)
    assert not closed
    user_env.close()
    assert closed


def test_set_env_with_another_number_of_envs_needs_a_reset():
    """force_reset=False kept the old envs' last observation: the next learn crashed with an IndexError."""
    model = CPO("MlpPolicy", gym.wrappers.TimeLimit(costly_bandit(), 10), n_steps=20, batch_size=10, seed=0)
    model.learn(20)
    three = DummyVecEnv([lambda: CostMonitor(gym.wrappers.TimeLimit(costly_bandit(), 10))] * 3)
    last_obs = model._last_obs
    with pytest.raises(ValueError, match="needs force_reset=True"):
        model.set_env(three, force_reset=False)
    assert model.n_envs == 1 and model._last_obs is last_obs and model.get_env().num_envs == 1
    model.set_env(three)
    model.learn(60, reset_num_timesteps=False)
    assert model.num_timesteps == 80


def test_a_schedule_is_never_read_past_its_end(tmp_path):
    """A budget that is not a whole number of rollouts ends past progress 0: the last update applied a linear
    schedule's negative value (gradient ascent on the critics' loss)."""
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)
    rates = []

    def schedule(progress):
        rates.append(progress)
        return 1e-3 * progress

    model = CPO("MlpPolicy", env, n_steps=100, seed=0, learning_rate=schedule)
    model.learn(250)  # 3 updates: progress 0.6, 0.2, -0.2
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0 and min(rates) >= 0.0


def test_a_loaded_model_without_its_env_object_says_how_to_train(tmp_path):
    path = CPO("MlpPolicy", gym.wrappers.TimeLimit(costly_bandit(), 10), n_steps=50, seed=0).save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"pass env= to CPO\.load, or call set_env"):
        CPO.load(path).learn(50)  # an env object is not saved (SB3 asserted without a message)


def test_many_episodes_ending_together_with_a_small_stats_window():
    """More episodes ending on one step than twice stats_window_size indexed below the start of the episode buffer
    (IndexError); each episode record gets its cost before SB3 appends it now."""
    model = CPO("MlpPolicy", "Toy2DNav", n_envs=3, n_steps=100, stats_window_size=1, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(300)
    assert len(model.ep_info_buffer) == 1 and "c" in model.ep_info_buffer[0] and "episode_costs" in model.ep_info_buffer[0]


def test_a_refused_constructor_closes_the_envs_it_built():
    """A bad hyperparameter was reported after n_envs SubprocVecEnv workers had started, which stayed alive."""
    closed = []

    class Recording(DummyVecEnv):
        def close(self):
            closed.append(True)
            super().close()

    with pytest.raises(ValueError, match=r"gae_lambda must be in \[0, 1\]"):
        CPO("MlpPolicy", "Toy2DNav", n_envs=2, vec_env_cls=Recording, gae_lambda=1.5)
    assert closed == [True]
    env = gym.wrappers.TimeLimit(costly_bandit(), 10)  # the user's own env is left open
    with pytest.raises(ValueError, match="n_envs must be a positive integer, got 0"):
        CPO("MlpPolicy", env, n_envs=0)


def test_a_save_inside_adapt_describes_the_training_envs(tmp_path):
    """While adapting, the model's env is the adaptation's (for SB3's callbacks): a checkpoint saved by a callback
    there must still hold the training envs' streams, or a resume from it continues the wrong envs."""
    import json
    import zipfile

    model = CPO("MlpPolicy", "Toy2DNav", n_envs=2, n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(100)
    before = model.save(tmp_path / "before")

    class SaveOnce(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls == 1:
                self.model.save(tmp_path / "inside")
            return True

    model.adapt("Toy2DNav", n_updates=1, n_steps=50, callback=SaveOnce())

    def sampler_states(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json"))["rng"]["samplers"]

    inside = sampler_states(tmp_path / "inside.zip")
    assert sampler_states(before)["envs"] and inside["envs"] == sampler_states(before)["envs"]
    assert "adaptation" not in sampler_states(before) and len(inside["adaptation"]) == 1  # the adaptation's own stream


@pytest.mark.parametrize("algorithm", ["MetaCPO", "CPO"])
def test_a_family_that_does_not_report_a_named_cost_is_refused_before_anything_changes(algorithm, tmp_path):
    """set_env and load(env=...) took a family without the constrained cost; learn then failed at the first episode's
    end (the constructor refuses the same family at once)."""
    from sb3_metacpo import MetaCPO

    cls = MetaCPO if algorithm == "MetaCPO" else CPO
    kwargs = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]), cost_limit={"cost_speed": 3.0})
    if algorithm == "MetaCPO":
        kwargs["meta_batch_size"] = 2
    speed = make_task_distribution("Toy2DNav", seed=0, speed_limit=0.5)
    plain = make_task_distribution("Toy2DNav", seed=0)
    model = cls("MlpPolicy", speed, **kwargs)
    path = model.save(tmp_path / "model")
    for attempt in (lambda: model.set_env(plain), lambda: cls.load(path, env=plain)):
        with pytest.raises(ValueError, match=r"cost_limit names \['cost_speed'\], which the task family Toy2DNav does not"):
            attempt()
    assert model.task_distribution is speed
    model.learn(200)


def test_dict_observations_are_refused_naming_the_flattening_that_works():
    """SB3's message asked for MultiInputPolicy, which CPO then called unknown; an image's error showed SB3's
    transposed copy of the space. Now one error names the env's own space and the fix, and the fix trains."""
    from bad_inputs import DictObservationEnv

    with pytest.raises(TypeError, match=r"got Dict\('a'.*FlattenObservation\(env\)"):
        CPO("MlpPolicy", DictObservationEnv())
    model = CPO("MlpPolicy", gym.wrappers.FlattenObservation(DictObservationEnv()), n_steps=20, batch_size=10, seed=0)
    assert model.observation_space.shape == (6,)
    model.learn(40)
