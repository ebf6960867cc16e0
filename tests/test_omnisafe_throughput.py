"""benchmarks/omnisafe_throughput.py: the settings it calls shared are CPO's defaults and reach OmniSafe's config
where OmniSafe reads them, its ratios are per-round ratios, and our rows run and leave the env switches as they were.
(OmniSafe itself is not installed here: the benchmark's OmniSafe row runs in ``.venv-omnisafe``.)"""

from __future__ import annotations

import inspect
import math

import pytest
import torch as th

from sb3_metacpo import CPO
from sb3_metacpo.common import envs
from sb3_metacpo.tasks import safety_gym
from tests.benchmark_modules import load_benchmark

peer = load_benchmark("omnisafe_throughput")


def test_the_shared_settings_are_cpos_defaults_apart_from_the_batch_and_the_cost_limit() -> None:
    defaults = {name: p.default for name, p in inspect.signature(CPO.__init__).parameters.items()}
    kwargs = peer.cpo_kwargs()
    assert set(kwargs) == {ours for ours, _, _ in peer.SHARED.values()}
    differing = {name for name, value in kwargs.items() if defaults[name] != value}
    assert differing == {"n_steps", "cost_limit"}
    assert (kwargs["n_steps"], defaults["n_steps"]) == (20_000, 2048)


def test_our_default_policy_has_the_networks_called_shared() -> None:
    model = CPO("MlpPolicy", "SafetyPointGoal1Gymnasium-v0", seed=0, n_steps=64)
    policy = model.policy
    assert policy.activation_fn is th.nn.Tanh
    widths = {
        name: [m.out_features for m in net if isinstance(m, th.nn.Linear)]
        for name, net in (("pi", policy.mlp_extractor.policy_net), ("vf", policy.mlp_extractor.value_net))
    }
    assert widths == {"pi": peer.HIDDEN, "vf": peer.HIDDEN}
    model.env.close()


def test_omnisafe_config_puts_every_shared_setting_where_omnisafe_reads_it() -> None:
    config = peer.omnisafe_config(3, "logs")
    assert config["train_cfgs"] == {
        "device": "cpu",
        "torch_threads": 1,
        "vector_env_nums": 1,
        "parallel": 1,
        "total_steps": 60_000,
    }
    assert config["algo_cfgs"] == {
        "steps_per_epoch": 20_000,
        "update_iters": 10,
        "batch_size": 128,
        "cg_iters": 15,
        "cg_damping": 0.1,
        "fvp_sample_freq": 1,
        "target_kl": 0.01,
        "gamma": 0.99,
        "lam": 0.95,
        "cost_limit": 25.0,
    }
    # the critic's learning rate joins its network settings instead of replacing them
    assert config["model_cfgs"]["critic"] == {"hidden_sizes": [64, 64], "activation": "tanh", "lr": 1e-3}
    assert config["model_cfgs"]["actor"] == {"hidden_sizes": [64, 64], "activation": "tanh"}
    assert config["logger_cfgs"]["log_dir"] == "logs"
    assert not config["logger_cfgs"]["use_wandb"] and not config["logger_cfgs"]["use_tensorboard"]


def test_ratios_are_the_median_of_per_round_ratios() -> None:
    rounds = {row: [1.0, 1.0, 1.0] for row in peer.ROWS}
    rounds[peer.OURS] = [100.0, 200.0, 300.0]
    rounds[peer.OMNISAFE] = [50.0, 50.0, 100.0]  # per round 2, 4, 3: median 3 (the ratio of medians would be 4)
    result = peer.PeerThroughput(rounds)
    assert result.round_ratios(peer.OURS, peer.OMNISAFE) == [2.0, 4.0, 3.0]
    assert result.ratio(peer.OURS, peer.OMNISAFE) == 3.0
    assert result.speed(peer.OURS) == 200.0
    lines = peer.table(result, 2)
    (line,) = [line for line in lines if line.startswith("what a user gets")]
    assert line.split()[-4:] == ["3.00", "(2.00,", "4.00,", "3.00)"]


def test_our_rows_run_on_the_env_asked_for_and_leave_the_switches_as_they_were() -> None:
    built = []  # FAST_STEP when the library gave a standard id's env its fast methods (or, off, left it as it is)
    original = envs.fast_standard_env

    def spy(env):
        built.append(safety_gym.FAST_STEP)
        return original(env)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(envs, "fast_standard_env", spy)
        for fast in (False, True):
            assert math.isfinite(peer.time_ours(1, fast=fast, n_steps=64)) and built[-1] is fast
            assert math.isfinite(peer.time_raw(1, fast=fast, n_steps=64)) and built[-1] is fast
            assert (safety_gym.FAST_STEP, safety_gym.FAST_RESET) == (True, True)


def test_each_round_starts_one_row_later() -> None:
    rows = ("a", "b", "c")
    assert [peer.rotated(rows, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_an_unknown_row_is_an_error_naming_the_rows() -> None:
    with pytest.raises(ValueError, match="unknown row 'TRPO'"):
        peer.run_row("TRPO", 1)
