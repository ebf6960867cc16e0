"""``learn()`` throughput of two versions of the library, interleaved: the before/after of a change, in one run.

Each round runs one process per version (``--before`` and ``--after``: source trees of the package, e.g. a ``git
worktree`` of the old commit and the working tree), alternating, and each process times MetaCPO (first and second
order) and CPO ``learn()`` on the same family, seeds and tasks in CPU seconds of its own process (torch and numpy's
BLAS on one thread). It prints every round and the medians, and the ratio after / before of each: on a shared
machine whose speed varies between runs, the interleaving is what makes the ratio mean something.

    git worktree add ../before <old commit>
    python benchmarks/learn_ab.py --before ../before --after . | tee benchmarks/results/throughput/ab.txt

With ``--env-id`` it times CPO alone, with its defaults (1 env, 2048 steps per update) on that standard id, over
``--iterations`` updates after a warm-up one:

    python benchmarks/learn_ab.py --before ../before --after . --env-id SafetyPointGoal1Gymnasium-v0 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def timed_learn(model: Any, steps: int) -> tuple[float, dict[str, float]]:
    """Env steps per CPU second of ``model.learn(steps)`` (continuing its run), and its CPU seconds by phase."""
    from sb3_metacpo.common.profiling import phase_times

    with phase_times(time.process_time) as times:
        start = time.process_time()
        model.learn(steps, reset_num_timesteps=False)
        seconds = time.process_time() - start
    return steps / seconds, times


def measure(family: str, tasks: int, n_steps: int, iterations: int) -> dict[str, float]:
    """Env steps per CPU second of MetaCPO (first and second order; ``tasks`` tasks of ``n_steps`` steps, one inner
    update) and of CPO on ``tasks`` envs of the family's training tasks, after one warm-up iteration each; and, for
    each, the speed of its conjugate gradients alone (iterations or updates per CPU second of that phase: a change to
    one phase shows there beyond the noise of the whole)."""
    import torch
    from threadpoolctl import threadpool_limits

    from sb3_metacpo import CPO, MetaCPO
    from sb3_metacpo.tasks import make_task_distribution

    torch.set_num_threads(1)
    per_iteration = 2 * tasks * n_steps  # the pre- and post-adaptation batches
    speeds = {}

    def timed(label: str, model: Any, steps: int, updates: int) -> None:
        speeds[label], times = timed_learn(model, steps)
        solves = sum(seconds for name, seconds in times.items() if name.endswith("conjugate_gradient"))
        speeds[f"  {label}: conjugate gradient, updates/s"] = updates / solves

    with threadpool_limits(1):
        for mode in ("first_order", "second_order"):
            dist = make_task_distribution(family, seed=0)
            model = MetaCPO(
                "MlpPolicy", dist, meta_batch_size=tasks, n_inner_updates=1, n_steps=n_steps, meta_gradient=mode, seed=0
            )
            model.learn(per_iteration)
            timed(f"MetaCPO, {mode.replace('_', ' ')}", model, iterations * per_iteration, iterations)
        cpo = CPO("MlpPolicy", make_task_distribution(family, seed=0), n_envs=tasks, n_steps=n_steps, seed=0)
        cpo.learn(tasks * n_steps)
        timed("CPO", cpo, 2 * iterations * tasks * n_steps, 2 * iterations)
    return speeds


def measure_cpo(env_id: str, updates: int) -> dict[str, float]:
    """Env steps per CPU second of CPO with its defaults on the standard id ``env_id``, over ``updates`` updates after
    a warm-up one, and the speed of each phase of an update (updates per CPU second of the phase alone: a change to
    one phase shows there beyond the noise of the whole)."""
    import torch
    from threadpoolctl import threadpool_limits

    from sb3_metacpo import CPO

    torch.set_num_threads(1)
    with threadpool_limits(1):
        cpo = CPO("MlpPolicy", env_id, seed=0)
        cpo.learn(cpo.n_steps)
        speed, times = timed_learn(cpo, updates * cpo.n_steps)
    speeds = {f"CPO on {env_id}": speed}
    for phase in ("sampling", "advantages", "cpo_update", "critic_training"):
        speeds[f"  {phase}, updates/s"] = updates / times[phase]
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="source tree of the old version")
    parser.add_argument("--after", type=Path, help="source tree of the new version")
    parser.add_argument("--family", default="HalfCheetahVelocity")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--n-steps", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env-id", help="time only CPO, with its defaults, on this standard id")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.env_id:
            print(json.dumps(measure_cpo(args.env_id, args.iterations)))
        else:
            print(json.dumps(measure(args.family, args.tasks, args.n_steps, args.iterations)))
        return
    if args.before is None or args.after is None:
        parser.error("--before and --after name the two source trees")
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    if args.env_id:
        print(f"CPO on {args.env_id} with its defaults, {args.iterations} timed updates; env steps per CPU second")
    else:
        print(
            f"{args.family}: M = {args.tasks} tasks x {args.n_steps} steps, {args.iterations} timed iterations; "
            "env steps per CPU second"
        )
    for round_index in range(args.rounds):
        for label, tree in (("before", args.before), ("after", args.after)):
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
            command = [sys.executable, __file__, "--child", "--family", args.family, "--tasks", str(args.tasks)]
            command += ["--n-steps", str(args.n_steps), "--iterations", str(args.iterations)]
            command += ["--env-id", args.env_id] if args.env_id else []
            line = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
            speeds = json.loads(line.strip().splitlines()[-1])
            results[label].append(speeds)
            print(f"round {round_index} {label:<6} " + "  ".join(f"{k}: {v:.1f}" for k, v in speeds.items()), flush=True)
    width = max(26, *(len(key) for key in results["before"][0]))
    print(f"\n{'median':<{width}} {'before':>8} {'after':>8} {'after / before':>15}")
    for key in results["before"][0]:
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        print(f"{key:<{width}} {before:>8.1f} {after:>8.1f} {after / before:>15.3f}")


if __name__ == "__main__":
    main()
