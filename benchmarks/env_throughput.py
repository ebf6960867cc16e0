"""Raw env throughput with random actions.

Two tables, each measured within one run (the machine may be shared: compare ratios, not absolute speeds):

* ``--mode fast-step``: our navigation envs (``FAST_STEP`` and ``FAST_RESET`` on) against upstream's code on the same
  tasks, seeds and actions (both switches off: stock safety-gymnasium), for the families and for standard ids built
  through the library (``EnvFactory``, what ``make_safe_vec_env`` uses), with physics alone (``mj_step`` with the
  same frame skip on the same model, the same actions) beside them as the limit. Best of ``--repeats`` runs each,
  ours and stock alternating.
* ``--mode sampler``: every task family through the sampler (DummyVecEnv), resets included.
* ``--mode resets``: meta-training's task switches and resets (``set_task`` on every env of a 4-env sampler, the first
  reset, which builds the new world, and a later one), CPU ms per env, ours against upstream's reset.

python benchmarks/env_throughput.py | tee benchmarks/results/env_throughput/env_throughput.txt
python benchmarks/env_throughput.py --mode sampler --n-envs 2 --families Toy2DNav PointButtonHazard
python benchmarks/env_throughput.py --mode resets --switches 10
python benchmarks/env_throughput.py --mode fast-step --profile PointButtonHazard   # cProfile of our step
python benchmarks/env_throughput.py --mode fast-step --envs SafetyPointButton1Gymnasium-v0 --n-gremlins 3 --cpu-time
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import platform
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
import torch

from sb3_metacpo.common.envs import EnvFactory
from sb3_metacpo.common.rollouts import RolloutSampler
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution, safety_gym

NAVIGATION_FAMILIES = ["PointButtonHazard", "PointGoalHazard", "CarCircle"]
STANDARD_IDS = ["SafetyPointGoal1Gymnasium-v0", "SafetyPointButton1Gymnasium-v0", "SafetyCarCircle1Gymnasium-v0"]
GREMLINS = "PointButtonHazard+gremlins"  # the family with ``n_gremlins`` (--n-gremlins) gremlins
CLOCK = time.perf_counter  # --cpu-time: time.process_time


def random_actions(shape: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    return lambda observations, _tasks: rng.uniform(-1, 1, (len(observations), *shape))


def sampler_table(args: argparse.Namespace) -> None:
    print(f"Every family through the sampler, n_envs={args.n_envs}, {args.episodes} episodes per task, {args.tasks} tasks")
    print(f"{'family':<22} {'episode':>8} {'steps':>8} {'seconds':>8} {'steps/s':>9}")
    for name in args.families:
        dist = make_task_distribution(name, seed=0)
        act = random_actions(dist.spaces[1].shape)
        sampler = RolloutSampler(dist, n_envs=args.n_envs, seed=0)
        sampler.collect(dist.sample(1), act, 1)  # warm-up
        steps, start = 0, CLOCK()
        for task in dist.sample(args.tasks):
            (batch,) = sampler.collect([task], act, args.episodes * args.n_envs * dist.max_episode_steps)
            steps += batch.n_steps
        elapsed = CLOCK() - start
        sampler.close()
        print(f"{name:<22} {dist.max_episode_steps:>8} {steps:>8} {elapsed:>8.2f} {steps / elapsed:>9.0f}")


def task_switch_costs(name: str, fast: bool, n_envs: int, iterations: int) -> tuple[float, float, float]:
    """Meta-training's env work besides steps, ms per env (CPU): switching the envs of a ``n_envs``-env sampler to new
    tasks (``set_task``: upstream's task object, its pinned layout), the first reset after it (a new world: its XML
    and compile) and a later reset (a new episode of the same task), the mean over ``iterations`` switches after
    one untimed. ``fast``: ``FAST_RESET`` (and ``FAST_STEP``) on, else upstream's reset."""
    safety_gym.FAST_STEP = safety_gym.FAST_RESET = fast
    dist = make_task_distribution(name.split("+")[0], seed=0, **({"n_gremlins": 3} if name == GREMLINS else {}))
    sampler = RolloutSampler(dist, n_envs=n_envs, seed=0)
    env = sampler.vec_env
    totals = np.zeros(3)
    for iteration in range(iterations + 1):
        tasks = dist.sample(n_envs)
        times = [time.process_time()]
        for index in range(n_envs):
            env.env_method("set_task", tasks[index], indices=[index])
        times.append(time.process_time())
        env.reset()
        times.append(time.process_time())
        env.reset()
        times.append(time.process_time())
        totals += np.diff(times) * (iteration > 0)
    sampler.close()
    ms = totals / iterations / n_envs * 1000
    return float(ms[0]), float(ms[1]), float(ms[2])


