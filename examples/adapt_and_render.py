"""Adapt a saved MetaCPO model to a held-out task and render it before and after, side by side, as a GIF.

    python examples/adapt_and_render.py --model runs/quickstart/metacpo_toy2dnav.zip
    python examples/adapt_and_render.py --timesteps 2000 --n-steps 100   # no model: trains a small one first

Writes ``adapted.gif`` (the meta-policy and the adapted policy on the same start state, acting stochastically as in
the evaluations) and ``adaptation.png`` (return
and cost after each update) to ``--out`` (default ``runs/adapt_and_render``). Needs ``pip install sb3-metacpo[plots]``.
Toy2DNav draws itself with numpy; the safety-gymnasium families render with headless MuJoCo (``MUJOCO_GL=egl``).
"""

from __future__ import annotations

import argparse
import os

import torch as th

from sb3_metacpo import MetaCPO
from sb3_metacpo.plots import plot_adaptation_curves, side_by_side_gif
from sb3_metacpo.tasks import make_task_distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved MetaCPO or MetaTRPO model (default: train one on Toy2DNav)")
    parser.add_argument("--timesteps", type=int, default=50_000, help="meta-training env steps when no --model is given")
    parser.add_argument("--n-steps", type=int, default=1000, help="env steps per batch when training")
    parser.add_argument("--n-updates", type=int, default=2, help="adaptation updates")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--out", default=os.path.join("runs", "adapt_and_render"))
    args = parser.parse_args()
    th.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    path = args.model
    if path is None:
        task_dist = make_task_distribution("Toy2DNav", seed=0)
        model = MetaCPO("MlpPolicy", task_dist, meta_batch_size=4, n_steps=args.n_steps, seed=0)
        path = str(model.learn(args.timesteps).save(os.path.join(args.out, "metacpo_toy2dnav")))
        print(f"trained and saved {path}")

    meta_policy = MetaCPO.load(path)  # as trained: acts with the meta-parameters
    task_dist = meta_policy.task_distribution
    task = task_dist.test_tasks(1)[0]  # held out: never trained on
    print(f"held-out task of {task_dist.name}: {task.short()}")

    # Adapt a second copy (the meta-policy keeps acting as trained), evaluating before and after every update.
    adapted = MetaCPO.load(path)
    records, last = [], None
    for k, params in adapted.adaptation_steps(task, n_updates=args.n_updates):
        last = params
        result = adapted.evaluate_params(task, params, args.eval_episodes, seed=1)
        records.append(
            {"method": "MetaCPO", "task": 0, "seed": 0, "update": k, "return": result.ep_rew_mean, "cost": result.ep_cost_mean}
        )
        print(f"after {k} update(s): return {result.ep_rew_mean:.1f}, cost {result.ep_cost_mean:.2f}")
    # act with the parameters just evaluated (adapting again would draw new batches and give another policy)
    adapted.adapted_params = last
    adapted.policy.set_actor_override(last)

    curves = os.path.join(args.out, "adaptation.png")
    plot_adaptation_curves(records, curves, cost_limit=adapted.effective_cost_limit)
    gif = side_by_side_gif(
        {"meta-policy": meta_policy, f"after {args.n_updates} updates": adapted},
        lambda: task_dist.make_env(task, render_mode="rgb_array"),
        os.path.join(args.out, "adapted.gif"),
        seed=10_000,
        every=2,
    )
    print(f"wrote {gif} and {curves}")


if __name__ == "__main__":
    main()
