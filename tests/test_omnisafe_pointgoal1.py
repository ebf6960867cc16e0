"""benchmarks/omnisafe_pointgoal1.py: OmniSafe's CPO keeps its own defaults, its final policy is evaluated through
the function that evaluates ours with frozen observation statistics and clipped actions, and its files are read by
pointgoal1.py's summary like ours. (OmniSafe itself is not installed here: the script runs in ``.venv-omnisafe``.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch as th

from sb3_metacpo.common import cpo_subproblem as pc
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


def test_the_cpo_case_follows_the_trust_region_geometry() -> None:
    """Oracle: points sampled on the trust region's boundary ``½ xᵀHx = target_kl`` (where the linear constraint takes
    its extremes over the region) say whether ``c + bᵀx <= 0`` holds at ``x = 0`` and whether its boundary crosses the
    region; the case is read from that, not from ``s = bᵀH⁻¹b``."""
    rng = np.random.default_rng(2)
    target_kl, dim = 0.01, 4
    root = rng.normal(size=(dim, dim))
    hessian = root @ root.T + 0.5 * np.eye(dim)
    b = rng.normal(size=dim)
    s = float(b @ np.linalg.solve(hessian, b))
    directions = rng.normal(size=(200_000, dim))
    # x = sqrt(2·target_kl) · H^(-1/2) u for unit u: exactly the boundary of the trust region
    values, vectors = np.linalg.eigh(hessian)
    inverse_root = vectors @ np.diag(values**-0.5) @ vectors.T
    boundary = np.sqrt(2 * target_kl) * (directions / np.linalg.norm(directions, axis=1, keepdims=True)) @ inverse_root
    linear = boundary @ b
    reach = np.sqrt(2 * target_kl * s)
    seen = set()
    for c in np.concatenate([np.linspace(-3, 3, 25) * reach, [-1000 * reach, 1000 * reach]]):
        if abs(abs(c) - reach) < 0.05 * reach:  # too near the tangent for the sampled oracle
            continue
        crosses = (c + linear).min() <= 0 <= (c + linear).max()
        expected = (2 if crosses else 3) if c < 0 else (1 if crosses else 0)
        assert peer.cpo_case(float(c), s, target_kl, bb=float(b @ b)) == expected
        seen.add(expected)
    assert seen == {0, 1, 2, 3}
    assert peer.cpo_case(-1.0, s, target_kl, bb=1e-7) == 4  # no cost gradient and feasible: TRPO's step
    assert peer.cpo_case(1.0, s, target_kl, bb=1e-7) == 0  # no cost gradient and infeasible: still a recovery


class FakeLogger:
    def __init__(self, ep_cost: float, ep_len: float) -> None:
        self.stats = {"Metrics/EpCost": (ep_cost,), "Metrics/EpLen": (ep_len,)}

    def get_stats(self, key: str) -> tuple[float]:
        return self.stats[key]


class FakeCPO:
    """OmniSafe's CPO's three methods that see the constraint value, called with keywords as its ``_update_actor``
    calls them; each records what it was given."""

    def __init__(self, ep_cost: float, ep_len: float) -> None:
        self._logger = FakeLogger(ep_cost, ep_len)
        self.given: dict[str, float] = {}

    def _determine_case(self, b_grads: th.Tensor, ep_costs: float, q: th.Tensor, r: th.Tensor, s: th.Tensor) -> tuple:
        self.given["case"] = ep_costs
        return 1, th.tensor(0.5), th.tensor(-0.25)

    def _step_direction(self, optim_case: int, ep_costs: float, **kwargs: object) -> tuple:
        self.given["step"] = ep_costs
        return "step", th.tensor(0.5), th.tensor(0.25)

    def _cpo_search_step(self, step_direction: str, violation_c: float, **kwargs: object) -> str:
        self.given["search"] = violation_c
        return "searched"


def _one_update(cpo: FakeCPO, c: float) -> None:
    scalars = {key: th.tensor(value) for key, value in (("q", 2.0), ("r", 0.5), ("s", 0.3))}
    assert cpo._determine_case(b_grads=th.tensor([3.0, 4.0]), ep_costs=c, **scalars)[0] == 1
    assert cpo._step_direction(optim_case=1, ep_costs=c, A=0.5)[0] == "step"
    assert cpo._cpo_search_step(step_direction="step", violation_c=c, total_steps=20) == "searched"


def test_the_per_step_ablation_divides_c_by_the_episode_length_everywhere_and_restores() -> None:
    original = FakeCPO._determine_case, FakeCPO._step_direction, FakeCPO._cpo_search_step
    for per_step, expected in ((False, 15.0), (True, 15.0 / 500)):
        updates: list[dict] = []
        restore = peer.patch_cpo(FakeCPO, per_step, updates)
        cpo = FakeCPO(ep_cost=40.0, ep_len=500.0)
        _one_update(cpo, 15.0)  # OmniSafe's c: the window's episode cost 40 minus the limit 25
        restore()
        assert cpo.given == {"case": expected, "step": expected, "search": expected}
        assert updates == [
            {"update": 0, "ep_cost": 40.0, "ep_len": 500.0, "q": 2.0, "r": 0.5, "s": pytest.approx(0.3), "c": expected}
            | {"bb": 25.0, "B": -0.25, "case": 1, "lam": 0.5, "nu": 0.25}
        ]
    assert (FakeCPO._determine_case, FakeCPO._step_direction, FakeCPO._cpo_search_step) == original


def test_the_updates_file_round_trips_and_the_cases_are_counted_under_both_scales(tmp_path, capsys) -> None:
    target_kl, limit, s = 0.01, 25.0, 0.05  # the boundary meets the trust region when |c| <= sqrt(2·0.01·0.05) = 0.0316
    rows = []
    for update, ep_cost in enumerate((60.0, 40.0, 20.0, 10.0)):  # per step: c = 0.035, 0.015, -0.005, -0.015
        c = (ep_cost - limit) / 1000
        rows.append(dict(update=update, ep_cost=ep_cost, ep_len=1000.0, c=c, bb=1.0, q=1.0, r=0.1, s=s, B=0.0))
        rows[-1].update(lam=1.0, nu=0.0)
        rows[-1]["case"] = peer.cpo_case(c, s, target_kl)
    name = f"{peer.VARIANTS[('per-step', 'omnisafe')][0]}_seed3_nsteps20000.updates.csv"
    variant = {"constraint": "per-step", "dual": "omnisafe"}
    peer.write_updates(tmp_path / name, rows, variant, limit, target_kl)
    header, read = peer.read_updates(tmp_path / name)
    assert header == variant | {"cost_limit": limit, "target_kl": target_kl} and read == rows
    assert [row["case"] for row in rows] == [0, 1, 2, 2]
    peer.print_cases(tmp_path)
    out = capsys.readouterr().out
    assert f"{peer.PER_STEP_VARIANT}, seeds 3: 4 updates (cpo_case gives OmniSafe's recorded case in 4)" in out

    def cells(case: int) -> list[str]:
        line = next(line for line in out.splitlines() if line.startswith(f"| {peer.CASE_NAMES[case]} |"))
        return [cell.strip() for cell in line.strip("|").split("|")][1:]

    # taken, taken with the cost over the limit, and per episode (c = 35, 15, -5, -15: never near 0.0316)
    assert cells(0) == ["1", "1", "2"] and cells(1) == ["1", "1", "0"]
    assert cells(2) == ["2", "0", "0"] and cells(3) == ["0", "0", "2"] and cells(4) == ["0", "0", "0"]


def test_a_variant_of_another_library_is_paired_with_that_librarys_defaults(capsys) -> None:
    defaults, per_step, ours = [30.0, 35.0, 25.0], [40.0, 38.0, 31.0], [52.0, 55.0, 56.0]
    runs = {
        ("CPO", 20_000): [_result("CPO", s, c) for s, c in enumerate(ours)],
        (peer.VARIANT, 20_000): [_result(peer.VARIANT, s, c) for s, c in enumerate(defaults)],
        (peer.PER_STEP_VARIANT, 20_000): [_result(peer.PER_STEP_VARIANT, s, c) for s, c in enumerate(per_step)],
    }
    pointgoal1.paired_table(runs, 100)
    out = capsys.readouterr().out
    paired, unpaired = out.split("unpaired")
    row = next(line for line in paired.splitlines() if line.startswith(f"| {peer.PER_STEP_VARIANT} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == peer.VARIANT and cells[3] == "0, 1, 2"
    differences = np.array(per_step) - np.array(defaults)
    assert cells[5] == pointgoal1.mean_and_interval(differences, 2)  # the cost of the last 100 episodes
    starts = {line.split("|")[1].strip() for line in paired.splitlines() if line.startswith("| ")}
    assert peer.VARIANT not in starts  # OmniSafe's defaults against ours: unpaired only
    starts = {line.split("|")[1].strip() for line in unpaired.splitlines() if line.startswith("| ")}
    assert {peer.VARIANT, peer.PER_STEP_VARIANT} <= starts


def _qcqp_oracle(g: np.ndarray, hessian: np.ndarray, b: np.ndarray, c: float, target_kl: float) -> np.ndarray:
    """CPO's linearised problem solved directly by cvxpy: maximise gᵀx with c + bᵀx <= 0 and ½xᵀHx <= target_kl."""
    import cvxpy as cp

    x = cp.Variable(len(g))
    problem = cp.Problem(cp.Maximize(g @ x), [c + b @ x <= 0, 0.5 * cp.quad_form(x, cp.psd_wrap(hessian)) <= target_kl])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL
    return np.asarray(x.value)


