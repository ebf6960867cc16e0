"""What an adaptation audit and a review found (2026-12-02): adapt's callbacks and the logger, the model's own env,
gymnasium ids and family names, the adaptation streams across a change of family, archives a model may hold."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.serialization import register_class

SMALL: dict[str, Any] = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
CPO_SMALL: dict[str, Any] = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]), n_critic_updates=1)


def toy(**kwargs: Any) -> Any:
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, **kwargs)


class StepCost(BaseCallback):
    """Records the first env's step cost at every step, as a user's callback would."""

    def _on_step(self) -> bool:
        self.logger.record("adapt/step_cost", float(self.locals["infos"][0]["cost"]))
        return True


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_adapt_callbacks_may_record_on_a_model_never_trained_or_just_loaded(algo: str, tmp_path: Path) -> None:
    """The callback's self.logger raised AttributeError ('_logger') on a fresh or loaded model."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL) if algo == "MetaCPO" else CPO("MlpPolicy", toy(), **CPO_SMALL)
    task = toy().test_tasks(1)[0]
    model.adapt(task, n_updates=1, n_steps=100, callback=StepCost())
    loaded = type(model).load(model.save(tmp_path / "model"))
    loaded.adapt(task, n_updates=1, n_steps=100, callback=StepCost())
    loaded.learn(200 if algo == "CPO" else 400)  # learn configures its own logger, as without the adapt


def test_what_adapt_callbacks_record_is_written_when_adapt_returns(tmp_path: Path) -> None:
    """It stayed in the logger and came out in the next learn's row, under a training step."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(400)
    model.adapt(toy().test_tasks(1)[0], n_updates=1, n_steps=100, callback=StepCost())
    model.learn(400, reset_num_timesteps=False)
    with open(tmp_path / "progress.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    written = [row for row in rows if row.get("adapt/step_cost")]
    assert len(rows) == 3 and len(written) == 1  # learn, adapt, learn
    assert written[0]["time/total_timesteps"] == "" and rows[1] is written[0]  # its own row, between the two
    assert rows[2].get("adapt/step_cost", "") == ""


def test_adapting_on_the_models_own_training_env_is_refused() -> None:
    """It reset and stepped CPO's training env under the run; the next learn went on from a stale observation."""
    model = CPO("MlpPolicy", toy(), **CPO_SMALL)
    model.learn(100)
    with pytest.raises(ValueError, match="need another env than the model's own training env"):
        model.adapt(model.get_env(), n_updates=1, n_steps=50)
    with pytest.raises(ValueError, match="need another env than the model's own training env"):
        model.evaluate_params(model.get_env(), model.policy.actor_params(), n_episodes=1)


def test_adapt_takes_a_gymnasium_id_and_a_family_name_on_a_model_built_on_an_env() -> None:
    """A standard id was 'an unknown task distribution'; a family name on a model built on an env said 'pass an env
    instead of a task' although a string was passed."""
    model = CPO("MlpPolicy", "SafetyPointGoal1Gymnasium-v0", n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.adapt("SafetyPointGoal1Gymnasium-v0", n_updates=1, n_steps=50)
    assert len(model.adaptation_history) == 1
    dist = toy()
    on_env = CPO("MlpPolicy", dist.make_env(dist.test_tasks(1)[0]), **CPO_SMALL)
    on_env.adapt("Toy2DNav", n_updates=1, n_steps=100)
    assert len(on_env.adaptation_history) == 1


def evaluated(model: Any, task: Any) -> tuple[float, ...]:
    th.manual_seed(0)
    evaluation = model.evaluate_params(task, model.policy.actor_params(), n_episodes=2)
    return evaluation.episode_costs + evaluation.episode_rewards


@pytest.mark.parametrize("close", [False, True])
def test_another_family_starts_its_own_adaptation_episodes(close: bool) -> None:
    """MetaCPO with close() in between, and CPO's set_env always, kept the old family's adaptation stream (CPO its
    whole sampler: episodes of the old family's envs)."""
    other = toy(speed_limit=0.05)
    task = other.test_tasks(1)[0]
    fresh_meta, fresh_cpo = MetaCPO("MlpPolicy", other, **SMALL), CPO("MlpPolicy", other, **CPO_SMALL)
    meta, cpo = MetaCPO("MlpPolicy", toy(), **SMALL), CPO("MlpPolicy", toy(), **CPO_SMALL)
    for model in (meta, cpo):
        evaluated(model, toy().test_tasks(1)[0])
        if close:
            model.close()
    meta.set_task_distribution(other)
    cpo.set_env(other)
    assert evaluated(meta, task) == evaluated(fresh_meta, task)
    assert evaluated(cpo, task) == evaluated(fresh_cpo, task)


def test_close_releases_a_vec_env_whose_worker_died() -> None:
    """close() raised the dead worker's error and released nothing."""
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "vec_env_cls": SubprocVecEnv})
    model.learn(400)
    vec_env = model.sampler.vec_env  # type: ignore[union-attr]
    vec_env.processes[0].kill()
    vec_env.processes[0].join()
    model.close()
    assert model.sampler is None and vec_env.closed and not any(process.is_alive() for process in vec_env.processes)
    model.learn(400, reset_num_timesteps=False)  # fresh workers


