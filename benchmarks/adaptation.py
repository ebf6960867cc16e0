"""The adaptation benchmark: Meta-CPO against Meta-TRPO, multi-task CPO pretraining and CPO from scratch.

For every seed, Meta-CPO, Meta-TRPO and CPO (pretrained on the training tasks, a new task drawn at every episode)
train with the same env-step budget; CPO from scratch starts from a random policy. Each then adapts to the same N
held-out tasks with the same number of CPO (Meta-TRPO: TRPO) updates of the same batch size and trust region,
and is evaluated on the same episode seeds before adaptation and after every update.

    python benchmarks/adaptation.py --family Toy2DNav --seeds 0 1 2
    python benchmarks/adaptation.py --family PointButtonHazard --seeds 0 1

Outputs in ``--out`` (default ``benchmarks/results/<family>``): ``results.csv`` and ``results.json`` (every number
and the configuration), ``table.md`` (mean and spread over tasks and seeds after 0, 1 and all updates),
``adaptation.png`` (the adaptation curves with the cost limit) and ``adaptation.gif`` (one held-out task after
adaptation, the trained methods side by side). Trained models go to ``runs/adaptation/<family>``; ``--reuse``
loads them instead of training again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import textwrap
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering for the GIFs

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch as th
from PIL import Image, ImageDraw
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo import CPO, MetaCPO, MetaTRPO, make_task_distribution
from sb3_metacpo.common.evaluation import evaluate_safe_policy
from sb3_metacpo.tasks import Task, TaskDistribution, list_task_distributions

METHODS = ("Meta-CPO", "Meta-TRPO", "CPO-pretrain", "CPO-scratch")
META = {"Meta-CPO": MetaCPO, "Meta-TRPO": MetaTRPO}
#: Budgets that finish on a 2-core machine (see the results page for the measured times).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "Toy2DNav": {"budget": 150_000, "meta_batch_size": 8, "n_steps": 400, "n_test_tasks": 5, "eval_episodes": 10},
    "PointButtonHazard": {"budget": 200_000, "meta_batch_size": 4, "n_steps": 1000, "n_test_tasks": 3, "eval_episodes": 3},
    "HalfCheetahVelocity": {"budget": 200_000, "meta_batch_size": 8, "n_steps": 400, "n_test_tasks": 3, "eval_episodes": 3},
}
EVAL_SEED = 10_000  # held-out task i is evaluated on the episodes of seed EVAL_SEED + i, by every method


def train(method: str, args: argparse.Namespace, seed: int, models: Path) -> Path | None:
    """Train ``method`` with the env-step budget (CPO-scratch trains nothing); returns the saved model's path."""
    if method == "CPO-scratch":
        return None
    path = models / f"{method}_seed{seed}.zip"
    if args.reuse and path.exists():
        return path
    distribution = make_task_distribution(args.family, seed=seed)
    start = time.perf_counter()
    if method in META:
        model: Any = META[method](
            "MlpPolicy",
            distribution,
            meta_batch_size=args.meta_batch_size,
            n_steps=args.n_steps,
            inner_target_kl=args.inner_target_kl,
            seed=seed,
        )
    else:
        model = CPO("MlpPolicy", distribution, n_steps=args.n_steps, n_envs=args.meta_batch_size, seed=seed)
    model.learn(args.budget, progress_bar=args.progress)
    model.save(path)
    args.train_seconds[f"{method}_seed{seed}"] = time.perf_counter() - start
    print(f"trained {method} seed {seed}: {model.num_timesteps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def task_vec_env(distribution: TaskDistribution, task: Task, seed: int) -> DummyVecEnv:
    env = DummyVecEnv([lambda: distribution.make_env(task)])
    env.seed(seed)
    return env


def evaluate(model: Any, distribution: TaskDistribution, task: Task, task_index: int, args: argparse.Namespace) -> tuple:
    env = task_vec_env(distribution, task, EVAL_SEED + task_index)
    reward, _, cost, _ = evaluate_safe_policy(model, env, args.eval_episodes, deterministic=args.deterministic)
    env.close()
    return reward, cost


def adaptation_curve(
    method: str, path: Path | None, distribution: TaskDistribution, task: Task, seed: int, args: argparse.Namespace
) -> Any:
    """Yield the model after 0, 1, ..., ``n_updates`` adaptation updates on ``task`` (acting with the adapted policy)."""
    if method in META:
        model = META[method].load(path, env=distribution)
        for _, params in model.adaptation_steps(task, args.n_updates, args.n_steps):
            model.policy.set_actor_override(params)
            yield model
        return
    limit = distribution.default_cost_limit
    if path is None:
        env = task_vec_env(distribution, task, seed)
        model = CPO("MlpPolicy", env, n_steps=args.n_steps, target_kl=args.inner_target_kl, cost_limit=limit, seed=seed)
    else:
        env = task_vec_env(distribution, task, seed)
        model = CPO.load(path, env=env, n_steps=args.n_steps, target_kl=args.inner_target_kl)
    yield model
    for k in range(args.n_updates):
        model.learn(args.n_steps, reset_num_timesteps=k == 0)
        yield model


def record_episode(model: Any, distribution: TaskDistribution, task: Task, label: str, args: argparse.Namespace) -> list:
    """Frames of one episode of ``model`` on ``task`` (the first evaluation episode's seed), labelled."""
    env = distribution.make_env(task, render_mode="rgb_array")
    obs, _ = env.reset(seed=EVAL_SEED)
    frames, done, t = [], False, 0
    while not done:
        if t % args.gif_every == 0:
            image = Image.fromarray(env.render())
            image = image.resize((args.gif_size, args.gif_size))
            draw = ImageDraw.Draw(image)
            draw.rectangle((0, 0, args.gif_size - 1, 13), fill=(0, 0, 0))  # a label band readable on any background
            draw.rectangle((0, 0, args.gif_size - 1, args.gif_size - 1), outline=(0, 0, 0))
            draw.text((4, 1), label, fill=(255, 255, 255))
            frames.append(np.asarray(image))
        action, _ = model.predict(obs, deterministic=args.deterministic)
        obs, _, terminated, truncated, _ = env.step(action)
        done, t = terminated or truncated, t + 1
    env.close()
    return frames


def gif_only(args: argparse.Namespace) -> None:
    """Adapt every method to the first held-out task (first seed) and write the side-by-side GIF."""
    models, seed = Path("runs") / "adaptation" / args.family, args.seeds[0]
    distribution = make_task_distribution(args.family, seed=seed)
    task = distribution.test_tasks(1)[0]
    frames = {}
    for method in args.methods:
        th.manual_seed(seed)
        path = train(method, args, seed, models)
        *_, model = adaptation_curve(method, path, distribution, task, seed, args)
        frames[method] = record_episode(model, distribution, task, method, args)
    write_gif(frames, args.out / "adaptation.gif")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = Path("runs") / "adaptation" / args.family
    models.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    gif_frames: dict[str, list] = {}
    for seed in args.seeds:
        distribution = make_task_distribution(args.family, seed=seed)
        tasks = distribution.test_tasks(args.n_test_tasks)
        limit = distribution.default_cost_limit
        for method in args.methods:
            th.manual_seed(seed)
            path = train(method, args, seed, models)
            if args.train_only:
                continue
            for task_index, task in enumerate(tasks):
                for k, model in enumerate(adaptation_curve(method, path, distribution, task, seed, args)):
                    reward, cost = evaluate(model, distribution, task, task_index, args)
                    rows.append(
                        {
                            "family": args.family,
                            "method": method,
                            "seed": seed,
                            "task": task_index,
                            "task_params": task.short(),
                            "updates": k,
                            "return": reward,
                            "cost": cost,
                            "cost_limit": limit,
                            "under_limit": cost <= limit,
                        }
                    )
                    if args.gif and seed == args.seeds[0] and task_index == 0 and k == args.n_updates:
                        gif_frames[method] = record_episode(model, distribution, task, method, args)
                print(
                    f"{method} seed {seed} task {task_index}: "
                    + ", ".join(
                        f"{r['return']:.1f}/{r['cost']:.1f}"
                        for r in rows
                        if r["method"] == method and r["seed"] == seed and r["task"] == task_index
                    ),
                    flush=True,
                )
    if gif_frames:
        write_gif(gif_frames, args.out / "adaptation.gif")
    return rows


def write_gif(frames: dict[str, list], path: Path) -> None:
    """Side by side, one panel per method; shorter episodes hold their last frame."""
    length = max(len(f) for f in frames.values())
    padded = [f + [f[-1]] * (length - len(f)) for f in frames.values()]
    imageio.mimsave(path, [np.hstack(panels) for panels in zip(*padded, strict=True)], duration=0.1, loop=0)


def summarise(rows: list[dict[str, Any]], methods: list[str], n_updates: int) -> str:
    """Markdown table: mean ± std over tasks and seeds of return and cost, and the fraction under the limit."""
    checkpoints = sorted({0, 1, n_updates})
    lines = [
        "| method | updates | return | cost | under limit |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        for k in checkpoints:
            cell = [r for r in rows if r["method"] == method and r["updates"] == k]
            if not cell:
                continue
            returns, costs = np.array([r["return"] for r in cell]), np.array([r["cost"] for r in cell])
            n_under = sum(r["under_limit"] for r in cell)
            lines.append(
                f"| {method} | {k} | {returns.mean():.1f} ± {returns.std():.1f} | {costs.mean():.2f} ± {costs.std():.2f} "
                f"| {n_under / len(cell):.2f} ({n_under}/{len(cell)}) |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    limit = rows[0]["cost_limit"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        updates = sorted({r["updates"] for r in mine})
        for axis, key in zip(axes, ("return", "cost"), strict=True):
            values = [np.array([r[key] for r in mine if r["updates"] == k]) for k in updates]
            mean, std = np.array([v.mean() for v in values]), np.array([v.std() for v in values])
            axis.plot(updates, mean, "-o", label=method)
            axis.fill_between(updates, mean - std, mean + std, alpha=0.15)
    axes[1].axhline(limit, color="red", linestyle=":", label="cost limit")
    for axis, key in zip(axes, ("episode return", "episode cost"), strict=True):
        axis.set_xlabel("adaptation updates")
        axis.set_ylabel(key)
        axis.set_xticks(sorted({r["updates"] for r in rows}))
    axes[1].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="Toy2DNav", choices=list_task_distributions())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=int, help="env steps of training for each trained method")
    parser.add_argument("--meta-batch-size", type=int, help="tasks per meta-iteration (CPO-pretrain: envs)")
    parser.add_argument("--n-steps", type=int, help="env steps per task batch: inner updates and adaptation updates")
    parser.add_argument("--inner-target-kl", type=float, default=0.05, help="trust region of every adaptation update")
    parser.add_argument("--n-test-tasks", type=int)
    parser.add_argument("--n-updates", type=int, default=3, help="adaptation updates per held-out task")
    parser.add_argument("--eval-episodes", type=int)
    parser.add_argument("--deterministic", action="store_true", help="evaluate the mean action (default: stochastic)")
    parser.add_argument("--no-gif", dest="gif", action="store_false")
    parser.add_argument("--gif-every", type=int, default=8, help="keep every n-th frame")
    parser.add_argument("--gif-size", type=int, default=128, help="panel size in pixels")
    parser.add_argument("--reuse", action="store_true", help="load trained models from runs/ instead of training")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train and save the models, then stop (run seeds in "
        "parallel processes, then adapt and evaluate them all with --reuse)",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars during training")
    parser.add_argument("--gif-only", action="store_true", help="only redo the GIF (first seed, first task; with --reuse)")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="rewrite table.md and adaptation.png from --out's results.json without running anything",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for key, value in FAMILY_DEFAULTS.get(args.family, FAMILY_DEFAULTS["Toy2DNav"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or Path("benchmarks") / "results" / args.family
    args.out.mkdir(parents=True, exist_ok=True)
    args.train_seconds = {}
    th.set_num_threads(1)  # small networks: one thread is fastest and leaves the other core to the simulator

    if args.gif_only:
        gif_only(args)
        return
    if args.summarise_only:
        with open(args.out / "results.json") as handle:
            results = json.load(handle)
        rows, seconds = results["rows"], results["seconds"]
        for key in (
            "family",
            "methods",
            "budget",
            "seeds",
            "n_test_tasks",
            "n_updates",
            "n_steps",
            "eval_episodes",
            "deterministic",
        ):
            setattr(args, key, results["config"][key])
    else:
        start = time.perf_counter()
        rows = run(args)
        if args.train_only:
            return
        seconds = time.perf_counter() - start
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        with open(args.out / "results.json", "w") as handle:
            json.dump({"config": config, "seconds": seconds, "machine": _machine(), "rows": rows}, handle, indent=1)
        with open(args.out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    table = summarise(rows, args.methods, args.n_updates)
    header = (
        f"{args.family}: budget {args.budget} env steps per trained method, {len(args.seeds)} seeds x "
        f"{args.n_test_tasks} held-out tasks, {args.n_updates} adaptation updates of {args.n_steps} steps, "
        f"{args.eval_episodes} evaluation episodes ({'mean action' if args.deterministic else 'stochastic policy'}), "
        f"cost limit {rows[0]['cost_limit']:g}"
    )
    (args.out / "table.md").write_text(f"{header}\n\n{table}\n")
    plot(rows, args.methods, args.out / "adaptation.png", header)
    print(f"\n{header}\n\n{table}\n\ntotal {seconds:.0f} s; outputs in {args.out}")


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": th.__version__,
    }


if __name__ == "__main__":
    main()
