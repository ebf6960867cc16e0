"""CPO's training speed against OmniSafe's CPO (the peer), on SafetyPointGoal1, in one run.

OmniSafe 0.5.0 lives in its own virtual environment beside ``.venv`` (it pins ``pandas==2.0.3``, which does not
install next to numpy 2.3; ``benchmarks/omnisafe_venv.sh`` installs it without its pins, sharing ``.venv``'s torch,
numpy, mujoco and safety-gymnasium, so both libraries run on the same stack):

    bash benchmarks/omnisafe_venv.sh
    python benchmarks/omnisafe_throughput.py | tee benchmarks/results/omnisafe/throughput.txt

Every row trains a fresh model with seed 0 for ``--updates`` updates of 20,000 env steps (OmniSafe's CPO default,
and this library's setting for SafetyPointGoal1 in ``hyperparams/cpo.yml``) in its own process, and is timed in CPU
seconds of that process around ``learn()`` alone (construction excluded), with torch and numpy's BLAS on one
thread. The rows run in ``--rounds`` interleaved rounds; each ratio is the median of the per-round ratios (this
machine is shared: its speed varies between runs, less within a round). The rows:

* OmniSafe's CPO (``omnisafe.Agent("CPO", "SafetyPointGoal1-v0")``) on safety-gymnasium's own env;
* our CPO on safety-gymnasium's own env (``FAST_STEP``/``FAST_RESET`` off): the algorithms' difference alone;
* our CPO on the library's env (the same episodes, bit for bit): what a user of each library gets;
* both envs with random actions (no learning): the floor each training run stands on.

The settings that decide the work of an update are the same for both (:data:`SHARED`: batch, critic epochs and
minibatch, conjugate-gradient iterations and damping, trust region, discounting, networks); each library keeps its
own defaults elsewhere (OmniSafe normalises observations and standardises advantages, as ours does; OmniSafe
discounts the cost with 0.99, ours not at all; learning-rate schedules and logging differ). What this does not
show: which learns better (the same number of updates, not the same results), other envs or batch sizes, several
threads or a GPU, or OmniSafe's own vectorised and parallel modes (``vector_env_nums``, ``parallel``), which trade
more processes for wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_ID = "SafetyPointGoal1Gymnasium-v0"  # the library's id
OMNISAFE_ENV_ID = "SafetyPointGoal1-v0"  # OmniSafe's name for the same task (it builds safety_gymnasium.make of it)
STEPS_PER_UPDATE = 20_000
DEFAULT_OMNISAFE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-omnisafe" / "bin" / "python"

#: The settings that decide an update's work, under both libraries' names (ours: CPO's constructor arguments, and
#: OmniSafe's: ``algo_cfgs`` and ``model_cfgs``), all at OmniSafe's defaults, which CPO's are too (tested) apart
#: from the batch and the cost limit.
SHARED: dict[str, tuple[str, str, Any]] = {
    # name: (ours, OmniSafe's, value)
    "env steps per update": ("n_steps", "algo_cfgs.steps_per_epoch", STEPS_PER_UPDATE),
    "critic epochs per update": ("n_critic_updates", "algo_cfgs.update_iters", 10),
    "critic minibatch": ("batch_size", "algo_cfgs.batch_size", 128),
    "conjugate-gradient iterations": ("cg_max_steps", "algo_cfgs.cg_iters", 15),
    "conjugate-gradient damping": ("cg_damping", "algo_cfgs.cg_damping", 0.1),
    "trust region (KL)": ("target_kl", "algo_cfgs.target_kl", 0.01),
    "discount": ("gamma", "algo_cfgs.gamma", 0.99),
    "GAE lambda": ("gae_lambda", "algo_cfgs.lam", 0.95),
    "cost limit": ("cost_limit", "algo_cfgs.cost_limit", 25.0),
    "critic learning rate": ("learning_rate", "model_cfgs.critic.lr", 1e-3),
}
HIDDEN = [64, 64]  # both libraries' actor and critics, tanh (ours: SB3's default ``MlpPolicy``; tested)

OMNISAFE = "OmniSafe CPO, stock env"
OURS_STOCK = "CPO (ours), stock env"
OURS = "CPO (ours), library env"
RAW_STOCK = "raw env, random actions, stock"
RAW_OURS = "raw env, random actions, library"
ROWS = (RAW_STOCK, RAW_OURS, OMNISAFE, OURS_STOCK, OURS)


def cpo_kwargs() -> dict[str, Any]:
    """Our CPO's constructor arguments for the shared settings."""
    return {ours: value for ours, _, value in SHARED.values()}


