"""Reliability: callbacks get SB3's locals and can stop learn and adapt; a failed adapt or a failing env leaves the
model as it was; non-finite env outputs are caught where they enter; degenerate batches are handled."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, StopTrainingOnMaxEpisodes

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.tasks.toy import Toy2DNavEnv

SMALL: dict[str, Any] = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))


def toy() -> Any:
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def snapshot(model: Any) -> dict[str, th.Tensor]:
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


def same(a: dict[str, th.Tensor], b: dict[str, th.Tensor]) -> bool:
    return a.keys() == b.keys() and all(th.equal(a[k], b[k]) for k in a)


class InfoReader(BaseCallback):
    """Reads what SB3 callbacks read at every step; stops after ``stop_after`` calls if given."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after, self.costs, self.episodes, self.calls = stop_after, 0.0, 0, 0

    def _on_step(self) -> bool:
        self.calls += 1
        infos, dones = self.locals["infos"], self.locals["dones"]
        assert len(infos) == len(dones) == len(self.locals["new_obs"]) == len(self.locals["rewards"])
        assert self.locals["actions"].shape == self.locals["obs"].shape == (len(infos), 2)
        assert self.locals["n_steps"] >= 0  # the step's index in its batch, as SB3's collect_rollouts names it
        self.costs += sum(info["cost"] for info in infos)
        self.episodes += sum("episode" in info for info in infos)
        return self.stop_after is None or self.calls < self.stop_after


def test_callbacks_read_sb3_locals_in_learn_and_adapt() -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    reader = InfoReader()
    model.learn(400, callback=reader)
    assert reader.calls == 200 and reader.episodes == 8  # 2 envs x 200 steps, 50-step episodes
    adapt_reader = InfoReader()
    model.adapt("Toy2DNav", n_updates=1, n_steps=100, callback=adapt_reader)
    assert adapt_reader.calls == 100 and adapt_reader.episodes == 2


def test_cpo_callbacks_read_sb3_locals() -> None:
    class Steps(InfoReader):
        def __init__(self) -> None:
            super().__init__()
            self.indices: list[int] = []

        def _on_step(self) -> bool:
            clipped = self.locals["clipped_actions"]
            assert np.all(np.abs(clipped) <= 1.0) and clipped.shape == self.locals["actions"].shape
            self.indices.append(self.locals["n_steps"])
            return super()._on_step()

    reader = Steps()
    CPO("MlpPolicy", toy(), n_envs=2, n_steps=100, seed=0).learn(400, callback=reader)
    assert reader.calls == 200 and reader.episodes == 8  # 2 envs x 200 steps, 50-step episodes
    assert reader.indices == list(range(100)) * 2  # n_steps: the index within each 100-step rollout


def test_stop_training_on_max_episodes_stops_learn_before_the_next_update() -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    theta = snapshot(model)
    # 2 envs x 1 episode each: reached after 50 steps, in the middle of the first meta-iteration.
    model.learn(10_000, callback=StopTrainingOnMaxEpisodes(max_episodes=1))
    assert model._n_updates == 0 and model.num_timesteps == 100
    assert same(theta, snapshot(model))  # no update was made from the partial data
    model.learn(400)  # and the model trains afterwards
    assert model._n_updates == 1


def test_a_callback_returning_false_stops_learn_before_the_next_update() -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.learn(10_000, callback=InfoReader(stop_after=250))  # in the second meta-iteration (200 calls each)
    assert model._n_updates == 1 and model.num_timesteps == 500


def test_a_callback_returning_false_stops_adapt() -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    theta = model.policy.actor_params()
    obs = np.zeros((1, 2), np.float32)
    meta_action = model.predict(obs, deterministic=True)[0]
    model.adapt("Toy2DNav", n_updates=3, n_steps=100, callback=InfoReader(stop_after=150))
    # The first update completed (100 steps), the second's batch was cut: one update is kept.
    assert [h["update"] for h in model.adaptation_history] == [1]
    assert model.adapted_params is not None and not np.array_equal(model.predict(obs, deterministic=True)[0], meta_action)
    stopped_at_once = MetaCPO("MlpPolicy", toy(), **SMALL).adapt("Toy2DNav", n_updates=3, callback=InfoReader(stop_after=1))
    assert stopped_at_once.adaptation_history == []
    assert all(th.equal(stopped_at_once.adapted_params[k], theta[k]) for k in theta)  # θ itself


