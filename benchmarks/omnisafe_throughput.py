"""CPO's training speed against OmniSafe's CPO (the peer), on SafetyPointGoal1, in one run.

OmniSafe 0.5.0 lives in its own virtual environment beside ``.venv`` (it pins ``pandas==2.0.3``, which does not
install next to numpy 2.3; ``benchmarks/omnisafe_venv.sh`` installs it without its pins, sharing ``.venv``'s torch,
numpy, mujoco and safety-gymnasium, so both libraries run on the same stack):

    bash benchmarks/omnisafe_venv.sh
    python benchmarks/omnisafe_throughput.py | tee benchmarks/results/omnisafe/throughput.txt

Every row trains a fresh model with seed 0 for ``--updates`` updates of 20,000 env steps (OmniSafe's CPO default,
and this library's setting for SafetyPointGoal1 in ``sb3_metacpo/hyperparams/cpo.yml``) in its own process, and is
timed in CPU seconds of that process around ``learn()`` alone (construction excluded), with torch and numpy's BLAS
on one thread. The rows run in ``--rounds`` interleaved rounds, in a rotated order from round to round; each ratio
is the median of the per-round ratios (this machine is shared: its speed varies between runs, less within a
round). The rows:

* OmniSafe's CPO (``omnisafe.Agent("CPO", "SafetyPointGoal1-v0")``) on safety-gymnasium's own env;
* our CPO on safety-gymnasium's own env (``FAST_STEP``/``FAST_RESET`` off);
* our CPO on the library's env (the same episodes, bit for bit): with OmniSafe's row, what a user of each gets;
* random actions (no learning) through each training stack's env: ours, stock and library, and OmniSafe's
  (its adapter, with its wrappers: it resets the env twice at every episode end, since safety-gymnasium's
  ``autoreset`` and OmniSafe's ``AutoReset`` wrapper both reset, and a stock reset recompiles the MuJoCo model).

The *settings* that decide an update's work are the same for both (:data:`SHARED`: batch, critic epochs and minibatch,
conjugate-gradient iterations and damping, Fisher products on every sample, trust region, discounting, networks); the
*implementations* differ, and each keeps its own defaults elsewhere. What a user of OmniSafe gets and ours does not,
fixed in OmniSafe's code: the double reset above; 33 Fisher-vector products per update through autograd's double
backward (ours: 30, in closed form); a line search of up to 20 tries (ours: up to 11); two critic Adam steps per
minibatch over a ``DataLoader`` that fetches samples one at a time (ours: one step for both critics, gradients written
out); per step, the actor and both critics in torch, logger calls and a progress bar (ours: a numpy actor, critics
batched after the rollout). And by OmniSafe's defaults (options in its config): an L2 term and gradient clipping in
the critics' steps. OmniSafe discounts the cost with 0.99 (ours not at all; both centre the cost advantages,
OmniSafe's ``standardized_cost_adv`` only subtracts their mean). So the rows compare the two libraries as a user gets
them, not two implementations of one computation. What this does not show: which learns better (the same number of
updates, not the same results), other envs or batch sizes, several threads or a GPU, or OmniSafe's vectorised and
parallel modes (``vector_env_nums``, ``parallel``), which trade more processes for wall time.
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

from omnisafe_pointgoal1 import run_config
from throughput import random_action_speed

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
    "Fisher products on every n-th sample": ("fvp_sample_freq", "algo_cfgs.fvp_sample_freq", 1),
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
RAW_OMNISAFE = "random actions, OmniSafe's env stack"
RAW_STOCK = "random actions, our stack, stock env"
RAW_OURS = "random actions, our stack, library env"
ROWS = (RAW_OMNISAFE, RAW_STOCK, RAW_OURS, OMNISAFE, OURS_STOCK, OURS)
OMNISAFE_ROWS = (RAW_OMNISAFE, OMNISAFE)  # run by OmniSafe's python


def cpo_kwargs() -> dict[str, Any]:
    """Our CPO's constructor arguments for the shared settings."""
    return {ours: value for ours, _, value in SHARED.values()}


