"""Meta-train MetaCPO on a task distribution, adapt to held-out tasks, print a table and plot the adaptation curves.

    python examples/demo.py                                  # Toy2DNav, a few minutes on 2 CPU cores
    python examples/demo.py --family HalfCheetahVelocity --timesteps 400000

Outputs go to ``--out`` (default ``runs/demo``): the trained model and ``adaptation.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.common.evaluation import AdaptationRecord, meta_evaluate
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution


def plot(records: list[AdaptationRecord], baseline: list[AdaptationRecord], cost_limit: float, path: str) -> None:
    tasks = list(dict.fromkeys(record.task for record in records))
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), sharex=True, squeeze=False)
    for column, task in enumerate(tasks):
        for label, rows, style in (("MetaCPO", records, "-o"), ("random init", baseline, "--s")):
            mine = [row for row in rows if row.task == task]
            updates = [row.n_updates for row in mine]
            axes[0, column].plot(updates, [row.ep_rew_mean for row in mine], style, label=label)
            axes[1, column].plot(updates, [row.ep_cost_mean for row in mine], style, label=label)
        axes[1, column].axhline(cost_limit, color="red", linestyle=":", label="cost limit")
        axes[0, column].set_title(f"held-out task {column + 1}", fontsize=10)
        axes[1, column].set_xlabel("adaptation updates")
        axes[1, column].set_xticks(sorted({row.n_updates for row in records}))
    axes[0, 0].set_ylabel("episode return")
    axes[1, 0].set_ylabel("episode cost")
    axes[1, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="Toy2DNav", choices=list_task_distributions())
    parser.add_argument("--timesteps", type=int, default=300_000, help="meta-training env steps")
    parser.add_argument("--n-test", type=int, default=3, help="held-out tasks to adapt to")
    parser.add_argument("--n-updates", type=int, default=3, help="adaptation updates per held-out task")
    parser.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes after each update")
    parser.add_argument("--stochastic", action="store_true", help="evaluate the stochastic policy (default: its mean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "demo"))
    args = parser.parse_args()
    th.set_num_threads(1)  # small networks: one thread is fastest and leaves the other core to the simulator
    os.makedirs(args.out, exist_ok=True)

    dist = make_task_distribution(args.family, seed=args.seed)
    n_steps = 4 * dist.max_episode_steps
    kwargs = dict(meta_batch_size=8, n_inner_updates=1, n_steps=n_steps, seed=args.seed)
    model = MetaCPO("MlpPolicy", dist, **kwargs)
    print(f"Meta-training MetaCPO on {dist.name} for {args.timesteps} env steps (cost limit {model.effective_cost_limit:g})")
    start = time.perf_counter()
    model.learn(args.timesteps, progress_bar=True)
    print(f"meta-training took {time.perf_counter() - start:.0f} s")
    model.save(os.path.join(args.out, f"metacpo_{dist.name}"))

    tasks = dist.test_tasks(args.n_test)
    policy = "stochastic policy" if args.stochastic else "policy's mean action (predict(deterministic=True))"
    print(f"\nAdapting to {len(tasks)} held-out tasks: {args.n_updates} CPO updates of {n_steps} steps each;")
    print(f"evaluating the {policy} on {args.eval_episodes} episodes before and after every update")
    deterministic = not args.stochastic
    records = meta_evaluate(model, tasks, args.n_updates, n_steps, args.eval_episodes, deterministic, progress_bar=True)
    random_init = MetaCPO("MlpPolicy", make_task_distribution(args.family, seed=args.seed), **kwargs)
    baseline = meta_evaluate(random_init, tasks, args.n_updates, n_steps, args.eval_episodes, deterministic, progress_bar=True)

    limit = model.effective_cost_limit
    header = (
        f"{'held-out task':<62} {'return before':>13} {'after':>7} {'cost before':>11} {'after':>6} {'limit':>5}"
        f" | {'random init: return':>19} {'cost':>5}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for task in tasks:
        rows = [record for record in records if record.task == task]
        baseline_after = [record for record in baseline if record.task == task][-1]
        before, after = rows[0], rows[-1]
        print(
            f"{task.short():<62} {before.ep_rew_mean:>13.1f} {after.ep_rew_mean:>7.1f} "
            f"{before.ep_cost_mean:>11.2f} {after.ep_cost_mean:>6.2f} {limit:>5g}"
            f" | {baseline_after.ep_rew_mean:>19.1f} {baseline_after.ep_cost_mean:>5.2f}"
        )
    final = [record for record in records if record.n_updates == args.n_updates]
    final_baseline = [record for record in baseline if record.n_updates == args.n_updates]
    print(
        f"\nafter {args.n_updates} updates: MetaCPO return {np.mean([r.ep_rew_mean for r in final]):.1f}, cost "
        f"{np.mean([r.ep_cost_mean for r in final]):.2f}, under the limit on {sum(r.ep_cost_mean <= limit for r in final)}"
        f"/{len(final)} tasks; a randomly initialised policy adapted the same way: return "
        f"{np.mean([r.ep_rew_mean for r in final_baseline]):.1f}, cost {np.mean([r.ep_cost_mean for r in final_baseline]):.2f}"
    )
    path = os.path.join(args.out, "adaptation.png")
    plot(records, baseline, limit, path)
    print(f"adaptation curves saved to {path}")


if __name__ == "__main__":
    main()
