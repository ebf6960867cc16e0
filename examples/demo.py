"""Show a task distribution: build training and held-out tasks, roll each out with a random policy, print a table.

    python examples/demo.py                       # PointButtonHazard, 3 training + 2 held-out tasks
    python examples/demo.py --family Toy2DNav --episodes 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sb3_metacpo.common.sampler import TaskSampler
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="PointButtonHazard", choices=list_task_distributions())
    parser.add_argument("--n-train", type=int, default=3, help="training tasks to show")
    parser.add_argument("--n-test", type=int, default=2, help="held-out tasks to show")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist = make_task_distribution(args.family, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    _, action_space = dist.spaces

    def random_policy(obs: np.ndarray, task_indices: np.ndarray) -> np.ndarray:
        return rng.uniform(action_space.low, action_space.high, (len(obs), *action_space.shape))

    print(f"{dist.name}: {dist.max_episode_steps}-step episodes, suggested cost limit {dist.default_cost_limit:g}")
    print(f"training ranges: {', '.join(f'{k} {v}' for k, v in dist.train_ranges.items())}")
    print(f"held-out ranges: {', '.join(f'{k} {v}' for k, v in dist.test_ranges.items())}\n")
    header = f"{'split':<8} {'task':<64} {'ep reward':>10} {'ep cost':>8} {'steps/s':>8}"
    print(header)
    print("-" * len(header))
    sampler = TaskSampler(dist, n_envs=1, seed=args.seed)
    rows = [("train", task) for task in dist.sample(args.n_train)] + [("held-out", t) for t in dist.test_tasks(args.n_test)]
    for split, task in rows:
        start = time.perf_counter()
        (batch,) = sampler.collect([task], random_policy, args.episodes * dist.max_episode_steps)
        elapsed = time.perf_counter() - start
        print(
            f"{split:<8} {task.short():<64} {batch.episode_rewards.mean():>10.2f} "
            f"{batch.episode_costs.mean():>8.1f} {batch.n_steps / elapsed:>8.0f}"
        )
    sampler.close()
    print("\nsteps/s include the episode resets and a random policy; ep reward/cost are means over episodes.")


if __name__ == "__main__":
    main()
