"""Train CPO on one safety-gymnasium id, then evaluate the final policy: one JSON line per run.

The evaluation runs ``--episodes`` episodes (default 50) of the stochastic policy (what CPO constrains) and of the
mean action, each on a fresh env seeded apart from training (``10000 + seed``). Run it on two commits (e.g. with
``git worktree`` and ``PYTHONPATH``: the output names the package's commit) with the same seeds to compare them:

    python benchmarks/cpo_eval.py --seed 0 --timesteps 500000 --label after
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch as th

import sb3_metacpo
from sb3_metacpo import CPO
from sb3_metacpo.common.envs import make_safe_vec_env
from sb3_metacpo.common.evaluation import evaluate_safe_policy


def commit() -> str:
    """The git commit of the checkout the imported package comes from, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(sb3_metacpo.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def evaluate_final(model: Any, env_id: str, seed: int, episodes: int) -> dict[str, dict[str, float]]:
    """The final policy on ``episodes`` episodes of a fresh ``env_id`` env seeded apart from training (``10000 +
    seed``, torch too): ``"stochastic"`` (what CPO constrains) and ``"mean_action"``, each with the mean and population
    standard deviation of the episode return and cost."""
    result = {}
    for deterministic, key in ((False, "stochastic"), (True, "mean_action")):
        env = make_safe_vec_env(env_id)
        env.seed(10_000 + seed)
        th.manual_seed(10_000 + seed)
        reward, reward_sd, cost, cost_sd = evaluate_safe_policy(model, env, episodes, deterministic)
        result[key] = {"return": reward, "return_sd": reward_sd, "cost": cost, "cost_sd": cost_sd, "episodes": episodes}
        env.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="SafetyPointGoal1Gymnasium-v0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=500_000)
    parser.add_argument("--cost-limit", type=float, default=25.0)
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per policy (stochastic, mean)")
    parser.add_argument("--label", default="", help="a name for the run in the output")
    args = parser.parse_args()
    th.set_num_threads(1)
    start = time.process_time()
    model = CPO("MlpPolicy", args.env_id, cost_limit=args.cost_limit, seed=args.seed).learn(args.timesteps)
    result = {
        "label": args.label,
        "commit": commit(),
        "env_id": args.env_id,
        "seed": args.seed,
        "timesteps": args.timesteps,
        "env_steps": model.num_timesteps,  # whole rollouts: at least --timesteps
        "updates": model.num_timesteps // (model.n_steps * model.n_envs),
        "train_cpu_s": round(time.process_time() - start, 1),
    }
    result.update(evaluate_final(model, args.env_id, args.seed, args.episodes))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
