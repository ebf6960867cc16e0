"""Meta-training throughput against the simulator's limit, with a breakdown of one meta-iteration.

Every time is CPU seconds of this process (``time.process_time``; torch and numpy's BLAS on one thread, envs
in-process), so the ratios measure what our code costs whatever else the shared machine runs. In one run, on the
same M tasks with E DummyVecEnv envs per task (``--envs-per-task``, default 1):

1. the limit: random actions on meta-training's env workload (new tasks every iteration, a reset per batch),
   stepping the same VecEnv without any of our code in the loop;
2. ``learn()`` throughput of MetaCPO (first and second order), CPO and sb3-contrib TRPO, and each as a ratio of the
   limit (CPO and TRPO train on M fixed task envs, so they never pay for new worlds);
3. where a meta-iteration's time goes (sampling, advantages and critics, inner CPO steps and their parts,
   meta-gradient backward, outer step, outer line search), and the dual solve plus its backward against an inner
   update; the *ceiling*: the ratio if everything but the env and the updates' matrix products were free (about
   what an implementation making the same product calls could reach on this CPU; the products are those of the
   timed iterations, run again by a twin of the timed model under the profiler and replayed alone);
4. with ``--scaling``, seconds per meta-iteration as tasks per iteration, inner updates and policy size grow;
5. with ``--env-id``, CPO and sb3-contrib TRPO on one standard id, both with their defaults (1 env, 2048 steps per
   update), as ratios of the raw env (ours and stock safety-gymnasium), in CPU seconds; ``--env-id-only`` skips the
   rest;
6. with ``--blas-threads-only`` (alone), MetaCPO first-order ``learn()`` with numpy's BLAS on all cores against one
   thread (``sb3_metacpo.common.threads``), in CPU and in wall-clock seconds.

    python benchmarks/throughput.py --family PointGoalHazard --scaling --env-id SafetyPointGoal1Gymnasium-v0
    python benchmarks/throughput.py --family HalfCheetahVelocity --scaling
    python benchmarks/throughput.py --family HalfCheetahVelocity --envs-per-task 4 --n-steps 3200
    python benchmarks/throughput.py --family HalfCheetahVelocity --envs-per-task 4 --n-steps 3200 --fvp-sample-freq 4
    python benchmarks/throughput.py --family PointGoalHazard --iterations 4 --blas-threads-only
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from fingerprints import policy_hash
from sb3_contrib import TRPO
from stable_baselines3.common.vec_env import DummyVecEnv
from threadpoolctl import threadpool_limits

from sb3_metacpo import CPO, MetaCPO
from sb3_metacpo.common.cpo_subproblem import cpo_direction
from sb3_metacpo.common.envs import EnvFactory, LeanDummyVecEnv
from sb3_metacpo.common.profiling import phase_times
from sb3_metacpo.common.rollouts import RolloutSampler
from sb3_metacpo.tasks import TaskDistribution, list_task_distributions, make_task_distribution

TOP_PHASES = ("sampling", "advantages", "inner_update", "meta_gradient", "outer_step", "outer_line_search", "critic_training")


def limit_throughput(dist: TaskDistribution, n_tasks: int, envs_per_task: int, n_steps: int, iterations: int) -> float:
    """The simulator's speed on meta-training's env workload, with random actions: per iteration, every task's envs
    switch to a new task (a new world) and run two batches of ``n_steps`` steps per task (inner and validation), each
    starting with a reset. The VecEnv is stepped directly, so none of our code is in the loop. Env steps per second."""
    n_envs = n_tasks * envs_per_task
    sampler = RolloutSampler(dist, n_envs=n_envs, seed=0)
    env = sampler.vec_env
    rng = np.random.default_rng(0)
    shape = (n_envs, *dist.spaces[1].shape)
    horizon = n_steps // envs_per_task  # as the sampler: the task's envs share its n_steps
    seconds = 0.0
    for iteration in range(iterations + 1):  # the first one warms up
        start = time.process_time()
        tasks = dist.sample(n_tasks)
        for index in range(n_envs):
            env.env_method("set_task", tasks[index % n_tasks], indices=[index])
        for _ in range(2):
            env.reset()
            for _ in range(horizon):
                env.step(rng.uniform(-1, 1, shape).astype(np.float32))
        seconds += (time.process_time() - start) * (iteration > 0)
    sampler.close()
    return iterations * 2 * horizon * n_envs / seconds


def timed_learn(model: Any, steps_per_iteration: int, iterations: int) -> tuple[float, dict[str, float]]:
    """Env steps per second of ``learn`` after one warm-up iteration, and the phase times per iteration."""
    model.learn(steps_per_iteration)
    with phase_times(time.process_time) as times:
        start = time.process_time()
        model.learn(steps_per_iteration * iterations, reset_num_timesteps=False)
        seconds = time.process_time() - start
    times = {key: value / iterations for key, value in times.items()}
    times["total"] = seconds / iterations
    return steps_per_iteration * iterations / seconds, times


#: The matrix products of the updates (torch ops): time a faster implementation of the same computation on this CPU
#: would still spend (MKL's kernels run them at the machine's matrix-product speed).
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot")


@dataclass(frozen=True)
class ProductTimes:
    """CPU seconds per iteration of ``learn`` in the updates' matrix products, measured two ways on a twin of the
    timed model (same seed, same warm-up) over the timed iterations: the kernels' self time under the torch profiler,
    and the same calls (operator, shapes, strides, dtypes, scalars) replayed alone outside the profiler."""

    profiled: float
    replayed: float
    #: the profiled twin ended with the timed model's parameters bit for bit: it ran the timed computation
    same_computation: bool
    #: calls the replay could not rebuild (counted with their profiled time)
    not_replayed: int = 0


#: torch dtypes of the profiler's dtype names
_DTYPES = {"float": th.float32, "double": th.float64}


def _operand(shape: list[int], stride: list[int], dtype: str) -> th.Tensor:
    """A random tensor of the recorded shape, strides (transposed views included) and dtype."""
    size = 1 + sum((extent - 1) * step for extent, step in zip(shape, stride, strict=True) if extent > 0)
    return th.randn(size, dtype=_DTYPES[dtype]).as_strided(shape, stride)


def _product_call(name: str, shapes: list, strides: list, dtypes: list, scalars: list) -> Any:
    """A thunk that runs one recorded product (None for a call this replay does not know)."""
    tensors = [_operand(sh, st, dt) if dt in _DTYPES else None for sh, st, dt in zip(shapes, strides, dtypes, strict=True)]
    if name in ("aten::mm", "aten::bmm", "aten::mv", "aten::dot") and len(tensors) in (2, 3) and None not in tensors:
        op = getattr(th, name.split("::")[1])
        a, b = tensors[:2]
        if len(tensors) == 3:
            out = tensors[2]
            return lambda: op(a, b, out=out)
        return lambda: op(a, b)
    if name in ("aten::addmm", "aten::baddbmm", "aten::addmv") and len(tensors) in (5, 6):
        op = getattr(th, name.split("::")[1])
        bias, a, b = tensors[:3]
        beta, alpha = (scalars[3], scalars[4]) if len(scalars) >= 5 else (None, None)  # not recorded: not replayed
        if None in (bias, a, b) or beta is None or alpha is None:
            return None
        if len(tensors) == 6 and tensors[5] is not None:
            out = tensors[5]
            return lambda: op(bias, a, b, beta=beta, alpha=alpha, out=out)
        return lambda: op(bias, a, b, beta=beta, alpha=alpha)
    return None


def _seconds_per_call(call: Any, count: int) -> float:
    """The best of 3 timings of ``call`` run back to back (hot caches: the fastest these kernels run here)."""
    calls = max(10, min(count, 400))
    call()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - start) / calls)
    return best


def matrix_product_seconds(make_model: Any, steps_per_iteration: int, iterations: int, reference: str) -> ProductTimes:
    """The matrix products of the timed iterations, on a twin of the timed model: ``make_model()`` builds it as the
    timed model was built, it warms up as :func:`timed_learn` does, then runs the timed iterations under the torch
    profiler (recording every product's operands); ``reference``: the timed model's final :func:`policy_hash`.

    The replayed figure is about the floor of those calls: each product alone, back to back, in hot caches (with
    Python's ~0.5 µs of dispatch per call still in it), so an implementation making the same product calls spends
    about as much in them at least (the profiler's self time adds its own bookkeeping to each call, by an amount that
    varies between runs)."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model()
    model.learn(steps_per_iteration)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.learn(steps_per_iteration * iterations, reset_num_timesteps=False)
    same = policy_hash(model) == reference
    profiled = 0.0
    groups: dict[tuple, list] = {}
    for event in prof.events():
        if event.name not in MATRIX_PRODUCTS:
            continue
        profiled += event.self_cpu_time_total / 1e6
        key = (
            event.name,
            repr(event.input_shapes),
            repr(event.structured_input_strides),
            repr(event.input_dtypes),
            repr(event.concrete_inputs),
        )
        entry = groups.setdefault(key, [event, 0, 0.0])
        entry[1] += 1
        entry[2] += event.self_cpu_time_total / 1e6
    replayed, not_replayed = 0.0, 0
    for event, count, self_seconds in groups.values():
        call = _product_call(
            event.name, event.input_shapes, event.structured_input_strides, event.input_dtypes, event.concrete_inputs
        )
        # a call the replay cannot rebuild counts with its profiled time
        replayed += self_seconds if call is None else count * _seconds_per_call(call, count)
        not_replayed += count if call is None else 0
    return ProductTimes(profiled / iterations, replayed / iterations, same, not_replayed)


def rounds_text(values: list[float]) -> str:
    """Each round's ratio, as the tables print them."""
    return ", ".join(f"{value:.3f}" for value in values)


def ceiling(limit: float, steps_per_iteration: int, product_seconds: float) -> float:
    """The ratio to the limit that ``learn`` would reach if everything but the env (at the limit's speed) and the
    updates' matrix products were free: about the most an implementation making the same product calls can reach."""
    env_seconds = steps_per_iteration / limit
    return env_seconds / (env_seconds + product_seconds)


#: The phases of a meta-iteration that run once per task: the M tasks' advantages, inner updates, meta-gradient terms
#: and the outer line search's replays of the inner updates (the work that batching the tasks would merge).
PER_TASK_PHASES = ("advantages", "inner_update", "meta_gradient", "outer_step/line_search")


def batched_bound(limit: float, steps_per_iteration: int, times: dict[str, float], tasks: int) -> float:
    """The ratio to the limit that ``learn`` would reach if its per-task phases (:data:`PER_TASK_PHASES`, CPU seconds
    per iteration in ``times``) cost one task's share, 1/M of what they cost, and everything else what it cost: about
    the most that running the M tasks' updates as one batch of operations could give. It is optimistic: a batched
    operation on M tasks' data costs at least what one task's does (its matrix products M times as much), and the
    phases still include the little of the outer step that is not per task (its policy's KL on all the data)."""
    per_task = sum(times.get(name, 0.0) for name in PER_TASK_PHASES)
    return steps_per_iteration / limit / (times["total"] - (1 - 1 / tasks) * per_task)


#: The rows of :func:`measure_standard_env`.
RAW_OURS, RAW_STOCK = "raw env, random actions, ours (the limit)", "raw env, random actions, stock"
CPO_OURS, TRPO_OURS, TRPO_STOCK = "CPO learn(), ours", "sb3-contrib TRPO learn(), ours", "sb3-contrib TRPO learn(), stock env"


@dataclass(frozen=True)
class StandardEnvThroughput:
    """Env steps/s of each row of :func:`measure_standard_env` in each interleaved round, and CPO's matrix products per
    update."""

    rounds: dict[str, list[float]]
    cpo_products: ProductTimes
    steps_per_update: int

    @property
    def speeds(self) -> dict[str, float]:
        """Each row's median speed over the rounds."""
        return {name: float(np.median(values)) for name, values in self.rounds.items()}

    def round_ratios(self, row: str) -> list[float]:
        """The row's speed in each round over the raw env's in the same round (measured just before it)."""
        return [speed / raw for speed, raw in zip(self.rounds[row], self.rounds[RAW_OURS], strict=True)]

    def ratio(self, row: str) -> float:
        """The median of :meth:`round_ratios`: the row as a ratio of the raw env built by the library (the limit)."""
        return float(np.median(self.round_ratios(row)))

    def cpo_ceiling(self) -> float:
        return ceiling(self.speeds[RAW_OURS], self.steps_per_update, self.cpo_products.replayed)


def random_action_speed(step: Callable[[np.ndarray], Any], action_shape: tuple[int, ...], steps: int) -> float:
    """Env steps per CPU second of ``steps`` calls of ``step`` (one env's step) with uniform random actions in
    [-1, 1] of shape ``(1, *action_shape)``, float32, drawn from seed 0: a raw env's speed, with nothing of ours in
    the loop but the draw."""
    rng = np.random.default_rng(0)
    shape = (1, *action_shape)
    start = time.process_time()
    for _ in range(steps):
        step(rng.uniform(-1, 1, shape).astype(np.float32))
    return steps / (time.process_time() - start)


def measure_standard_env(env_id: str, iterations: int, rounds: int = 3) -> StandardEnvThroughput:
    """CPO and sb3-contrib TRPO on one standard id against the raw env, in one run and in CPU seconds of this
    process (this machine is shared; CPU time is what our code costs, whatever else runs), in ``rounds`` interleaved
    rounds (each row's ratio: the median of its per-round ratios to the raw env of the same round): the raw env with
    random actions through the library (fast step on) and stock (safety-gymnasium's own code,
    ``FAST_STEP``/``FAST_RESET`` off), ``learn()`` of CPO and of TRPO on the library's env stack (2048 steps per
    update, the defaults of both) and of TRPO on the stock env."""
    from sb3_metacpo.tasks import safety_gym

    def raw(fast: bool) -> float:
        safety_gym.FAST_STEP = safety_gym.FAST_RESET = fast
        env = CPO("MlpPolicy", env_id, seed=0).env  # the env stack CPO builds (cost monitor and all)
        safety_gym.FAST_STEP = safety_gym.FAST_RESET = True
        env.reset()
        speed = random_action_speed(env.step, env.action_space.shape, 2048 * iterations)
        env.close()
        return speed

    cpo_products: list[tuple[ProductTimes, int]] = []  # (matrix products per update, env steps per update)

    def build(kind: str, fast: bool) -> Any:
        safety_gym.FAST_STEP = safety_gym.FAST_RESET = fast
        env = CPO("MlpPolicy", env_id, seed=0).env
        safety_gym.FAST_STEP = safety_gym.FAST_RESET = True
        return CPO("MlpPolicy", env, seed=0) if kind == "CPO" else TRPO("MlpPolicy", env, seed=0)

    def learn(kind: str, fast: bool) -> float:
        model = build(kind, fast)
        model.learn(model.n_steps)  # warm-up update
        start = time.process_time()
        model.learn(model.n_steps * iterations, reset_num_timesteps=False)
        seconds = time.process_time() - start
        if kind == "CPO" and not cpo_products:  # the first round's timed updates again, on a twin, profiled
            products = matrix_product_seconds(lambda: build(kind, fast), model.n_steps, iterations, policy_hash(model))
            cpo_products.append((products, model.n_steps))
        return model.n_steps * iterations / seconds

    runs = {
        RAW_OURS: lambda: raw(True),
        RAW_STOCK: lambda: raw(False),
        CPO_OURS: lambda: learn("CPO", True),
        TRPO_OURS: lambda: learn("TRPO", True),
        TRPO_STOCK: lambda: learn("TRPO", False),
    }
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            measured[name].append(run())
    products, steps = cpo_products[0]
    return StandardEnvThroughput(measured, products, steps)


def standard_env_table(env_id: str, iterations: int, rounds: int = 3) -> list[str]:
    """:func:`measure_standard_env`'s table."""
    result = measure_standard_env(env_id, iterations, rounds)
    lines = [
        f"\n{env_id}, 1 env, 2048 steps per update; CPU seconds of this process, median of {rounds} interleaved rounds "
        f"of {iterations} updates:",
        f"{'':<40} {'steps/s':>9} {'x limit':>8}",
    ]
    lines += [
        f"{name:<40} {speed:>9.0f} {result.ratio(name):>8.2f}  (rounds {rounds_text(result.round_ratios(name))})"
        for name, speed in result.speeds.items()
    ]
    lines.append(f"CPO on ours / TRPO on stock = {result.speeds[CPO_OURS] / result.speeds[TRPO_STOCK]:.2f}")
    products = result.cpo_products
    lines.append(
        f"CPO's ceiling (everything but the env and the update's matrix products free; {products.replayed:.3f} s of "
        f"matrix products per {result.steps_per_update}-step update replayed alone, {products.profiled:.3f} s under "
        f"the profiler ({products.not_replayed} calls not replayed); the profiled twin ran the timed updates bit for bit: "
        f"{'yes' if products.same_computation else 'NO'}"
        f"): {result.cpo_ceiling():.2f}"
    )
    return lines


def meta_model(dist: TaskDistribution, args: argparse.Namespace, mode: str, **overrides: Any) -> MetaCPO:
    kwargs = dict(
        meta_batch_size=args.tasks,
        n_inner_updates=1,
        n_steps=args.n_steps,
        meta_gradient=mode,
        fvp_sample_freq=args.fvp_sample_freq,
        seed=0,
    )
    kwargs.update(overrides)
    kwargs["n_envs"] = kwargs["meta_batch_size"] * args.envs_per_task
    return MetaCPO("MlpPolicy", dist, **kwargs)


META_MODES = ("first_order", "second_order")


@dataclass(frozen=True)
class MetaThroughput:
    """The limit and MetaCPO's ``learn()`` (each mode) on one workload, in env steps per CPU second, over R interleaved
    rounds, with each mode's phase times per round and matrix products per meta-iteration.

    The host's speed per CPU second drifts on a shared machine, so the limit is measured before every ``learn()`` run
    and after the last (``limits``: L, first order, L, second order, L, first order, ... L; 2R + 1 measurements), and
    each run's ratio and bound are taken against the mean of the two measurements around it. A mode's figure is the
    median over the rounds, with their range beside it: every round runs the same computation (a fresh model with the
    same seed), so the rounds differ only by the host."""

    limits: list[float]
    #: per mode, env steps per CPU second of each round's ``learn()``
    speeds: dict[str, list[float]]
    #: per mode, each round's CPU seconds per meta-iteration by phase
    phases: dict[str, list[dict[str, float]]]
    products: dict[str, ProductTimes]
    steps_per_iteration: int
    tasks: int

    @property
    def rounds(self) -> int:
        return len(self.speeds[META_MODES[0]])

    @property
    def limit(self) -> float:
        """The median of the limit's measurements (for display)."""
        return float(np.median(self.limits))

    def drift(self) -> float:
        """How far apart the limit's measurements are: the largest over the smallest, minus 1."""
        return max(self.limits) / min(self.limits) - 1

    def run_limit(self, mode: str, round_index: int) -> float:
        """The limit a run is compared with: the mean of the measurements before and after it."""
        index = round_index * len(META_MODES) + META_MODES.index(mode)
        return (self.limits[index] + self.limits[index + 1]) / 2

    def mode_limit(self, mode: str) -> float:
        """The median over the rounds of :meth:`run_limit` (the ceiling's env speed, and for display)."""
        return float(np.median([self.run_limit(mode, r) for r in range(self.rounds)]))

    def ratios(self, mode: str) -> list[float]:
        """Each round's ``learn()`` speed over its :meth:`run_limit`."""
        return [speed / self.run_limit(mode, r) for r, speed in enumerate(self.speeds[mode])]

    def ratio(self, mode: str) -> float:
        """The median of :meth:`ratios`."""
        return float(np.median(self.ratios(mode)))

    def speed(self, mode: str) -> float:
        """The median ``learn()`` speed over the rounds (for display)."""
        return float(np.median(self.speeds[mode]))

    def mean_phases(self, mode: str) -> dict[str, float]:
        """Each phase's CPU seconds per meta-iteration, averaged over the rounds."""
        runs = self.phases[mode]
        keys = dict.fromkeys(key for run in runs for key in run)  # every round's phases, in order of appearance
        return {key: float(np.mean([run.get(key, 0.0) for run in runs])) for key in keys}

    def ceiling(self, mode: str) -> float:
        return ceiling(self.mode_limit(mode), self.steps_per_iteration, self.products[mode].replayed)

    def batched_bound(self, mode: str) -> float:
        """The median over the rounds of each run's :func:`batched_bound`."""
        bounds = [
            batched_bound(self.run_limit(mode, r), self.steps_per_iteration, times, self.tasks)
            for r, times in enumerate(self.phases[mode])
        ]
        return float(np.median(bounds))


def measure_meta(args: argparse.Namespace) -> MetaThroughput:
    """The limit and MetaCPO first- and second-order ``learn()`` on ``args.family`` (``tasks``, ``envs_per_task``,
    ``n_steps`` per task batch, ``iterations`` timed after a warm-up, ``fvp_sample_freq``), K = 1, in ``rounds``
    interleaved rounds (default 1), the limit measured around every run; the matrix products once per mode."""
    # The limit and each learn() draw their tasks from a fresh copy of the distribution with the same seed, so that
    # they run the same worlds (a navigation step's cost depends on the task's objects), iteration for iteration.
    fresh = lambda: make_task_distribution(args.family, seed=0)  # noqa: E731
    per_iteration = args.tasks * 2 * args.n_steps  # K = 1: one inner and one validation batch per task
    rounds = getattr(args, "rounds", 1)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def measure_limit() -> float:
        return limit_throughput(fresh(), args.tasks, args.envs_per_task, args.n_steps, args.iterations)

    limits = [measure_limit()]
    speeds: dict[str, list[float]] = {mode: [] for mode in META_MODES}
    phases: dict[str, list[dict[str, float]]] = {mode: [] for mode in META_MODES}
    hashes: dict[str, set[str]] = {mode: set() for mode in META_MODES}
    for _ in range(rounds):
        for mode in META_MODES:
            model = meta_model(fresh(), args, mode)
            speed, times = timed_learn(model, per_iteration, args.iterations)
            limits.append(measure_limit())  # right after the timed learn()
            speeds[mode].append(speed)
            phases[mode].append(times)
            hashes[mode].add(policy_hash(model))
    products = {}
    for mode in META_MODES:
        twin = lambda mode=mode: meta_model(fresh(), args, mode)  # noqa: E731
        # rounds that ended with different parameters did not run one computation: then no reference matches, and
        # the table says "NOT the timed bits"
        reference = hashes[mode].pop() if len(hashes[mode]) == 1 else "rounds differ"
        products[mode] = matrix_product_seconds(twin, per_iteration, args.iterations, reference)
    return MetaThroughput(limits, speeds, phases, products, per_iteration, args.tasks)


def task_vec_env(dist: TaskDistribution, tasks: list, envs_per_task: int) -> DummyVecEnv:
    """The fixed-task envs of CPO's and TRPO's rows, in the VecEnv class the limit and the algorithms use."""
    factories = [EnvFactory(distribution=dist, task=tasks[i % len(tasks)]) for i in range(len(tasks) * envs_per_task)]
    env = LeanDummyVecEnv(factories)
    env.seed(0)
    return env


def dual_seconds(n_tasks: int, repeats: int = 200) -> float:
    """Seconds of one batched dual solve (closed form) over ``n_tasks`` tasks plus its backward."""
    gen = th.Generator().manual_seed(0)
    dim = 4
    total = 0.0
    for _ in range(repeats):
        # Inputs that all require gradients, as in the second-order meta-gradient; b < 0 with s large: the dual case.
        v, w = th.randn(n_tasks, dim, generator=gen), th.randn(n_tasks, dim, generator=gen)
        q, r, s = (th.rand(n_tasks, generator=gen) + 0.5 for _ in range(3))
        b = -th.rand(n_tasks, generator=gen) * 0.1
        for tensor in (v, w, q, r, s, b):
            tensor.requires_grad_(True)
        start = time.process_time()
        result = cpo_direction(v, w.unsqueeze(1), q, r.unsqueeze(1), s.reshape(-1, 1, 1), b.unsqueeze(1), 0.05)
        result.x.sum().backward()
        total += time.process_time() - start
    return total / repeats


def breakdown(times: dict[str, float]) -> list[str]:
    total = times["total"]
    lines = [f"  {'phase':<42} {'s/iter':>8} {'%':>6}"]
    for top in TOP_PHASES:
        if top not in times:
            continue
        lines.append(f"  {top:<42} {times[top]:>8.3f} {100 * times[top] / total:>6.1f}")
        for key in sorted(k for k in times if k.startswith(top + "/") and k.count("/") == 1):
            lines.append(f"    {key:<40} {times[key]:>8.3f} {100 * times[key] / total:>6.1f}")
    other = total - sum(times.get(top, 0.0) for top in TOP_PHASES)
    lines.append(f"  {'other (logging, callbacks, bookkeeping)':<42} {other:>8.3f} {100 * other / total:>6.1f}")
    lines.append(f"  {'total':<42} {total:>8.3f} {100.0:>6.1f}")
    return lines


def blas_threads_table(args: argparse.Namespace, rounds: int = 3) -> list[str]:
    """MetaCPO first-order ``learn()`` with numpy's BLAS as OpenBLAS sets it (all cores: ``BLAS_THREADS = None``)
    and on one thread (the default), in CPU and in wall-clock seconds, median of ``rounds`` alternating rounds."""
    from threadpoolctl import threadpool_info

    from sb3_metacpo.common import threads

    cores = max(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
    per_iteration = args.tasks * 2 * args.n_steps
    speeds: dict[Any, list[tuple[float, float]]] = {None: [], 1: []}
    for _ in range(rounds):
        for setting in speeds:
            threads.BLAS_THREADS = setting
            model = meta_model(make_task_distribution(args.family, seed=0), args, "first_order")
            model.learn(per_iteration)  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            model.learn(per_iteration * args.iterations, reset_num_timesteps=False)
            steps = per_iteration * args.iterations
            speeds[setting].append((steps / (time.process_time() - cpu), steps / (time.perf_counter() - wall)))
    threads.BLAS_THREADS = 1
    lines = [
        f"\nMetaCPO first-order learn() on {args.family} with numpy's BLAS on {cores} threads (OpenBLAS's default here) "
        f"and on 1 (BLAS_THREADS = 1); env steps/s, median of {rounds} alternating rounds:",
        f"{'':<30} {'CPU seconds':>12} {'wall clock':>11}",
    ]
    for setting, label in ((None, f"BLAS on {cores} threads"), (1, "BLAS on 1 thread")):
        cpu_speed = float(np.median([speed[0] for speed in speeds[setting]]))
        wall_speed = float(np.median([speed[1] for speed in speeds[setting]]))
        lines.append(f"{label:<30} {cpu_speed:>12.0f} {wall_speed:>11.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="PointGoalHazard", choices=list_task_distributions())
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-iteration (M)")
    parser.add_argument("--envs-per-task", type=int, default=1, help="envs sampling each task (E)")
    parser.add_argument("--n-steps", type=int, help="env steps per task batch (default: one episode)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument(
        "--rounds", type=int, default=1, help="MetaCPO: interleaved rounds of both modes (median ratio, range shown)"
    )
    parser.add_argument("--scaling", action="store_true", help="also time meta-iterations for growing M, K and net size")
    parser.add_argument("--env-id", help="also time CPO against TRPO on this safety-gymnasium id")
    parser.add_argument("--env-id-only", action="store_true", help="only the --env-id table")
    parser.add_argument(
        "--fvp-sample-freq", type=int, default=1, help="Fisher products on every k-th sample (TRPO: sub_sampling_factor)"
    )
    parser.add_argument(
        "--blas-threads-only",
        action="store_true",
        help="only MetaCPO first-order learn() with numpy's BLAS on all cores against one thread (CPU and wall clock)",
    )
    args = parser.parse_args()
    th.set_num_threads(1)
    if args.blas_threads_only:
        args.n_steps = args.n_steps or make_task_distribution(args.family, seed=0).max_episode_steps
        print(f"{platform.machine()}, {platform.python_version()}, torch {th.__version__} (1 thread)")
        print("\n".join(blas_threads_table(args)))
        return
    # numpy's BLAS on one thread for the whole run, as torch: the limit, our learn() (which limits it itself) and
    # sb3-contrib's alike; with OpenBLAS's default, a second core's busy-waiting would count in some rows only
    threadpool_limits(limits=1, user_api="blas")
    if args.env_id_only:
        if not args.env_id:
            parser.error("--env-id-only needs --env-id")
        print(f"{platform.machine()}, {platform.python_version()}, torch {th.__version__} (1 thread), numpy BLAS 1 thread")
        print("\n".join(standard_env_table(args.env_id, args.iterations)))
        return
    dist = make_task_distribution(args.family, seed=0)
    args.n_steps = args.n_steps or dist.max_episode_steps
    tasks = dist.sample(args.tasks)
    per_meta_iteration = args.tasks * 2 * args.n_steps  # K = 1: one inner and one validation batch per task
    if args.n_steps % args.envs_per_task:
        parser.error("--n-steps must be a multiple of --envs-per-task")
    per_env = args.n_steps // args.envs_per_task
    print(
        f"{args.family}: M={args.tasks} tasks x {args.envs_per_task} env(s) (LeanDummyVecEnv), {args.n_steps} steps per "
        f"task batch, K=1, fvp_sample_freq={args.fvp_sample_freq}; "
        f"{platform.machine()}, {platform.python_version()}, torch {th.__version__} (1 thread), numpy BLAS 1 thread; "
        "CPU seconds of this process\n"
    )

    meta = measure_meta(args)
    limit, products = meta.limit, meta.products
    phases = {mode: meta.mean_phases(mode) for mode in META_MODES}
    rows: list[tuple[str, float, str | None]] = [("raw env, random actions (the limit)", limit, None)]
    rows += [(f"MetaCPO learn(), {mode.replace('_', '-')}", meta.speed(mode), mode) for mode in META_MODES]
    vec_env = task_vec_env(dist, tasks, args.envs_per_task)
    cpo = CPO(
        "MlpPolicy",
        vec_env,
        n_steps=per_env,
        cost_limit=dist.default_cost_limit,
        fvp_sample_freq=args.fvp_sample_freq,
        seed=0,
    )
    rows.append(("CPO learn()", timed_learn(cpo, args.tasks * args.n_steps, args.iterations)[0], None))
    trpo = TRPO(
        "MlpPolicy",
        task_vec_env(dist, tasks, args.envs_per_task),
        n_steps=per_env,
        batch_size=128,
        sub_sampling_factor=args.fvp_sample_freq,
        seed=0,
    )
    rows.append(("sb3-contrib TRPO learn()", timed_learn(trpo, args.tasks * args.n_steps, args.iterations)[0], None))

    print(f"{'':<40} {'steps/s':>9} {'x limit':>8}")
    for name, speed, mode in rows:
        ratio = meta.ratio(mode) if mode else speed / limit
        spread = f"  (rounds {rounds_text(meta.ratios(mode))})" if mode and meta.rounds > 1 else ""
        print(f"{name:<40} {speed:>9.0f} {ratio:>8.2f}{spread}")
    print(
        f"(the limit: the median of {len(meta.limits)} measurements, before, between and after the MetaCPO runs: "
        + ", ".join(f"{value:.0f}" for value in meta.limits)
        + f" steps/s, {100 * meta.drift():.0f} % apart; each MetaCPO run against the mean of the two around it"
        + (f", the median over {meta.rounds} interleaved rounds" if meta.rounds > 1 else "")
        + ")"
    )

    print(
        "\nThe ceiling: the ratio if everything but the env and the updates' matrix products (torch's mm/addmm/bmm "
        "kernels)\nwere free, about the most an implementation making the same product calls can reach. The "
        "products are those\nof the timed iterations, run again by a twin of the timed model under the torch "
        "profiler (their self time)\nand replayed alone (each call's shapes, strides and dtypes, back to back, hot "
        "caches: about their floor,\nused for the ceiling).\n'batched': the ratio if the per-task phases ("
        + ", ".join(PER_TASK_PHASES)
        + ")\ncost 1/M of their time, everything else unchanged: about the most batching the M tasks' updates "
        "could give:"
    )
    print(
        f"  {'':<30} {'profiled s/iter':>16} {'replayed s/iter':>16} {'other s/iter':>13} {'x limit':>8} "
        f"{'ceiling':>8} {'batched':>8} {'same bits':>9} {'not replayed':>12}"
    )
    for mode, times in products.items():
        other = phases[mode]["total"] - per_meta_iteration / meta.mode_limit(mode) - times.replayed
        print(
            f"  {'MetaCPO, ' + mode.replace('_', '-'):<30} {times.profiled:>16.3f} {times.replayed:>16.3f} {other:>13.3f} "
            f"{meta.ratio(mode):>8.2f} {meta.ceiling(mode):>8.2f} {meta.batched_bound(mode):>8.2f} "
            f"{'yes' if times.same_computation else 'NO':>9} {times.not_replayed:>12}"
        )

    for mode, times in phases.items():
        print(f"\nOne meta-iteration, {mode.replace('_', '-')} ({per_meta_iteration} env steps):")
        print("\n".join(breakdown(times)))
    inner = phases["second_order"]["inner_update"] / args.tasks
    dual = dual_seconds(args.tasks) / args.tasks
    print(
        f"\nDual solve + backward (closed form, batched over {args.tasks} tasks): {1e3 * dual:.3f} ms per task, "
        f"{100 * dual / inner:.2f}% of a second-order inner update ({1e3 * inner:.1f} ms, its backward excluded)"
    )

    if args.env_id:
        print("\n".join(standard_env_table(args.env_id, args.iterations)))

    if args.scaling:
        print("\nSeconds per second-order meta-iteration (updates only: total minus sampling):")
        print(f"  {'M':>3} {'K':>3} {'net':>10} {'s/iter':>8} {'updates':>8}")
        for tasks_m, inner_k, net in ((2, 1, 64), (4, 1, 64), (8, 1, 64), (4, 2, 64), (4, 1, 256)):
            model = meta_model(
                dist, args, "second_order", meta_batch_size=tasks_m, n_inner_updates=inner_k,
                policy_kwargs=dict(net_arch=[net, net]),
            )  # fmt: skip
            steps = tasks_m * (inner_k + 1) * args.n_steps
            _, times = timed_learn(model, steps, args.iterations)
            updates = times["total"] - times["sampling"]
            print(f"  {tasks_m:>3} {inner_k:>3} {f'{net}x{net}':>10} {times['total']:>8.2f} {updates:>8.2f}")


if __name__ == "__main__":
    main()
