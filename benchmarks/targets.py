"""The performance issue's targets in one table, each figure measured in this run.

Every time is CPU seconds of this process (``time.process_time``; torch and numpy's BLAS on one thread, envs
in-process): the machine is shared, and CPU time is what the code costs whatever else runs. Each ratio is measured
within this run against a baseline of the same run:

* raw env steps/s with random actions, ours (``FAST_STEP`` and ``FAST_RESET``) against stock safety-gymnasium on the
  same task, seed and actions, resets at episode ends included, with physics alone (``mj_step`` with the same frame
  skip on the same model) as the limit (``env_throughput.measure_fast_step``);
* MetaCPO's ``learn()`` (first and second order) on PointGoalHazard and HalfCheetahVelocity, 4 tasks of one episode
  per batch, K = 1, as a ratio of the raw env on meta-training's own workload (new tasks every iteration, a reset per
  batch; ``throughput.measure_meta``: 3 interleaved rounds of both modes, the limit measured before every run and
  after the last, each run against the mean of the two measurements around it, since the host's speed drifts; the
  median ratio decides, each round's is printed), with the *ceiling*: the ratio if everything
  but the env and the updates' matrix products were free (the products of the timed iterations, replayed alone:
  ``throughput.matrix_product_seconds``), and the most that batching the M tasks' updates could give (the per-task
  phases at 1/M of their time: ``throughput.batched_bound``);
* CPO's ``learn()`` on ``SafetyPointGoal1Gymnasium-v0`` (the defaults: 1 env, 2048 steps per update) as a ratio of
  the raw env built by the library, with sb3-contrib TRPO on the library's env and on the stock env for comparison
  (``throughput.measure_standard_env``).

    python benchmarks/targets.py | tee benchmarks/results/throughput/targets.txt

``benchmarks/throughput.py`` and ``benchmarks/env_throughput.py`` print the full tables behind each row (phases,
scaling, resets, the standard ids).
"""

from __future__ import annotations

import argparse
import platform
import time

import env_throughput
import mujoco
import numpy as np
import throughput
import torch as th
from threadpoolctl import threadpool_limits

from sb3_metacpo.tasks import make_task_distribution

#: (family, ours / stock at least) of the raw env targets.
ENV_TARGETS = (("PointButtonHazard", 4.0), ("PointGoalHazard", 3.0), ("CarCircle", 3.0))
#: (family, first-order and second-order ratio targets) of MetaCPO's learn() against the raw env.
META_TARGETS = (("PointGoalHazard", 0.85, 0.75), ("HalfCheetahVelocity", 0.6, 0.4))
CPO_ENV_ID, CPO_TARGET = "SafetyPointGoal1Gymnasium-v0", 0.9


def row(label: str, measured: str, target: str, met: bool | str | None, note: str) -> str:
    """One line of the table; ``met``: whether the target is met (None: no target; a string: a header). The
    ``learn()`` ratios are printed to three decimals, so that a ratio just under its target does not read as it."""
    verdict = met if isinstance(met, str) else "" if met is None else "yes" if met else "NO"
    return f"{label:<54} {measured:>9} {target:>8} {verdict:>4}   {note}"


