"""Meta-training on Ray: time per meta-iteration with the local sampler and with Ray at 1 and 2 workers, what
crosses the wire, the driver's share, and a projection to 8, 32 and 128 workers.

In one run, for one family, every configuration trains the same MetaCPO (same seed: the same meta-parameters come
out of each, which the run checks) for ``--iterations`` meta-iterations after one warm-up iteration:

* ``local``: the default sampler (a DummyVecEnv in the driver process);
* ``ray-N``: ``sampler="ray"`` with N workers on a local Ray (``--workers``, default ``1,2``).

It prints, per configuration, seconds per meta-iteration, env steps per second, the seconds the driver spent waiting
for samples and the seconds it spent on everything else (inner CPO updates, advantages, meta-gradient, outer step
with its line search, critics, and the sampler's own driver work: shipping the actor, assembling batches, replaying
callbacks), the bytes sent and received per iteration, and whether the meta-parameters equal the local sampler's.

The projection is Amdahl's law on the ``ray-1`` measurement: per meta-iteration, ``T(N) = S + P / min(N, n_envs)``,
``P`` the busiest worker's env time summed over the iteration's collects (the part more workers share) and ``S``
everything else (the driver's work, waiting overheads, transfers), which stays serial. It assumes the transfer and
per-collect overhead do not grow with N and that envs are the unit of parallelism (at most ``n_envs`` useful
workers; raise ``n_envs`` to use more).

    python benchmarks/ray_scaling.py --family Toy2DNav
    python benchmarks/ray_scaling.py --family PointGoalHazard --n-steps 500 --meta-batch-size 4
    RAY_ADDRESS=auto python benchmarks/ray_scaling.py --workers 1,2,8,32  # on a running cluster

The output is written to ``benchmarks/results/ray_scaling/<family>.txt`` as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import ray
import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.common.profiling import phase_times
from sb3_metacpo.common.ray_sampler import RaySampler
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution

#: Driver phases of a meta-iteration (``sampling`` is split into waiting for the workers and the sampler's own work).
DRIVER_PHASES = ("advantages", "inner_update", "meta_gradient", "outer_step", "critic_training")
PROJECTED_WORKERS = (1, 2, 8, 32, 128)


def measure(args: argparse.Namespace, sampler: str, workers: int) -> dict[str, Any]:
    """Train the benchmark's MetaCPO with one sampler; timings of the measured iterations."""
    kwargs: dict[str, Any] = {} if sampler == "local" else {"num_workers": workers, "measure_transfer": True}
    model = MetaCPO(
        "MlpPolicy",
        make_task_distribution(args.family, seed=0),
        meta_batch_size=args.meta_batch_size,
        n_steps=args.n_steps,
        n_envs=args.n_envs,
        meta_gradient=args.meta_gradient,
        seed=0,
        sampler=sampler,  # type: ignore[arg-type]
        sampler_kwargs=kwargs or None,
    )
    # the sampler runs every env for ceil(n_steps / envs per task) steps per batch (n_envs >= M, a multiple or not)
    per_batch = model.n_envs * -(-model.n_steps // (model.n_envs // model.meta_batch_size))
    per_iteration = per_batch * (model.n_inner_updates + 1)
    model.learn(per_iteration)  # warm-up: Ray actors, imports, first compilations
    ray_sampler = model.sampler if isinstance(model.sampler, RaySampler) else None
    before = None if ray_sampler is None else dataclass_copy(ray_sampler.totals)
    with phase_times() as times:
        start = time.perf_counter()
        model.learn(args.iterations * per_iteration, reset_num_timesteps=False)
        seconds = time.perf_counter() - start
    n = args.iterations
    result: dict[str, Any] = {
        "name": sampler if sampler == "local" else f"ray-{workers}",
        "workers": workers,
        "iteration": seconds / n,
        "steps_per_s": args.iterations * per_iteration / seconds,
        "sampling": times.get("sampling", 0.0) / n,
        "driver_phases": {name: times.get(name, 0.0) / n for name in DRIVER_PHASES},
        "params": th.cat([value.detach().flatten() for value in model.policy.actor_params().values()]),
        "n_envs": model.n_envs,
    }
    if ray_sampler is not None and before is not None:
        totals = ray_sampler.totals
        result.update(
            wait=(totals.wait_seconds - before.wait_seconds) / n,
            busiest=(totals.busiest_worker_seconds - before.busiest_worker_seconds) / n,
            worker_total=(totals.worker_seconds - before.worker_seconds) / n,
            sent=(totals.sent - before.sent) / n,
            received=(totals.received - before.received) / n,
        )
        ray_sampler.close()
    else:
        result.update(wait=result["sampling"], busiest=result["sampling"], worker_total=result["sampling"], sent=0, received=0)
    return result


def dataclass_copy(stats: Any) -> Any:
    return type(stats)(**stats.__dict__)


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[str]:
    local = results[0]
    lines = [
        f"Meta-training on Ray: {args.family}, MetaCPO ({args.meta_gradient}), meta_batch_size={args.meta_batch_size}, "
        f"n_steps={args.n_steps}, n_envs={local['n_envs']}, 1 inner update; {args.iterations} measured meta-iterations "
        f"after 1 warm-up, seed 0; each configuration run {args.repeats} times, interleaved, the fastest run shown.",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, Ray {ray.__version__}, torch {th.__version__}.",
        f"Load average {args.load_at_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on "
        f"{os.cpu_count()} cores{f' ({args.note})' if args.note else ''}. Ray's workers and the driver share these "
        "cores; only ratios within this run count, and a load above the core count makes even them noisy.",
        "",
        "sampler  s/iter  env steps/s  vs local  wait for samples  driver work  driver share  sent/iter  received/iter  "
        "same params",
    ]
    for result in results:
        driver = result["iteration"] - result["wait"]
        same = "yes" if th.equal(result["params"], local["params"]) else "NO"
        lines.append(
            f"{result['name']:<8} {result['iteration']:6.2f}  {result['steps_per_s']:11.0f}  "
            f"{local['iteration'] / result['iteration']:7.2f}x  {result['wait']:15.2f}s  {driver:10.2f}s  "
            f"{driver / result['iteration']:11.0%}  {result['sent'] / 2**20:7.2f}MB  {result['received'] / 2**20:11.2f}MB  "
            f"{same:>10}"
        )
    lines += [
        "",
        "wait for samples: local, the sampling phase (env steps and acting in the driver); Ray, the driver blocked on the "
        "workers. driver work: everything else (per iteration, in s):",
    ]
    for result in results:
        phases = ", ".join(f"{name} {value:.2f}" for name, value in result["driver_phases"].items())
        own = result["sampling"] - result["wait"] if result["name"] != "local" else 0.0
        lines.append(f"  {result['name']:<8} {phases}, sampler's driver work {own:.2f}")
    ray_one = next((result for result in results if result["name"] == "ray-1"), None)
    if ray_one is not None:
        parallel = ray_one["busiest"]
        serial = ray_one["iteration"] - parallel
        n_envs = ray_one["n_envs"]
        lines += [
            "",
            f"Projection (Amdahl, from ray-1): per iteration S = {serial:.2f}s serial (driver work, transfers, waiting "
            f"overhead) and P = {parallel:.2f}s of env time in the worker, shared by min(N, n_envs = {n_envs}) workers; "
            f"serial share {serial / ray_one['iteration']:.0%}.",
            f"Left: the envs as run (n_envs = {n_envs}, so at most {n_envs} useful workers). Right: the same env steps "
            "split over n_envs >= N envs (more envs per task, shorter rollouts per env).",
            "workers  measured s/iter | n_envs as run: s/iter  vs ray-1  vs local | n_envs >= N: s/iter  vs ray-1  vs local",
        ]
        measured = {result["workers"]: result["iteration"] for result in results if result["name"] != "local"}
        for n in PROJECTED_WORKERS:
            capped = serial + parallel / min(n, n_envs)
            free = serial + parallel / n
            seen = f"{measured[n]:.2f}" if n in measured else "-"
            lines.append(
                f"{n:7d}  {seen:>15} | {capped:21.2f}  {ray_one['iteration'] / capped:7.2f}x  "
                f"{local['iteration'] / capped:7.2f}x | {free:19.2f}  {ray_one['iteration'] / free:7.2f}x  "
                f"{local['iteration'] / free:7.2f}x"
            )
        lines += [
            f"Upper bound on the speed-up from workers: {ray_one['iteration'] / serial:.1f}x (P/N -> 0). What stays serial: "
            "the inner CPO updates and advantages of every task (run on the driver after the samples arrive), the "
            "meta-gradient, the outer CPO step and its line search (which re-runs the inner updates), the critics, and "
            "the sampler's driver work. Beyond n_envs workers nothing is gained unless n_envs grows with them "
            "(more envs per task, or a larger meta-batch).",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="Toy2DNav", choices=list_task_distributions())
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=2000, help="env steps per task per batch")
    parser.add_argument("--n-envs", type=int, default=None, help="envs (default: meta_batch_size)")
    parser.add_argument("--meta-gradient", default="second_order", choices=["second_order", "first_order"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved; the fastest counts")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--note", default="", help="what else ran on the machine, printed with the load average")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/ray_scaling/<family>.txt")
    args = parser.parse_args()
    args.load_at_start = os.getloadavg()[0]
    th.set_num_threads(1)
    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    configs = [("local", 0)] + [("ray", int(value)) for value in args.workers.split(",")]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {config: [] for config in configs}
    for _ in range(args.repeats):  # interleaved, so that a change of the machine's load hits every configuration
        for config in configs:
            runs[config].append(measure(args, *config))
    results = [min(runs[config], key=lambda run: run["iteration"]) for config in configs]
    lines = report(args, results)
    print("\n".join(lines))
    output = Path(args.output or Path(__file__).parent / "results" / "ray_scaling" / f"{args.family}.txt")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