def test_the_corrected_step_solves_cpos_linearised_problem_in_cases_1_and_2() -> None:
    """Oracle: cvxpy's solution of the primal problem (not the dual), on random problems whose constraint boundary
    crosses the trust region, feasible at x = 0 (case 2) or not (case 1): the step is feasible and its objective the
    oracle's."""
    rng = np.random.default_rng(5)
    target_kl, dim = 0.01, 6
    seen = set()
    for _ in range(40):
        root = rng.normal(size=(dim, dim))
        hessian = root @ root.T + 0.3 * np.eye(dim)
        g, b = rng.normal(size=dim), rng.normal(size=dim)
        x, p = np.linalg.solve(hessian, g), np.linalg.solve(hessian, b)
        q, r, s = g @ x, g @ p, b @ p
        c = float(rng.uniform(-0.95, 0.95) * np.sqrt(2 * target_kl * s))  # |c| < sqrt(2·target_kl·s): B > 0
        case = peer.cpo_case(c, s, target_kl, bb=float(b @ b))
        assert case in (1, 2)
        seen.add(case)
        step, lam, nu = peer.corrected_step(*(th.tensor(value) for value in (x, p, q, r, s)), c, target_kl)
        assert step.dtype == th.float64 and float(lam) > 0 and float(nu) >= 0
        expected, found = _qcqp_oracle(g, hessian, b, c, target_kl), step.numpy()
        # feasible (to rounding), as good as the oracle (whose interior-point solution may stray outside by ~1e-9)
        assert c + b @ found <= 1e-12 and 0.5 * found @ hessian @ found <= target_kl * (1 + 1e-9)
        assert g @ found >= g @ expected - 1e-6 * np.linalg.norm(g) * np.linalg.norm(expected)
        np.testing.assert_allclose(found, expected, atol=2e-3 * np.linalg.norm(expected))  # the same point
        single = peer.corrected_step(*(th.tensor(value, dtype=th.float32) for value in (x, p, q, r, s)), c, target_kl)
        assert single[0].dtype == th.float32  # OmniSafe's parameters' dtype, the step to its precision
        np.testing.assert_allclose(single[0].numpy(), found, rtol=0, atol=1e-5 * np.linalg.norm(found))
    assert seen == {1, 2}


