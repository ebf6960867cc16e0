"""Single-task sanity check: CPO and sb3-contrib TRPO on SafetyPointGoal1Gymnasium-v0 with the same script.

Both train for ``--timesteps`` env steps with their default hyperparameters (one env) and write a monitor CSV of
every training episode. The summary row is the mean return and cost of the last ``--last`` training episodes, the
measure of OmniSafe's benchmark table (research/anchors.md section 3: CPO 20.46 return / 28.84 cost at 1e7 steps).

    python benchmarks/pointgoal1.py --timesteps 1000000 --seed 0                  # each one's defaults (2048 steps)
    python benchmarks/pointgoal1.py --timesteps 1000000 --seed 0 --n-steps 20000  # OmniSafe's steps per epoch
    python benchmarks/pointgoal1.py --summarise --last 100   # the last-100 statistics of --out's monitor files
    # three seeds of each, with the final policies' evaluations and the table over seeds:
    for s in 0 1 2; do python benchmarks/pointgoal1.py --seed $s --out benchmarks/results/pointgoal1_seeds --last 100; done
    for s in 0 1 2; do python benchmarks/pointgoal1.py --seed $s --algorithms CPO --n-steps 20000 \
        --out benchmarks/results/pointgoal1_seeds --last 100; done
    python benchmarks/pointgoal1.py --summarise --last 100 --out benchmarks/results/pointgoal1_seeds
    # the ablation of CPO's options (docs/guide/results.rst lists the runs): e.g.
    python benchmarks/pointgoal1.py --seed 0 --algorithms CPO --cpo-recovery violated --cpo-cost-confidence 1 \
        --out benchmarks/results/pointgoal1_seeds --last 100

The summary gives each mean with its standard error over those episodes (ddof=1) and the share of them at or under
the cost limit.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import re
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch as th
from adaptation import mean_and_interval
from cpo_eval import evaluate_final
from omnisafe_pointgoal1 import VARIANTS as OMNISAFE_VARIANTS
from sb3_contrib import TRPO
from scipy import stats
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo import CPO
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.monitor import CostMonitor
from sb3_metacpo.tasks.safety_gym import fast_standard_env

ENV_ID = "SafetyPointGoal1Gymnasium-v0"
ALGORITHMS = {"CPO": CPO, "TRPO": TRPO}


DEFAULT_TIMESTEPS = 1_000_000


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings(options: dict[str, Any], timesteps: int, stock_env: bool) -> list[tuple[str, str]]:
    """A run's settings besides the algorithm, seed and steps per update that its name and label carry: CPO's options,
    a budget other than :data:`DEFAULT_TIMESTEPS` and the stock env."""
    settings = [(key, _value_text(value)) for key, value in options.items()]
    if timesteps != DEFAULT_TIMESTEPS:
        settings.append(("timesteps", str(timesteps)))
    return settings + ([("env", "stock")] if stock_env else [])


def variant(name: str, options: dict[str, Any], timesteps: int = DEFAULT_TIMESTEPS, stock_env: bool = False) -> str:
    """The run's label: the algorithm with its other settings (``CPO (recovery=violated)``)."""
    settings = _settings(options, timesteps, stock_env)
    return name if not settings else f"{name} ({', '.join(f'{key}={value}' for key, value in settings)})"


def run_name(
    name: str,
    seed: int,
    n_steps: int | None,
    options: dict[str, Any] | None = None,
    timesteps: int = DEFAULT_TIMESTEPS,
    stock_env: bool = False,
) -> str:
    """The file name of a run: ``CPO_seed0``, ``CPO_seed0_nsteps20000``, ``CPO-recovery-violated_seed0``."""
    tags = "".join(f"-{key.replace('_', '-')}-{value}" for key, value in _settings(options or {}, timesteps, stock_env))
    return f"{name}{tags}_seed{seed}" + ("" if n_steps is None else f"_nsteps{n_steps}")


