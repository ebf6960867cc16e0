"""SafeEvalCallback: reward and cost on held-out tasks (after adaptation for the meta-algorithms), the best model under
the cost limit, and an EvalCallback-style npz with the costs."""

import csv
import json

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.logger import configure

import sb3_metacpo.common.callbacks as callbacks_module
from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.callbacks import SafeEvalCallback
from sb3_metacpo.common.evaluation import AdaptationRecord

TINY_META = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))


def toy():
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def test_meta_cpo_evaluated_after_adaptation_with_costs_in_the_npz(tmp_path):
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **TINY_META)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    tasks = dist.test_tasks(2)
    callback = SafeEvalCallback(
        tasks,
        eval_freq=1,
        n_updates=1,
        n_steps=100,
        n_eval_episodes=1,
        best_model_save_path=tmp_path / "best",
        log_path=tmp_path / "evals",
    )
    model.learn(800, callback=callback)

    data = np.load(tmp_path / "evals" / "evaluations.npz")
    assert data["timesteps"].tolist() == [400, 800]  # after each of the 2 meta-iterations (the last at training end)
    for key in ("results", "costs", "pre_adapt_results", "pre_adapt_costs"):
        assert data[key].shape == (2, len(tasks)) and np.isfinite(data[key]).all(), key
    assert (data["costs"] >= 0).all() and float(data["cost_limit"]) == model.effective_cost_limit
    under = data["costs"].mean(axis=1) <= model.effective_cost_limit
    assert data["under_limit"].tolist() == under.tolist()

    # the best model is the best reward among the evaluations under the limit
    means = data["results"].mean(axis=1)
    if under.any():
        best = int(np.flatnonzero(under)[np.argmax(means[under])])
        assert callback.best_mean_reward == pytest.approx(means[best])
        assert callback.best_timestep == data["timesteps"][best]
        assert MetaCPO.load(callback.best_model_path).num_timesteps == data["timesteps"][best]
    else:
        assert callback.best_timestep is None and not callback.best_model_path.exists()

    with open(tmp_path / "log" / "progress.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("eval/mean_cost")]
    assert [int(row["time/total_timesteps"]) for row in rows] == [400, 800]
    assert all(row["eval/pre_adapt_mean_reward"] and row["eval/under_limit"] in ("0.0", "1.0") for row in rows)


def fake_meta_evaluate(outcomes):
    """A meta_evaluate returning the given (reward, cost) per call, for both tasks and every update."""
    queue = list(outcomes)

    def evaluate(model, tasks, n_updates, n_steps, n_eval_episodes, deterministic=False):
        reward, cost = queue.pop(0)
        return [AdaptationRecord(task, k, reward, cost, 1) for task in tasks for k in range(n_updates + 1)]

    return evaluate


def test_the_best_model_is_the_best_reward_under_the_limit(tmp_path, monkeypatch):
    # (reward, cost) of five evaluations against a limit of 5: the highest rewards are over the limit
    outcomes = [(10.0, 9.0), (1.0, 2.0), (50.0, 5.5), (3.0, 5.0), (2.0, 0.0)]
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate(outcomes))
    dist = toy()
    model = CPO("MlpPolicy", dist, n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))
    callback = SafeEvalCallback(
        dist.test_tasks(2), eval_freq=1, cost_limit=5.0, best_model_save_path=tmp_path, log_path=tmp_path
    )
    saved = []
    model.save = lambda path: saved.append((model.num_timesteps, path))
    model.learn(250, callback=callback)

    assert callback.n_updates == 0  # CPO is evaluated as trained
    assert callback.evaluations_under_limit == [False, True, False, True, True]
    assert callback.best_mean_reward == 3.0 and callback.best_timestep == 200
    assert saved == [(100, tmp_path / "best_model.zip"), (200, tmp_path / "best_model.zip")]
    data = np.load(tmp_path / "evaluations.npz")
    assert data["results"][:, 0].tolist() == [r for r, _ in outcomes]
    assert data["costs"][:, 1].tolist() == [c for _, c in outcomes]
    assert np.array_equal(data["pre_adapt_costs"], data["costs"])  # no adaptation


