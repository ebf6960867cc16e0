"""benchmarks/cpo_prediction.py: the split of a batch into halves of whole episodes, the predicted surrogate changes
against finite differences of the surrogate's definition, the diagnosed CPO training exactly as CPO does, and the
summary's statistics against hand-computed values."""

from __future__ import annotations

import csv
import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from sb3_metacpo import CPO
from sb3_metacpo.common.cpo_update import PreparedBatch, flatten
from sb3_metacpo.common.rollouts import EpisodeRecord, TaskBatch
from tests.bandits import costly_bandit
from tests.benchmark_modules import load_benchmark

prediction = load_benchmark("cpo_prediction")


def one_env_batch(lengths: list[int]) -> TaskBatch:
    """A one-env batch of consecutive episodes of ``lengths``; row t holds t everywhere, to see where rows went."""
    n = sum(lengths)
    rows = np.arange(n, dtype=np.float32)
    truncated = np.zeros((n, 1), bool)
    truncated[np.cumsum(lengths) - 1, 0] = True
    steps = np.concatenate([np.arange(length) for length in lengths]).reshape(n, 1)
    episodes = [
        EpisodeRecord(reward=float(i), cost=0.0, length=length, seed=None, terminated=False)
        for i, length in enumerate(lengths)
    ]
    return TaskBatch(
        task=None,
        observations=rows.reshape(n, 1, 1),
        actions=rows.reshape(n, 1, 1),
        rewards=rows.reshape(n, 1),
        costs=rows.reshape(n, 1, 1),
        terminated=np.zeros((n, 1), bool),
        truncated=truncated,
        next_observations=rows.reshape(n, 1, 1) + 1,
        episodes=episodes,
        episode_steps=steps,
    )


