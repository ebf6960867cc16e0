"""Write your own task distribution: a 1-D corridor whose goal and hazard zone change from task to task.

    python examples/custom_task_distribution.py                       # ~1 minute on 2 CPU cores
    python examples/custom_task_distribution.py --timesteps 2000 --n-steps 100 --meta-batch-size 2   # seconds

A family is three things: a frozen ``Task`` dataclass of parameters, a gymnasium env that reports a per-step cost
in ``info["cost"]``, and a ``TaskDistribution`` subclass with the parameters' valid, training and held-out ranges
(disjoint in at least one parameter) that builds the env of a task. Registered, it is used by name like the
shipped families, and saved models rebuild it on load. The docs page "Writing your own task distribution" explains
each part (it shows this file's code).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.tasks import ParamRange, Task, TaskDistribution, make_task_distribution, register_task_distribution


# --- the task --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CorridorTask(Task):
    """The goal's position and the hazard zone's centre on a line; ``layout_seed`` (from ``Task``) is unused here."""

    family: ClassVar[str] = "Corridor"
    goal: float = 1.0
    hazard_center: float = 0.5
    hazard_width: float = 0.2


# --- its env ---------------------------------------------------------------------------------------------------
class CorridorEnv(gym.Env):
    """Move along [-2, 2]; reward -|x - goal| per step, cost 1 per step inside the hazard zone."""

    def __init__(self, task: CorridorTask) -> None:
        self.task = task
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.x = 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)  # TaskEnv passes every episode its own seed: start states are reproducible
        self.x = float(self.np_random.uniform(-0.1, 0.1))
        return np.array([self.x], np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.x = float(np.clip(self.x + 0.1 * float(np.clip(action[0], -1.0, 1.0)), -2.0, 2.0))
        in_hazard = abs(self.x - self.task.hazard_center) < self.task.hazard_width / 2
        return np.array([self.x], np.float32), -abs(self.x - self.task.goal), False, False, {"cost": float(in_hazard)}


# --- the distribution ------------------------------------------------------------------------------------------
@register_task_distribution
class Corridor(TaskDistribution):
    """Goals on either side; held-out tasks have wider hazard zones than any training task."""

    name = "Corridor"
    task_cls = CorridorTask
    limits: ClassVar[dict[str, ParamRange]] = {  # what a task may be at all
        "goal": ParamRange(-1.8, 1.8),
        "hazard_center": ParamRange(-1.5, 1.5),
        "hazard_width": ParamRange(0.05, 1.0),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "goal": ParamRange(-1.5, 1.5),
        "hazard_center": ParamRange(-1.0, 1.0),
        "hazard_width": ParamRange(0.1, 0.3),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "goal": ParamRange(-1.5, 1.5),
        "hazard_center": ParamRange(-1.0, 1.0),
        "hazard_width": ParamRange(0.4, 0.6),  # disjoint from training: held-out tasks are never trained on
    }
    default_max_episode_steps = 50
    default_cost_limit = 3.0

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        assert isinstance(task, CorridorTask)
        return gym.wrappers.TimeLimit(CorridorEnv(task), self.max_episode_steps)  # the family's episode length


# --- using it --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=60_000, help="meta-training env steps")
    parser.add_argument("--n-steps", type=int, default=500, help="env steps per task batch (10 episodes)")
    parser.add_argument("--meta-batch-size", type=int, default=8, help="tasks per meta-iteration")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "custom_task_distribution"))
    args = parser.parse_args()
    th.set_num_threads(1)

    dist = make_task_distribution("Corridor", seed=args.seed)  # by name, like the shipped families
    preview = dist.sample(2, rng=np.random.default_rng(0))  # an rng of its own: the training stream is untouched
    print("training tasks:", *(task.short() for task in preview), sep="\n  ")
    print("held-out tasks:", *(task.short() for task in dist.test_tasks(2)), sep="\n  ")

    model = MetaCPO("MlpPolicy", dist, meta_batch_size=args.meta_batch_size, n_steps=args.n_steps, seed=args.seed)
    model.learn(args.timesteps)
    os.makedirs(args.out, exist_ok=True)
    path = model.save(os.path.join(args.out, "metacpo_corridor"))
    model = MetaCPO.load(path)  # rebuilds Corridor from the registry: register it before loading in a new process

    for task in dist.test_tasks(2):
        steps = model.adaptation_steps(task)  # (k, parameters after k updates) for k = 0 .. n_inner_updates
        stages = [model.evaluate_params(task, params, args.eval_episodes, seed=1) for _, params in steps]
        print(
            f"held-out {task.short()}: return {stages[0].ep_rew_mean:.1f} -> {stages[-1].ep_rew_mean:.1f}, "
            f"cost {stages[0].ep_cost_mean:.2f} -> {stages[-1].ep_cost_mean:.2f} (limit {model.effective_cost_limit:g})"
        )


if __name__ == "__main__":
    main()
