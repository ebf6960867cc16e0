"""Several costs, each with its own limit: CPO and MetaCPO on Toy2DNav with a hazard cost and a speed cost.

    python examples/several_costs.py                          # ~2 minutes on 2 CPU cores
    python examples/several_costs.py --timesteps 2000 --n-steps 100 --meta-batch-size 2   # seconds

``speed_limit=1.0`` adds ``info["cost_speed"]`` (1 per step whose move is faster than a full step along one axis)
beside ``info["cost_hazards"]``; ``cost_limit`` maps each name to its limit, and every update solves the CPO dual
with both constraints (exactly: the closed form on each set of active constraints). Prints each
cost's mean over the last training episodes and the multipliers of the last update, and writes ``progress.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
import torch as th
from stable_baselines3.common.logger import configure

from sb3_metacpo import CPO, MetaCPO
from sb3_metacpo.tasks import make_task_distribution

LIMITS = {"cost_hazards": 5.0, "cost_speed": 10.0}


def episode_costs(model: CPO | MetaCPO) -> dict[str, float]:
    """Mean episode cost of each constrained cost over the model's last training episodes."""
    episodes = list(model.ep_info_buffer)
    return {name: float(np.mean([info["episode_costs"][name] for info in episodes])) for name in LIMITS}


def last_multipliers(progress_csv: str) -> dict[str, float]:
    """The multipliers of the last update logged in a ``progress.csv``: ``train/nu_<name>`` for CPO,
    ``train/nu_stage<k>_<name>`` for MetaCPO (one per adaptation stage, with the default per-stage meta-constraints)."""
    with open(progress_csv, newline="") as file:
        rows = [row for row in csv.DictReader(file) if any("/nu_" in key and value for key, value in row.items())]
    if not rows:
        return {}
    return {key: round(float(value), 4) for key, value in rows[-1].items() if "/nu_" in key and value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=50_000, help="env steps for each algorithm")
    parser.add_argument("--n-steps", type=int, default=1000, help="env steps per batch")
    parser.add_argument("--meta-batch-size", type=int, default=4, help="MetaCPO's tasks per meta-iteration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "several_costs"))
    args = parser.parse_args()
    th.set_num_threads(1)

    dist = make_task_distribution("Toy2DNav", seed=args.seed, speed_limit=1.0)
    print(f"costs reported by {dist.name}: {dist.cost_names}; limits {LIMITS}")
    models = {
        "CPO": CPO("MlpPolicy", dist, n_steps=args.n_steps, cost_limit=LIMITS, seed=args.seed),
        "MetaCPO": MetaCPO(
            "MlpPolicy", dist, meta_batch_size=args.meta_batch_size, n_steps=args.n_steps, cost_limit=LIMITS, seed=args.seed
        ),
    }
    for name, model in models.items():
        folder = os.path.join(args.out, name)
        model.set_logger(configure(folder, ["csv"]))  # progress.csv: rollout/ep_cost_<name>_mean, train/nu_<name>
        model.learn(args.timesteps)
        costs = episode_costs(model)
        multipliers = last_multipliers(os.path.join(folder, "progress.csv"))
        print(f"{name}: " + ", ".join(f"{cost} {value:.2f} (limit {LIMITS[cost]:g})" for cost, value in costs.items()))
        print(f"  logged in {folder}/progress.csv; last multipliers: {multipliers or 'none'}")


if __name__ == "__main__":
    main()
