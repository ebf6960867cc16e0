"""The learning check of ``tests/test_learning.py`` (Toy2DNav, 120k steps of MetaCPO, one adaptation update of 1,000
steps on five unseen tasks, 30 stochastic evaluation episodes each) over several training seeds: the return before
and after adaptation, its gain, and the cost after adaptation. For comparing two versions of the library on more
than the test's one seed (run it once per version, e.g. with ``PYTHONPATH`` at a worktree of the other commit).

    python benchmarks/learning_seeds.py 0 1 2 3 4 5
"""

from __future__ import annotations

import sys

import numpy as np

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.evaluation import meta_evaluate

N_UPDATES, N_STEPS, EVAL_EPISODES = 1, 1000, 30  # tests/test_learning.py's


def main() -> None:
    for seed in [int(arg) for arg in sys.argv[1:]] or [0]:
        dist = make_task_distribution("Toy2DNav", seed=0)
        tasks = dist.unseen_tasks(5)
        kwargs = dict(meta_batch_size=4, n_inner_updates=N_UPDATES, n_steps=N_STEPS, inner_target_kl=0.02, seed=seed)
        model = MetaCPO("MlpPolicy", dist, **kwargs).learn(120_000)
        records = meta_evaluate(model, tasks, N_UPDATES, N_STEPS, n_eval_episodes=EVAL_EPISODES, deterministic=False)
        before = np.mean([r.ep_rew_mean for r in records if r.n_updates == 0])
        after = np.mean([r.ep_rew_mean for r in records if r.n_updates == N_UPDATES])
        costs = [r.ep_cost_mean for r in records if r.n_updates == N_UPDATES]
        under = sum(cost <= model.effective_cost_limit for cost in costs)
        print(
            f"seed {seed}: before {before:.2f} after {after:.2f} gain {after - before:+.2f} cost {np.mean(costs):.2f} "
            f"under {under}/5",
            flush=True,
        )


if __name__ == "__main__":
    main()