def twin_note(products: throughput.ProductTimes) -> str:
    """The ceiling's products: seconds per iteration replayed alone, the calls that could not be replayed (counted with
    their profiled time), and a warning if the profiled twin did not run the timed computation bit for bit."""
    unreplayed = f", {products.not_replayed} calls not replayed" if products.not_replayed else ""
    return f" ({products.replayed:.3f} s of products{unreplayed}{'' if products.same_computation else ', NOT the timed bits'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="raw env: random steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="raw env: measurements per env (best is kept)")
    parser.add_argument("--iterations", type=int, default=6, help="MetaCPO: timed meta-iterations after a warm-up")
    parser.add_argument(
        "--meta-rounds", type=int, default=3, help="MetaCPO: interleaved rounds of both modes (median, range shown)"
    )
    parser.add_argument("--updates", type=int, default=2, help="CPO and TRPO: timed updates per round")
    parser.add_argument("--rounds", type=int, default=3, help="CPO and TRPO: interleaved rounds (median)")
    args = parser.parse_args()
    th.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    env_throughput.CLOCK = time.process_time
    print(
        f"{platform.machine()}, Python {platform.python_version()}, torch {th.__version__} (1 thread), numpy "
        f"{np.__version__} (BLAS 1 thread), mujoco {mujoco.__version__}; CPU seconds of this process\n"
    )
    lines = [row("", "measured", "target", "met", "limit / ceiling"), "-" * 110]

    for family, target in ENV_TARGETS:
        result = env_throughput.measure_fast_step(family, args.steps, args.repeats)
        lines.append(
            row(
                f"{family} raw env, ours / stock",
                f"{result.ratio():.2f}x",
                f">= {target:g}x",
                result.ratio() >= target,
                f"{result.with_resets[True]:.0f} against {result.with_resets[False]:.0f} steps/s; physics alone "
                f"{result.physics:.0f} (ours' step at {result.step_only[True] / result.physics:.2f} of it)",
            )
        )

    for family, first, second in META_TARGETS:
        n_steps = make_task_distribution(family, seed=0).max_episode_steps
        namespace = argparse.Namespace(
            family=family,
            tasks=4,
            envs_per_task=1,
            n_steps=n_steps,
            iterations=args.iterations,
            fvp_sample_freq=1,
            rounds=args.meta_rounds,
        )
        meta = throughput.measure_meta(namespace)
        for mode, target in zip(throughput.META_MODES, (first, second), strict=True):
            lines.append(
                row(
                    f"{family} MetaCPO {mode.replace('_', '-')} / raw env",
                    f"{meta.ratio(mode):.3f}",
                    f">= {target:g}",
                    meta.ratio(mode) >= target,
                    f"rounds {throughput.rounds_text(meta.ratios(mode))}; ceiling "
                    f"{meta.ceiling(mode):.2f}{twin_note(meta.products[mode])}; tasks batched at best "
                    f"{meta.batched_bound(mode):.2f}; limit {meta.mode_limit(mode):.0f} steps/s (measurements "
                    f"{', '.join(f'{value:.0f}' for value in meta.limits)}), learn() {meta.speed(mode):.0f}",
                )
            )

    standard = throughput.measure_standard_env(CPO_ENV_ID, args.updates, args.rounds)
    lines.append(
        row(
            "SafetyPointGoal1 CPO / raw env (ours)",
            f"{standard.ratio(throughput.CPO_OURS):.3f}",
            f">= {CPO_TARGET:g}",
            standard.ratio(throughput.CPO_OURS) >= CPO_TARGET,
            f"rounds {throughput.rounds_text(standard.round_ratios(throughput.CPO_OURS))}; "
            f"ceiling {standard.cpo_ceiling():.2f}{twin_note(standard.cpo_products)}; "
            f"raw env {standard.speeds[throughput.RAW_OURS]:.0f} steps/s, "
            f"stock {standard.speeds[throughput.RAW_STOCK]:.0f}",
        )
    )
    for label, name in (
        ("SafetyPointGoal1 sb3-contrib TRPO, our env / raw env", throughput.TRPO_OURS),
        ("SafetyPointGoal1 sb3-contrib TRPO, stock env / raw env", throughput.TRPO_STOCK),
    ):
        lines.append(row(label, f"{standard.ratio(name):.3f}", "", None, f"{standard.speeds[name]:.0f} steps/s"))
    cpo_over_trpo = standard.speeds[throughput.CPO_OURS] / standard.speeds[throughput.TRPO_STOCK]
    lines.append(row("SafetyPointGoal1 CPO on ours / TRPO on stock", f"{cpo_over_trpo:.2f}x", "", None, ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