def test_split_batch_gives_each_half_its_own_rows_and_episodes() -> None:
    first, second = prediction.split_batch(one_env_batch([2, 1, 3]), 2)
    assert first.rewards[:, 0].tolist() == [0, 1, 2] and second.rewards[:, 0].tolist() == [3, 4, 5]
    for field in ("observations", "actions", "costs"):
        assert getattr(first, field).reshape(-1).tolist() == [0, 1, 2]
        assert getattr(second, field).reshape(-1).tolist() == [3, 4, 5]
    assert second.next_observations.reshape(-1).tolist() == [4, 5, 6]
    assert [e.reward for e in first.episodes] == [0.0, 1.0] and [e.reward for e in second.episodes] == [2.0]
    assert second.episode_steps[:, 0].tolist() == [0, 1, 2] and first.truncated[:, 0].tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (one_env_batch([2, 2, 2]), "no episode boundary"),  # the middle row 3 is inside the second episode
        (one_env_batch([2, 3]), "does not divide into 2 parts"),  # five rows
    ],
)
def test_split_batch_refuses_a_middle_inside_an_episode(batch: TaskBatch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prediction.split_batch(batch, 2)


def test_split_batch_into_three_parts_and_its_refusals() -> None:
    parts = prediction.split_batch(one_env_batch([1, 1, 2, 2]), 3)
    assert [part.rewards[:, 0].tolist() for part in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [[e.reward for e in part.episodes] for part in parts] == [[0.0, 1.0], [2.0], [3.0]]
    with pytest.raises(ValueError, match="does not divide into 4 parts"):
        prediction.split_batch(one_env_batch([1, 1, 2, 2]), 4)
    with pytest.raises(ValueError, match="no episode boundary at row 2"):
        prediction.split_batch(one_env_batch([3, 3]), 3)


def test_split_batch_refuses_several_envs() -> None:
    batch = one_env_batch([2, 2])
    wide = TaskBatch(
        task=None,
        observations=np.zeros((4, 2, 1)),
        actions=np.zeros((4, 2, 1)),
        rewards=np.zeros((4, 2)),
        costs=np.zeros((4, 2, 1)),
        terminated=np.zeros((4, 2), bool),
        truncated=np.repeat(batch.truncated, 2, axis=1),
        next_observations=np.zeros((4, 2, 1)),
    )
    with pytest.raises(ValueError, match="one-env batch, got 2 envs"):
        prediction.split_batch(wide, 2)


def linear_actor(obs: th.Tensor, params: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
    return obs @ params["w"], params["log_std"].expand(len(obs), -1)


def test_predicted_changes_match_finite_differences_of_the_surrogates() -> None:
    """The linear predictions against central differences of ``mean(ratio · A)`` written out here, and the
    importance-sampled cost change against that definition evaluated at the moved parameters."""
    gen = th.Generator().manual_seed(0)
    obs, actions = th.randn(40, 3, generator=gen, dtype=th.float64), th.randn(40, 2, generator=gen, dtype=th.float64)
    params = {"w": 0.3 * th.randn(3, 2, generator=gen, dtype=th.float64), "log_std": th.full((2,), -0.2, dtype=th.float64)}
    reward_adv, cost_adv = th.randn(40, generator=gen, dtype=th.float64), th.randn(40, 1, generator=gen, dtype=th.float64)

    def log_density(p: dict[str, th.Tensor]) -> th.Tensor:
        mean, log_std = obs @ p["w"], p["log_std"]
        return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    behaviour = log_density(params)
    batch = PreparedBatch(
        observations=obs,
        actions=actions,
        log_prob_behaviour=behaviour,
        reward_advantages=reward_adv,
        cost_advantages=cost_adv,
        constraint=np.zeros(1),
        episode_costs=np.zeros(1),
        episode_reward=0.0,
        n_episodes=1,
        reward_returns=np.zeros(40),
        cost_returns=np.zeros((40, 1)),
    )
    step = 0.05 * th.randn(8, generator=gen, dtype=th.float64)

    def moved(scale: float) -> dict[str, th.Tensor]:
        return {"w": params["w"] + scale * step[:6].view(3, 2), "log_std": params["log_std"] + scale * step[6:]}

    def surrogate(p: dict[str, th.Tensor], advantages: th.Tensor) -> float:
        return float((th.exp(log_density(p) - behaviour) * advantages).mean())

    eps = 1e-6
    result = prediction.predicted_changes(linear_actor, params, step, batch)
    for key, advantages in (("reward", reward_adv), ("cost", cost_adv[:, 0])):
        central = (surrogate(moved(eps), advantages) - surrogate(moved(-eps), advantages)) / (2 * eps)
        assert result[key] == pytest.approx(central, rel=1e-6)
    assert result["cost_surrogate"] == pytest.approx(
        surrogate(moved(1.0), cost_adv[:, 0]) - surrogate(params, cost_adv[:, 0]), rel=1e-10
    )


def test_the_diagnosed_cpo_trains_as_cpo_does_and_records_every_update() -> None:
    """Same seed, same env: the same parameters after three updates (the diagnostic steps change nothing), and one
    row of finite diagnostics per update."""

    def model(cls: type[CPO]) -> CPO:
        env = gym.wrappers.TimeLimit(costly_bandit(), 10)  # 40 episodes a batch: every split cuts between episodes
        return cls("MlpPolicy", env, n_steps=400, cost_limit=2.0, seed=3, policy_kwargs=dict(net_arch=[16]))

    plain, diagnosed = model(CPO).learn(1200), model(prediction.DiagnosedCPO).learn(1200)
    assert th.equal(flatten(plain.policy.actor_params()), flatten(diagnosed.policy.actor_params()))
    rows = diagnosed.diagnostics
    assert [row["update"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == set(prediction.COLUMNS) and row["episodes"] == 40 and row["length"] == 10
        assert all(math.isfinite(row[key]) for key in prediction.COLUMNS if key not in prediction.TEXT_COLUMNS)
        assert all(len(row[f"k{k}_cases"].split("/")) == k for k in prediction.SPLITS)


def row(cost: float, case: str, promised: float, cost_in: float, cost_out: float, reward_in: float, reward_out: float) -> dict:
    """An updates row whose split tests all have these values (their surrogate ones are twice the linear ones)."""
    values: dict = dict.fromkeys(prediction.COLUMNS, 0.0)
    values.update(case=case, episode_cost=cost, full_cost_linear=promised)
    for k in prediction.SPLITS:
        values.update(
            {
                f"k{k}_cases": "dual/" * (k - 1) + "dual",
                f"k{k}_cost_in": cost_in,
                f"k{k}_cost_out": cost_out,
                f"k{k}_cost_in_surrogate": 2 * cost_in,
                f"k{k}_cost_out_surrogate": 2 * cost_out,
                f"k{k}_reward_in": reward_in,
                f"k{k}_reward_out": reward_out,
            }
        )
    return values


def test_seed_statistics_by_hand() -> None:
    rows = [
        row(30.0, "dual", -5.0, -6.0, -1.0, 0.2, 0.05),
        row(20.0, "trpo", 1.0, 2.0, 0.0, 0.4, 0.15),
        row(40.0, "recovery", -15.0, -8.0, -2.0, 0.0, 0.1),
    ]
    stats = prediction.seed_statistics(rows, cost_limit=25.0)
    assert stats["cost"] == pytest.approx(30.0) and stats["over"] == pytest.approx(2 / 3)
    assert stats["dual"] == pytest.approx(1 / 3) and stats["promised"] == pytest.approx(-19 / 3)
    assert stats["realised"] == pytest.approx(((20 - 30) + (40 - 20)) / 2)
    assert stats["promised_level"] == pytest.approx((30 - 5 + 20 + 1) / 2) and stats["next_level"] == pytest.approx(30.0)
    for k in prediction.SPLITS:
        assert stats[f"k{k}_in"] == pytest.approx(-4.0) and stats[f"k{k}_out"] == pytest.approx(-1.0)
        assert stats[f"k{k}_ratio"] == pytest.approx(0.25) and stats[f"k{k}_surrogate_ratio"] == pytest.approx(0.25)
        assert stats[f"k{k}_reward_ratio"] == pytest.approx(0.3 / 0.6)


def test_an_updates_file_round_trips(tmp_path) -> None:
    rows = [row(30.0, "dual", -5.0, -6.0, -1.0, 0.2, 0.05), row(20.0, "trpo", 1.0, 2.0, 0.0, 0.4, 0.15)]
    path = tmp_path / "run.updates.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=prediction.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert prediction.read_updates(path) == rows


def test_same_episodes_reports_prefixes_and_the_first_difference(tmp_path) -> None:
    def monitor(name: str, episodes: list[tuple[float, int, float]]):
        path = tmp_path / name
        path.write_text('#{"t_start": 0}\nr,l,t,c\n' + "".join(f"{r},{n},0.1,{c}\n" for r, n, c in episodes))
        return path

    reference = monitor("ref.csv", [(1.5, 10, 2.0), (2.5, 10, 0.0), (3.0, 10, 1.0)])
    assert prediction.same_episodes(monitor("a.csv", [(1.5, 10, 2.0), (2.5, 10, 0.0)]), reference).startswith(
        "the first 2 identical"
    )
    assert (
        prediction.same_episodes(monitor("b.csv", [(1.5, 10, 2.0), (2.5, 10, 9.0)]), reference)
        == "DIFFERENT from episode 1 on"
    )
    assert prediction.same_episodes(reference, reference) == "identical (3 episodes)"
    assert prediction.same_episodes(reference, tmp_path / "missing.csv") == "no reference"


def test_summarise_groups_the_seeds_of_each_variant(tmp_path, capsys) -> None:
    def write(name: str, rows: list[dict]) -> None:
        with open(tmp_path / f"{name}.updates.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=prediction.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    first, second = row(30.0, "dual", -5.0, -6.0, -1.0, 0.2, 0.05), row(20.0, "trpo", 1.0, 2.0, 0.0, 0.4, 0.15)
    write("CPO_seed0_nsteps20000", [first, first])
    write("CPO_seed1_nsteps20000", [second, second])
    write("CPO-recovery-violated_seed0_nsteps20000", [first])
    prediction.summarise(tmp_path, 25.0, None)
    printed = capsys.readouterr().out
    assert "\nCPO, 20000 steps" in printed and "\nCPO-recovery-violated, 20000 steps" in printed
    assert "| batch cost | 30 | 20 | 25 ± 64 |" in printed  # t(0.975, 1) · 7.07 = 63.5
    assert "| batch cost | 30 | 30 ± nan |" in printed