def omnisafe_config(updates: int, log_dir: str) -> dict[str, Any]:
    """OmniSafe's ``custom_cfgs`` for the shared settings, ``updates`` updates, one thread, no checkpoints or
    TensorBoard."""
    config = run_config(0, updates * STEPS_PER_UPDATE, log_dir)
    config["model_cfgs"] = {
        "actor": {"hidden_sizes": list(HIDDEN), "activation": "tanh"},
        "critic": {"hidden_sizes": list(HIDDEN), "activation": "tanh"},
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


def time_omnisafe(updates: int, learn: bool = True) -> float:
    """Env steps per CPU second of OmniSafe's CPO ``learn()`` or (``learn=False``) of random actions through the env
    its ``learn()`` steps (its on-policy adapter, wrappers and all); run under OmniSafe's environment."""
    import importlib

    import torch as th

    from sb3_metacpo.tasks import compat

    compat.apply()  # safety-gymnasium 1.0.0 on this stack, before OmniSafe imports it
    omnisafe = importlib.import_module("omnisafe")

    steps = updates * STEPS_PER_UPDATE
    with tempfile.TemporaryDirectory() as log_dir, _one_thread():
        agent = omnisafe.Agent("CPO", OMNISAFE_ENV_ID, custom_cfgs=omnisafe_config(updates, log_dir))
        if learn:
            start = time.process_time()
            agent.learn()
            return steps / (time.process_time() - start)
        env = agent.agent._env  # the OnPolicyAdapter that OmniSafe's rollout steps
        env.reset()
        return random_action_speed(lambda action: env.step(th.as_tensor(action)), env.action_space.shape, steps)


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
    from sb3_metacpo import CPO

    with _env_kind(fast):
        env = CPO("MlpPolicy", ENV_ID, seed=0).env
    assert env is not None
    with _one_thread():
        env.reset()
        speed = random_action_speed(env.step, env.action_space.shape, updates * n_steps)
        env.close()
    return speed


def run_row(row: str, updates: int) -> float:
    """One row, in this process."""
    if row in OMNISAFE_ROWS:
        return time_omnisafe(updates, learn=row == OMNISAFE)
    if row in (OURS, OURS_STOCK):
        return time_ours(updates, fast=row == OURS)
    if row in (RAW_OURS, RAW_STOCK):
        return time_raw(updates, fast=row == RAW_OURS)
    raise ValueError(f"unknown row {row!r}; the rows are {ROWS}")


def rotated(rows: tuple[str, ...], round_index: int) -> list[str]:
    """The rows in the order round ``round_index`` runs them: each round starts one row later, so that no row always
    runs first (or right after another) while the host's load drifts."""
    shift = round_index % len(rows)
    return list(rows[shift:] + rows[:shift])


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
        (OURS_STOCK, OMNISAFE, "both training stacks on the stock env: ours / OmniSafe's"),
        (OURS, OURS_STOCK, "our CPO on the library env / on the stock env"),
        (RAW_STOCK, RAW_OMNISAFE, "random actions: our stack / OmniSafe's, both stock env"),
        (RAW_OURS, RAW_STOCK, "random actions: library env / stock env, our stack"),
        (OMNISAFE, RAW_OMNISAFE, "OmniSafe's CPO / random actions through its env stack"),
        (OURS_STOCK, RAW_STOCK, "our CPO / random actions, stock env"),
        (OURS, RAW_OURS, "our CPO / random actions, library env"),
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
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed with exit code {done.returncode}:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"# python benchmarks/omnisafe_throughput.py --updates {args.updates} --rounds {args.rounds}")
    print(f"{platform.machine()}, Python {platform.python_version()}")
    for label, python in (("ours", sys.executable), ("OmniSafe's", args.omnisafe_python)):
        print(f"{label} environment: " + ", ".join(f"{k} {v}" for k, v in child(python, "--versions").items()))
    print("settings of both: " + "; ".join(f"{name} {value}" for name, (_, _, value) in SHARED.items()))
    rounds: dict[str, list[float]] = {row: [] for row in ROWS}
    for round_index in range(args.rounds):
        for row in rotated(ROWS, round_index):
            python = args.omnisafe_python if row in OMNISAFE_ROWS else sys.executable
            rounds[row].append(float(child(python, "--child", row, "--updates", str(args.updates))))
            print(f"round {round_index}: {row}: {rounds[row][-1]:.0f} steps/s", flush=True)
    print()
    print("\n".join(table(PeerThroughput(rounds), args.updates)))


if __name__ == "__main__":
    main()