def test_several_constraints_each_cost_against_its_own_limit(tmp_path, monkeypatch):
    """With cost_limit a mapping, an evaluation is under the limits when every named cost is under its own: the
    total cost against the first limit (what was compared before) says the opposite in evaluations 2 and 4."""
    limits = {"cost_hazards": 5.0, "cost_speed": 2.0}
    # (reward, total cost, cost_hazards, cost_speed)
    outcomes = [(10.0, 4.0, 3.0, 1.0), (40.0, 4.5, 1.5, 3.0), (50.0, 6.0, 6.0, 0.0), (30.0, 6.5, 4.9, 1.6)]
    queue = list(outcomes)

    def evaluate(model, tasks, n_updates, n_steps, n_eval_episodes, deterministic=False):
        reward, total, hazards, speed = queue.pop(0)
        costs = {"cost_hazards": hazards, "cost_speed": speed}
        return [AdaptationRecord(task, k, reward, total, 1, ep_costs=costs) for task in tasks for k in range(n_updates + 1)]

    monkeypatch.setattr(callbacks_module, "meta_evaluate", evaluate)
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, speed_limit=0.05)
    model = CPO("MlpPolicy", dist, n_steps=50, seed=0, cost_limit=limits, policy_kwargs=dict(net_arch=[8]))
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    callback = SafeEvalCallback(dist.test_tasks(2), eval_freq=1, log_path=tmp_path)
    model.learn(200, callback=callback)

    assert callback.evaluations_under_limit == [True, False, False, True]
    assert callback.best_mean_reward == 30.0 and callback.best_timestep == 200
    data = np.load(tmp_path / "evaluations.npz")
    assert data["constraint_names"].tolist() == list(limits) and data["constraint_limits"].tolist() == list(limits.values())
    assert data["constraint_costs"].tolist() == [[h, s] for _, _, h, s in outcomes]
    assert np.isnan(data["cost_limit"])  # the total cost has no limit here
    with open(tmp_path / "log" / "progress.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("eval/mean_cost")]
    assert [float(row["eval/mean_cost_cost_speed"]) for row in rows] == [s for *_, s in outcomes]
    assert {row["eval/cost_limit_cost_hazards"] for row in rows} == {"5.0"}
    # an explicit cost_limit is a limit on the total cost
    queue.extend(outcomes)
    callback = SafeEvalCallback(dist.test_tasks(2), eval_freq=1, cost_limit=5.0)
    model.learn(200, callback=callback)
    assert callback.evaluations_under_limit == [True, True, False, False]


def test_nothing_is_saved_while_every_evaluation_is_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate([(100.0, 30.0), (200.0, 26.0)]))
    dist = toy()
    model = CPO("MlpPolicy", dist, n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))
    callback = SafeEvalCallback(dist.test_tasks(1), eval_freq=1, cost_limit=25.0, best_model_save_path=tmp_path)
    model.learn(100, callback=callback)
    assert callback.best_timestep is None and callback.best_mean_reward == -np.inf
    assert not (tmp_path / "best_model.zip").exists()


