"""Every kind of bad input the package is tried with, and the error it must get.

Run by ``tests/test_bad_inputs.py``; the reliability guide's table (``docs/guide/bad_inputs_table.inc``) is generated
from :data:`CASES` by ``python tests/bad_inputs.py > docs/guide/bad_inputs_table.inc`` and a test keeps it in sync.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_metacpo import CPO, MetaCPO, MetaTRPO, make_task_distribution
from sb3_metacpo.common.callbacks import SafeEvalCallback
from sb3_metacpo.common.evaluation import MetaEvalCallback, evaluate_safe_policy, meta_evaluate
from sb3_metacpo.tasks import PointButtonHazardTask, Toy2DNavTask

SMALL: dict[str, Any] = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
CPO_SMALL: dict[str, Any] = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]), n_critic_updates=1)


def toy(**kwargs: Any) -> Any:
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50, **kwargs)


def metacpo(**kwargs: Any) -> MetaCPO:
    return MetaCPO("MlpPolicy", toy(), **{**SMALL, **kwargs})


def cpo(**kwargs: Any) -> CPO:
    return CPO("MlpPolicy", "Toy2DNav", **{**CPO_SMALL, **kwargs})


class FaultyEnv(gym.Env):
    """A 2-D env reporting a cost; ``fault`` = (quantity, value, step) makes it emit ``value`` as that quantity."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, quantity: str = "", value: float = 0.0, at_step: int = 3) -> None:
        self.quantity, self.value, self.at_step, self.t = quantity, value, at_step, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        hit = self.t == self.at_step
        if hit and self.quantity == "raise":
            raise RuntimeError("the env broke")
        obs = np.full(2, self.value if hit and self.quantity == "observation" else 0.1, np.float32)
        reward = self.value if hit and self.quantity == "reward" else 0.0
        cost = self.value if hit and self.quantity == "cost" else 0.0
        return obs, reward, False, self.t % 20 == 0, {"cost": cost}


class SquareActionEnv(FaultyEnv):
    action_space = gym.spaces.Box(-1, 1, (2, 2), np.float32)


class NoCostEnv(FaultyEnv):
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, {}


@dataclass(frozen=True)
class Case:
    """One bad input: what is tried (``run``), how it is described, and the error it must get."""

    where: str
    bad_input: str
    run: Callable[[], object]
    error: type[BaseException]
    message: str  # a regular expression the error message must match


class DictObservationEnv(gym.Env):
    """Observations as a Dict of two vectors (what CPO's MLP policies do not take: FlattenObservation does)."""

    def __init__(self) -> None:
        vector = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.observation_space = gym.spaces.Dict({"a": vector, "b": vector})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.observation_space.sample(), 0.0, False, True, {"cost": 0.0}


def _hyper(algo: str, bad: str, error: type[BaseException], message: str, **kwargs: Any) -> Case:
    build = {"MetaCPO": metacpo, "CPO": cpo, "MetaTRPO": lambda **kw: MetaTRPO("MlpPolicy", toy(), **{**SMALL, **kw})}
    return Case(f"{algo}(...)", bad, lambda: build[algo](**kwargs), error, message)


def _learn(model_fn: Callable[[], Any], steps: Any) -> Callable[[], object]:
    return lambda: model_fn().learn(steps)


def _adapt(env_fn: Callable[[], Any], **kwargs: Any) -> Callable[[], object]:
    return lambda: metacpo().adapt(env_fn(), **kwargs)


