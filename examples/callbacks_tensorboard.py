"""Callbacks and TensorBoard: cost-aware evaluation on held-out tasks, meta-test curves, resumable checkpoints.

    python examples/callbacks_tensorboard.py                       # ~2 minutes on 2 CPU cores
    python examples/callbacks_tensorboard.py --timesteps 1600 --n-steps 100 --meta-batch-size 2 --eval-episodes 1
    tensorboard --logdir runs/callbacks_tensorboard/tb

MetaCPO trains with ``tensorboard_log=`` and three callbacks: ``SafeEvalCallback`` (reward and cost on held-out
tasks after adaptation; ``best_model.zip`` = the best reward among the evaluations under the cost limit;
``evaluations.npz`` with the costs), ``MetaEvalCallback`` (``meta_test/*`` curves before and after each adaptation
update) and ``ResumableCheckpointCallback`` (checkpoints at update boundaries). Training then resumes from the last
checkpoint for as many steps again. Prints the cost-related TensorBoard tags it finds in the event file (``pip
install sb3-metacpo[tensorboard]``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CallbackList

from sb3_metacpo import MetaCPO
from sb3_metacpo.common.callbacks import ResumableCheckpointCallback, SafeEvalCallback
from sb3_metacpo.common.evaluation import MetaEvalCallback
from sb3_metacpo.tasks import make_task_distribution


def scalar_tags(run_folder: str) -> list[str]:
    """The scalar tags of the TensorBoard event files of one run (``<tensorboard_log>/<tb_log_name>_<n>``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_folder, size_guidance={"scalars": 0})
    accumulator.Reload()
    return sorted(accumulator.Tags()["scalars"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=40_000, help="env steps before the resume (and as many after)")
    parser.add_argument("--n-steps", type=int, default=500, help="env steps per task batch")
    parser.add_argument("--meta-batch-size", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--eval-freq", type=int, default=2, help="meta-iterations between evaluations and checkpoints")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "callbacks_tensorboard"))
    args = parser.parse_args()
    th.set_num_threads(1)

    dist = make_task_distribution("Toy2DNav", seed=args.seed)
    held_out = dist.test_tasks(2)
    tb_folder = os.path.join(args.out, "tb")
    model = MetaCPO(
        "MlpPolicy",
        dist,
        meta_batch_size=args.meta_batch_size,
        n_steps=args.n_steps,
        seed=args.seed,
        tensorboard_log=tb_folder,  # TensorBoard events in tb/MetaCPO_1 (tb_log_name below)
    )

    def callbacks() -> CallbackList:
        return CallbackList(
            [
                SafeEvalCallback(
                    held_out,
                    eval_freq=args.eval_freq,
                    n_eval_episodes=args.eval_episodes,
                    best_model_save_path=os.path.join(args.out, "best"),
                    log_path=os.path.join(args.out, "evals"),
                    verbose=1,
                ),
                MetaEvalCallback(held_out, eval_freq=args.eval_freq, n_eval_episodes=args.eval_episodes),
                ResumableCheckpointCallback(args.eval_freq, os.path.join(args.out, "checkpoints"), keep_last=2, verbose=1),
            ]
        )

    model.learn(args.timesteps, callback=callbacks(), tb_log_name="MetaCPO")

    # A new process would do the same: load the last checkpoint and continue its run (same TensorBoard folder). The
    # callbacks are not part of the model: new ones start afresh (SafeEvalCallback's best reward and evaluations.npz
    # cover the evaluations after the resume; keep_last counts only the checkpoints the new callback saves).
    checkpoint = ResumableCheckpointCallback.latest(os.path.join(args.out, "checkpoints"))
    assert checkpoint is not None
    model = MetaCPO.load(checkpoint, tensorboard_log=tb_folder)
    print(f"resuming from {checkpoint} ({model.num_timesteps} env steps)")
    model.learn(args.timesteps, callback=callbacks(), tb_log_name="MetaCPO", reset_num_timesteps=False)
    print(f"trained {model.num_timesteps} env steps in all")

    evaluations = np.load(os.path.join(args.out, "evals", "evaluations.npz"))
    print(
        f"evaluations.npz after the resume: timesteps {evaluations['timesteps'].tolist()}, mean costs "
        f"{np.round(evaluations['costs'].mean(axis=1), 2).tolist()}, under the limit {evaluations['under_limit'].tolist()}"
    )
    best = os.path.join(args.out, "best", "best_model.zip")
    print(f"best model under the cost limit: {best if os.path.exists(best) else 'none yet (no evaluation under the limit)'}")
    print(
        f"('under the limit' here is from {args.eval_episodes} episodes per held-out task: a signal for choosing a "
        "checkpoint, not a verdict; evaluate the chosen model on at least 50 episodes per task, as "
        "examples/compare_methods.py does, before saying it is under the limit)"
    )
    run_folder = model.logger.dir  # tb/MetaCPO_1: the resumed run writes into the same folder
    try:
        tags = scalar_tags(run_folder)
    except ImportError:
        print("TensorBoard is not installed (pip install sb3-metacpo[tensorboard]): no event files were written")
        return
    shown = [tag for tag in tags if any(key in tag for key in ("cost", "nu", "lambda", "kl", "meta_test", "eval/"))]
    print(f"TensorBoard tags in {run_folder} (cost-related, of {len(tags)}):", *shown, sep="\n  ")


if __name__ == "__main__":
    main()