def omnisafe_config(updates: int, log_dir: str) -> dict[str, Any]:
    """OmniSafe's ``custom_cfgs`` for the shared settings, ``updates`` updates, one thread, no checkpoints or
    TensorBoard."""
    config: dict[str, Any] = {
        "seed": 0,
        "train_cfgs": {
            "device": "cpu",
            "torch_threads": 1,
            "vector_env_nums": 1,
            "parallel": 1,
            "total_steps": updates * STEPS_PER_UPDATE,
        },
        "logger_cfgs": {"use_wandb": False, "use_tensorboard": False, "log_dir": log_dir, "save_model_freq": 10**9},
        "model_cfgs": {
            "actor": {"hidden_sizes": list(HIDDEN), "activation": "tanh"},
            "critic": {"hidden_sizes": list(HIDDEN), "activation": "tanh"},
        },
    }
    for _, path, value in SHARED.values():
        section, *keys = path.split(".")
        node = config.setdefault(section, {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return config


def _one_thread() -> Any:
    import torch as th
    from threadpoolctl import threadpool_limits

    th.set_num_threads(1)
    return threadpool_limits(1)


def time_omnisafe(updates: int) -> float:
    """Env steps per CPU second of OmniSafe's CPO ``learn()`` (run under OmniSafe's environment)."""
    import importlib

    from sb3_metacpo.tasks import compat

    compat.apply()  # safety-gymnasium 1.0.0 on this stack, before OmniSafe imports it
    omnisafe = importlib.import_module("omnisafe")

    with tempfile.TemporaryDirectory() as log_dir, _one_thread():
        agent = omnisafe.Agent("CPO", OMNISAFE_ENV_ID, custom_cfgs=omnisafe_config(updates, log_dir))
        start = time.process_time()
        agent.learn()
        seconds = time.process_time() - start
    return updates * STEPS_PER_UPDATE / seconds


@contextlib.contextmanager
def _env_kind(fast: bool) -> Iterator[None]:
    """The library's env (``fast``) or safety-gymnasium's own code for the envs built inside."""
    from sb3_metacpo.tasks import safety_gym

    before = safety_gym.FAST_STEP, safety_gym.FAST_RESET
    safety_gym.FAST_STEP = safety_gym.FAST_RESET = fast
    try:
        yield
    finally:
        safety_gym.FAST_STEP, safety_gym.FAST_RESET = before


def time_ours(updates: int, fast: bool, n_steps: int = STEPS_PER_UPDATE) -> float:
    """Env steps per CPU second of our CPO's ``learn()`` on the library's env (``fast``) or safety-gymnasium's."""
    from sb3_metacpo import CPO

    with _env_kind(fast):
        model = CPO("MlpPolicy", ENV_ID, seed=0, **{**cpo_kwargs(), "n_steps": n_steps})
    with _one_thread():
        start = time.process_time()
        model.learn(updates * n_steps)
        seconds = time.process_time() - start
    return updates * n_steps / seconds


def time_raw(updates: int, fast: bool, n_steps: int = STEPS_PER_UPDATE) -> float:
    """Env steps per CPU second of the env CPO builds (monitor and all) with uniform random actions."""
    import numpy as np

    from sb3_metacpo import CPO

    with _env_kind(fast):
        env = CPO("MlpPolicy", ENV_ID, seed=0).env
    assert env is not None
    with _one_thread():
        rng = np.random.default_rng(0)
        env.reset()
        steps = updates * n_steps
        shape = (1, *env.action_space.shape)
        start = time.process_time()
        for _ in range(steps):
            env.step(rng.uniform(-1, 1, shape).astype(np.float32))
        seconds = time.process_time() - start
        env.close()
    return steps / seconds


def run_row(row: str, updates: int) -> float:
    """One row, in this process."""
    if row == OMNISAFE:
        return time_omnisafe(updates)
    if row in (OURS, OURS_STOCK):
        return time_ours(updates, fast=row == OURS)
    if row in (RAW_OURS, RAW_STOCK):
        return time_raw(updates, fast=row == RAW_OURS)
    raise ValueError(f"unknown row {row!r}; the rows are {ROWS}")


@dataclass(frozen=True)
class PeerThroughput:
    """Each row's env steps per CPU second, one value per round."""

    rounds: dict[str, list[float]]

    def speed(self, row: str) -> float:
        return statistics.median(self.rounds[row])

    def round_ratios(self, row: str, baseline: str) -> list[float]:
        """The row's speed over the baseline's, round by round."""
        return [a / b for a, b in zip(self.rounds[row], self.rounds[baseline], strict=True)]

    def ratio(self, row: str, baseline: str) -> float:
        """The median of :meth:`round_ratios`."""
        return statistics.median(self.round_ratios(row, baseline))


def table(result: PeerThroughput, updates: int) -> list[str]:
    """The printed table: every row's median speed and its round values, then the ratios."""
    n = len(result.rounds[ROWS[0]])
    lines = [
        f"SafetyPointGoal1, 1 env, {updates} updates of {STEPS_PER_UPDATE} env steps per row and round; env steps per "
        f"CPU second, median of {n} interleaved rounds (each round's value in brackets):",
    ]
    width = max(len(row) for row in ROWS)
    for row in ROWS:
        values = ", ".join(f"{value:.0f}" for value in result.rounds[row])
        lines.append(f"{row:<{width}} {result.speed(row):>8.0f}  ({values})")
    lines.append("")
    comparisons = (
        (OURS, OMNISAFE, "what a user gets: our CPO on our env / OmniSafe's CPO"),
        (OURS_STOCK, OMNISAFE, "the algorithms alone: both CPOs on the stock env"),
        (OURS, OURS_STOCK, "our env under our CPO: library env / stock env"),
        (RAW_OURS, RAW_STOCK, "the envs alone: library env / stock env, random actions"),
        (OMNISAFE, RAW_STOCK, "OmniSafe's CPO as a share of its env's speed"),
        (OURS_STOCK, RAW_STOCK, "our CPO on the stock env, as a share of that env's speed"),
        (OURS, RAW_OURS, "our CPO on our env, as a share of that env's speed"),
    )
    for row, baseline, label in comparisons:
        rounds = ", ".join(f"{value:.2f}" for value in result.round_ratios(row, baseline))
        lines.append(f"{label:<60} {result.ratio(row, baseline):>6.2f}  ({rounds})")
    return lines


def versions() -> dict[str, str]:
    """The versions of the packages a row's speed depends on, in this process's environment."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("omnisafe", "sb3-metacpo", "torch", "numpy", "mujoco", "safety-gymnasium", "gymnasium"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2, help="updates of 20,000 env steps per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--omnisafe-python", default=str(DEFAULT_OMNISAFE_PYTHON), help="the OmniSafe venv's python")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--versions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.updates < 1 or args.rounds < 1:
        parser.error("--updates and --rounds must be at least 1")
    if args.child:
        print(json.dumps(run_row(args.child, args.updates)))
        return
    if args.versions:
        print(json.dumps(versions()))
        return
    if not Path(args.omnisafe_python).exists():
        parser.error(f"no OmniSafe python at {args.omnisafe_python}: run `bash benchmarks/omnisafe_venv.sh` first")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def child(python: str, *arguments: str) -> Any:
        command = [python, str(Path(__file__).resolve()), *arguments]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(f"# python benchmarks/omnisafe_throughput.py --updates {args.updates} --rounds {args.rounds}")
    print(f"{platform.machine()}, Python {platform.python_version()}")
    for label, python in (("ours", sys.executable), ("OmniSafe's", args.omnisafe_python)):
        print(f"{label} environment: " + ", ".join(f"{k} {v}" for k, v in child(python, "--versions").items()))
    print("settings of both: " + "; ".join(f"{name} {value}" for name, (_, _, value) in SHARED.items()))
    rounds: dict[str, list[float]] = {row: [] for row in ROWS}
    for round_index in range(args.rounds):
        for row in ROWS:
            python = args.omnisafe_python if row == OMNISAFE else sys.executable
            rounds[row].append(float(child(python, "--child", row, "--updates", str(args.updates))))
            print(f"round {round_index}: {row}: {rounds[row][-1]:.0f} steps/s", flush=True)
    print()
    print("\n".join(table(PeerThroughput(rounds), args.updates)))


if __name__ == "__main__":
    main()