CASES: list[Case] = [
    # --- MetaCPO's constructor ---
    _hyper(
        "MetaCPO", "verbose='x'", ValueError, r"verbose must be an integer >= 0 \(0 silent, 1 info, 2 debug\)", verbose="x"
    ),
    _hyper("MetaCPO", "policy_kwargs='x'", ValueError, "policy_kwargs must be None or a dict", policy_kwargs="x"),
    _hyper(
        "MetaCPO",
        "policy_kwargs=dict(net_arch=[-3])",
        ValueError,
        r"policy_kwargs\['net_arch'\] must be the hidden-layer sizes",
        policy_kwargs=dict(net_arch=[-3]),
    ),
    _hyper(
        "CPO",
        "policy_kwargs=dict(activation_fn='tanh')",
        ValueError,
        r"policy_kwargs\['activation_fn'\] must be a torch.nn.Module class",
        policy_kwargs=dict(activation_fn="tanh"),
    ),
    _hyper("CPO", "verbose=None", ValueError, r"verbose must be an integer >= 0 \(0 silent, 1 info, 2 debug\)", verbose=None),
    _hyper("MetaCPO", "meta_batch_size=0", ValueError, "meta_batch_size must be a positive integer", meta_batch_size=0),
    _hyper("MetaCPO", "meta_batch_size=True", ValueError, "meta_batch_size must be a positive integer", meta_batch_size=True),
    _hyper("MetaCPO", "meta_batch_size=2.0", ValueError, "meta_batch_size must be a positive integer", meta_batch_size=2.0),
    _hyper("MetaCPO", "n_inner_updates=0", ValueError, "n_inner_updates must be a positive integer", n_inner_updates=0),
    _hyper("MetaCPO", "n_steps=1", ValueError, "n_steps must be an integer >= 2", n_steps=1),
    _hyper("MetaCPO", "n_steps=1.5", ValueError, "n_steps must be an integer >= 2", n_steps=1.5),
    _hyper(
        "MetaCPO", "inner_target_kl=inf", ValueError, "inner_target_kl must be a finite number > 0", inner_target_kl=np.inf
    ),
    _hyper("MetaCPO", "outer_target_kl=-0.1", ValueError, "outer_target_kl must be a finite number > 0", outer_target_kl=-0.1),
    _hyper(
        "MetaCPO", "outer_target_kl='0.01'", ValueError, "outer_target_kl must be a finite number > 0", outer_target_kl="0.01"
    ),
    _hyper("MetaCPO", "cg_damping=inf", ValueError, r"cg_damping must be a number in \[0, 1e6\]", cg_damping=np.inf),
    _hyper("MetaCPO", "cg_damping=-1", ValueError, r"cg_damping must be a number in \[0, 1e6\]", cg_damping=-1.0),
    _hyper("MetaCPO", "cg_damping=1e39", ValueError, "larger ones overflow float32 Fisher products", cg_damping=1e39),
    _hyper("MetaCPO", "cg_max_steps=0", ValueError, "cg_max_steps must be a positive integer", cg_max_steps=0),
    _hyper(
        "MetaCPO",
        "line_search_max_iter=2.0",
        ValueError,
        "line_search_max_iter must be an integer >= 0",
        line_search_max_iter=2.0,
    ),
    _hyper(
        "MetaCPO",
        "line_search_max_iter=-1",
        ValueError,
        "line_search_max_iter must be an integer >= 0",
        line_search_max_iter=-1,
    ),
    _hyper(
        "MetaCPO",
        "line_search_shrinking_factor=1",
        ValueError,
        r"line_search_shrinking_factor must be in \(0, 1\)",
        line_search_shrinking_factor=1.0,
    ),
    _hyper("MetaCPO", "gamma=0", ValueError, r"gamma must be in \(0, 1\]", gamma=0.0),
    _hyper("MetaCPO", "gamma=nan", ValueError, r"gamma must be in \(0, 1\]", gamma=float("nan")),
    _hyper("MetaCPO", "gae_lambda=1.5", ValueError, r"gae_lambda must be in \[0, 1\]", gae_lambda=1.5),
    _hyper("MetaCPO", "cost_gamma=0", ValueError, r"cost_gamma must be in \(0, 1\]", cost_gamma=0.0),
    _hyper(
        "MetaCPO", "cost_limit=inf", ValueError, "cost_limit: the limit of 'cost' must be finite and >= 0", cost_limit=np.inf
    ),
    _hyper("MetaCPO", "cost_limit=-1", ValueError, "cost_limit: the limit of 'cost' must be finite and >= 0", cost_limit=-1.0),
    _hyper("MetaCPO", "cost_limit='5'", ValueError, "cost_limit: the limit of 'cost' must be a number >= 0", cost_limit="5"),
    _hyper("MetaCPO", "cost_limit={}", ValueError, "cost_limit is an empty mapping", cost_limit={}),
    _hyper(
        "MetaCPO",
        "cost_limit={'cost_wind': 1.0}",
        ValueError,
        "which the task family Toy2DNav does not report",
        cost_limit={"cost_wind": 1.0},
    ),
    Case(
        "MetaCPO(...)",
        "cost_limit={'cost_hazard': 5.0} on PointGoalHazard",
        lambda: MetaCPO("MlpPolicy", "PointGoalHazard", **{**SMALL, "cost_limit": {"cost_hazard": 5.0}}),
        ValueError,
        r"which the task family PointGoalHazard does not report; .*did you mean 'cost_hazards'\?",
    ),
    _hyper("MetaCPO", "cost_limit={1: 1.0}", ValueError, "cost_limit's keys must be cost names", cost_limit={1: 1.0}),
    _hyper("CPO", "seed=2**32", ValueError, r"seed must be None or an integer in \[0, 2\*\*32\)", seed=2**32),
    _hyper("CPO", "vec_env_cls=list", ValueError, "vec_env_cls must be DummyVecEnv, SubprocVecEnv or None", vec_env_cls=list),
    _hyper(
        "CPO",
        "policy_kwargs={'clip_observations': -1.0}",
        ValueError,
        r"clip_observations must be a number > 0 \(inf: no clipping\)",
        policy_kwargs=dict(clip_observations=-1.0),
    ),
    _hyper(
        "CPO",
        "policy_kwargs={'normalize_observations': 'no'}",
        ValueError,
        "normalize_observations must be True or False",
        policy_kwargs=dict(normalize_observations="no"),
    ),
    Case(
        "CPO(...)",
        "an env with a (2, 2) Box action space",
        lambda: CPO("MlpPolicy", SquareActionEnv(), n_steps=8),
        TypeError,
        r"CPOPolicy needs a flat Box action space, got shape \(2, 2\)",
    ),
    _hyper(
        "CPO",
        "cost_limit={'hazard': 5.0}",
        ValueError,
        "'hazard', which is not a cost signal's name",
        cost_limit={"hazard": 5.0},
    ),
    _hyper("MetaCPO", "seed='0'", ValueError, r"seed must be None or an integer in \[0, 2\*\*32\)", seed="0"),
    _hyper("MetaCPO", "seed=-1", ValueError, r"seed must be None or an integer in \[0, 2\*\*32\)", seed=-1),
    _hyper("MetaCPO", "seed=1.5", ValueError, r"seed must be None or an integer in \[0, 2\*\*32\)", seed=1.5),
    _hyper(
        "MetaCPO",
        "meta_gradient='third_order'",
        ValueError,
        "meta_gradient must be 'second_order' or 'first_order'",
        meta_gradient="third_order",
    ),
    _hyper("MetaCPO", "dual_solver='scipy'", ValueError, "dual_solver must be one of", dual_solver="scipy"),
    _hyper(
        "MetaCPO",
        "dual_solver='analytic' with 9 outer constraints",
        ValueError,
        "dual_solver='analytic' solves at most 8 constraints exactly; meta_constraint='stages' gives the outer step 9",
        dual_solver="analytic",
        n_inner_updates=8,
    ),
    _hyper("MetaCPO", "recovery='always'", ValueError, "recovery must be one of", recovery="always"),
    _hyper("MetaCPO", "critic='gp'", ValueError, "critic must be 'linear' or 'mlp'", critic="gp"),
    _hyper("MetaCPO", "meta_constraint='max'", ValueError, "meta_constraint must be one of", meta_constraint="max"),
    _hyper(
        "MetaCPO",
        "meta_constraint_alpha=0",
        ValueError,
        r"meta_constraint_alpha must be in \(0, 1\]",
        meta_constraint_alpha=0.0,
    ),
    _hyper(
        "MetaCPO", "cost_confidence=-1", ValueError, r"cost_confidence must be a number in \[0, 1e6\]", cost_confidence=-1.0
    ),
    _hyper(
        "MetaCPO", "cost_confidence=1e40", ValueError, r"cost_confidence must be a number in \[0, 1e6\]", cost_confidence=1e40
    ),
    _hyper("MetaCPO", "cost_limit=1e300", ValueError, "must be at most 1e\\+30 \\(larger limits overflow", cost_limit=1e300),
    _hyper(
        "MetaCPO",
        "policy_kwargs log_std_init=100",
        ValueError,
        r"log_std_init must be a number in \(-44.36, 44.36\)",
        policy_kwargs=dict(log_std_init=100.0),
    ),
    _hyper("MetaCPO", "n_envs=0", ValueError, "n_envs must be a positive integer or None", n_envs=0),
    _hyper("MetaCPO", "fvp_sample_freq=0", ValueError, "fvp_sample_freq must be a positive integer", fvp_sample_freq=0),
    _hyper(
        "MetaCPO",
        "critic_learning_rate=0",
        ValueError,
        "critic_learning_rate must be a finite number > 0",
        critic_learning_rate=0.0,
    ),
    _hyper(
        "MetaCPO", "vec_env_cls=list", ValueError, "vec_env_cls must be DummyVecEnv, SubprocVecEnv or None", vec_env_cls=list
    ),
    _hyper("MetaCPO", "sampler='dask'", ValueError, "sampler must be 'local' or 'ray'", sampler="dask"),
    _hyper(
        "MetaCPO",
        "sampler_kwargs={'num_workers': 3} with sampler='ray' and 2 envs",
        ValueError,
        "num_workers=3 is more than the 2 envs",
        sampler="ray",
        sampler_kwargs={"num_workers": 3},
    ),
    _hyper(
        "MetaCPO",
        "policy_kwargs=dict(activation_fn=PReLU)",
        ValueError,
        "parameter-free activations",
        policy_kwargs=dict(activation_fn=__import__("torch").nn.PReLU),
    ),
    _hyper(
        "CPO",
        "policy_kwargs=dict(activation_fn=Softmax)",
        ValueError,
        "needs element-wise activations",
        policy_kwargs=dict(activation_fn=__import__("torch").nn.Softmax),
    ),
    _hyper("MetaCPO", "stats_window_size=0", ValueError, "stats_window_size must be a positive integer", stats_window_size=0),
    _hyper("CPO", "stats_window_size=2.5", ValueError, "stats_window_size must be a positive integer", stats_window_size=2.5),
    _hyper(
        "CPO",
        "policy_kwargs=dict(share_features_extractor=False)",
        ValueError,
        "share_features_extractor=False is not supported",
        policy_kwargs=dict(share_features_extractor=False),
    ),
    _hyper(
        "MetaTRPO",
        "outer_target_kl=nan",
        ValueError,
        "outer_target_kl must be a finite number > 0",
        outer_target_kl=float("nan"),
    ),
    Case(
        "MetaCPO(...)",
        "policy_kwargs={'net_archh': [16]}",
        lambda: MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": {"net_archh": [16]}}),
        ValueError,
        r"policy_kwargs\['net_archh'\]: CPOPolicy takes no argument 'net_archh'; did you mean 'net_arch'\?",
    ),
    Case(
        "CPO(...)",
        "policy_kwargs={'lr_schedule': ...}",
        lambda: cpo(policy_kwargs={"lr_schedule": lambda _: 1e-3}),
        ValueError,
        "policy_kwargs cannot set 'lr_schedule': the algorithm gives the policy its spaces and schedule",
    ),
    Case(
        "CPO(...)",
        "env='SafetyPointGoal1-v0'",
        lambda: CPO("MlpPolicy", "SafetyPointGoal1-v0"),
        ValueError,
        "safety-gymnasium's own id, whose step returns six values .* use 'SafetyPointGoal1Gymnasium-v0'",
    ),
    Case("MetaCPO(...)", "env=None", lambda: MetaCPO("MlpPolicy", None), ValueError, "env is required"),
    Case(
        "CPO(...)",
        "env='CartPole-v1'",
        lambda: CPO("MlpPolicy", "CartPole-v1"),
        TypeError,
        r"needs a Box \(continuous\) action space, got Discrete\(2\)",
    ),
    Case(
        "CPO(...)", "env=None", lambda: CPO("MlpPolicy", None), ValueError, r"env is required.*CPO\.load\(path, env=\.\.\.\)"
    ),
    Case(
        "CPO(...)",
        "policy=ActorCriticPolicy",
        lambda: CPO(ActorCriticPolicy, "Toy2DNav", **CPO_SMALL),
        TypeError,
        r"CPO needs a CPOPolicy \(e.g. 'MlpPolicy'\), got ActorCriticPolicy",
    ),
    Case(
        "MetaCPO(...)",
        "policy=ActorCriticPolicy",
        lambda: MetaCPO(ActorCriticPolicy, toy(), **SMALL),
        TypeError,
        r"MetaCPO needs a CPOPolicy \(e.g. 'MlpPolicy'\), got ActorCriticPolicy",
    ),
    Case(
        "MetaCPO(...)",
        "policy=3",
        lambda: MetaCPO(3, toy(), **SMALL),
        TypeError,
        r"MetaCPO's policy must be 'MlpPolicy' or a CPOPolicy class, got 3",
    ),
    _hyper("CPO", "tensorboard_log=5", ValueError, "tensorboard_log must be None or a folder path", tensorboard_log=5),
    _hyper("MetaCPO", "tensorboard_log=5", ValueError, "tensorboard_log must be None or a folder path", tensorboard_log=5),
    Case(
        "MetaCPO(...)",
        "env=a gymnasium env",
        lambda: MetaCPO("MlpPolicy", FaultyEnv()),
        TypeError,
        "trains on a task distribution",
    ),
    Case("MetaCPO(...)", "env='Toy'", lambda: MetaCPO("MlpPolicy", "Toy"), ValueError, "unknown task distribution 'Toy'"),
    Case(
        "MetaCPO(...)",
        "seed='x' with env given by name",
        lambda: MetaCPO("MlpPolicy", "Toy2DNav", seed="x"),
        ValueError,
        r"seed must be None or an integer in \[0, 2\*\*32\)",
    ),
    # --- CPO's constructor ---
    _hyper("CPO", "target_kl=inf", ValueError, "target_kl must be a finite number > 0", target_kl=np.inf),
    _hyper("CPO", "n_steps=1", ValueError, "n_steps must be an integer >= 2", n_steps=1),
    _hyper("CPO", "batch_size=0", ValueError, "batch_size must be a positive integer", batch_size=0),
    _hyper("CPO", "learning_rate=-1", ValueError, "learning_rate must be >= 0", learning_rate=-1.0),
    _hyper("CPO", "learning_rate=inf", ValueError, "learning_rate must be >= 0", learning_rate=np.inf),
    _hyper("CPO", "n_envs=0", ValueError, "n_envs must be a positive integer", n_envs=0),
    _hyper("CPO", "cost_limit=inf", ValueError, "cost_limit: the limit of 'cost' must be finite and >= 0", cost_limit=np.inf),
    _hyper("CPO", "seed=[0]", ValueError, r"seed must be None or an integer in \[0, 2\*\*32\)", seed=[0]),
    Case("CPO(...)", "env=42", lambda: CPO("MlpPolicy", 42), TypeError, "env must be a gymnasium env"),
    Case(
        "CPO(...)",
        "env with Dict observations",
        lambda: CPO("MlpPolicy", DictObservationEnv()),
        TypeError,
        r"needs a flat Box observation space .* flatten them, e.g. gymnasium.wrappers.FlattenObservation\(env\)",
    ),
    # --- learn ---
    Case("MetaCPO.learn", "total_timesteps=-5", _learn(metacpo, -5), ValueError, "total_timesteps must be a positive integer"),
    Case(
        "MetaCPO.learn",
        "callback=5",
        lambda: metacpo().learn(400, callback=5),
        ValueError,
        "callback must be None, a BaseCallback, a list of them or a function",
    ),
    Case(
        "CPO.learn",
        "reset_num_timesteps='False'",
        lambda: cpo().learn(100, reset_num_timesteps="False"),
        ValueError,
        "reset_num_timesteps must be True or False",
    ),
    Case(
        "CPO.learn",
        "progress_bar=1",
        lambda: cpo().learn(100, progress_bar=1),
        ValueError,
        "progress_bar must be True or False",
    ),
    Case("MetaCPO.learn", "total_timesteps=0", _learn(metacpo, 0), ValueError, "total_timesteps must be a positive integer"),
    Case(
        "MetaCPO.learn", "total_timesteps=2.5", _learn(metacpo, 2.5), ValueError, "total_timesteps must be a positive integer"
    ),
    Case(
        "MetaCPO.learn",
        "total_timesteps='100'",
        _learn(metacpo, "100"),
        ValueError,
        "total_timesteps must be a positive integer",
    ),
    Case("CPO.learn", "total_timesteps=-5", _learn(cpo, -5), ValueError, "total_timesteps must be a positive integer"),
    Case(
        "MetaCPO.learn",
        "callback=CheckpointCallback",
        lambda: metacpo().learn(400, callback=CheckpointCallback),
        ValueError,
        r"callback is the class CheckpointCallback, not a callback: pass an instance, CheckpointCallback\(...\)",
    ),
    Case(
        "CPO.learn",
        "tb_log_name=None",
        lambda: cpo().learn(100, tb_log_name=None),
        ValueError,
        r"tb_log_name must be a non-empty string \(the TensorBoard run's name\), got None",
    ),
    Case(
        "MetaCPO.learn",
        "log_interval=0",
        lambda: metacpo().learn(400, log_interval=0),
        ValueError,
        "log_interval must be a positive integer or None",
    ),
    # --- adapt, evaluate ---
    Case(
        "MetaCPO.adapt",
        "callback='x'",
        _adapt(lambda: "Toy2DNav", callback="x"),
        ValueError,
        "callback must be None, a BaseCallback, a list of them or a function",
    ),
    Case(
        "MetaCPO.adapt",
        "progress_bar='yes'",
        _adapt(lambda: "Toy2DNav", progress_bar="yes"),
        ValueError,
        "progress_bar must be True or False",
    ),
    Case(
        "MetaCPO.adapt",
        "n_updates=-1",
        _adapt(lambda: "Toy2DNav", n_updates=-1),
        ValueError,
        "n_updates must be None or an integer >= 0",
    ),
    Case(
        "MetaCPO.adapt",
        "n_updates=True",
        _adapt(lambda: "Toy2DNav", n_updates=True),
        ValueError,
        "n_updates must be None or an integer >= 0",
    ),
    Case(
        "MetaCPO.adapt",
        "n_updates='2'",
        _adapt(lambda: "Toy2DNav", n_updates="2"),
        ValueError,
        "n_updates must be None or an integer >= 0",
    ),
    Case(
        "MetaCPO.adapt",
        "n_steps=1",
        _adapt(lambda: "Toy2DNav", n_steps=1),
        ValueError,
        "n_steps must be None or an integer >= 2",
    ),
    Case("MetaCPO.adapt", "env=CartPole", _adapt(lambda: gym.make("CartPole-v1")), TypeError, "needs a Box action space"),
    Case(
        "MetaCPO.adapt",
        "env=Pendulum (other shapes)",
        _adapt(lambda: gym.make("Pendulum-v1")),
        ValueError,
        "observation/action shapes",
    ),
    Case(
        "MetaCPO.adapt", "an env without info['cost']", _adapt(NoCostEnv, n_updates=1, n_steps=10), KeyError, "reports no cost"
    ),
    Case("MetaCPO.adapt", "env=3", _adapt(lambda: 3), TypeError, "adapt needs a gymnasium env"),
    Case(
        "MetaCPO.adapt",
        "a task of another family",
        _adapt(lambda: make_task_distribution("PointGoalHazard").test_tasks(1)[0]),
        TypeError,
        "is not a task of the model's family",
    ),
    Case(
        "MetaCPO.evaluate_params",
        "n_episodes=0",
        lambda: metacpo().evaluate_params("Toy2DNav", metacpo().policy.actor_params(), n_episodes=0),
        ValueError,
        "n_episodes must be a positive integer",
    ),
    Case(
        "MetaCPO.evaluate_params",
        "seed=-1",
        lambda: metacpo().evaluate_params("Toy2DNav", metacpo().policy.actor_params(), seed=-1),
        ValueError,
        "seed must be None or an integer >= 0",
    ),
    Case(
        "MetaCPO.evaluate_params",
        "params with a NaN log_std",
        lambda: metacpo().evaluate_params(
            "Toy2DNav", {**metacpo().policy.actor_params(), "log_std": torch.full((2,), np.nan)}
        ),
        ValueError,
        r"params\['log_std'\] has non-finite values",
    ),
    Case(
        "MetaCPO.evaluate_params",
        "params without log_std",
        lambda: metacpo().evaluate_params(
            "Toy2DNav", {k: v for k, v in metacpo().policy.actor_params().items() if k != "log_std"}
        ),
        ValueError,
        "params must map the actor's parameter names",
    ),
    Case(
        "meta_evaluate",
        "n_eval_episodes=0",
        lambda: meta_evaluate(metacpo(), toy().test_tasks(1), n_eval_episodes=0),
        ValueError,
        "n_eval_episodes must be a positive integer",
    ),
    Case(
        "meta_evaluate",
        "an env instead of tasks",
        lambda: meta_evaluate(metacpo(), [toy().make_env(toy().test_tasks(1)[0])]),
        ValueError,
        "meta-evaluation takes tasks of the model's family",
    ),
    Case(
        "meta_evaluate",
        "one task instead of a list",
        lambda: meta_evaluate(metacpo(), toy().test_tasks(1)[0]),
        ValueError,
        r"meta-evaluation takes a list of tasks, got one Toy2DNavTask: pass \[task\]",
    ),
    Case(
        "SafeEvalCallback",
        "an env (SB3's EvalCallback(eval_env))",
        lambda: SafeEvalCallback(toy().make_env(toy().test_tasks(1)[0])),
        ValueError,
        r"takes tasks of the model's family \(e.g. distribution.test_tasks\(5\)\), got CostMonitor",
    ),
    Case(
        "SafeEvalCallback",
        "a family name instead of tasks",
        lambda: SafeEvalCallback("Toy2DNav"),
        ValueError,
        r"got the name 'Toy2DNav': pass held-out tasks, e.g. make_task_distribution\('Toy2DNav'\).test_tasks\(5\)",
    ),
    Case(
        "MetaEvalCallback",
        "the distribution instead of its tasks",
        lambda: MetaEvalCallback(toy()),
        ValueError,
        "got the distribution 'Toy2DNav': pass its held-out tasks, e.g. distribution.test_tasks",
    ),
    Case(
        "MetaEvalCallback",
        "tasks=[]",
        lambda: MetaEvalCallback([]),
        ValueError,
        "meta-evaluation needs at least one held-out task",
    ),
    Case(
        "MetaEvalCallback",
        "n_eval_episodes=0",
        lambda: MetaEvalCallback(toy().test_tasks(1), n_eval_episodes=0),
        ValueError,
        "n_eval_episodes must be a positive integer",
    ),
    Case(
        "MetaEvalCallback",
        "eval_freq=1.5",
        lambda: MetaEvalCallback(toy().test_tasks(1), eval_freq=1.5),
        ValueError,
        "eval_freq must be a positive integer",
    ),
    Case(
        "SafeEvalCallback",
        "n_steps=1",
        lambda: SafeEvalCallback(toy().test_tasks(1), n_steps=1),
        ValueError,
        "n_steps must be None or an integer >= 2",
    ),
    Case(
        "evaluate_safe_policy",
        "n_eval_episodes=0",
        lambda: evaluate_safe_policy(metacpo(), toy().make_env(toy().test_tasks(1)[0]), n_eval_episodes=0),
        ValueError,
        "n_eval_episodes must be a positive integer",
    ),
    # --- envs emitting non-finite values ---
    Case(
        "MetaCPO.adapt",
        "env emits a NaN observation",
        _adapt(lambda: FaultyEnv("observation", float("nan")), n_updates=1, n_steps=10),
        ValueError,
        "env 0 returned a non-finite next observation at step 2",
    ),
    Case(
        "MetaCPO.adapt",
        "env emits an inf reward",
        _adapt(lambda: FaultyEnv("reward", float("inf")), n_updates=1, n_steps=10),
        ValueError,
        "env 0 returned a non-finite reward at step 2",
    ),
    Case(
        "MetaCPO.adapt",
        "env emits a NaN cost",
        _adapt(lambda: FaultyEnv("cost", float("nan")), n_updates=1, n_steps=10),
        ValueError,
        "env 0 of the VecEnv: the env reported a non-finite cost .nan. at step 2",
    ),
    Case(
        "CPO.learn",
        "env emits an inf observation",
        lambda: CPO("MlpPolicy", FaultyEnv("observation", float("inf")), **CPO_SMALL).learn(100),
        ValueError,
        "env 0 returned a non-finite next observation at step 2",
    ),
    Case(
        "CPO.learn",
        "env emits a NaN cost",
        lambda: CPO("MlpPolicy", FaultyEnv("cost", float("nan")), **CPO_SMALL).learn(100),
        ValueError,
        "env 0 of the VecEnv: the env reported a non-finite cost .nan. at step 2",
    ),
    Case(
        "MetaCPO.adapt",
        "env raises in step",
        _adapt(lambda: FaultyEnv("raise"), n_updates=1, n_steps=10),
        RuntimeError,
        "the env broke",
    ),
    Case(
        "CPO.learn",
        "env emits a finite 1e20 observation (overflows the observation statistics)",
        lambda: CPO("MlpPolicy", FaultyEnv("observation", 1e20), **CPO_SMALL).learn(100),
        ValueError,
        "overflow the running statistics of observation normalisation",
    ),
    Case(
        "CPO.learn",
        "env emits a finite 1e30 reward (overflows the critics' regression)",
        lambda: CPO("MlpPolicy", FaultyEnv("reward", 1e30), **CPO_SMALL).learn(100),
        ValueError,
        r"the reward critic's targets \(discounted returns\) reach",
    ),
    Case(
        "CPO.learn",
        "learning_rate schedule that gives NaN during training",
        lambda: CPO("MlpPolicy", "Toy2DNav", learning_rate=lambda p: 1e-3 if p == 1.0 else float("nan"), **CPO_SMALL).learn(
            100
        ),
        ValueError,
        "the learning-rate schedule gave nan at progress remaining 0",
    ),
    _hyper(
        "CPO",
        "learning_rate=lambda p: float('nan')",
        ValueError,
        "the schedule gives nan at progress remaining 1",
        learning_rate=lambda p: float("nan"),
    ),
    # --- task distributions ---
    Case(
        "make_task_distribution",
        "max_episode_steps=0",
        lambda: make_task_distribution("Toy2DNav", max_episode_steps=0),
        ValueError,
        "max_episode_steps must be a positive integer",
    ),
    Case(
        "make_task_distribution",
        "train_ranges={'bogus': (0, 1)}",
        lambda: make_task_distribution("Toy2DNav", train_ranges={"bogus": (0, 1)}),
        ValueError,
        "has no parameter 'bogus'",
    ),
    Case(
        "TaskDistribution.make_env",
        "PointButtonHazardTask(n_buttons=1)",
        lambda: make_task_distribution("PointButtonHazard").make_env(PointButtonHazardTask(n_buttons=1)),
        ValueError,
        r"n_buttons=1 is out of range; valid range is \[2, 10\]",
    ),
    Case(
        "TaskDistribution.make_env",
        "Toy2DNavTask(n_hazards=2.0)",
        lambda: make_task_distribution("Toy2DNav").make_env(Toy2DNavTask(n_hazards=2.0)),
        ValueError,
        r"n_hazards=2.0 must be an integer \(an int, not a float\)",
    ),
    Case(
        "TaskDistribution.make_env",
        "Toy2DNavTask(layout_seed=-1)",
        lambda: make_task_distribution("Toy2DNav").make_env(Toy2DNavTask(layout_seed=-1)),
        ValueError,
        r"layout_seed=-1 must be an integer in \[0, 2\*\*32\)",
    ),
    Case(
        "TaskDistribution.make_env",
        "a Button task whose objects do not fit its arena",
        lambda: make_task_distribution("PointButtonHazard").make_env(
            PointButtonHazardTask(n_buttons=6, n_hazards=8, extent=1.0)
        ),
        ValueError,
        "no layout of this task's objects .* fits its arena",
    ),
    Case(
        "CPO.predict",
        "an observation with a NaN",
        lambda: cpo().predict(np.array([np.nan, 0.0], np.float32)),
        ValueError,
        "the policy's action is not finite, for observations with non-finite values",
    ),
    Case(
        "MetaCPO.predict",
        "an observation with a NaN",
        lambda: metacpo().predict(np.array([[0.0, np.nan]], np.float32), deterministic=True),
        ValueError,
        "the policy's action is not finite, for observations with non-finite values",
    ),
    Case(
        "CPO.set_env",
        "3 envs for a 1-env model that has stepped, force_reset=False",
        lambda: cpo().learn(100).set_env(CPO("MlpPolicy", "Toy2DNav", n_envs=3).get_env(), force_reset=False),
        ValueError,
        "a different number of envs needs force_reset=True",
    ),
    Case(
        "make_task_distribution",
        "train_ranges={'goal_distance': (0, 9)}",
        lambda: make_task_distribution("Toy2DNav", train_ranges={"goal_distance": (0, 9)}),
        ValueError,
        "outside the valid range",
    ),
    Case(
        "make_task_distribution",
        "seed='a'",
        lambda: make_task_distribution("Toy2DNav", seed="a"),
        ValueError,
        "seed must be an integer",
    ),
]


def rst_table() -> str:
    """The reliability guide's table of :data:`CASES`, as a reStructuredText list-table."""
    lines = [
        ".. list-table:: Bad inputs and the errors they get (generated from tests/bad_inputs.py)",
        "   :header-rows: 1",
        "   :widths: 18 32 12 38",
        "",
        "   * - Where",
        "     - Bad input",
        "     - Error",
        "     - Message (matches)",
    ]
    for case in CASES:
        message = case.message.replace("\\", "").replace("`", "'")
        lines += [
            f"   * - ``{case.where}``",
            f"     - ``{case.bad_input}``",
            f"     - ``{case.error.__name__}``",
            f"     - {message}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(rst_table())