class FakeConfig:
    class algo_cfgs:  # OmniSafe's attribute name
        target_kl = 0.01


def test_the_corrected_dual_replaces_omnisafes_step_in_cases_1_and_2_only() -> None:
    original = FakeCPO._step_direction
    updates: list[dict] = [{}]
    FakeCPO._cfgs = FakeConfig
    restore = peer.patch_cpo(FakeCPO, True, updates, corrected_dual=True)
    try:
        cpo = FakeCPO(ep_cost=40.0, ep_len=500.0)
        x, p = th.tensor([1.0, 0.5]), th.tensor([0.2, -0.4])
        terms = {"x": x, "p": p, "q": x.dot(x), "r": x.dot(p), "s": p.dot(p), "A": 0.0, "B": 0.0, "xHx": x.dot(x)}
        for case in (1, 2):
            step, lam, nu = cpo._step_direction(optim_case=case, ep_costs=15.0, **terms)
            expected = peer.corrected_step(x, p, terms["q"], terms["r"], terms["s"], 15.0 / 500, 0.01)
            assert th.equal(step, expected[0]) and (lam, nu) == (expected[1], expected[2])
            assert updates[-1]["lam"] == float(lam) and "step" not in cpo.given  # OmniSafe's own step not called
        for case in (0, 3):
            assert cpo._step_direction(optim_case=case, ep_costs=15.0, **terms)[0] == "step"
            assert cpo.given["step"] == 15.0 / 500
    finally:
        restore()
        del FakeCPO._cfgs
    assert FakeCPO._step_direction is original


