"""One critic regression of CPO, with autograd's backward against the written-out gradient, interleaved in one run.

``CPOPolicy.fit_critics`` on the policy CPO builds for a standard id (its defaults: 10 epochs of 128-sample Adam
minibatches on a 2,048-sample batch), with ``sb3_metacpo.common.critic_gradients.FAST_CRITIC_GRADIENTS`` off
(``loss.backward()``) and on (:func:`~sb3_metacpo.common.critic_gradients.mse_gradients`), alternating, in CPU
seconds of this process (torch on one thread). Both fits start from the same parameters and optimiser state and must
end with the same bits (checked). Prints every round, the medians, and the median of the per-round ratios.

    python benchmarks/critic_regression.py | tee benchmarks/results/throughput/critic_regression.txt
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch as th

from sb3_metacpo import CPO
from sb3_metacpo.common import critic_gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="SafetyPointGoal1Gymnasium-v0")
    parser.add_argument("--samples", type=int, default=2048, help="the batch (CPO's n_steps x n_envs)")
    parser.add_argument("--batch-size", type=int, help="minibatch size (default: CPO's)")
    parser.add_argument("--epochs", type=int, help="epochs (default: CPO's n_critic_updates)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    th.set_num_threads(1)
    model = CPO("MlpPolicy", args.env_id, seed=0)
    batch_size = args.batch_size or model.batch_size
    epochs = args.epochs or model.n_critic_updates
    generator = th.Generator().manual_seed(0)
    n = args.samples
    data = (
        th.randn(n, model.observation_space.shape[0], generator=generator),
        th.randn(n, generator=generator),
        th.rand(n, generator=generator),
        epochs,
        batch_size,
        th.rand(n, generator=generator),
    )
    model.policy.fit_critics(*data)  # the optimiser's state exists from here on
    print(
        f"{args.env_id}: CPOPolicy.fit_critics, {n} samples, {epochs} epochs of {batch_size}-sample minibatches; "
        "CPU seconds per regression (torch on one thread)"
    )
    seconds: dict[bool, list[float]] = {False: [], True: []}
    try:
        for index in range(args.rounds):
            ends = {}
            for fast in (False, True):
                critic_gradients.FAST_CRITIC_GRADIENTS = fast
                policy = copy.deepcopy(model.policy)  # the same start for both
                th.manual_seed(index)  # the same minibatches
                start = time.process_time()
                policy.fit_critics(*data)
                seconds[fast].append(time.process_time() - start)
                ends[fast] = [value.clone() for value in policy.state_dict().values()]
            same = all(th.equal(a, b) for a, b in zip(ends[False], ends[True], strict=True))
            print(
                f"round {index}: autograd {seconds[False][-1]:.3f} s, written out {seconds[True][-1]:.3f} s, "
                f"ratio {seconds[False][-1] / seconds[True][-1]:.3f}, same bits: {'yes' if same else 'NO'}",
                flush=True,
            )
    finally:
        critic_gradients.FAST_CRITIC_GRADIENTS = True
    before, after = statistics.median(seconds[False]), statistics.median(seconds[True])
    ratios = [a / b for a, b in zip(seconds[False], seconds[True], strict=True)]
    print(
        f"median: autograd {before:.3f} s, written out {after:.3f} s; ratio of the medians {before / after:.3f}, "
        f"median of the per-round ratios {statistics.median(ratios):.3f}; "
        f"{sum(r < 1 for r in ratios)} of {len(ratios)} rounds slower written out"
    )


if __name__ == "__main__":
    main()
