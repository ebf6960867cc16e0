"""TensorBoard: the event file of a run holds the cost, the CPO case, the multipliers, the KL and the meta-test curves."""

import importlib.util

import pytest

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.evaluation import MetaEvalCallback
from sb3_metacpo.common.safe_algorithm import CPO_CASE_CODES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard (tests extra)")


def test_event_file_holds_cost_case_multipliers_kl_and_meta_test(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaCPO(
        "MlpPolicy",
        dist,
        meta_batch_size=2,
        n_steps=100,
        seed=0,
        policy_kwargs=dict(net_arch=[16]),
        tensorboard_log=str(tmp_path),
    )
    callback = MetaEvalCallback(dist.test_tasks(2), eval_freq=1, n_updates=1, n_steps=100, n_eval_episodes=1)
    model.learn(800, callback=callback, tb_log_name="run")
    assert len(callback.history) == 2

    (folder,) = tmp_path.glob("run_*")
    assert list(folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "rollout/ep_cost_mean",
        "meta/post_adapt_ep_cost_mean",
        "train/cpo_case_code",
        "train/lambda",
        "train/kl",
        "meta_test/ep_rew_mean_0",
        "meta_test/ep_rew_mean_1",
        "meta_test/ep_cost_mean_0",
        "meta_test/ep_cost_mean_1",
        "meta_test/under_limit_frac",
    }
    assert expected <= scalars, sorted(expected - scalars)
    # one multiplier per constraint: train/nu for the total cost, train/nu_<name> otherwise (here per stage)
    assert any(tag == "train/nu" or tag.startswith("train/nu_") for tag in scalars), sorted(scalars)
    assert len(accumulator.Scalars("rollout/ep_cost_mean")) == model._n_updates
    assert {event.value for event in accumulator.Scalars("train/cpo_case_code")} <= set(CPO_CASE_CODES.values())
    # every meta-evaluation reaches the event file, the one at the end of training too
    assert len(accumulator.Scalars("meta_test/ep_cost_mean_1")) == len(callback.history)

    # SB3 writes strings as TensorBoard text: the case's name is there as well
    texts = accumulator.Tags()["tensors"]
    assert "train/cpo_case/text_summary" in texts
    cases = {event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors("train/cpo_case/text_summary")}
    assert cases <= set(CPO_CASE_CODES)
    # the code matches the name at every update
    codes = [CPO_CASE_CODES[case] for case in cases]
    assert {event.value for event in accumulator.Scalars("train/cpo_case_code")} == set(codes)