def test_bad_arguments_and_foreign_models():
    tasks = toy().test_tasks(1)
    for kwargs, message in [
        (dict(eval_freq=0), "eval_freq must be a positive integer"),
        (dict(n_updates=-1), "n_updates must be None or an integer >= 0"),
        (dict(n_eval_episodes=0), "n_eval_episodes must be a positive integer"),
        (dict(cost_limit=float("nan")), "cost_limit must be None or a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            SafeEvalCallback(tasks, **kwargs)
    with pytest.raises(ValueError, match="at least one held-out task"):
        SafeEvalCallback([])
    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, seed=0)
    with pytest.raises(TypeError, match="needs a model of this package"):
        model.learn(64, callback=SafeEvalCallback(tasks))


def test_arguments_are_checked_as_the_other_callbacks_check_them(tmp_path):
    """cost_limit=True was taken as a limit of 1.0 and np.float32(5) refused; deterministic="False" was taken (and
    truthy: the mean action was evaluated) while MetaEvalCallback refused it; verbose was not checked by any."""
    from sb3_metacpo.common.callbacks import ResumableCheckpointCallback
    from sb3_metacpo.common.evaluation import MetaEvalCallback

    tasks = toy().test_tasks(1)
    for kwargs, message in [
        (dict(cost_limit=True), r"cost_limit must be None or a finite number >= 0 .*got True"),
        (dict(cost_limit=-1.0), r"cost_limit must be None or a finite number >= 0"),
        (dict(cost_limit="5"), r"cost_limit must be None or a finite number >= 0"),
        (dict(deterministic="False"), r"deterministic must be True or False, got 'False'"),
        (dict(deterministic=1), r"deterministic must be True or False, got 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            SafeEvalCallback(tasks, **kwargs)
    callback = SafeEvalCallback(tasks, cost_limit=np.float32(5), deterministic=np.True_)
    assert callback.cost_limit == 5.0 and type(callback.cost_limit) is float
    assert callback.deterministic is True
    assert SafeEvalCallback(tasks, cost_limit=np.int64(0)).cost_limit == 0.0
    for make in (
        lambda verbose: SafeEvalCallback(tasks, verbose=verbose),
        lambda verbose: MetaEvalCallback(tasks, verbose=verbose),
        lambda verbose: ResumableCheckpointCallback(1, tmp_path, verbose=verbose),
    ):
        for verbose in ("x", None, -1):
            with pytest.raises(ValueError, match=r"verbose must be an integer >= 0 \(0 silent, 1 info, 2 debug\)"):
                make(verbose)
        assert make(np.int64(1)).verbose == 1


def test_held_out_tasks_of_another_family_are_refused_when_training_starts():
    """They were refused at the first evaluation, eval_freq meta-iterations of real training later."""
    from sb3_metacpo.common.evaluation import MetaEvalCallback

    foreign = make_task_distribution("CarCircle", seed=0).test_tasks(1)
    for callback_cls in (SafeEvalCallback, MetaEvalCallback):
        model = MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), meta_batch_size=2, n_steps=100, seed=0)
        with pytest.raises(TypeError, match="builds Toy2DNavTask tasks, got CarCircleTask"):
            model.learn(1200, callback=callback_cls(foreign, eval_freq=3))
        assert model.num_timesteps == 0


def test_a_resumed_run_takes_up_the_evaluations_and_the_best_so_far(tmp_path, monkeypatch):
    """A run killed after three evaluations and resumed from its checkpoint: the file kept only the resumed run's
    evaluations, and the first evaluation under the limit after resuming (reward 2) replaced the best model (3)."""
    outcomes = [(1.0, 2.0), (3.0, 5.0), (50.0, 9.0), (2.0, 0.0), (4.0, 1.0)]
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate(outcomes))
    dist = toy()
    model = CPO("MlpPolicy", dist, n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))

    def callback():
        return SafeEvalCallback(
            dist.test_tasks(2), eval_freq=1, cost_limit=5.0, best_model_save_path=tmp_path, log_path=tmp_path
        )

    model.learn(150, callback=callback())
    path = model.save(tmp_path / "checkpoint")
    resumed = CPO.load(path)
    saved = []
    resumed.save = lambda path: saved.append((resumed.num_timesteps, path))
    second = callback()
    resumed.learn(100, callback=second, reset_num_timesteps=False)
    assert second.evaluations_timesteps == [50, 100, 150, 200, 250]
    assert second.evaluations_under_limit == [True, True, False, True, True]
    assert second.best_mean_reward == 4.0 and second.best_timestep == 250
    assert saved == [(250, tmp_path / "best_model.zip")]  # not at 200: reward 2 is below the earlier best, 3
    data = np.load(tmp_path / "evaluations.npz")
    assert data["results"][:, 0].tolist() == [r for r, _ in outcomes]
    # a fresh run in the same folder starts its own record; other limits are not taken up
    fresh = SafeEvalCallback(dist.test_tasks(2), eval_freq=1, cost_limit=7.0, log_path=tmp_path)
    other = CPO.load(path)
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate([(1.0, 1.0)]))
    with pytest.warns(UserWarning, match="evaluations of other settings .* not taken up"):
        other.learn(50, callback=fresh, reset_num_timesteps=False)
    assert fresh.evaluations_timesteps == [200]
    # a file cut short (a run killed while writing it; the file is now written atomically) is not taken up
    data = (tmp_path / "evaluations.npz").read_bytes()
    (tmp_path / "evaluations.npz").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate([(1.0, 1.0)]))
    cut = SafeEvalCallback(dist.test_tasks(2), eval_freq=1, cost_limit=5.0, log_path=tmp_path)
    with pytest.warns(UserWarning, match="cannot be read .* not taken up"):
        CPO.load(path).learn(50, callback=cut, reset_num_timesteps=False)
    assert cut.evaluations_timesteps == [200] and not list(tmp_path.glob(".evaluations*"))


