"""Single-task sanity check: CPO and sb3-contrib TRPO on SafetyPointGoal1Gymnasium-v0 with the same script.

Both train for ``--timesteps`` env steps with their default hyperparameters (one env) and write a monitor CSV of
every training episode. The summary row is the mean return and cost of the last ``--last`` training episodes, the
measure of OmniSafe's benchmark table (research/anchors.md section 3: CPO 20.46 return / 28.84 cost at 1e7 steps).

    python benchmarks/pointgoal1.py --timesteps 1000000 --seed 0                  # each one's defaults (2048 steps)
    python benchmarks/pointgoal1.py --timesteps 1000000 --seed 0 --n-steps 20000  # OmniSafe's steps per epoch
    python benchmarks/pointgoal1.py --summarise --last 100   # the last-100 statistics of --out's monitor files

The summary gives each mean with its standard error over those episodes (ddof=1) and the share of them at or under
the cost limit.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import gymnasium as gym
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch as th
from sb3_contrib import TRPO
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo import CPO
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.monitor import CostMonitor

ENV_ID = "SafetyPointGoal1Gymnasium-v0"
ALGORITHMS = {"CPO": CPO, "TRPO": TRPO}


def run_name(name: str, seed: int, n_steps: int | None) -> str:
    return f"{name}_seed{seed}" + ("" if n_steps is None else f"_nsteps{n_steps}")


def run(name: str, timesteps: int, seed: int, cost_limit: float, n_steps: int | None, out: Path) -> dict:
    import_safety_gymnasium()
    monitor_file = out / run_name(name, seed, n_steps)
    env = DummyVecEnv([lambda: CostMonitor(gym.make(ENV_ID), filename=str(monitor_file))])
    kwargs: dict = {"cost_limit": cost_limit} if name == "CPO" else {}
    if n_steps is not None:
        kwargs["n_steps"] = n_steps
    model = ALGORITHMS[name]("MlpPolicy", env, seed=seed, **kwargs)
    start = time.perf_counter()
    model.learn(timesteps)
    seconds = time.perf_counter() - start
    env.close()
    episodes = read_monitor(Path(f"{monitor_file}.monitor.csv"))
    n_steps = model.n_steps
    return {
        "algorithm": name,
        "seed": seed,
        "n_steps": n_steps,
        "timesteps": timesteps,
        "seconds": seconds,
        "episodes": episodes,
    }


def read_monitor(path: Path) -> list[dict]:
    with open(path) as handle:
        next(handle)  # the monitor's JSON header line
        return list(csv.DictReader(handle))


def episode_statistics(episodes: list[dict], last: int, cost_limit: float) -> dict:
    """Mean return and cost of the last ``last`` episodes, their standard errors (ddof=1) and the share of them at
    or under ``cost_limit``."""
    tail = episodes[-last:]
    returns, costs = np.array([float(e["r"]) for e in tail]), np.array([float(e["c"]) for e in tail])
    n = len(tail)
    return {
        "last": n,
        "return": float(returns.mean()),
        "return_se": float(returns.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "cost": float(costs.mean()),
        "cost_se": float(costs.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "under_limit": float(np.mean(costs <= cost_limit)),
    }


def summarise(out: Path, last: int, cost_limit: float) -> None:
    """Print :func:`episode_statistics` of every monitor file in ``out``."""
    print(f"| run | episodes | return (last {last}) | cost (last {last}) | at or under {cost_limit:g} |")
    print("|---|---|---|---|---|")
    for path in sorted(out.glob("*.monitor.csv")):
        episodes = read_monitor(path)
        stats = episode_statistics(episodes, last, cost_limit)
        print(
            f"| {path.name.removesuffix('.monitor.csv')} | {len(episodes)} | {stats['return']:.2f} ± {stats['return_se']:.2f} "
            f"| {stats['cost']:.2f} ± {stats['cost_se']:.2f} | {stats['under_limit']:.0%} |"
        )


def plot(out: Path, cost_limit: float, window: int = 20) -> None:
    """Learning curves of every monitor file in ``out`` (moving averages over ``window`` episodes)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path in sorted(out.glob("*.monitor.csv")):
        episodes = read_monitor(path)
        steps = np.cumsum([int(e["l"]) for e in episodes])
        for axis, key in zip(axes, ("r", "c"), strict=True):
            values = np.convolve([float(e[key]) for e in episodes], np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1 :], values, label=path.name.removesuffix(".monitor.csv"))
    axes[0].axhline(20.46, color="gray", linestyle="--", label="OmniSafe CPO at 1e7 steps")
    axes[1].axhline(28.84, color="gray", linestyle="--", label="OmniSafe CPO at 1e7 steps")
    axes[1].axhline(cost_limit, color="red", linestyle=":", label="cost limit")
    for axis, name in zip(axes, ("episode return", "episode cost"), strict=True):
        axis.set_xlabel("env steps")
        axis.set_ylabel(f"{name} ({window}-episode mean)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{ENV_ID}, training episodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)


def summary(result: dict, last: int) -> dict:
    tail = result["episodes"][-last:]
    return {
        "algorithm": result["algorithm"],
        "seed": result["seed"],
        "n_steps": result["n_steps"],
        "timesteps": result["timesteps"],
        "episodes": len(result["episodes"]),
        "return": float(np.mean([float(e["r"]) for e in tail])),
        "cost": float(np.mean([float(e["c"]) for e in tail])),
        "steps_per_s": result["timesteps"] / result["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-limit", type=float, default=25.0)
    parser.add_argument("--n-steps", type=int, help="env steps per update for both (default: each one's default, 2048)")
    parser.add_argument("--last", type=int, default=20, help="training episodes averaged for the summary")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pointgoal1"))
    parser.add_argument("--plot-only", action="store_true", help="redraw learning_curves.png from --out's monitor files")
    parser.add_argument("--summarise", action="store_true", help="only print the --last statistics of --out's monitor files")
    args = parser.parse_args()
    if args.plot_only:
        plot(args.out, args.cost_limit)
        return
    if args.summarise:
        summarise(args.out, args.last, args.cost_limit)
        return
    th.set_num_threads(1)  # one core per run: the simulator is single-threaded and a 64x64 MLP gains nothing from more
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.algorithms:
        row = summary(run(name, args.timesteps, args.seed, args.cost_limit, args.n_steps, args.out), args.last)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / f"{run_name(name, args.seed, args.n_steps)}.json", "w") as handle:
            json.dump(row, handle, indent=1)
    last = args.last
    print(
        f"\n| algorithm | seed | steps/update | env steps | episodes | return (last {last}) | cost (last {last}) | steps/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['algorithm']} | {row['seed']} | {row['n_steps']} | {row['timesteps']} | {row['episodes']} "
            f"| {row['return']:.2f} | {row['cost']:.2f} | {row['steps_per_s']:.0f} |"
        )
    print("| OmniSafe CPO (published) | | 20000 | 10000000 | | 20.46 | 28.84 | |")
    plot(args.out, args.cost_limit)


if __name__ == "__main__":
    main()
