"""Wall time of one MetaCPO meta-iteration on every task family, split into sampling and the rest (the updates).

python benchmarks/meta_iteration_time.py                       # all families, first and second order
python benchmarks/meta_iteration_time.py --families Toy2DNav --iterations 5
"""

from __future__ import annotations

import argparse
import platform
import time

import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.common.sampler import TaskSampler
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list_task_distributions(), choices=list_task_distributions())
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--n-inner-updates", type=int, default=1)
    parser.add_argument("--episodes-per-batch", type=int, default=1, help="n_steps = this x episode length")
    parser.add_argument("--iterations", type=int, default=2, help="timed meta-iterations (after one warm-up)")
    args = parser.parse_args()
    th.set_num_threads(1)
    print(
        f"{platform.machine()}, torch {th.__version__}, 1 torch thread, M={args.meta_batch_size} tasks, "
        f"K={args.n_inner_updates} inner updates, {args.episodes_per_batch} episode(s) per batch, DummyVecEnv"
    )
    columns = ("steps/iter", "s/iter", "sampling", "updates", "steps/s")
    print(f"{'family':<22} {'meta_gradient':<13} " + " ".join(f"{c:>10}" for c in columns))
    for name in args.families:
        for mode in ("first_order", "second_order"):
            dist = make_task_distribution(name, seed=0)
            n_steps = args.episodes_per_batch * dist.max_episode_steps
            model = MetaCPO(
                "MlpPolicy",
                dist,
                meta_batch_size=args.meta_batch_size,
                n_inner_updates=args.n_inner_updates,
                n_steps=n_steps,
                meta_gradient=mode,
                seed=0,
            )
            per_iteration = args.meta_batch_size * (args.n_inner_updates + 1) * n_steps
            model.learn(per_iteration)  # warm-up: builds the envs
            sampling = 0.0
            original = TaskSampler.collect

            def timed_collect(self, *a, original=original, **k):  # type: ignore[no-untyped-def]
                nonlocal sampling
                start = time.perf_counter()
                result = original(self, *a, **k)
                sampling += time.perf_counter() - start
                return result

            TaskSampler.collect = timed_collect  # type: ignore[method-assign]
            start = time.perf_counter()
            model.learn(per_iteration * args.iterations, reset_num_timesteps=True)
            total = (time.perf_counter() - start) / args.iterations
            TaskSampler.collect = original  # type: ignore[method-assign]
            sampling /= args.iterations
            updates = total - sampling
            values = (per_iteration, f"{total:.2f}", f"{sampling:.2f}", f"{updates:.2f}", f"{per_iteration / total:.0f}")
            print(f"{name:<22} {mode:<13} " + " ".join(f"{v:>10}" for v in values))
            model.sampler.close()


if __name__ == "__main__":
    main()