def run(
    name: str,
    timesteps: int,
    seed: int,
    cost_limit: float,
    n_steps: int | None,
    out: Path,
    stock_env: bool = False,
    eval_episodes: int = 50,
    options: dict[str, Any] | None = None,
) -> dict:
    """Train ``name`` (with the constructor ``options``, CPO only) on one env of :data:`ENV_ID`: the library's fast
    env (the same episodes as upstream's, bit for bit: ``tests/test_fast_step.py``), or with ``stock_env``
    safety-gymnasium's own; then :func:`evaluate_final`."""
    import_safety_gymnasium()
    options = options or {}
    monitor_file = out / run_name(name, seed, n_steps, options, timesteps, stock_env)

    def make() -> gym.Env:
        env = gym.make(ENV_ID)
        return CostMonitor(env if stock_env else fast_standard_env(env), filename=str(monitor_file))

    env = DummyVecEnv([make])
    kwargs: dict = {"cost_limit": cost_limit, **options} if name == "CPO" else {}
    if n_steps is not None:
        kwargs["n_steps"] = n_steps
    model = ALGORITHMS[name]("MlpPolicy", env, seed=seed, **kwargs)
    start = time.perf_counter()
    model.learn(timesteps)
    seconds = time.perf_counter() - start
    env.close()
    episodes = read_monitor(Path(f"{monitor_file}.monitor.csv"))
    return {
        "file": monitor_file.name,
        "algorithm": name,
        "variant": variant(name, options, timesteps, stock_env),
        "seed": seed,
        "n_steps": model.n_steps,
        "timesteps": timesteps,
        "updates": model.num_timesteps // model.n_steps,
        "seconds": seconds,
        "episodes": episodes,
        "evaluation": evaluate_final(model, ENV_ID, seed, eval_episodes),
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
    seed_table(out, last, cost_limit)


def seed_table(out: Path, last: int, cost_limit: float) -> None:
    """Per configuration (algorithm and steps per update) with a result file, over its seeds: the mean of each seed's
    last-``last`` training episodes and of each seed's final-policy evaluation (stochastic policy and mean action),
    ± the 95 % t-interval over the seeds, and how many seeds are at or under ``cost_limit``."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(out.glob("*.json")):
        with open(path) as handle:
            result = json.load(handle)
        if "evaluation" not in result:  # written before the script evaluated the final policy
            continue
        result["training"] = episode_statistics(read_monitor(path.with_suffix(".monitor.csv")), last, cost_limit)
        runs.setdefault((result.get("variant", result["algorithm"]), result["n_steps"]), []).append(result)
    if not runs:
        return
    print(f"\nOver seeds (± 95 % t-interval over the seeds; seeds at or under {cost_limit:g} in brackets):\n")
    print(
        f"| algorithm | steps/update | updates | seeds | return, last {last} | cost, last {last} "
        "| return, final policy | cost, final policy | cost, final mean action |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, n_steps), results in sorted(runs.items()):
        training = [r["training"] for r in results]
        final = [r["evaluation"]["stochastic"] for r in results]
        mean_action = [r["evaluation"]["mean_action"] for r in results]

        def column(rows: list[dict], key: str) -> str:
            """Mean ± interval over the seeds of ``key``; for the cost also the seeds at or under the limit."""
            cell = mean_and_interval(np.array([row[key] for row in rows]), 2)
            return cell if key == "return" else f"{cell} ({sum(row[key] <= cost_limit for row in rows)}/{len(rows)})"

        print(
            f"| {name} | {n_steps} | {results[0]['updates']} | {', '.join(str(r['seed']) for r in results)} "
            f"| {column(training, 'return')} | {column(training, 'cost')} | {column(final, 'return')} "
            f"| {column(final, 'cost')} | {column(mean_action, 'cost')} |"
        )
    episodes = sorted({row["episodes"] for r in runs.values() for result in r for row in result["evaluation"].values()})
    print(f"\n(final policy: {', '.join(map(str, episodes))} episodes per seed on an env seeded 10000 + seed)")
    paired_table(runs, last)


def _difference_header(last: int, baseline_column: bool = False) -> None:
    """The header of the tables of differences against a baseline (named in a column with ``baseline_column``)."""
    minus = " minus |" if baseline_column else ""
    print(
        f"| run |{minus} steps/update | seeds | return, last {last} | cost, last {last} | return, final | cost, final "
        "| return, final mean action | cost, final mean action |"
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if baseline_column else ""))


#: Rows trained by another library (``omnisafe_pointgoal1.py``): their seeds share no random stream with ours, so
#: they are compared with CPO unpaired (Welch), not seed by seed.
OTHER_LIBRARIES = tuple(variant for _, variant in OMNISAFE_VARIANTS.values())
#: Another library's variants, each compared seed by seed with that library's variants before it (its defaults
#: first; same seeds, same library: the runs share their random streams until their updates differ).
LIBRARY_BASELINES = {variant: OTHER_LIBRARIES[:index] for index, variant in enumerate(OTHER_LIBRARIES) if index}
PARTS = (
    lambda result: result["training"],
    lambda result: result["evaluation"]["stochastic"],
    lambda result: result["evaluation"]["mean_action"],
)


def welch_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a`` minus mean of ``b`` and the half-width of its 95 % Welch t-interval (unequal variances,
    Welch-Satterthwaite degrees of freedom)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # no spread in either group: the difference is exact
        return float(a.mean() - b.mean()), 0.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(a.mean() - b.mean()), float(stats.t.ppf(0.975, dof) * np.sqrt(va + vb))


def paired_table(runs: dict[tuple[str, int], list[dict]], last: int) -> None:
    """Each configuration minus the same library's CPO with its defaults at the same steps per update (ours: "CPO";
    another library's variant: each of its :data:`LIBRARY_BASELINES`, defaults first), seed by seed (the seeds both
    have): mean difference ± the 95 % t-interval over the seeds, of the last-``last`` means and of the final policy.
    Another library's rows are also compared with ours unpaired (:func:`unpaired_table`)."""
    lines = []
    for (name, n_steps), results in sorted(runs.items()):
        for minus in LIBRARY_BASELINES.get(name, () if name in OTHER_LIBRARIES or name == "CPO" else ("CPO",)):
            baseline = {r["seed"]: r for r in runs.get((minus, n_steps), [])}
            pairs = [(r, baseline[r["seed"]]) for r in results if r["seed"] in baseline]
            if not pairs:
                continue
            cells = [
                mean_and_interval(np.array([part(r)[key] - part(b)[key] for r, b in pairs]), 2)
                for part in PARTS
                for key in ("return", "cost")
            ]
            seeds = ", ".join(str(r["seed"]) for r, _ in pairs)
            lines.append(f"| {name} | {minus} | {n_steps} | {seeds} | {' | '.join(cells)} |")
    if lines:
        print(
            "\nPaired by seed, minus the same library's CPO with its defaults (or an earlier variant of that library) "
            "at the same steps per update (± 95 % t-interval):\n"
        )
        _difference_header(last, baseline_column=True)
        print("\n".join(lines))
    unpaired_table(runs, last)