def test_a_resumed_run_with_other_adaptation_settings_does_not_take_up_the_earlier_evaluations(tmp_path, monkeypatch):
    """The settings recorded n_updates=None and n_steps=None (the algorithm's own), so a model loaded with other
    n_inner_updates, n_steps or inner_target_kl took up evaluations of another adaptation, silently."""
    monkeypatch.setattr(callbacks_module, "meta_evaluate", fake_meta_evaluate([(1.0, 1.0)] * 8))
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))

    def callback():
        return SafeEvalCallback(dist.test_tasks(2), eval_freq=1, n_updates=1, log_path=tmp_path)

    model.learn(400, callback=callback())
    path = model.save(tmp_path / "checkpoint")
    same = callback()
    MetaCPO.load(path).learn(400, callback=same, reset_num_timesteps=False)
    assert same.evaluations_timesteps == [400, 800]  # the same settings: taken up
    for overrides in ({"n_steps": 50}, {"inner_target_kl": 0.05}):
        other = callback()
        with pytest.warns(UserWarning, match="evaluations of other settings .* not taken up"):
            MetaCPO.load(path, **overrides).learn(400, callback=other, reset_num_timesteps=False)
        assert min(other.evaluations_timesteps) > 400  # none of the first run's
    settings = json.loads(str(np.load(tmp_path / "evaluations.npz")["settings"]))
    assert (settings["n_updates"], settings["n_steps"], settings["target_kl"]) == (1, 100, 0.05)


class _Counting(BaseCallback):
    """Counts its calls and answers ``answer``; records its parent's best reward at each call."""

    def __init__(self, answer: bool = True) -> None:
        super().__init__()
        self.answer, self.calls, self.seen_best = answer, 0, []

    def _on_step(self) -> bool:
        self.calls += 1
        self.seen_best.append(self.parent.best_mean_reward)
        return self.answer


@pytest.mark.parametrize("algorithm", ["CPO", "MetaCPO"])
def test_hooks_are_called_as_by_sb3s_eval_callback_and_can_stop_training(algorithm):
    """SB3's EvalCallback takes callback_on_new_best and callback_after_eval (StopTrainingOnRewardThreshold,
    StopTrainingOnNoModelImprovement read its best_mean_reward); SafeEvalCallback took neither, so nothing could stop
    training on a result under the limits."""
    dist = toy()

    def make():
        if algorithm == "CPO":
            return CPO("MlpPolicy", dist, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
        return MetaCPO("MlpPolicy", dist, **TINY_META)

    tasks = dist.test_tasks(2)
    per_update = 100 if algorithm == "CPO" else 400
    # every evaluation is under a limit of 1e6: the first is a new best, which the reward threshold stops at
    after_eval, on_best = _Counting(), StopTrainingOnRewardThreshold(reward_threshold=-1e9)
    callback = SafeEvalCallback(
        tasks, eval_freq=1, n_eval_episodes=1, cost_limit=1e6, callback_on_new_best=on_best, callback_after_eval=after_eval
    )
    model = make().learn(10 * per_update, callback=callback)
    assert len(callback.evaluations_timesteps) == 1 and after_eval.calls == 1 and on_best.n_calls == 1
    assert model.num_timesteps <= per_update + model.n_envs  # stopped at the next env step after the evaluation
    assert after_eval.seen_best == [callback.best_mean_reward] and callback.best_timestep == per_update

    # callback_after_eval's False stops training too (the new best's hook said go on)
    told_best, after_eval = _Counting(), _Counting(answer=False)
    callback = SafeEvalCallback(
        tasks, eval_freq=1, n_eval_episodes=1, cost_limit=1e6, callback_after_eval=after_eval, callback_on_new_best=told_best
    )
    model = make().learn(10 * per_update, callback=callback)  # callback_after_eval's False stops it
    assert after_eval.calls == 1 and told_best.calls == 1 and model.num_timesteps <= per_update + model.n_envs
    with pytest.raises(ValueError, match="callback_after_eval must be None or an SB3 BaseCallback"):
        SafeEvalCallback(tasks, callback_after_eval=lambda *_: True)