class EnvReader(BaseCallback):
    """Records the number of envs of its training_env at the start and at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.n_envs: list[int] = []

    def _on_training_start(self) -> None:
        self.n_envs.append(self.training_env.num_envs)

    def _on_step(self) -> bool:
        self.n_envs.append(self.training_env.num_envs)
        return True


@pytest.mark.parametrize("fresh", [True, False])
def test_adapt_shows_callbacks_the_adaptation_env_as_their_training_env(fresh: bool) -> None:
    # SB3's callbacks read training_env (model.get_env()) when they start and at every step: during adapt it must be
    # the one-env adaptation env, not the 4-env training env (StopTrainingOnMaxEpisodes(1) let 4 episodes run) or
    # None (a fresh or loaded model: SB3's "initialize the model with an environment" assertion)
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "meta_batch_size": 4})
    if not fresh:
        model.learn(400)
    training_env = model.env
    reader, stop = EnvReader(), StopTrainingOnMaxEpisodes(max_episodes=1)
    model.adapt("Toy2DNav", n_updates=3, n_steps=50, callback=[reader, stop])
    assert set(reader.n_envs) == {1} and len(reader.n_envs) == 1 + 50
    assert model.adaptation_history == []  # stopped at the end of the first 50-step episode, before any update
    assert model.env is training_env


def test_progress_bar_callback_in_adapt_counts_the_adaptation_steps() -> None:
    from stable_baselines3.common.callbacks import ProgressBarCallback

    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    bar = ProgressBarCallback()
    model.adapt("Toy2DNav", n_updates=2, n_steps=50, callback=bar)
    assert bar.pbar.total == 100 and bar.pbar.n == 100


def test_progress_bar_callback_in_learn_counts_whole_meta_iterations() -> None:
    """learn takes whole meta-iterations (400 steps here): a budget of 100 showed a bar of 400/100, and one of 500
    800/500."""
    from stable_baselines3.common.callbacks import ProgressBarCallback

    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    for budget, total in ((100, 400), (500, 800)):
        bar = ProgressBarCallback()
        start = model.num_timesteps
        model.learn(budget, callback=bar, reset_num_timesteps=False)
        assert bar.pbar.total == total == model.num_timesteps - start and bar.pbar.n == total


def test_failed_adapt_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    dist = toy()
    model = MetaCPO("MlpPolicy", dist, **SMALL)
    task = dist.test_tasks(1)[0]
    model.adapt(task, n_updates=1, n_steps=100)
    obs = np.random.default_rng(0).uniform(-1, 1, (8, 2)).astype(np.float32)
    before = (model.predict(obs, deterministic=True)[0], list(model.adaptation_history), dict(model.adapted_params))
    theta = snapshot(model)

    class Broken(Toy2DNavEnv):
        def step(self, action: np.ndarray) -> Any:
            raise RuntimeError("the env broke")

    from sb3_metacpo.tasks.monitor import CostMonitor

    with pytest.raises(RuntimeError, match="the env broke"):
        model.adapt(CostMonitor(Broken(task)), n_updates=2, n_steps=100)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], before[0])
    assert model.adaptation_history == before[1]
    assert all(th.equal(model.adapted_params[k], v) for k, v in before[2].items())
    assert same(theta, snapshot(model))
    model.save(tmp_path / "model")
    np.testing.assert_array_equal(MetaCPO.load(tmp_path / "model").predict(obs, deterministic=True)[0], before[0])


def test_learn_after_adapt_forgets_the_adaptation() -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.adapt("Toy2DNav", n_updates=1, n_steps=100)
    assert model.adapted_params is not None
    model.learn(400)
    assert model.adapted_params is None and model.adaptation_history == []
    obs = np.zeros((1, 2), np.float32)
    with th.no_grad():
        mean = model.policy.actor_mean_log_std(th.as_tensor(obs))[0].numpy()
    np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], np.clip(mean, -1, 1), rtol=1e-6)


def test_env_raising_in_the_main_process_leaves_theta_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.learn(400)
    theta = snapshot(model)
    calls = {"n": 0}
    original = Toy2DNavEnv.step

    def failing(self: Toy2DNavEnv, action: np.ndarray) -> Any:
        calls["n"] += 1
        if calls["n"] == 300:  # in the validation batch of the next meta-iteration
            raise RuntimeError("the env broke")
        return original(self, action)

    monkeypatch.setattr(Toy2DNavEnv, "step", failing)
    with pytest.raises(RuntimeError, match="the env broke"):
        model.learn(400, reset_num_timesteps=False)
    assert same(theta, snapshot(model)) and model._n_updates == 1
    model.learn(400, reset_num_timesteps=False)  # usable: the next collect resets the envs
    assert model._n_updates == 2 and all(th.isfinite(v).all() for v in model.policy.state_dict().values())


# what the env returns at its 37th step: an inf observation; a finite float64 cost beyond float32's range (the storage's
# dtype, where it would be stored as inf); finite values that float32 stores but that overflow what is computed from
# them: the observation statistics (1e20: obs_var was inf for good, and the policy acted alike on every observation)
# and the critics' regression (1e30 rewards or costs: Adam's second moments went inf and froze critic weights)
POISONS = {
    "inf observation": ("observation", np.array([np.inf, 0.0], np.float32), "returned a non-finite next observation at step"),
    "float64 cost": ("cost", 1e39, r"reported a non-finite cost \(1e\+39; the storage is float32"),
    "1e20 observation": ("observation", np.full(2, 1e20, np.float32), "overflow the running statistics of observation"),
    "1e30 reward": ("reward", 1e30, r"the reward critic's targets \(discounted returns\) reach"),
    "1e30 cost": ("cost", 1e30, r"the cost critic's targets \(discounted returns\) reach"),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_non_finite_env_output_leaves_statistics_critics_and_theta_finite(
    algo: str, poison: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if algo == "MetaCPO":
        model: Any = MetaCPO("MlpPolicy", toy(), critic="mlp", n_critic_updates=1, **SMALL)
    else:
        model = CPO("MlpPolicy", "Toy2DNav", n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]), n_critic_updates=1)
    model.learn(400 if algo == "MetaCPO" else 100)
    state, optimizer = snapshot(model), copy.deepcopy(model.policy.optimizer.state_dict())
    original = Toy2DNavEnv.step
    calls = {"n": 0}

    def poisoned(self: Toy2DNavEnv, action: np.ndarray) -> Any:
        obs, reward, terminated, truncated, info = original(self, action)
        calls["n"] += 1
        if calls["n"] == 37:
            if where == "observation":
                obs = value
            elif where == "reward":
                reward = value
            else:
                info = {**info, "cost": value}
        return obs, reward, terminated, truncated, info

    where, value, message = POISONS[poison]
    monkeypatch.setattr(Toy2DNavEnv, "step", poisoned)
    with pytest.raises(ValueError, match=message):
        model.learn(400, reset_num_timesteps=False)
    assert same(state, snapshot(model))  # θ, critics and observation statistics untouched
    after = model.policy.optimizer.state_dict()["state"]  # and the critics' optimiser
    assert all(th.equal(value, after[key][name]) for key, entry in optimizer["state"].items() for name, value in entry.items())
    monkeypatch.setattr(Toy2DNavEnv, "step", original)
    model.learn(400 if algo == "MetaCPO" else 100, reset_num_timesteps=False)
    assert all(th.isfinite(v).all() for v in model.policy.state_dict().values())


def test_a_float64_observation_beyond_float32_is_refused_before_the_statistics() -> None:
    """safety-gymnasium's observation spaces are float64: a diverging simulation's finite 1e39 passed a float64 check and
    was stored as inf in the float32 rollout, then poisoned the observation statistics and the critics."""

    class BlowUp(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
        action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
            super().reset(seed=seed)
            self.t = 0
            return np.zeros(1), {}

        def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
            self.t += 1
            return np.full(1, 1e39 if self.t == 3 else 0.0), 0.0, False, False, {"cost": 0.0}

    model = CPO("MlpPolicy", gym.wrappers.TimeLimit(BlowUp(), 10), n_steps=8, seed=0, policy_kwargs=dict(net_arch=[8]))
    state = snapshot(model)
    with pytest.raises(ValueError, match="env 0 returned a non-finite next observation at step 2"):
        model.learn(8)
    assert same(state, snapshot(model))


def test_degenerate_batches_are_handled() -> None:
    # The smallest batches validation allows: 2 env steps per task, no completed episode, one env per task.
    model = MetaCPO("MlpPolicy", toy(), meta_batch_size=1, n_steps=2, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.learn(8)
    cpo = CPO("MlpPolicy", "Toy2DNav", n_steps=2, batch_size=2, seed=0, policy_kwargs=dict(net_arch=[16]))
    cpo.learn(6)
    for trained in (model, cpo):
        assert all(th.isfinite(v).all() for v in trained.policy.state_dict().values())


def test_a_subprocess_worker_that_raises_or_dies_is_named_and_the_model_stays_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_metacpo.common.envs import EnvWorkerError
    from sb3_metacpo.tasks.toy import Toy2DNavTask

    dist = toy()
    model = MetaCPO("MlpPolicy", dist, vec_env_cls=SubprocVecEnv, **SMALL)
    model.learn(400)
    theta = snapshot(model)
    # A worker raises: the main process's distribution hands out a task the workers refuse.
    bad = Toy2DNavTask(goal_distance=99.0)
    monkeypatch.setattr(type(dist), "sample", lambda self, n, rng=None: [bad] * n)
    with pytest.raises(EnvWorkerError, match=r"env worker 0 raised ValueError: Toy2DNav: goal_distance=99.0") as info:
        model.learn(400, reset_num_timesteps=False)
    assert isinstance(info.value.__cause__, ValueError) and info.value.env_index == 0
    assert same(theta, snapshot(model))
    monkeypatch.undo()
    model.learn(400, reset_num_timesteps=False)  # the sampler rebuilt its VecEnv
    assert model._n_updates == 2 and model.sampler.n_rebuilds == 1
    # A worker dies.
    theta = snapshot(model)
    os.kill(model.sampler.vec_env.processes[1].pid, signal.SIGKILL)
    with pytest.raises(EnvWorkerError, match=r"env worker 1 died \(exit code -9"):
        model.learn(400, reset_num_timesteps=False)
    assert same(theta, snapshot(model))
    model.set_task_distribution(toy())  # closes the broken VecEnv without raising
    model.learn(400, reset_num_timesteps=False)
    assert model._n_updates == 3
    model.sampler.close()


class BreakWorkerStep(BaseCallback):
    """At the ``at``-th env step of a collect, makes worker ``index``'s next env step raise in the worker (its env's
    ``step`` shadowed by a non-callable): the other workers answer that step, this one fails."""

    def __init__(self, at: int, index: int) -> None:
        super().__init__()
        self.at, self.index, self.steps = at, index, 0

    def _on_step(self) -> bool:
        self.steps += 1
        if self.steps == self.at:  # MetaCPO's sampler's VecEnv, CPO's own
            vec_env = self.model.env if isinstance(self.model, CPO) else self.model.sampler.vec_env
            vec_env.set_attr("step", None, indices=[self.index])
        return True


def _within(seconds: float, call: Any) -> None:
    """Run ``call`` in a thread and fail (rather than hang the suite) if it has not returned after ``seconds``."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} still running after {seconds} s"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("index", [0, 1])
