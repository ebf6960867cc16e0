"""benchmarks/omnisafe_pointgoal1.py: OmniSafe's CPO keeps its own defaults, its final policy is evaluated through
the function that evaluates ours with frozen observation statistics and clipped actions, and its files are read by
pointgoal1.py's summary like ours. (OmniSafe itself is not installed here: the script runs in ``.venv-omnisafe``.)"""

from __future__ import annotations

import json

import numpy as np
import torch as th

from tests.benchmark_modules import load_benchmark

peer = load_benchmark("omnisafe_pointgoal1")
pointgoal1 = load_benchmark("pointgoal1")


def test_the_config_sets_only_seed_budget_threads_and_logger() -> None:
    config = peer.run_config(3, 1_000_000, "logs")
    assert set(config) == {"seed", "train_cfgs", "logger_cfgs"}  # algo_cfgs, model_cfgs: OmniSafe's CPO defaults
    assert config["seed"] == 3
    assert config["train_cfgs"]["total_steps"] == 1_000_000 and config["train_cfgs"]["torch_threads"] == 1
    assert config["logger_cfgs"]["use_tensorboard"] is False and config["logger_cfgs"]["log_dir"] == "logs"


class LinearActor:
    """OmniSafe's actor interface (``predict(obs, deterministic)`` on a float32 tensor); the mean is ``obs @ w``,
    a sample adds unit noise from torch's global stream."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = th.as_tensor(weights, dtype=th.float32)
        self.seen: list[np.ndarray] = []

    def predict(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        assert obs.dtype == th.float32
        self.seen.append(obs.numpy().copy())
        mean = obs @ self.weights
        return mean if deterministic else mean + th.randn_like(mean)


def test_the_policy_normalises_with_frozen_statistics_and_clips_actions() -> None:
    rng = np.random.default_rng(0)
    mean, std, clip = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3), np.array(5.0)
    actor = LinearActor(np.eye(3)[:, :2] * 10.0)
    policy = peer.FrozenNormalisedPolicy(actor, mean, std, clip, np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    observations = rng.normal(scale=20.0, size=(4, 3))
    for _ in range(2):  # a second call sees the same statistics (OmniSafe's normaliser would update them)
        actions, state = policy.predict(observations, deterministic=True)
        expected = np.clip((observations - mean) / std, -5.0, 5.0)  # OmniSafe's Normalizer.normalize, written out
        np.testing.assert_allclose(actor.seen[-1], expected.astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(actions, np.clip(expected[:, :2] * 10.0, [-1.0, -0.5], [1.0, 0.5]), rtol=1e-5)
        assert state is None
    th.manual_seed(0)
    first, _ = policy.predict(np.zeros((1, 3)), deterministic=False)
    th.manual_seed(0)
    again, _ = policy.predict(np.zeros((1, 3)), deterministic=False)
    np.testing.assert_array_equal(first, again)  # samples follow torch's global stream, which evaluate_final seeds


def test_evaluate_final_runs_the_wrapped_policy_on_the_task() -> None:
    evaluate_final = pointgoal1.evaluate_final  # cpo_eval's, which evaluates our CPO in pointgoal1.py
    obs_dim, act_dim = 60, 2  # SafetyPointGoal1's observation and action sizes
    policy = peer.FrozenNormalisedPolicy(
        LinearActor(np.zeros((obs_dim, act_dim))), np.zeros(obs_dim), np.ones(obs_dim), np.array(5.0), -np.ones(2), np.ones(2)
    )
    result = evaluate_final(policy, peer.ENV_ID, seed=0, episodes=1)
    assert set(result) == {"stochastic", "mean_action"}
    assert result["stochastic"]["episodes"] == 1 and np.isfinite(result["stochastic"]["cost"])
    assert result["mean_action"]["return"] != result["stochastic"]["return"]  # zero actions against noisy ones


def test_pointgoal1_summarises_omnisafe_files_like_its_own(tmp_path, capsys) -> None:
    costs = np.arange(150, dtype=float)  # the last 100 episodes' mean cost is 99.5
    with open(tmp_path / "OmniSafe-CPO_seed0_nsteps20000.monitor.csv", "w") as handle:
        handle.write('#{"t_start": 0, "env_id": "SafetyPointGoal1Gymnasium-v0"}\nr,l,t,c\n')
        handle.writelines(f"{c / 10},1000,{i},{c}\n" for i, c in enumerate(costs))
    row = {
        "algorithm": peer.VARIANT,
        "variant": peer.VARIANT,
        "seed": 0,
        "n_steps": 20_000,
        "timesteps": 1_000_000,
        "episodes": 150,
        "updates": 50,
        "evaluation": {
            key: {"return": 1.0, "return_sd": 0.0, "cost": 30.0, "cost_sd": 0.0, "episodes": 50}
            for key in ("stochastic", "mean_action")
        },
    }
    (tmp_path / "OmniSafe-CPO_seed0_nsteps20000.json").write_text(json.dumps(row))
    pointgoal1.seed_table(tmp_path, 100, 25.0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {peer.VARIANT} |")]
    assert len(lines) == 1
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert cells[:4] == [peer.VARIANT, "20000", "50", "0"]
    assert cells[5].startswith("99.50") and cells[7].startswith("30.00")


def test_welch_interval_matches_scipys_unequal_variance_t_test() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    a, b = rng.normal(30.0, 4.0, size=3), rng.normal(50.0, 12.0, size=5)
    difference, half = pointgoal1.welch_interval(a, b)
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    np.testing.assert_allclose([difference - half, difference + half], [interval.low, interval.high], rtol=1e-10)


def _result(variant: str, seed: int, cost: float) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "n_steps": 20_000,
        "updates": 50,
        "training": {"return": 20.0, "cost": cost},
        "evaluation": {key: {"return": 20.0, "cost": cost} for key in ("stochastic", "mean_action")},
    }


def test_another_librarys_rows_are_compared_unpaired_not_seed_by_seed(capsys) -> None:
    ours, theirs = [52.0, 55.0, 56.0], [30.0, 35.0, 25.0]
    runs = {
        ("CPO", 20_000): [_result("CPO", s, c) for s, c in enumerate(ours)],
        (peer.VARIANT, 20_000): [_result(peer.VARIANT, s, c) for s, c in enumerate(theirs)],
    }
    pointgoal1.paired_table(runs, 100)
    out = capsys.readouterr().out
    assert "Paired by seed" not in out and "unpaired" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {peer.VARIANT} |"))
    difference, half = pointgoal1.welch_interval(np.array(theirs), np.array(ours))
    assert row.split("|")[5].strip() == f"{difference:.2f} ± {half:.2f}"  # the cost of the last 100 episodes
    assert difference == np.mean(theirs) - np.mean(ours)
