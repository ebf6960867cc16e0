"""How well does a CPO step predict the cost it will have? Our CPO on SafetyPointGoal1Gymnasium-v0, each update
diagnosed.

CPO linearises the episode cost: a step x is taken so that ``J_C + L·aᵀx`` is at most the limit, ``a`` the gradient
of the cost surrogate ``mean(ratio · A_C)`` on the batch, L the episode length. On PointGoal1 at 1e6 steps the cost
stays about twice the limit although almost every step is one whose linearised cost is at the limit
(``docs/guide/results.rst``). This script asks where the promised decrease goes. At every update it records, besides
what CPO does:

* the full step's predicted change of the episode cost, ``L·aᵀx`` (linear, CPO's model) and ``L·(L_C(φ+x) −
  L_C(φ))`` (the importance-sampled surrogate the line search checks), and the next batch's measured change;
* a split test of the cost gradient: the batch is cut into K parts of whole episodes (K = 2, 4, 10: parts of 10, 5
  and 2 episodes of a 20-episode batch), each part gives a CPO step computed on that part alone, and each step's
  predicted cost change is evaluated on its own part (in sample) and on the other parts (out of sample, the mean
  over them). A gradient that is mostly noise promises on its own part what the other parts do not confirm; the
  ratio out / in is the share of the promise that holds, at that many episodes per batch. The same for the reward
  surrogate, as a contrast.

The diagnostic steps change nothing: the update the model takes is checked to equal the one computed here, and the
training episodes are those of ``pointgoal1.py``'s run of the same seed and batch size (compare with ``--reference``).

    python benchmarks/cpo_prediction.py --seed 0 --out benchmarks/results/cpo_prediction   # ~11 min per seed
    python benchmarks/cpo_prediction.py --seed 0 --recovery violated --out benchmarks/results/cpo_prediction
    python benchmarks/cpo_prediction.py --seed 0 --cost-gamma 0.99 --out benchmarks/results/cpo_prediction
    python benchmarks/cpo_prediction.py --summarise --out benchmarks/results/cpo_prediction \\
        --reference benchmarks/results/pointgoal1_seeds
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from adaptation import t_interval
from pointgoal1 import ENV_ID, read_monitor, run_name
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo import CPO
from sb3_metacpo.common.conjugate_gradient import flat_grad
from sb3_metacpo.common.cpo_update import (
    RECOVERY_RULES,
    ActorFn,
    Params,
    PreparedBatch,
    add_flat,
    cpo_update,
    detached,
    flatten,
    surrogates,
)
from sb3_metacpo.common.rollouts import TaskBatch
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.monitor import CostMonitor
from sb3_metacpo.tasks.safety_gym import fast_standard_env

DEFAULT_TIMESTEPS = 1_000_000
N_STEPS = 20_000
#: the numbers of parts the batch is cut into for the split test
SPLITS = (2, 4, 10)
#: per number of parts K, the split test's columns (``k<K>_cost_in`` ...): the parts' steps' predicted changes on
#: their own part and on the other parts (cost in episode-cost units, linear and surrogate; reward linear, per step)
SPLIT_COLUMNS = ("cost_in", "cost_out", "cost_in_surrogate", "cost_out_surrogate", "reward_in", "reward_out")
#: the columns of an updates file, one row per update (``k<K>_cases``: the parts' CPO cases, ``/``-separated)
COLUMNS = (
    "update",
    "case",
    "accepted",
    "episodes",
    "episode_cost",
    "episode_cost_se",
    "length",
    "full_cost_linear",
    "full_cost_surrogate",
    *(f"k{k}_{name}" for k in SPLITS for name in (*SPLIT_COLUMNS, "cases")),
)
#: the text columns of an updates file
TEXT_COLUMNS = frozenset({"case", *(f"k{k}_cases" for k in SPLITS)})


def split_batch(batch: TaskBatch, parts: int) -> list[TaskBatch]:
    """The batch cut in time into ``parts`` parts of equal rows, each of whole episodes (a one-env batch).

    Raises ``ValueError`` when the batch has several envs, its rows do not divide into ``parts``, or a cut is not an
    episode boundary (each part must hold its own episodes, whose advantages and costs do not depend on the others).
    """
    n_rows, n_envs = batch.rewards.shape
    if n_envs != 1:
        raise ValueError(f"split_batch needs a one-env batch, got {n_envs} envs")
    if parts < 1 or n_rows % parts:
        raise ValueError(f"a batch of {n_rows} steps does not divide into {parts} parts")
    size = n_rows // parts
    cuts = [size * index for index in range(1, parts)]
    ends = np.cumsum([episode.length for episode in batch.episodes])
    missing = sorted(set(cuts) - set(ends.tolist()))  # the completed episodes' ends are the episode boundaries
    if missing:
        raise ValueError(f"the batch of {n_rows} steps has no episode boundary at row {missing[0]}")
    which = np.searchsorted(np.array(cuts), ends - 1, side="right")  # the part each completed episode ends in

    def part(index: int) -> TaskBatch:
        rows = slice(index * size, (index + 1) * size)
        steps = None if batch.episode_steps is None else batch.episode_steps[rows]
        return replace(
            batch,
            observations=batch.observations[rows],
            actions=batch.actions[rows],
            rewards=batch.rewards[rows],
            costs=batch.costs[rows],
            terminated=batch.terminated[rows],
            truncated=batch.truncated[rows],
            next_observations=batch.next_observations[rows],
            episodes=[episode for episode, w in zip(batch.episodes, which, strict=True) if w == index],
            episode_steps=steps,
        )

    return [part(index) for index in range(parts)]


def predicted_changes(actor: ActorFn, params: Params, step: th.Tensor, batch: PreparedBatch) -> dict[str, float]:
    """What ``batch`` predicts a parameter change ``step`` (flat) does to the surrogates at ``params``: the linear
    predictions ``gᵀ·step`` (reward surrogate) and ``aᵀ·step`` (first cost surrogate), and the importance-sampled
    change of the cost surrogate, ``L_C(params + step) − L_C(params)``. Per step of data: multiply the cost ones by
    the episode length for episode-cost units."""
    work = {name: value.detach().clone().requires_grad_(True) for name, value in params.items()}
    reward, costs = surrogates(actor, work, batch)
    tensors = list(work.values())
    g = flat_grad(reward, tensors, retain_graph=True)
    a = flat_grad(costs[0], tensors)
    with th.no_grad():
        _, costs_after = surrogates(actor, add_flat(detached(params), step), batch)
    return {
        "reward": float(g @ step),
        "cost": float(a @ step),
        "cost_surrogate": float(costs_after[0] - costs[0].detach()),
    }


def mean_length(batch: TaskBatch, default: int) -> float:
    """The mean length of the batch's completed episodes (``default`` when none completed), the L of CPO's
    constraint value."""
    return float(np.mean([episode.length for episode in batch.episodes])) if batch.episodes else float(default)


class DiagnosedCPO(CPO):
    """Our CPO, unchanged, recording at each update the predictions of its step and the split tests' (one row of
    :data:`COLUMNS` in ``diagnostics``)."""

    diagnostics: list[dict[str, Any]]

    def train(self) -> None:
        batch = self._rollout
        assert batch is not None, "train() needs a rollout: call learn()"
        if not hasattr(self, "diagnostics"):
            self.diagnostics = []
        params = {name: value.detach().clone() for name, value in self.policy.actor_params().items()}
        episode_length = self._episode_length()
        config = self._cpo_config(self.target_kl)
        actor, fisher = self.policy.actor_mean_log_std, self.policy.fisher_product
        prepared = self._prepare_batch(batch, params, episode_length, with_critic=True)
        full_params, full = cpo_update(actor, params, prepared, config, fisher=fisher)
        length = mean_length(batch, episode_length)
        on_full = predicted_changes(actor, params, full.step.detach(), prepared)
        split = {k: self._split_test(batch, params, k) for k in SPLITS}
        super().train()
        taken = flatten({name: value.detach() for name, value in self.policy.actor_params().items()})
        if not th.equal(taken, flatten(full_params).detach()):
            raise RuntimeError("the diagnosed update differs from the one the model took")
        sem = prepared.episode_cost_sem
        self.diagnostics.append(
            {
                "update": self._n_updates,
                "case": full.case,
                "accepted": int(full.accepted),
                "episodes": prepared.n_episodes,
                "episode_cost": float(prepared.episode_costs[0]),
                "episode_cost_se": float("nan") if sem is None else float(sem[0]),
                "length": length,
                "full_cost_linear": length * on_full["cost"],
                "full_cost_surrogate": length * on_full["cost_surrogate"],
                **{f"k{k}_{name}": value for k, columns in split.items() for name, value in columns.items()},
            }
        )

    def _split_test(self, batch: TaskBatch, params: Params, parts: int) -> dict[str, Any]:
        """The split test with ``parts`` parts (:data:`SPLIT_COLUMNS`, means over the parts' steps, and the cases)."""
        episode_length = self._episode_length()
        config = self._cpo_config(self.target_kl)
        actor, fisher = self.policy.actor_mean_log_std, self.policy.fisher_product
        pieces = split_batch(batch, parts)
        prepared = [self._prepare_batch(piece, params, episode_length, with_critic=True) for piece in pieces]
        lengths = [mean_length(piece, episode_length) for piece in pieces]
        steps = [cpo_update(actor, params, piece, config, fisher=fisher)[1] for piece in prepared]
        own, other = [], []  # per part's step: its predictions on its own part, and their mean over the other parts
        for index, step in enumerate(steps):
            on = [predicted_changes(actor, params, step.step.detach(), piece) for piece in prepared]
            scaled = [
                {**o, "cost": n * o["cost"], "cost_surrogate": n * o["cost_surrogate"]}
                for n, o in zip(lengths, on, strict=True)
            ]
            own.append(scaled[index])
            others = [o for j, o in enumerate(scaled) if j != index]
            other.append({key: float(np.mean([o[key] for o in others])) for key in scaled[index]})
        return {
            "cost_in": float(np.mean([o["cost"] for o in own])),
            "cost_out": float(np.mean([o["cost"] for o in other])),
            "cost_in_surrogate": float(np.mean([o["cost_surrogate"] for o in own])),
            "cost_out_surrogate": float(np.mean([o["cost_surrogate"] for o in other])),
            "reward_in": float(np.mean([o["reward"] for o in own])),
            "reward_out": float(np.mean([o["reward"] for o in other])),
            "cases": "/".join(step.case for step in steps),
        }


def run(
    seed: int, timesteps: int, cost_limit: float, out: Path, recovery: str = "linearised", cost_gamma: float = 1.0
) -> Path:
    """Train :class:`DiagnosedCPO` as ``pointgoal1.py`` trains CPO (one fast env, a monitor file of every training
    episode, the files named as that script names them) and write the updates file; returns its path. CPO's
    defaults (``recovery="linearised"``, ``cost_gamma=1``) put no variant in the name."""
    import_safety_gymnasium()
    options: dict[str, Any] = {} if recovery == "linearised" else {"recovery": recovery}
    if cost_gamma != 1.0:
        options["cost_gamma"] = cost_gamma
    name = run_name("CPO", seed, N_STEPS, options)
    monitor_file = out / name

    def make() -> gym.Env:
        return CostMonitor(fast_standard_env(gym.make(ENV_ID)), filename=str(monitor_file))

    env = DummyVecEnv([make])
    model = DiagnosedCPO(
        "MlpPolicy", env, seed=seed, cost_limit=cost_limit, n_steps=N_STEPS, recovery=recovery, cost_gamma=cost_gamma
    )
    start = time.perf_counter()
    model.learn(timesteps)
    print(f"{name}: {model._n_updates} updates in {time.perf_counter() - start:.0f} s", flush=True)
    env.close()
    path = out / f"{name}.updates.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(model.diagnostics)
    return path


def read_updates(path: Path) -> list[dict[str, Any]]:
    """An updates file's rows, numbers as floats (:data:`TEXT_COLUMNS` as text)."""
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return [{key: value if key in TEXT_COLUMNS else float(value) for key, value in row.items()} for row in rows]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def seed_statistics(rows: list[dict[str, Any]], cost_limit: float) -> dict[str, float]:
    """One seed's means over its updates (the cost ones in episode-cost units):

    * ``promised``: the full step's linear prediction ``L·aᵀx`` and ``surrogate``, its importance-sampled one;
    * ``realised``: the next batch's mean episode cost minus this batch's (the last update has no next batch; the
      mean telescopes to the change from the first batch to the last, over the number of updates);
    * ``promised_level``: the cost the full steps promise the next batch, ``J_C + L·aᵀx``, and ``next_level`` the
      next batch's cost (both over the updates that have a next batch);
    * per number of parts K, ``k<K>_in``/``k<K>_out``: the parts' steps' predicted cost change on their own part and
      on the other parts, ``k<K>_ratio`` = out / in (of the means over the updates), ``k<K>_surrogate_ratio`` the
      same for the importance-sampled change and ``k<K>_reward_ratio`` for the reward surrogate;
    * ``over``: the share of updates whose batch cost was at or over the limit, ``dual``: the share of CPO's
      constrained (dual) steps.
    """
    costs = np.array([row["episode_cost"] for row in rows])
    promised = np.array([row["full_cost_linear"] for row in rows])
    mean = {key: float(np.mean([row[key] for row in rows])) for key in COLUMNS if key not in TEXT_COLUMNS}
    result = {
        "updates": float(len(rows)),
        "cost": float(costs.mean()),
        "over": float(np.mean(costs >= cost_limit)),
        "dual": float(np.mean([row["case"] == "dual" for row in rows])),
        "promised": mean["full_cost_linear"],
        "surrogate": mean["full_cost_surrogate"],
        "realised": float(np.diff(costs).mean()) if len(costs) > 1 else math.nan,
        "promised_level": float(np.mean((costs + promised)[:-1])) if len(costs) > 1 else math.nan,
        "next_level": float(costs[1:].mean()) if len(costs) > 1 else math.nan,
    }
    for k in SPLITS:
        result[f"k{k}_in"], result[f"k{k}_out"] = mean[f"k{k}_cost_in"], mean[f"k{k}_cost_out"]
        result[f"k{k}_ratio"] = ratio(mean[f"k{k}_cost_out"], mean[f"k{k}_cost_in"])
        result[f"k{k}_surrogate_ratio"] = ratio(mean[f"k{k}_cost_out_surrogate"], mean[f"k{k}_cost_in_surrogate"])
        result[f"k{k}_reward_ratio"] = ratio(mean[f"k{k}_reward_out"], mean[f"k{k}_reward_in"])
    return result


def same_episodes(path: Path, reference: Path) -> str:
    """Whether a monitor file's episodes (return, length, cost of each) are those of ``reference``, as text for the
    summary: identical, the first N of a longer reference, or from which episode on they differ."""
    if not reference.exists():
        return "no reference"
    ours, theirs = read_monitor(path), read_monitor(reference)
    for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if any(a[key] != b[key] for key in ("r", "l", "c")):
            return f"DIFFERENT from episode {index} on"
    if len(ours) == len(theirs):
        return f"identical ({len(ours)} episodes)"
    return f"the first {min(len(ours), len(theirs))} identical ({len(ours)} against {len(theirs)} episodes)"


STATISTICS = (
    ("cost", "batch cost"),
    ("over", "updates at or over the limit"),
    ("dual", "dual steps"),
    ("promised", "promised ΔJ_C, linear"),
    ("surrogate", "promised ΔJ_C, surrogate"),
    ("realised", "realised ΔJ_C, next batch"),
    ("promised_level", "promised J_C of the next batch"),
    ("next_level", "the next batch's J_C"),
    *(
        (f"k{k}_{key}", f"{k} parts of {N_STEPS // k} steps: {label}")
        for k in SPLITS
        for key, label in (
            ("in", "ΔJ_C on own part"),
            ("out", "ΔJ_C on the other parts"),
            ("ratio", "cost, other / own"),
            ("surrogate_ratio", "cost surrogate, other / own"),
            ("reward_ratio", "reward, other / own"),
        )
    ),
)


def summarise(out: Path, cost_limit: float, reference: Path | None) -> None:
    """Per variant (the run name before ``_seed``), each seed's :func:`seed_statistics` and their mean ± 95 %
    t-interval over the seeds; and whether each seed's training episodes equal those of the ``reference`` folder's
    run of the same name."""
    paths = sorted(out.glob("*.updates.csv"))
    if not paths:
        raise SystemExit(f"no updates files in {out}")
    variants: dict[str, dict[str, dict[str, float]]] = {}
    for path in paths:
        name = path.name.removesuffix(".updates.csv")
        variants.setdefault(name.split("_seed")[0], {})[name] = seed_statistics(read_updates(path), cost_limit)
    for variant, per_seed in variants.items():
        names = list(per_seed)
        print(f"\n{variant}, {N_STEPS} steps per update (means over each seed's updates; ΔJ_C in episode cost):\n")
        seeds = [name.split("_seed")[1].split("_")[0] for name in names]
        print(f"| quantity | {' | '.join(f'seed {seed}' for seed in seeds)} | over seeds (± 95 % t) |")
        print("|---|" + "---|" * (len(names) + 1))
        for key, label in STATISTICS:
            values = np.array([per_seed[name][key] for name in names])
            cells = " | ".join(f"{value:.3g}" for value in values)
            print(f"| {label} | {cells} | {values.mean():.3g} ± {t_interval(values):.2g} |")
        if reference is not None:
            print()
            for name in names:
                compared = same_episodes(out / f"{name}.monitor.csv", reference / f"{name}.monitor.csv")
                print(f"{name}: training episodes against {reference.name}/: {compared}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=DEFAULT_TIMESTEPS)
    parser.add_argument("--cost-limit", type=float, default=25.0)
    parser.add_argument("--recovery", choices=RECOVERY_RULES, default="linearised", help="CPO's recovery rule")
    parser.add_argument("--cost-gamma", type=float, default=1.0, help="CPO's cost_gamma (discount of the cost advantages)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpo_prediction"))
    parser.add_argument("--summarise", action="store_true", help="only print the statistics of --out's updates files")
    parser.add_argument("--reference", type=Path, help="a folder of pointgoal1.py's monitor files to compare with")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.out, args.cost_limit, args.reference)
        return
    th.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(run(args.seed, args.timesteps, args.cost_limit, args.out, args.recovery, args.cost_gamma))


if __name__ == "__main__":
    main()
