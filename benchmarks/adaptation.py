"""The adaptation benchmark: does Meta-CPO keep unseen tasks under the cost limit while it adapts?

For every seed, each trained method (Meta-CPO, the paper's Meta-CPO, Meta-TRPO, CPO pretrained on the training
tasks, and any ablation variants) trains with the same env-step budget; CPO from scratch starts from a random
policy. Every method then adapts through the same protocol (``adaptation_steps``: the same number K of CPO updates,
of the same batch size and trust region, as in meta-training) to two held-out sets:

* ``unseen``: tasks drawn from the *training* ranges, never trained on (the paper's setting);
* ``shifted``: the family's harder held-out tasks (outside the training ranges).

Before adaptation and after every update, the *stochastic* policy is evaluated on the same ``--eval-episodes``
episodes (the same start states for every method: ``evaluate_params(seed=...)``). The cost of the adaptation
batches themselves (what a user pays while adapting) is recorded beside it.

    python benchmarks/adaptation.py --family Toy2DNav --seeds 0 1 2 3 4 --out runs/Toy2DNav
    python benchmarks/adaptation.py --family Toy2DNav --seeds 0 1 2 3 4 --ablation --out runs/Toy2DNav_ablation

(The default --out is the family's published folder, benchmarks/results/<family>; a folder that holds results is
refused unless --overwrite is given.)

Summaries (``table.md``): per method, held-out set and update, the mean over seeds of the task-mean return and
cost with a 95 % t-interval over the seeds, the cost paid during adaptation, and the share of task-seed pairs at
or under the limit with a 95 % Wilson interval; plus each method's env steps and policy updates. Raw numbers in
``results.csv`` / ``results.json``; curves in ``adaptation_<set>.png``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from scipy import stats

from sb3_metacpo import CPO, MetaCPO, MetaTRPO, make_task_distribution
from sb3_metacpo.plots import plot_adaptation_curves
from sb3_metacpo.tasks import TaskDistribution, list_task_distributions

EVAL_SEED = 10_000  # held-out task i of a set is evaluated on the episodes of seed EVAL_SEED + i, by every method

#: Budgets and settings per family (the same for every method): env steps per trained method, tasks per
#: meta-iteration (CPO-pretrain: envs), env steps per task batch (meta-training and adaptation alike), K (inner
#: updates in meta-training = adaptation updates at test time), the inner / adaptation trust region, held-out tasks
#: per set and evaluation episodes.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "Toy2DNav": {
        "budget": 400_000,
        "meta_batch_size": 8,
        "n_steps": 1000,
        "n_updates": 2,
        "inner_target_kl": 0.02,
        "outer_target_kl": 0.01,
        "n_test_tasks": 5,
        "eval_episodes": 50,
    },
}
#: Navigation families: 10 episodes of 500 steps per batch, 1M env steps per method.
NAVIGATION = {
    "budget": 1_000_000,
    "meta_batch_size": 4,
    "n_steps": 5000,
    "n_updates": 1,
    "inner_target_kl": 0.02,
    "outer_target_kl": 0.01,
    "n_test_tasks": 3,
    "eval_episodes": 20,
}
FAMILY_DEFAULTS.update({"PointGoalHazard": NAVIGATION, "PointButtonHazard": NAVIGATION, "CarCircle": NAVIGATION})

#: The methods: (class, constructor overrides). "Meta-CPO" is the library's default; "Meta-CPO (paper)" the paper's
#: meta-constraint and CPO's plain constraint estimate.
METHODS: dict[str, tuple[Any, dict[str, Any]]] = {
    "Meta-CPO": (MetaCPO, {}),
    "Meta-CPO (paper)": (MetaCPO, {"meta_constraint": "mean", "cost_confidence": 0.0}),
    "Meta-CPO (recovery)": (MetaCPO, {"recovery": "violated"}),
    "Meta-CPO (confident recovery)": (MetaCPO, {"recovery": "confident"}),
    "Meta-TRPO": (MetaTRPO, {}),
    "CPO-pretrain": (CPO, {}),
    "CPO-pretrain (recovery)": (CPO, {"recovery": "violated"}),
    "CPO-scratch": (CPO, {}),
}
#: Run by default (the "(recovery)" variants on request, with --methods).
DEFAULT_METHODS = ("Meta-CPO", "Meta-CPO (paper)", "Meta-TRPO", "CPO-pretrain", "CPO-scratch")
#: Ablation: the paper's Meta-CPO with each change alone, then together (the default is "Meta-CPO").
ABLATION: dict[str, tuple[Any, dict[str, Any]]] = {
    "paper": (MetaCPO, {"meta_constraint": "mean", "cost_confidence": 0.0}),
    "paper, 4-episode batches": (MetaCPO, {"meta_constraint": "mean", "cost_confidence": 0.0, "n_steps": 400}),
    "+ UCB (k=1)": (MetaCPO, {"meta_constraint": "mean", "cost_confidence": 1.0}),
    "+ per-stage constraints": (MetaCPO, {"meta_constraint": "stages", "cost_confidence": 0.0}),
    "+ per-stage CVaR": (MetaCPO, {"meta_constraint": "stages_cvar", "cost_confidence": 0.0}),
    "+ per-stage + UCB (default)": (MetaCPO, {"meta_constraint": "stages", "cost_confidence": 1.0}),
    "+ per-stage CVaR + UCB": (MetaCPO, {"meta_constraint": "stages_cvar", "cost_confidence": 1.0}),
    "+ recovery when violated": (MetaCPO, {"meta_constraint": "mean", "cost_confidence": 0.0, "recovery": "violated"}),
    "+ per-stage + UCB + recovery": (MetaCPO, {"meta_constraint": "stages", "cost_confidence": 1.0, "recovery": "violated"}),
    "+ per-stage + UCB + confident recovery": (
        MetaCPO,
        {"meta_constraint": "stages", "cost_confidence": 1.0, "recovery": "confident"},
    ),
}


def build(name: str, spec: tuple[Any, dict[str, Any]], args: argparse.Namespace, seed: int) -> Any:
    cls, overrides = spec
    distribution = make_task_distribution(args.family, seed=seed, **args.env_kwargs)
    n_steps = overrides.get("n_steps", args.n_steps)
    if cls is CPO:
        # Multi-task CPO: M envs, each drawing a new training task every episode, n_steps per env per update.
        return CPO(
            "MlpPolicy",
            distribution,
            n_steps=n_steps,
            n_envs=args.meta_batch_size,
            target_kl=args.inner_target_kl,
            seed=seed,
            **{key: value for key, value in overrides.items() if key != "n_steps"},
        )
    kwargs = dict(
        meta_batch_size=args.meta_batch_size,
        n_inner_updates=args.n_updates,
        n_steps=n_steps,
        inner_target_kl=args.inner_target_kl,
        outer_target_kl=args.outer_target_kl,
        seed=seed,
    )
    kwargs.update({key: value for key, value in overrides.items() if key != "n_steps"})
    return cls("MlpPolicy", distribution, **kwargs)


def train(name: str, spec: tuple[Any, dict[str, Any]], args: argparse.Namespace, seed: int) -> tuple[Any, dict[str, Any]]:
    model = build(name, spec, args, seed)
    start = time.perf_counter()
    if name != "CPO-scratch":
        model.learn(args.budget)
    info = {
        "env_steps": int(model.num_timesteps),
        "policy_updates": int(model._n_updates),
        "train_seconds": time.perf_counter() - start,
    }
    print(f"  {name} seed {seed}: {info['env_steps']} steps, {info['policy_updates']} updates, {info['train_seconds']:.0f} s")
    return model, info


#: What CPO's adaptation takes from the library's Meta-CPO (its constructor defaults), so that CPO-pretrain and
#: CPO-scratch adapt with the same cost margin and conjugate-gradient iterations (CPO's own defaults are 0 and 15).
ADAPTATION_SETTINGS = {
    key: inspect.signature(MetaCPO.__init__).parameters[key].default for key in ("cost_confidence", "cg_max_steps")
}


def evaluate_method(
    name: str, model: Any, distribution: TaskDistribution, args: argparse.Namespace, seed: int
) -> list[dict[str, Any]]:
    """Adapt to every held-out task of both sets and evaluate before and after every update (the same protocol for
    every method: batch, K, trust region; CPO's baselines also take Meta-CPO's cost margin and CG iterations; the
    paper's Meta-CPO keeps its own margin, 0)."""
    if isinstance(model, CPO):
        for key, value in ADAPTATION_SETTINGS.items():
            setattr(model, key, value)
    rows = []
    sets = {"unseen": distribution.unseen_tasks(args.n_test_tasks), "shifted": distribution.test_tasks(args.n_test_tasks)}
    limit = model.total_cost_limit  # the rows' cost is the total cost
    if limit is None:
        raise ValueError(f"{name} limits named costs only; this benchmark compares the total cost with its limit")
    n_steps = METHODS.get(name, ABLATION.get(name, (None, {})))[1].get("n_steps", args.n_steps)
    for set_name, tasks in sets.items():
        for index, task in enumerate(tasks):
            for k, params in model.adaptation_steps(task, args.n_updates, n_steps):
                result = model.evaluate_params(task, params, args.eval_episodes, deterministic=False, seed=EVAL_SEED + index)
                paid = model.adaptation_history[k - 1]["ep_cost_mean"] if k > 0 else float("nan")
                rows.append(
                    {
                        "method": name,
                        "seed": seed,
                        "set": set_name,
                        "task": index,
                        "update": k,
                        "return": result.ep_rew_mean,
                        "cost": result.ep_cost_mean,
                        "cost_sem": result.ep_cost_sem,
                        "n_episodes": result.n_episodes,
                        "adaptation_batch_cost": paid,
                        "cost_limit": limit,
                        "task_params": task.short(),
                    }
                )
    return rows


def t_interval(values: np.ndarray) -> float:
    """Half-width of the 95 % t-interval of the mean of ``values``."""
    if len(values) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def mean_and_interval(values: np.ndarray, digits: int) -> str:
    """``mean ± 95 % t-interval`` over seeds, or ``mean (1 seed)`` where one seed gives no interval."""
    if len(values) < 2:
        return f"{values.mean():.{digits}f} (1 seed)"
    return f"{values.mean():.{digits}f} ± {t_interval(values):.{digits}f}"


def valued_pairs(cell: list[dict[str, Any]], key: str, what: str) -> tuple[list[dict[str, Any]], str]:
    """The pairs of ``cell`` whose ``key`` is a number (not NaN), and the note counting the others ("" if none)."""
    valued = [r for r in cell if math.isfinite(r[key])]
    missing = len(cell) - len(valued)
    return valued, f" ({missing} of {len(cell)} pairs without {what})" if missing else ""


def paid_cell(cell: list[dict[str, Any]]) -> str:
    """The cost paid while adapting: the mean over seeds of each seed's mean over its pairs, ± the t-interval over
    seeds. A pair whose adaptation batch completed no episode has no episode cost (NaN): it is left out and counted,
    neither averaged in nor turning the cell into NaN."""
    valued, note = valued_pairs(cell, "adaptation_batch_cost", "a completed episode")
    seeds = sorted({r["seed"] for r in valued})
    if not seeds:
        return "n/a" + note
    per_seed = np.array([np.mean([r["adaptation_batch_cost"] for r in valued if r["seed"] == s]) for s in seeds])
    return mean_and_interval(per_seed, 2) + note


def under_limit_cell(cell: list[dict[str, Any]]) -> str:
    """The task-seed pairs whose evaluation cost is at or under the limit, of the pairs with a cost, with its 95 %
    Wilson interval; a pair without one (NaN: no completed episode) is left out and counted, not taken as over."""
    valued, note = valued_pairs(cell, "cost", "a cost")
    if not valued:
        return "n/a" + note
    under = sum(r["cost"] <= r["cost_limit"] for r in valued)
    low, high = wilson(under, len(valued))
    return f"{under}/{len(valued)} ({low:.2f}–{high:.2f})" + note


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.959964, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def two_way_bootstrap_means(matrix: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the mean of a (seeds, tasks) matrix, resampling the seeds (rows) and the tasks
    (columns) with replacement, independently: ``n_resamples`` means of ``matrix[seeds][:, tasks]``.

    Their variance is ``S_seeds / n_seeds + S_tasks / n_tasks + S_interaction / (n_seeds * n_tasks)`` (the population
    variances of the two-way decomposition's row effects, column effects and residuals), so task-to-task spread widens
    the interval where a t-interval over seeds of the task means ignores it."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"need a non-empty (seeds, tasks) matrix, got shape {matrix.shape}")
    n_seeds, n_tasks = matrix.shape
    seeds = rng.integers(n_seeds, size=(n_resamples, n_seeds))
    tasks = rng.integers(n_tasks, size=(n_resamples, n_tasks))
    return matrix[seeds[:, :, None], tasks[:, None, :]].mean(axis=(1, 2))


def seeds_tasks_interval(matrix: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of a (seeds, tasks) matrix under :func:`two_way_bootstrap_means` (a fixed
    ``seed``: a table's intervals are the same at every summary)."""
    replicates = two_way_bootstrap_means(matrix, n_resamples, np.random.default_rng(seed))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


def random_effects_interval(matrix: np.ndarray) -> tuple[float, float]:
    """95 % interval of the mean of a (seeds, tasks) matrix as an estimate of the mean over both populations (new
    seeds *and* new tasks of the family), under the two-way random-effects model y_ij = μ + a_i + b_j + e_ij (a seed's
    effect, a task's, and the rest, each independent, mean 0).

    The mean's variance is σ_a²/S + σ_b²/T + σ_e²/(ST); with one value per cell the ANOVA mean squares estimate it
    without bias as (MS_seeds + MS_tasks − MS_residual)/(ST) (E[MS_seeds] = Tσ_a² + σ_e², E[MS_tasks] = Sσ_b² +
    σ_e², E[MS_residual] = σ_e²), with Satterthwaite's degrees of freedom for that combination. Where the combination
    falls below MS_seeds or MS_tasks alone (the residual larger than a main effect's mean square: no evidence of that
    effect), the larger of the two is used instead, with its own degrees of freedom: the mean's variance is at least
    the part each of them estimates. Where both are 0 (every seed's mean and every task's equal) but the values
    differ, MS_residual is, with its degrees of freedom: not a zero-width interval. In simulations of normal
    effects this covers the mean 0.944–0.993 of the time at
    5 x 5, 5 x 3 and 3 x 3, whatever share of the variance is the tasks' (``tests/test_benchmark_statistics.py``), where
    the t-interval over seeds of the task means covers it as rarely as 0.3 when tasks dominate: that interval is about
    these tasks only. It is normal theory: on skewed costs its upper end is too low (the results page gives a
    review's simulations)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 2:
        raise ValueError(f"need a (seeds, tasks) matrix of at least 2 x 2, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("the matrix has non-finite values")
    n_seeds, n_tasks = matrix.shape
    mean = matrix.mean()
    seed_means, task_means = matrix.mean(axis=1), matrix.mean(axis=0)
    ms_seeds = n_tasks * np.sum((seed_means - mean) ** 2) / (n_seeds - 1)
    ms_tasks = n_seeds * np.sum((task_means - mean) ** 2) / (n_tasks - 1)
    residuals = matrix - seed_means[:, None] - task_means[None, :] + mean
    df_residual = (n_seeds - 1) * (n_tasks - 1)
    ms_residual = np.sum(residuals**2) / df_residual
    if max(ms_seeds, ms_tasks, ms_residual) == 0:  # every value equal
        return float(mean), float(mean)
    combined = ms_seeds + ms_tasks - ms_residual
    # ``>=`` up to rounding: a grid with one non-zero value gives three equal mean squares, and the last digit of their
    # sum picked the formula (two published cells had the narrower one; reversing the seeds gave the other)
    if combined >= max(ms_seeds, ms_tasks) - 1e-9 * max(ms_seeds, ms_tasks, ms_residual):
        variance_sum = combined
        df = combined**2 / (ms_seeds**2 / (n_seeds - 1) + ms_tasks**2 / (n_tasks - 1) + ms_residual**2 / df_residual)
    elif max(ms_seeds, ms_tasks) > 1e-12 * ms_residual:  # the larger main effect's, with its degrees of freedom
        variance_sum, df = max((ms_seeds, n_seeds - 1), (ms_tasks, n_tasks - 1))
    else:  # every seed's mean and every task's equal, the values not: the residual's, not a zero-width interval
        variance_sum, df = ms_residual, df_residual
    half = stats.t.ppf(0.975, df) * math.sqrt(variance_sum / (n_seeds * n_tasks))
    return float(mean - half), float(mean + half)


def cell_matrices(cell: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """A table cell's evaluation costs and under-the-limit indicators as (seeds, tasks) matrices, or None when the
    cell is not a full grid of at least 2 x 2 (a seed without every task)."""
    seeds, tasks = sorted({r["seed"] for r in cell}), sorted({r["task"] for r in cell})
    if len(cell) != len(seeds) * len(tasks) or len(seeds) < 2 or len(tasks) < 2:
        return None
    cost, under = np.full((len(seeds), len(tasks)), np.nan), np.full((len(seeds), len(tasks)), np.nan)
    for r in cell:
        i, j = seeds.index(r["seed"]), tasks.index(r["task"])
        cost[i, j], under[i, j] = r["cost"], float(r["cost"] <= r["cost_limit"])
    return None if np.isnan(cost).any() else (cost, under)


def seeds_tasks_cell(cell: list[dict[str, Any]]) -> str:
    """The seeds × tasks bootstrap interval of a table cell's cost and share under the limit, or "" when the cell is
    not a full grid (a seed without every task)."""
    matrices = cell_matrices(cell)
    if matrices is None:
        return ""
    (cost_low, cost_high), (under_low, under_high) = (seeds_tasks_interval(matrix) for matrix in matrices)
    return f"{cost_low:.2f}–{cost_high:.2f}; {under_low:.2f}–{under_high:.2f}"


def random_effects_cell(cell: list[dict[str, Any]]) -> str:
    """The random-effects interval (:func:`random_effects_interval`) of a table cell's mean cost, or "" when the
    cell is not a full grid."""
    matrices = cell_matrices(cell)
    if matrices is None:
        return ""
    low, high = random_effects_interval(matrices[0])
    return f"{low:.2f}–{high:.2f}"


def summarise(rows: list[dict[str, Any]], training: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    settings = getattr(args, "cpo_adaptation", None)
    cpo_adaptation = (
        f"CPO adapts with Meta-CPO's cost margin and CG iterations, {settings}"
        if settings
        else "CPO adapts with its own cost_confidence 0 and 15 CG iterations, Meta-CPO with 1.0 and 10"
    )
    lines = [
        f"# {args.family}: adaptation on held-out tasks",
        "",
        f"Seeds {args.seeds}; {args.n_test_tasks} tasks per held-out set; budget {args.budget} env steps per trained "
        f"method; {args.meta_batch_size} tasks per meta-iteration; batches of {args.n_steps} env steps; K = "
        f"{args.n_updates} inner updates in meta-training and {args.n_updates} adaptation updates; adaptation trust "
        f"region {args.inner_target_kl} (CPO's training steps too; {cpo_adaptation}), meta trust region "
        f"{getattr(args, 'outer_target_kl', 0.01)}; evaluation of the stochastic policy on {args.eval_episodes} "
        "episode lengths of env steps per task and stage (at least that many episodes; more where episodes end early, "
        "see n_episodes in results.csv), on the same start states for every method.",
        "",
        "Return and cost: mean over seeds of the task means, ± the 95 % t-interval over seeds. Paid: the mean episode "
        "cost of the batch each update was computed from (what a user pays while adapting). Under: share of "
        "task-seed pairs whose evaluation cost is at or under the limit, with its 95 % Wilson interval (which treats "
        "the pairs as independent: every seed adapts to the same tasks). Seeds × tasks: 95 % intervals of the mean "
        "cost and of the share under the limit from a bootstrap that resamples the seeds and the tasks (10,000 "
        "resamples, percentile interval), which adds the spread between tasks but, with this few seeds and tasks, is "
        "too narrow itself (about 87 % coverage at 5 x 5 and 70 % at 3 x 3 in simulations) and often narrower than "
        "the t-interval: a check that a difference survives resampling the tasks, not a wider interval; a share of 1 "
        "(or 0) gives 1.00–1.00: it cannot see failures that did not occur (read the Wilson interval there). New "
        "seeds and tasks: a 95 % interval of the mean cost as an estimate for the family (new training seeds and new "
        "tasks of the same held-out kind) under a two-way random-effects model of seeds and tasks (ANOVA estimates, "
        "Satterthwaite's degrees of freedom; 0.944–0.993 coverage in simulations of normal effects at 3 x 3 to 5 x 5, "
        "its upper end too low on skewed costs), where the t-interval is about these tasks only.",
    ]
    seeds_of = {method: sorted({row["seed"] for row in rows if row["method"] == method}) for method in methods}
    fewer = {method: seeds for method, seeds in seeds_of.items() if seeds != sorted(args.seeds)}
    if fewer:  # an interrupted run, or merged files that hold some methods' seeds only: say so above the numbers
        described = "; ".join(f"{method}: seeds {seeds}" for method, seeds in fewer.items())
        lines += ["", f"**Not every method has every seed** ({described}): their intervals are over fewer seeds."]
    unrecorded = getattr(args, "unrecorded", [])
    if unrecorded:
        lines += ["", f"(Settings not recorded in the results files, shown at the script's defaults: {unrecorded}.)"]
    lines += [
        "",
        "| method | env steps | policy updates | train s |",
        "|---|---|---|---|",
    ]
    for method in methods:
        infos = [info for key, info in training.items() if key.startswith(f"{method}|")]
        steps, updates = np.mean([i["env_steps"] for i in infos]), np.mean([i["policy_updates"] for i in infos])
        lines.append(f"| {method} | {steps:.0f} | {updates:.0f} | {np.mean([i['train_seconds'] for i in infos]):.0f} |")
    for set_name in ("unseen", "shifted"):
        lines += [
            "",
            f"## {set_name} tasks",
            "",
            "| method | updates | return | cost | paid while adapting | under the limit | seeds × tasks: cost; under "
            "| cost, new seeds and tasks |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in methods:
            for k in range(args.n_updates + 1):
                cell = [r for r in rows if r["method"] == method and r["set"] == set_name and r["update"] == k]
                if not cell:
                    continue
                seeds = sorted({r["seed"] for r in cell})
                per_seed = {
                    key: np.array([np.mean([r[key] for r in cell if r["seed"] == s]) for s in seeds])
                    for key in ("return", "cost")
                }
                under_cell = under_limit_cell(cell)
                paid = "" if k == 0 else paid_cell(cell)
                lines.append(
                    f"| {method} | {k} | {mean_and_interval(per_seed['return'], 1)} "
                    f"| {mean_and_interval(per_seed['cost'], 2)} | {paid} "
                    f"| {under_cell} | {seeds_tasks_cell(cell)} "
                    f"| {random_effects_cell(cell)} |"
                )
    return "\n".join(lines) + "\n"


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What a results file records of the command line: the settings, without where and how it was written."""
    return {key: value for key, value in vars(args).items() if key not in ("out", "summarise_from", "overwrite", "unrecorded")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="Toy2DNav", choices=list_task_distributions())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", help="a subset of the methods (default: all)")
    parser.add_argument("--ablation", action="store_true", help="run the ablation variants instead of the methods")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<family>)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results an --out folder holds (they are refused otherwise)"
    )
    parser.add_argument(
        "--summarise-from",
        type=Path,
        nargs="+",
        help="only merge these results.json files (runs of other seeds) into --out's tables and plots",
    )
    parser.add_argument(
        "--env-kwargs", type=json.loads, default={}, help="family options as JSON, e.g. '{\"observe_hazards\": true}'"
    )
    for key, value in FAMILY_DEFAULTS["Toy2DNav"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value))
    args = parser.parse_args()
    if not isinstance(args.env_kwargs, dict) or "seed" in args.env_kwargs:
        parser.error("--env-kwargs must be a JSON object of family options without 'seed' (the seeds are --seeds)")
    for key, value in FAMILY_DEFAULTS.get(args.family, FAMILY_DEFAULTS["Toy2DNav"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    th.set_num_threads(1)
    catalogue = ABLATION if args.ablation else METHODS
    names = args.methods or (list(catalogue) if args.ablation else list(DEFAULT_METHODS))
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(catalogue)}")
    if len(set(names)) != len(names):
        parser.error(f"--methods repeats a method: {names} (its pairs would count twice in the intervals)")

    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds} (each would count as another seed in the intervals)")
    if args.summarise_from:
        configs = []
        for path in args.summarise_from:
            data = json.loads(path.read_text())
            rows += data["rows"]
            training.update(data["training"])
            configs.append(data.get("config", {}))
        keys = [(r["method"], r["seed"], r["set"], r["task"], r["update"]) for r in rows]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:  # a file given twice, or two runs of one method and seed: counted twice in the intervals
            parser.error(
                f"the merged files repeat {len(repeated)} rows (method, seed, set, task, update), e.g. {repeated[:3]}"
            )
        # The tables describe the data's protocol: the merged files must agree on it, and it replaces the flags'
        protocol = ["family", "env_kwargs", "cpo_adaptation", *FAMILY_DEFAULTS["Toy2DNav"]]
        configs = [{"cpo_adaptation": None, **config} for config in configs]  # runs before it: CPO's own settings
        args.cpo_adaptation = None
        partly = [key for key in protocol if any(key in c for c in configs) and not all(key in c for c in configs)]
        if partly:  # compared only where every file has it, the value of one file would stand for all
            parser.error(f"some merged files do not record {partly}: they cannot be checked to agree")
        args.unrecorded = [key for key in protocol if not any(key in config for config in configs)]
        shared = [key for key in protocol if all(key in config for config in configs)]
        differing = {
            key: [config[key] for config in configs]
            for key in shared
            if len({json.dumps(c[key], sort_keys=True) for c in configs}) > 1
        }
        if differing:
            parser.error(f"the merged files were run with different settings: {differing}")
        for key in shared:
            setattr(args, key, configs[0][key])
        args.seeds = sorted({row["seed"] for row in rows})
    out = args.out or Path("benchmarks/results") / args.family  # a merge's family is its files'
    merging_in_place = args.summarise_from is not None and [p.resolve() for p in args.summarise_from] == [
        (out / "results.json").resolve()
    ]
    if (out / "results.json").exists() and not (args.overwrite or merging_in_place):  # (the default is a published one)
        parser.error(f"{out} holds results already (results.json): give another --out, or --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_from:
        args.cpo_adaptation = ADAPTATION_SETTINGS
    for seed in [] if args.summarise_from else args.seeds:
        print(f"seed {seed}", flush=True)
        for name in names:
            model, info = train(name, catalogue[name], args, seed)
            training[f"{name}|{seed}"] = info
            rows += evaluate_method(name, model, make_task_distribution(args.family, seed=seed, **args.env_kwargs), args, seed)
            with open(out / "results.json", "w") as handle:  # after every method: a partial run keeps its numbers
                json.dump(
                    {"config": run_config(args), "training": training, "rows": rows},
                    handle,
                    default=str,
                )
    # A folder's own results.json again (a later version of the tables): its data, plots and footer stay as they are;
    # a folder without tables yet (a run stopped before its end) gets them, its csv and its plots
    in_place = merging_in_place and (out / "table.md").exists()
    footer = ""
    if in_place:
        old_lines = (out / "table.md").read_text().rstrip("\n").split("\n")
        ends = [i for i, line in enumerate(old_lines) if line.startswith("| ")]
        kept = [line for line in old_lines[ends[-1] + 1 :] if not line.startswith("(Tables summarised again")] if ends else []
        footer = "\n".join(kept).strip()
    if not merging_in_place:
        with open(out / "results.json", "w") as handle:
            json.dump({"config": run_config(args), "training": training, "rows": rows}, handle, default=str)
    if not in_place:
        with open(out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    table = summarise(rows, training, args)
    machine = f"{platform.machine()}, Python {platform.python_version()}, torch {th.__version__} (1 thread)"
    if in_place:
        table += f"\n{footer}\n\n(Tables summarised again from this folder's results.json by a later version of the script.)\n"
    elif merging_in_place:
        table += f"\n{machine}; summarised from this folder's results.json (train s: each run's own wall time).\n"
    elif args.summarise_from:
        table += f"\n{machine}; merged from {len(args.summarise_from)} result files (train s: each run's own wall time).\n"
    else:
        table += f"\n{machine}; {time.perf_counter() - start:.0f} s in all.\n"
    (out / "table.md").write_text(table)
    if in_place:
        print(table)
        return
    for set_name in ("unseen", "shifted"):
        plot_adaptation_curves(
            [r for r in rows if r["set"] == set_name],
            out / f"adaptation_{set_name}.png",
            title=f"{args.family}, {set_name} held-out tasks (stochastic policy)",
        )
    print(table)


if __name__ == "__main__":
    main()