def test_after_a_later_workers_failure_the_model_saves_learns_and_closes(index: int, tmp_path: Path) -> None:
    """When a worker other than the first failed in a step (the first had answered it), SB3's close waited for
    answers the first worker never sends: learn, close and set_task_distribution hung, and save raised (the streams
    were asked of the broken workers). The saved model resumes as the in-process run goes on: with the streams the
    broken VecEnv's rebuild starts."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_metacpo.common.envs import EnvWorkerError

    model = MetaCPO("MlpPolicy", toy(), vec_env_cls=SubprocVecEnv, **SMALL)
    model.learn(400)
    with pytest.raises(EnvWorkerError, match=f"env worker {index} raised TypeError"):
        model.learn(400, callback=BreakWorkerStep(at=30, index=index), reset_num_timesteps=False)
    path = model.save(tmp_path / "broken")
    _within(60, lambda: model.learn(400, reset_num_timesteps=False))  # the sampler rebuilt its VecEnv
    assert model.sampler.n_rebuilds == 1
    resumed = MetaCPO.load(path, env=toy(), vec_env_cls=SubprocVecEnv)
    resumed.learn(400, reset_num_timesteps=False)
    assert same(snapshot(model), snapshot(resumed))
    broken = MetaCPO("MlpPolicy", toy(), vec_env_cls=SubprocVecEnv, **SMALL)
    with pytest.raises(EnvWorkerError):
        broken.learn(400, callback=BreakWorkerStep(at=30, index=index))
    broken.set_random_seed(7)  # a broken sampler would seed its rebuild itself: a new one takes the seed's streams
    reseeded = MetaCPO("MlpPolicy", toy(), vec_env_cls=SubprocVecEnv, **SMALL)
    reseeded.set_random_seed(7)
    assert broken._sampler_rng_states() == reseeded._sampler_rng_states()
    _within(60, broken.close)
    for closing in (model, resumed):
        closing.close()


def test_subprocess_workers_outlive_a_ctrl_c_that_the_main_process_handles() -> None:
    """A Ctrl-C reaches every process of the terminal's group: SB3's workers died of it, so a run that stops at the
    next env step (sb3-metacpo train) failed with a dead worker instead."""
    import os
    import signal
    import time

    from stable_baselines3.common.vec_env import SubprocVecEnv

    model = MetaCPO("MlpPolicy", toy(), vec_env_cls=SubprocVecEnv, **SMALL)
    model.learn(400)
    for process in model.sampler.vec_env.processes:
        os.kill(process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(process.is_alive() for process in model.sampler.vec_env.processes)
    model.learn(400, reset_num_timesteps=False)
    assert model._n_updates == 2
    model.sampler.close()


def test_a_vec_env_whose_env_fails_to_build_leaves_no_worker_running() -> None:
    """The other workers outlived the error (a notebook retrying piled them up)."""
    import multiprocessing as mp

    import gymnasium as gym

    from sb3_metacpo.common.envs import EnvWorkerError, ReportingSubprocVecEnv

    def no_env() -> gym.Env:
        raise ValueError("no env here")

    before = set(mp.active_children())
    with pytest.raises(EnvWorkerError, match="env worker 0 raised ValueError: no env here"):
        ReportingSubprocVecEnv([no_env, lambda: gym.make("Pendulum-v1"), lambda: gym.make("Pendulum-v1")])
    assert set(mp.active_children()) <= before


def test_cpo_rebuilds_a_subprocess_vec_env_it_built_after_a_worker_failed(tmp_path: Path) -> None:
    """CPO stepped its SubprocVecEnv again after a worker had failed: every later learn failed (``env worker 0 died
    (exit code 0, ConnectionResetError)``), though the message said the VecEnv would be rebuilt. A VecEnv the model
    built is now rebuilt, seeded afresh; one the user gave cannot be: the error says to pass another."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_metacpo.common.envs import EnvWorkerError, make_safe_vec_env

    small = dict(n_steps=50, n_envs=2, vec_env_cls=SubprocVecEnv, seed=0, policy_kwargs=dict(net_arch=[8]))
    model = CPO("MlpPolicy", toy(), **small)
    model.learn(100)
    theta = snapshot(model)
    with pytest.raises(EnvWorkerError, match="env worker 1 raised TypeError"):
        model.learn(100, callback=BreakWorkerStep(at=20, index=1), reset_num_timesteps=False)
    assert same(theta, snapshot(model))
    model.save(tmp_path / "after_failure")  # the broken workers are not asked for their streams
    _within(60, lambda: model.learn(100, reset_num_timesteps=False))
    assert model._n_updates == 2 and model._env_rebuilds == 1 and not model.env.failed
    assert all(th.isfinite(v).all() for v in model.policy.state_dict().values())
    model.env.close()

    given = make_safe_vec_env(toy(), 2, SubprocVecEnv)
    user = CPO("MlpPolicy", given, **{**small, "n_envs": 1, "vec_env_cls": None})
    with pytest.raises(EnvWorkerError):
        user.learn(100, callback=BreakWorkerStep(at=20, index=0))
    with pytest.raises(EnvWorkerError, match="cannot rebuild a VecEnv it did not build: pass a new env with set_env"):
        user.learn(100, reset_num_timesteps=False)
    user.set_env(make_safe_vec_env(toy(), 2, SubprocVecEnv))
    _within(60, lambda: user.learn(100, reset_num_timesteps=False))
    assert user._n_updates == 1
    user.env.close()
    given.close()
