"""Compare Meta-CPO, Meta-TRPO, multi-task CPO and CPO from scratch on held-out tasks, at the same budget.

    python examples/compare_methods.py                                   # ~5 minutes on 2 CPU cores
    python examples/compare_methods.py --timesteps 2000 --n-steps 100 --meta-batch-size 2 --n-tasks 1 --eval-episodes 2

Every trained method gets at least ``--timesteps`` env steps on the Toy2DNav training distribution (the meta-methods
in whole meta-iterations: the steps and updates each got are printed); then each adapts to the same held-out tasks
with the same number of CPO updates, batch size and trust region (``--target-kl``, also the meta-methods' inner and
CPO-pretrain's training trust region; the CPO baselines also take Meta-CPO's cost margin and conjugate-gradient
steps), through :func:`sb3_metacpo.common.evaluation.meta_evaluate` (evaluation
episodes separate from the adaptation batches, the stochastic policy). ``CPO-pretrain`` trains on as many envs as
the meta-methods have tasks per meta-iteration; ``CPO-scratch`` adapts from a random initialisation. Prints a table
of return and cost before and after adapting, with the cost paid while adapting, and writes ``adaptation.csv`` and
``adaptation.png`` to ``--out``. ``benchmarks/adaptation.py`` (the published results) uses this protocol, and also
evaluates the unseen tasks of the training ranges beside these shifted ones, fixes the evaluation episodes' seeds
across methods and reports intervals over seeds.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch as th

from sb3_metacpo import CPO, MetaCPO, MetaTRPO
from sb3_metacpo.common.evaluation import meta_evaluate
from sb3_metacpo.plots import plot_adaptation_curves, write_records
from sb3_metacpo.tasks import make_task_distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=100_000, help="env steps for each trained method")
    parser.add_argument("--n-steps", type=int, default=1000, help="env steps per batch (training and adaptation)")
    parser.add_argument("--meta-batch-size", type=int, default=8, help="tasks per meta-iteration")
    parser.add_argument("--n-updates", type=int, default=1, help="inner updates in meta-training = adaptation updates")
    parser.add_argument("--n-tasks", type=int, default=5, help="held-out tasks")
    parser.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per task and stage")
    parser.add_argument("--target-kl", type=float, default=0.02, help="trust region of every adaptation update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "compare_methods"))
    args = parser.parse_args()
    th.set_num_threads(1)

    def dist():  # every method gets its own copy of the same distribution (same seed, same training tasks)
        return make_task_distribution("Toy2DNav", seed=args.seed)

    meta = dict(
        meta_batch_size=args.meta_batch_size,
        n_inner_updates=args.n_updates,
        n_steps=args.n_steps,
        inner_target_kl=args.target_kl,
        seed=args.seed,
    )
    cpo = dict(n_envs=args.meta_batch_size, n_steps=args.n_steps, target_kl=args.target_kl, seed=args.seed)
    methods = {
        "Meta-CPO": MetaCPO("MlpPolicy", dist(), **meta),
        "Meta-TRPO": MetaTRPO("MlpPolicy", dist(), **meta),
        "CPO-pretrain": CPO("MlpPolicy", dist(), **cpo),  # multi-task CPO
    }
    for name, model in methods.items():
        model.learn(args.timesteps)
        print(f"trained {name}: {model.num_timesteps} env steps, {model._n_updates} policy updates")
    methods["CPO-scratch"] = CPO("MlpPolicy", dist(), **cpo)  # adapts from scratch
    # The CPO baselines adapt with Meta-CPO's cost margin and conjugate-gradient steps (CPO's own defaults are 0 and
    # 15), as in benchmarks/adaptation.py and the demo, so that the adaptation updates differ only in where they start.
    for name in ("CPO-pretrain", "CPO-scratch"):
        for key in ("cost_confidence", "cg_max_steps"):
            setattr(methods[name], key, getattr(methods["Meta-CPO"], key))
    print(
        f"the CPO baselines adapt with Meta-CPO's cost margin {methods['CPO-scratch'].cost_confidence:g} and "
        f"{methods['CPO-scratch'].cg_max_steps} conjugate-gradient steps"
    )

    tasks = dist().test_tasks(args.n_tasks)  # held out: never trained on
    limit = methods["Meta-CPO"].effective_cost_limit
    records = []
    print(f"\n{len(tasks)} held-out tasks, {args.n_updates} update(s) of {args.n_steps} steps, cost limit {limit:g}")
    print(f"{'method':14s} {'return before':>13s} {'after':>7s} {'cost before':>11s} {'paid':>6s} {'after':>6s} under")
    for name, model in methods.items():
        results = meta_evaluate(
            model, tasks, args.n_updates, args.n_steps, n_eval_episodes=args.eval_episodes, target_kl=args.target_kl
        )
        for r in results:
            records.append(
                {
                    "method": name,
                    "task": tasks.index(r.task),
                    "seed": args.seed,
                    "update": r.n_updates,
                    "return": r.ep_rew_mean,
                    "cost": r.ep_cost_mean,
                    "cost_limit": limit,
                }
            )
        before = [r for r in results if r.n_updates == 0]
        after = [r for r in results if r.n_updates == args.n_updates]
        under = sum(r.ep_cost_mean <= limit for r in after)

        def mean(rows, field):
            return float(np.mean([getattr(r, field) for r in rows]))

        print(
            f"{name:14s} {mean(before, 'ep_rew_mean'):13.1f} {mean(after, 'ep_rew_mean'):7.1f} "
            f"{mean(before, 'ep_cost_mean'):11.2f} {mean(after, 'adaptation_ep_cost_mean'):6.2f} "
            f"{mean(after, 'ep_cost_mean'):6.2f} {under}/{len(after)}"
        )

    os.makedirs(args.out, exist_ok=True)
    csv_path = write_records(records, os.path.join(args.out, "adaptation.csv"))
    png_path = os.path.join(args.out, "adaptation.png")
    plot_adaptation_curves(records, png_path, cost_limit=limit)
    print(
        f"\nOne seed: 'under' counts held-out tasks whose stochastic policy's mean cost over {args.eval_episodes} "
        "episodes is at most the limit; benchmarks/adaptation.py gives intervals over seeds and tasks."
    )
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