def test_a_later_variant_is_paired_with_each_earlier_one(capsys) -> None:
    costs = {peer.VARIANT: [30.0, 35.0, 25.0], peer.PER_STEP_VARIANT: [40.0, 38.0, 31.0]}
    costs[peer.CORRECTED_VARIANT] = [45.0, 41.0, 30.0]
    runs = {(name, 20_000): [_result(name, s, c) for s, c in enumerate(values)] for name, values in costs.items()}
    pointgoal1.paired_table(runs, 100)
    paired = capsys.readouterr().out.split("unpaired")[0]
    rows = [line for line in paired.splitlines() if line.startswith(f"| {peer.CORRECTED_VARIANT} |")]
    assert [row.split("|")[2].strip() for row in rows] == [peer.VARIANT, peer.PER_STEP_VARIANT]
    for row, baseline in zip(rows, (peer.VARIANT, peer.PER_STEP_VARIANT), strict=True):
        differences = np.array(costs[peer.CORRECTED_VARIANT]) - np.array(costs[baseline])
        assert row.strip("|").split("|")[5].strip() == pointgoal1.mean_and_interval(differences, 2)


LOG = """Logging data to
runs/CPO-{{SafetyPointGoal1-v0}}/seed-007-2026-12-03-02-26-31/progress
┏━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━┓
┃ Metrics             ┃ Value        ┃
┡━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━┩
│ Metrics/EpCost      │ {cost}       │
│ Train/Epoch         │ {epoch}      │
│ Misc/FinalStepNorm  │ 0.25         │
│ Misc/AcceptanceStep │ {accept}     │
│ Misc/Lambda_star    │ -0.5         │
│ Misc/Nu_star        │ 1e-09        │
│ Misc/OptimCase      │ 1.0          │
└─────────────────────┴──────────────┘
"""


def test_omnisafes_printed_tables_are_read_per_epoch_and_round_trip(tmp_path) -> None:
    text = LOG.format(cost=40.0, epoch=0.0, accept=0.0) + "Accept step at i=1\n" + LOG.format(cost=30.5, epoch=1.0, accept=3.0)
    seed, rows = peer.printed_tables(text)
    assert seed == 7 and [(row["Train/Epoch"], row["Metrics/EpCost"], row["Misc/AcceptanceStep"]) for row in rows] == [
        (0.0, 40.0, 0.0),
        (1.0, 30.5, 3.0),
    ]
    (tmp_path / "log.txt").write_text(text)
    path = peer.write_printed([tmp_path / "log.txt"], tmp_path, "per-step", "corrected")
    assert path.name == f"{peer.VARIANTS[('per-step', 'corrected')][0]}_acceptance.csv"
    read = peer.read_printed(path)
    assert sorted(read) == [(7, 0), (7, 1)] and read[7, 1]["EpCost"] == 30.5 and read[7, 0]["Lambda_star"] == -0.5
    with pytest.raises(ValueError, match="seed-NNN"):
        peer.printed_tables("no log directory here")
    with pytest.raises(ValueError, match="same seed"):
        peer.write_printed([tmp_path / "log.txt"] * 2, tmp_path, "per-step", "corrected")


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "pointgoal1_seeds"


def test_omnisafe_dual_gives_the_values_omnisafe_printed_in_the_committed_runs() -> None:
    """Oracle: OmniSafe 0.5.0's own λ* and ν*, as it printed them in the per-step runs (its case-1/2 updates)."""
    prefix = peer.VARIANTS[("per-step", "omnisafe")][0]
    printed = peer.read_printed(RESULTS / f"{prefix}_acceptance.csv")
    compared = 0
    for seed in (0, 1, 2):
        header, rows = peer.read_updates(RESULTS / f"{prefix}_seed{seed}_nsteps20000.updates.csv")
        for row in rows:
            if row["case"] in (1, 2):
                shown = printed[seed, int(row["update"])]
                mirror = peer.omnisafe_dual(row["q"], row["r"], row["s"], row["c"], header["target_kl"])
                assert mirror == pytest.approx((shown["Lambda_star"], shown["Nu_star"]), rel=1e-3, abs=1e-6)
                compared += 1
    assert compared == 135


def _problem(rng: np.random.Generator, target_kl: float, dim: int = 5) -> tuple:
    """A random linearised CPO problem whose constraint boundary crosses the trust region (cases 1 and 2)."""
    root = rng.normal(size=(dim, dim))
    hessian = root @ root.T + 0.3 * np.eye(dim)
    g, b = rng.normal(size=dim), rng.normal(size=dim)
    x, p = np.linalg.solve(hessian, g), np.linalg.solve(hessian, b)
    c = float(rng.uniform(-0.95, 0.95) * np.sqrt(2 * target_kl * (b @ p)))
    return hessian, g, b, x, p, c, (float(g @ x), float(g @ p), float(b @ p), c)