def unpaired_table(runs: dict[tuple[str, int], list[dict]], last: int) -> None:
    """Each other library's configuration minus our CPO with its defaults at the same steps per update, over all the
    seeds of each: difference of the means ± the 95 % Welch t-interval."""
    lines = []
    for (name, n_steps), results in sorted(runs.items()):
        ours = runs.get(("CPO", n_steps), [])
        if name not in OTHER_LIBRARIES or len(results) < 2 or len(ours) < 2:
            continue
        cells = []
        for part in PARTS:
            for key in ("return", "cost"):
                difference, half = welch_interval(
                    np.array([part(r)[key] for r in results]), np.array([part(r)[key] for r in ours])
                )
                cells.append(f"{difference:.2f} ± {half:.2f}")
        seeds = f"{len(results)} against {len(ours)}"
        lines.append(f"| {name} | {n_steps} | {seeds} | {' | '.join(cells)} |")
    if lines:
        print("\nAnother library, minus our CPO with its defaults at the same steps per update, unpaired (± 95 % Welch")
        print("t-interval; its seeds share no random stream with ours):\n")
        _difference_header(last)
        print("\n".join(lines))


def plot(out: Path, cost_limit: float, window: int = 20) -> None:
    """Learning curves of the runs in ``out`` (moving averages over ``window`` episodes), one line per configuration
    (the file name without its ``_seedN``): a run's own curve, or with several seeds their mean and, shaded, the
    lowest and highest seed (up to the shortest run)."""
    curves: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
    for path in sorted(out.glob("*.monitor.csv")):
        episodes = read_monitor(path)
        width = min(window, len(episodes))  # a short run (fewer episodes than the window) gets one wide mean
        if width == 0:
            continue
        steps = np.cumsum([int(e["l"]) for e in episodes])[width - 1 :]
        values = {
            key: np.convolve([float(e[key]) for e in episodes], np.ones(width) / width, mode="valid") for key in ("r", "c")
        }
        curves.setdefault(re.sub(r"_seed\d+", "", path.name.removesuffix(".monitor.csv")), []).append((steps, values))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs in curves.items():
        length = min(len(steps) for steps, _ in runs)
        label = name if len(runs) == 1 else f"{name} ({len(runs)} seeds)"
        for axis, key in zip(axes, ("r", "c"), strict=True):
            stacked = np.stack([values[key][:length] for _, values in runs])
            (line,) = axis.plot(runs[0][0][:length], stacked.mean(0), label=label)
            if len(runs) > 1:
                axis.fill_between(
                    runs[0][0][:length], stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2, linewidth=0
                )
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
        "variant": result["variant"],
        "seed": result["seed"],
        "n_steps": result["n_steps"],
        "timesteps": result["timesteps"],
        "episodes": len(result["episodes"]),
        "return": float(np.mean([float(e["r"]) for e in tail])),
        "cost": float(np.mean([float(e["c"]) for e in tail])),
        "steps_per_s": result["timesteps"] / result["seconds"],
        "updates": result["updates"],
        "evaluation": result["evaluation"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=DEFAULT_TIMESTEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-limit", type=float, default=25.0)
    parser.add_argument("--n-steps", type=int, help="env steps per update for both (default: each one's default, 2048)")
    parser.add_argument("--last", type=int, default=20, help="training episodes averaged for the summary")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pointgoal1"))
    parser.add_argument("--stock-env", action="store_true", help="upstream's env (same episodes, slower)")
    parser.add_argument("--eval-episodes", type=int, default=50, help="episodes of each final-policy evaluation")
    parser.add_argument("--cpo-recovery", choices=("linearised", "violated", "confident"), help="CPO's recovery rule")
    parser.add_argument("--cpo-cost-confidence", type=float, help="CPO's cost_confidence (kappa)")
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
    options: dict[str, Any] = {}
    if args.cpo_recovery is not None:
        options["recovery"] = args.cpo_recovery
    if args.cpo_cost_confidence is not None:
        options["cost_confidence"] = args.cpo_cost_confidence
    defaults = inspect.signature(CPO.__init__).parameters
    options = {key: value for key, value in options.items() if value != defaults[key].default}  # CPO's own: no variant
    if options and args.algorithms != ["CPO"]:
        parser.error("--cpo-recovery and --cpo-cost-confidence need --algorithms CPO")
    rows = []
    for name in args.algorithms:
        result = run(
            name,
            args.timesteps,
            args.seed,
            args.cost_limit,
            args.n_steps,
            args.out,
            args.stock_env,
            args.eval_episodes,
            options,
        )
        row = summary(result, args.last)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / f"{result['file']}.json", "w") as handle:
            json.dump(row, handle, indent=1)
    last = args.last
    print(
        f"\n| algorithm | seed | steps/update | env steps | episodes | return (last {last}) | cost (last {last}) | steps/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['seed']} | {row['n_steps']} | {row['timesteps']} | {row['episodes']} "
            f"| {row['return']:.2f} | {row['cost']:.2f} | {row['steps_per_s']:.0f} |"
        )
    print("| OmniSafe CPO (published) | | 20000 | 10000000 | | 20.46 | 28.84 | |")
    plot(args.out, args.cost_limit)


if __name__ == "__main__":
    main()