@register_class
class BoundedExtractor(FlattenExtractor):
    """Clamps observations to bounds kept as buffers (an unbounded space's: infinite)."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space)
        self.register_buffer("low", th.full(observation_space.shape, -float("inf")))
        self.register_buffer("high", th.full(observation_space.shape, float("inf")))

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return super().forward(th.maximum(th.minimum(observations, self.high), self.low))


def test_a_policy_buffer_may_be_infinite_in_an_archive(tmp_path: Path) -> None:
    """The refusal of non-finite tensors also refused a custom extractor's infinite bounds: save wrote what load then
    refused. Parameters, statistics and optimiser state are still checked (tests/test_overflow_guards.py)."""
    kwargs = dict(net_arch=[16], features_extractor_class=BoundedExtractor)
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": kwargs})
    model.learn(400)
    loaded = MetaCPO.load(model.save(tmp_path / "model"), env=toy())
    assert th.equal(loaded.policy.features_extractor.high, model.policy.features_extractor.high)
    policy = CPOPolicy.load(model.policy.save(tmp_path / "policy"))
    observation = np.zeros(model.observation_space.shape, np.float32)
    action, _ = policy.predict(observation, deterministic=True)
    assert np.array_equal(action, model.predict(observation, deterministic=True)[0])


@pytest.mark.parametrize("value", [np.array(1e-3), th.tensor(1e-3), np.float32(1e-3)])
def test_a_schedule_may_return_a_0d_array_or_tensor(value: Any) -> None:
    """SB3 reads a schedule's value with float(); the start-value check refused a 0-d array or tensor."""
    CPO("MlpPolicy", toy(), learning_rate=lambda _: value, **CPO_SMALL).learn(100)


def test_a_save_from_a_callback_inside_adapt_writes_the_model_as_it_was_before_the_call(tmp_path: Path) -> None:
    """The archive paired the running adaptation's half-built history with the adapted parameters from before the
    call: a state the model never had between calls (resume audit). The oracle: the model before the call."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL).learn(400)
    first, second = model.task_distribution.test_tasks(2)
    model.adapt(first, n_updates=1, n_steps=100)
    history = [dict(entry) for entry in model.adaptation_history]
    adapted = {name: value.clone() for name, value in model.adapted_params.items()}

    class SaveMidway(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls == 150:  # in the second update's batch: the first is in the history already
                self.model.save(tmp_path / "midway")
            return True

    model.adapt(second, n_updates=2, n_steps=100, callback=SaveMidway())
    assert len(model.adaptation_history) == 2
    loaded = MetaCPO.load(tmp_path / "midway")
    assert [entry["update"] for entry in loaded.adaptation_history] == [entry["update"] for entry in history] == [1]
    assert loaded.adaptation_history[0]["ep_rew_mean"] == history[0]["ep_rew_mean"]
    assert loaded.adapted_params is not None
    for name, value in adapted.items():
        assert th.equal(loaded.adapted_params[name], value), name
    model.save(tmp_path / "after")  # and after the call, the new adaptation whole
    assert len(MetaCPO.load(tmp_path / "after").adaptation_history) == 2