def test_omnisafes_dual_is_the_correct_one_with_r_negated_where_its_bounds_do_not_cross() -> None:
    """The review's diagnosis, on random problems: OmniSafe's formulas are those for the loss's gradient, so with
    ``r`` negated they give the library's dual (tested against cvxpy above) wherever its clamp's bounds do not cross;
    with OmniSafe's own ``r`` they do not."""
    rng = np.random.default_rng(7)
    target_kl, agree, differ = 0.01, 0, 0
    for _ in range(200):
        *_, (q, r, s, c) = _problem(rng, target_kl)
        expected = [float(value) for value in pc.solve_dual_analytic(*(th.tensor(v) for v in (q, r, s, c, target_kl)))]
        if -r / (c + 1e-8) > 0:  # the bounds 0 and -r/c of the interval of ν > 0 do not cross
            assert peer.omnisafe_dual(q, -r, s, c, target_kl) == pytest.approx(expected, rel=1e-4, abs=1e-9)  # its 1e-8s
            agree += 1
        differ += not np.allclose(peer.omnisafe_dual(q, r, s, c, target_kl), expected, rtol=1e-3)
    assert agree > 50 and differ > 100


def test_the_step_quality_of_the_scalars_is_that_of_the_vectors() -> None:
    rng = np.random.default_rng(8)
    for _ in range(20):
        hessian, g, b, x, p, c, terms = _problem(rng, 0.01)
        lam, nu = rng.uniform(-2, 2), rng.uniform(0, 1)
        step = (x - nu * p) / lam
        expected = (g @ step, c + b @ step, 0.5 * step @ hessian @ step)
        assert peer.step_quality(*terms, lam, nu) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_duals_table_counts_the_full_steps_as_their_vectors_do(tmp_path, capsys) -> None:
    """Oracle: each update's full step built from the problem's vectors (not from the scalars)."""
    rng = np.random.default_rng(9)
    target_kl, rows, printed, expected = 0.01, [], [], Counter()
    for update in range(30):
        hessian, g, b, x, p, c, (q, r, s, _) = _problem(rng, target_kl)
        case = peer.cpo_case(c, s, target_kl)
        lam, nu = peer.omnisafe_dual(q, r, s, c, target_kl)
        step = (x - nu * p) / (lam + 1e-8)
        expected[case, "updates"] += 1
        expected[case, "negative"] += lam < 0
        expected[case, "breaks"] += c + b @ step > 1e-8
        expected[case, "outside"] += 0.5 * step @ hessian @ step > target_kl * (1 + 1e-6)
        expected[case, "rejected"] += update % 3 == 0
        best_lam, best_nu = (float(v) for v in pc.solve_dual_analytic(*(th.tensor(v) for v in (q, r, s, c, target_kl))))
        best = g @ (x - best_nu * p) / (best_lam + 1e-8)
        expected[case, "lower"] += g @ step < best - 1e-6 * abs(best)
        rows.append(dict(update=update, ep_cost=0.0, ep_len=1000.0, c=c, bb=float(b @ b), q=q, r=r, s=s, B=0.0))
        rows[-1].update(case=case, lam=lam, nu=nu)
        printed.append(f"4,{update},0.0,{case},{0 if update % 3 == 0 else 2},{lam!r},{nu!r},0.1\n")
    prefix = peer.VARIANTS[("per-step", "omnisafe")][0]
    peer.write_updates(tmp_path / f"{prefix}_seed4_nsteps20000.updates.csv", rows, {}, 25.0, target_kl)
    columns = "seed,epoch,EpCost,OptimCase,AcceptanceStep,Lambda_star,Nu_star,FinalStepNorm\n"
    (tmp_path / f"{prefix}_acceptance.csv").write_text("# made by the test\n" + columns + "".join(printed))
    peer.print_duals(tmp_path)
    out = capsys.readouterr().out
    counted = "30 updates; printed tables with the same case and episode cost in 30 of 30; omnisafe_dual gives"
    assert f"{peer.PER_STEP_VARIANT}: its full steps in cases 1 and 2, {counted} OmniSafe's printed λ, ν in 30 of 30" in out
    assert expected[1, "updates"] and expected[2, "updates"] and expected[1, "breaks"] and expected[2, "negative"]
    for case in (1, 2):
        line = next(line for line in out.splitlines() if line.startswith(f"| {peer.CASE_NAMES[case]} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
        counts = [str(expected[case, key]) for key in ("updates", "negative", "breaks", "outside", "lower")]
        assert cells[:5] == counts
        assert cells[5] == f"{expected[case, 'rejected']} of {expected[case, 'updates']}" and cells[6] == "0 / 0"
