"""Fingerprints of short training runs: a hash of the policy's parameters after each, to tell whether a change to the
library (a performance change, most often) leaves the numbers the algorithms compute bit for bit as they were.

Run it before and after the change on the same machine and compare the lines: equal hashes mean every update of
those runs computed the same bits. Float results depend on the CPU's kernels, so hashes are comparable between two
versions of the library on one host, not between hosts.

    python benchmarks/fingerprints.py > fingerprints_before.txt      # at the old commit (any file outside git)
    python benchmarks/fingerprints.py | diff fingerprints_before.txt -

The runs: MetaCPO first and second order on Toy2DNav, HalfCheetahVelocity and PointGoalHazard (one inner update;
second order also with two on Toy2DNav), MetaTRPO and CPO on Toy2DNav, each a few iterations from seed 0, torch and
numpy's BLAS on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from typing import Any

import torch as th
from threadpoolctl import threadpool_limits

from sb3_metacpo import CPO, MetaCPO, MetaTRPO
from sb3_metacpo.tasks import make_task_distribution


def policy_hash(model: Any) -> str:
    """SHA-256 of the policy's parameters and buffers (names and bytes, in name order), first 16 hex digits: equal
    hashes mean the same bits (a NaN equals the same NaN, -0.0 differs from 0.0)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def meta_run(algo: type, family: str, mode: str, tasks: int, n_steps: int, inner: int, iterations: int) -> Any:
    """``iterations`` meta-iterations of ``algo`` on ``tasks`` tasks of ``n_steps`` steps, ``inner`` inner updates."""
    kwargs: dict[str, Any] = dict(meta_batch_size=tasks, n_envs=tasks, n_inner_updates=inner, n_steps=n_steps, seed=0)
    if algo is MetaCPO:
        kwargs["meta_gradient"] = mode
    model = algo("MlpPolicy", make_task_distribution(family, seed=0), **kwargs)
    model.learn(tasks * (inner + 1) * n_steps * iterations)
    return model


def cpo_run() -> Any:
    """Three CPO updates on four Toy2DNav training tasks."""
    model = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_envs=4, n_steps=200, seed=0)
    model.learn(4 * 200 * 3)
    return model


RUNS: dict[str, Callable[[], Any]] = {
    "MetaCPO Toy2DNav first_order": lambda: meta_run(MetaCPO, "Toy2DNav", "first_order", 4, 100, 1, 5),
    "MetaCPO Toy2DNav second_order": lambda: meta_run(MetaCPO, "Toy2DNav", "second_order", 4, 100, 1, 5),
    "MetaCPO Toy2DNav second_order K=2": lambda: meta_run(MetaCPO, "Toy2DNav", "second_order", 4, 100, 2, 4),
    "MetaCPO HalfCheetahVelocity first_order": lambda: meta_run(MetaCPO, "HalfCheetahVelocity", "first_order", 4, 200, 1, 4),
    "MetaCPO HalfCheetahVelocity second_order": lambda: meta_run(MetaCPO, "HalfCheetahVelocity", "second_order", 4, 200, 1, 4),
    "MetaCPO PointGoalHazard first_order": lambda: meta_run(MetaCPO, "PointGoalHazard", "first_order", 2, 500, 1, 2),
    "MetaCPO PointGoalHazard second_order": lambda: meta_run(MetaCPO, "PointGoalHazard", "second_order", 2, 500, 1, 2),
    "MetaTRPO Toy2DNav": lambda: meta_run(MetaTRPO, "Toy2DNav", "first_order", 4, 100, 1, 5),
    "CPO Toy2DNav": cpo_run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="names of the runs to do (default: all)", choices=list(RUNS))
    args = parser.parse_args()
    th.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    for name in args.only or RUNS:
        print(f"{name:<44} {policy_hash(RUNS[name]())}", flush=True)


if __name__ == "__main__":
    main()
