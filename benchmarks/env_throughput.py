"""Raw env throughput of every task family: random actions through the sampler (DummyVecEnv), resets included.

python benchmarks/env_throughput.py                   # all families, 1 env, 2 episodes per task
python benchmarks/env_throughput.py --n-envs 2 --families Toy2DNav PointButtonHazard
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from sb3_metacpo.common.rollouts import RolloutSampler
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution


def random_actions(shape: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    return lambda observations, _tasks: rng.uniform(-1, 1, (len(observations), *shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list_task_distributions(), choices=list_task_distributions())
    parser.add_argument("--n-envs", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per env per measurement")
    parser.add_argument("--tasks", type=int, default=2, help="training tasks measured (one after the other)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, n_envs={args.n_envs}")
    print(f"{'family':<22} {'episode':>8} {'steps':>8} {'seconds':>8} {'steps/s':>9}")
    for name in args.families:
        dist = make_task_distribution(name, seed=0)
        act = random_actions(dist.spaces[1].shape)
        sampler = RolloutSampler(dist, n_envs=args.n_envs, seed=0)
        sampler.collect(dist.sample(1), act, 1)  # warm-up
        steps, start = 0, time.perf_counter()
        for task in dist.sample(args.tasks):
            (batch,) = sampler.collect([task], act, args.episodes * args.n_envs * dist.max_episode_steps)
            steps += batch.n_steps
        elapsed = time.perf_counter() - start
        sampler.close()
        print(f"{name:<22} {dist.max_episode_steps:>8} {steps:>8} {elapsed:>8.2f} {steps / elapsed:>9.0f}")


if __name__ == "__main__":
    main()
