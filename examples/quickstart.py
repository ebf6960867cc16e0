"""Quickstart: meta-train MetaCPO on Toy2DNav, adapt to an unseen task, compare before and after, save and load.

    python examples/quickstart.py                         # ~1 minute on 2 CPU cores
    python examples/quickstart.py --timesteps 2000 --n-steps 100 --meta-batch-size 2 --eval-episodes 2   # seconds

Prints the return and cost of the stochastic policy on an unseen task before and after adaptation, and writes the
model to ``--out`` (default ``runs/quickstart``).
"""

from __future__ import annotations

import argparse
import os

import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.tasks import make_task_distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=100_000, help="meta-training env steps")
    parser.add_argument("--n-steps", type=int, default=1000, help="env steps per task batch (10 Toy2DNav episodes)")
    parser.add_argument("--meta-batch-size", type=int, default=8, help="tasks per meta-iteration")
    parser.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes before and after adapting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "quickstart"))
    args = parser.parse_args()
    th.set_num_threads(1)  # small networks: one thread is fastest (and much faster on a busy machine)

    # A task distribution: every task is a goal and hazards; the held-out tasks are never trained on.
    task_dist = make_task_distribution("Toy2DNav", seed=args.seed)
    model = MetaCPO(
        "MlpPolicy",
        task_dist,
        meta_batch_size=args.meta_batch_size,
        n_inner_updates=1,  # K: CPO updates per task in meta-training, and when adapting
        n_steps=args.n_steps,
        inner_target_kl=0.02,
        seed=args.seed,
    )
    print(
        f"meta-training on {task_dist.name} for at least {args.timesteps} env steps (whole meta-iterations), cost limit "
        f"{model.effective_cost_limit:g}"
    )
    model.learn(total_timesteps=args.timesteps)

    # An unseen task of the training distribution: evaluate the meta-policy, adapt, evaluate the adapted policy.
    task = task_dist.unseen_tasks(1)[0]
    print(f"unseen task: {task.short()}")
    # adaptation_steps yields the parameters before (k = 0) and after each CPO update, leaving the model unchanged;
    # every stage is evaluated on the same start states (seed=1) with the stochastic policy.
    for k, params in model.adaptation_steps(task, n_updates=1):
        result = model.evaluate_params(task, params, n_episodes=args.eval_episodes, seed=1)
        print(f"after {k} update(s): return {result.ep_rew_mean:.1f}, cost {result.ep_cost_mean:.2f}")

    # adapt() keeps the adapted parameters for predict(); reset_adaptation() goes back to the meta-policy. It draws
    # new adaptation batches, so its policy is another draw than the one evaluated above (to act with that one, set
    # model.adapted_params and model.policy.set_actor_override to its params, as examples/adapt_and_render.py does).
    model.adapt(task)
    env = task_dist.make_env(task)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    print(f"adapted policy's action at {obs}: {action}")
    model.reset_adaptation()

    os.makedirs(args.out, exist_ok=True)
    path = model.save(os.path.join(args.out, "metacpo_toy2dnav"))
    loaded = MetaCPO.load(path)
    print(f"saved to {path}; loaded back after {loaded.num_timesteps} env steps and {loaded._n_updates} meta-updates")


if __name__ == "__main__":
    main()