def resets_table(args: argparse.Namespace) -> None:
    print(
        f"Task switches and resets as meta-training does them: {args.n_envs} envs switched to new tasks, then two resets;"
        f" CPU ms per env, mean of {args.switches} switches; ours (FAST_RESET) against upstream's reset in one run"
    )
    print(f"{'family':<28} {'':>6} {'set_task':>9} {'1st reset':>10} {'2nd reset':>10} {'total':>8}")
    for name in args.reset_families:
        rows = {fast: task_switch_costs(name, fast, args.n_envs, args.switches) for fast in (False, True)}
        for fast in (False, True):
            costs = rows[fast]
            print(
                f"{name if not fast else '':<28} {'ours' if fast else 'stock':>6} "
                + " ".join(f"{value:>{width}.2f}" for value, width in zip((*costs, sum(costs)), (9, 10, 10, 8), strict=True))
            )
        print(
            f"{'':<28} {'ratio':>6} "
            + " ".join(
                f"{a / b:>{width - 1}.1f}x"
                for a, b, width in zip(
                    (*rows[False], sum(rows[False])), (*rows[True], sum(rows[True])), (9, 10, 10, 8), strict=True
                )
            )
        )
    safety_gym.FAST_STEP = safety_gym.FAST_RESET = True


def make_env(name: str, fast: bool, n_gremlins: int = 0) -> gym.Env:
    """A family's env of its first training task (seed 0; ``GREMLINS``: PointButtonHazard's with ``n_gremlins``), or a
    standard id's through the library's factory, with the fast step and reset on or off (read when the env is made)."""
    safety_gym.FAST_STEP = safety_gym.FAST_RESET = fast
    if name in NAVIGATION_FAMILIES or name == GREMLINS:
        options = {"n_gremlins": n_gremlins} if name == GREMLINS else {}
        dist = make_task_distribution(name.split("+")[0], seed=0, **options)
        return dist.make_env(dist.sample(1)[0])
    return EnvFactory(env_id=name)()


def run_env(env: gym.Env, actions: np.ndarray) -> tuple[float, float]:
    """(seconds in ``step``, seconds in ``reset``) over ``actions`` from a seeded reset, resetting at episode ends."""
    env.reset(seed=0)
    step_time = reset_time = 0.0
    for action in actions:
        start = CLOCK()
        *_, terminated, truncated, _ = env.step(action)
        step_time += CLOCK() - start
        if terminated or truncated:
            start = CLOCK()
            env.reset()
            reset_time += CLOCK() - start
    return step_time, reset_time


def run_physics(env: gym.Env, actions: np.ndarray) -> float:
    """Seconds of ``mj_step`` alone, with the env's frame skip, on its model from a copy of its state after a seeded
    reset (gremlins' mocaps stay where the reset put them)."""
    env.reset(seed=0)
    task = env.unwrapped.task
    model = task.model
    data = copy.deepcopy(task.data)
    frame_skip = task.sim_conf.frameskip_binom_n
    low, high = model.actuator_ctrlrange.T
    start = CLOCK()
    for action in actions:
        data.ctrl[:] = np.clip(action, low, high)
        mujoco.mj_step(model, data, nstep=frame_skip)
    return CLOCK() - start


@dataclass(frozen=True)
class FastStepRow:
    """One env's steps/s, ours (fast step and reset) and stock (upstream's code), and of physics alone."""

    name: str
    with_resets: dict[bool, float]  # fast -> steps/s, resets at episode ends included
    step_only: dict[bool, float]  # fast -> steps/s of step() alone
    physics: float  # mj_step x frame skip on the same model and actions

    def ratio(self, resets: bool = True) -> float:
        """Ours / stock."""
        speeds = self.with_resets if resets else self.step_only
        return speeds[True] / speeds[False]


def measure_fast_step(name: str, steps: int, repeats: int, n_gremlins: int = 0) -> FastStepRow:
    """Ours against stock on the same task, seed and random actions, best of ``repeats`` (alternating), and physics
    alone with the same frame skip (the limit), in ``CLOCK`` seconds."""
    envs = {fast: make_env(name, fast, n_gremlins) for fast in (True, False)}
    shape = envs[True].action_space.shape
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *shape)).astype(envs[True].action_space.dtype)
    best: dict[bool, tuple[float, float]] = {}
    for _ in range(repeats):
        for fast in (True, False):
            step_time, reset_time = run_env(envs[fast], actions)
            if fast not in best or step_time + reset_time < sum(best[fast]):
                best[fast] = (step_time, reset_time)
    physics = min(run_physics(envs[True], actions) for _ in range(repeats))
    for env in envs.values():
        env.close()
    safety_gym.FAST_STEP = safety_gym.FAST_RESET = True
    return FastStepRow(
        name=name,
        with_resets={fast: steps / sum(best[fast]) for fast in best},
        step_only={fast: steps / best[fast][0] for fast in best},
        physics=steps / physics,
    )


def fast_step_table(args: argparse.Namespace) -> None:
    names = args.envs or [*NAVIGATION_FAMILIES, *([GREMLINS] if args.n_gremlins else []), *STANDARD_IDS]
    print(
        f"Fast step against stock safety-gymnasium: {args.steps} random steps from a seeded reset, best of "
        f"{args.repeats} (resets at episode ends: 500 steps, 1000 for Goal1/Button1)"
    )
    print(
        "steps/s with resets | steps/s of step() alone | physics: mj_step x frame skip on the same model"
        + (" (CPU seconds)" if CLOCK is time.process_time else "")
    )
    header = (
        f"{'env':<32} {'stock':>7} {'ours':>7} {'ratio':>6} | {'stock':>7} {'ours':>7} {'ratio':>6} | "
        f"{'physics':>8} {'stock/ph':>8} {'ours/ph':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        row = measure_fast_step(name, args.steps, args.repeats, args.n_gremlins)
        total, step_only, limit = row.with_resets, row.step_only, row.physics
        label = name.replace("Gymnasium-v0", " (library)").replace("+gremlins", f" {args.n_gremlins} gremlins")
        print(
            f"{label:<32} {total[False]:>7.0f} {total[True]:>7.0f} {row.ratio():>5.2f}x | "
            f"{step_only[False]:>7.0f} {step_only[True]:>7.0f} {row.ratio(resets=False):>5.2f}x | "
            f"{limit:>8.0f} {step_only[False] / limit:>8.2f} {step_only[True] / limit:>8.2f}"
        )


def profile(name: str, steps: int) -> None:
    env = make_env(name, True)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *env.action_space.shape)).astype(env.action_space.dtype)
    profiler = cProfile.Profile()
    profiler.runcall(run_env, env, actions)
    print(f"\ncProfile of our {name} env, {steps} random steps (tottime, top 15):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["fast-step", "sampler", "resets", "all"], default="all")
    parser.add_argument("--families", nargs="+", default=list_task_distributions(), choices=list_task_distributions())
    parser.add_argument("--n-envs", type=int, default=None, help="envs of the sampler (default: sampler 1, resets 4)")
    parser.add_argument("--switches", type=int, default=5, help="resets: task switches measured")
    parser.add_argument(
        "--reset-families",
        nargs="+",
        default=[*NAVIGATION_FAMILIES, GREMLINS],
        choices=[*NAVIGATION_FAMILIES, GREMLINS],
        help=f"resets: the families ({GREMLINS}: with 3 gremlins)",
    )
    parser.add_argument("--episodes", type=int, default=2, help="sampler: episodes per env per measurement")
    parser.add_argument("--tasks", type=int, default=2, help="sampler: training tasks measured (one after the other)")
    parser.add_argument("--steps", type=int, default=2000, help="fast-step: random steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="fast-step: measurements per env (best is kept)")
    parser.add_argument("--profile", choices=[*NAVIGATION_FAMILIES, *STANDARD_IDS], help="cProfile our env's steps")
    parser.add_argument(
        "--envs",
        nargs="+",
        choices=[*NAVIGATION_FAMILIES, GREMLINS, *STANDARD_IDS],
        help="fast-step: only these rows (default: all)",
    )
    parser.add_argument(
        "--n-gremlins", type=int, default=0, help=f"fast-step: gremlins of the {GREMLINS} row (shown when > 0)"
    )
    parser.add_argument("--cpu-time", action="store_true", help="time in CPU seconds of this process (shared machines)")
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"numpy {np.__version__}, mujoco {mujoco.__version__}"
    )
    if args.mode in ("fast-step", "all"):
        fast_step_table(args)
    n_envs = args.n_envs
    if args.mode in ("sampler", "all"):
        print()
        args.n_envs = n_envs or 1
        sampler_table(args)
    if args.mode in ("resets", "all"):
        print()
        args.n_envs = n_envs or 4
        resets_table(args)
    if args.profile:
        profile(args.profile, args.steps)


if __name__ == "__main__":
    main()
