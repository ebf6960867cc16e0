"""The adaptation benchmark's intervals against independent oracles: the t-interval against scipy's, Wilson's
against the roots of its defining quadratic, the seeds × tasks bootstrap against the closed-form variance of its
resampling and against coverage on simulated seeds × tasks data."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_modules import load_benchmark

bench = load_benchmark("adaptation")


def test_t_interval_is_scipys():
    values = np.array([2.41, 3.1, 1.7, 2.9, 2.2])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert bench.t_interval(values) == pytest.approx((high - low) / 2, rel=1e-12)


@pytest.mark.parametrize(("successes", "n"), [(21, 25), (0, 9), (9, 9), (12, 25), (1, 3)])
def test_wilson_is_the_roots_of_its_quadratic(successes, n):
    """Wilson's interval: the p with (p̂ - p)² = z² p (1 - p) / n."""
    z, p_hat = stats.norm.ppf(0.975), successes / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    roots = np.sort(np.roots([a, b, c]).real)
    assert bench.wilson(successes, n) == pytest.approx(tuple(np.clip(roots, 0, 1)), abs=1e-6)


def _closed_form_variance(matrix):
    """Variance of the mean under resampling rows and columns independently (derived from the two-way decomposition
    x = m + a_s + b_t + g_st: the three parts are uncorrelated under the resampling)."""
    n_s, n_t = matrix.shape
    m = matrix.mean()
    a = matrix.mean(axis=1) - m
    b = matrix.mean(axis=0) - m
    g = matrix - m - a[:, None] - b[None, :]
    return (a**2).mean() / n_s + (b**2).mean() / n_t + (g**2).mean() / (n_s * n_t)


@pytest.mark.parametrize("shape", [(5, 5), (3, 3), (3, 7)])
def test_bootstrap_variance_matches_its_closed_form(shape):
    matrix = np.random.default_rng(sum(shape)).gamma(2.0, 2.0, size=shape)
    replicates = bench.two_way_bootstrap_means(matrix, 200_000, np.random.default_rng(1))
    assert replicates.mean() == pytest.approx(matrix.mean(), rel=2e-3)
    assert replicates.var() == pytest.approx(_closed_form_variance(matrix), rel=0.02)


def test_bootstrap_covers_task_spread_that_a_seed_interval_misses():
    """Simulated seeds × tasks data whose spread is mostly between tasks: the seeds × tasks interval covers the
    true mean far more often than the t-interval over seeds of the task means (which sees no task spread)."""
    rng = np.random.default_rng(0)
    covered_bootstrap = covered_seeds = 0
    n_datasets = 200
    for _ in range(n_datasets):
        data = rng.normal(0, 0.2, size=(5, 1)) + rng.normal(0, 1.0, size=(1, 5)) + rng.normal(0, 0.2, size=(5, 5))
        low, high = bench.seeds_tasks_interval(data, n_resamples=2_000, seed=int(rng.integers(2**31)))
        covered_bootstrap += low <= 0 <= high
        per_seed = data.mean(axis=1)
        half = bench.t_interval(per_seed)
        covered_seeds += abs(per_seed.mean()) <= half
    assert covered_bootstrap / n_datasets > 0.75  # a percentile bootstrap of 5 x 5 is somewhat narrow
    assert covered_seeds / n_datasets < 0.5


def test_bootstrap_refuses_an_empty_or_flat_input():
    with pytest.raises(ValueError, match="seeds, tasks"):
        bench.two_way_bootstrap_means(np.zeros(5), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="seeds, tasks"):
        bench.two_way_bootstrap_means(np.zeros((0, 3)), 10, np.random.default_rng(0))


def test_cell_needs_a_full_grid():
    cell = [{"seed": s, "task": t, "cost": float(s + t), "cost_limit": 2.0} for s in range(3) for t in range(3)]
    text = bench.seeds_tasks_cell(cell)
    cost, under = (tuple(float(x) for x in part.split("–")) for part in text.split("; "))
    assert cost[0] < 2.0 < cost[1] and 0 <= under[0] < 6 / 9 < under[1] <= 1
    assert bench.seeds_tasks_cell(cell[:-1]) == ""  # a seed without every task


def test_interval_is_the_95_percent_percentile_interval_of_the_replicates():
    matrix = np.random.default_rng(4).normal(size=(4, 5))
    replicates = bench.two_way_bootstrap_means(matrix, 5_000, np.random.default_rng(9))
    expected = tuple(np.percentile(replicates, [2.5, 97.5]))
    assert bench.seeds_tasks_interval(matrix, n_resamples=5_000, seed=9) == pytest.approx(expected, abs=0)


def test_cell_counts_a_cost_at_the_limit_as_under():
    cell = [{"seed": s, "task": t, "cost": 2.0, "cost_limit": 2.0} for s in range(3) for t in range(3)]
    assert bench.seeds_tasks_cell(cell) == "2.00–2.00; 1.00–1.00"


def _expected_mean_squares_by_loops(matrix):
    """The two-way ANOVA mean squares (seeds, tasks, residual) of a matrix with one value per cell, by explicit
    sums over cells (the textbook definitions, written apart from the benchmark's array code)."""
    n_s, n_t = len(matrix), len(matrix[0])
    grand = sum(matrix[i][j] for i in range(n_s) for j in range(n_t)) / (n_s * n_t)
    rows = [sum(matrix[i][j] for j in range(n_t)) / n_t for i in range(n_s)]
    cols = [sum(matrix[i][j] for i in range(n_s)) / n_s for j in range(n_t)]
    ss_s = n_t * sum((r - grand) ** 2 for r in rows)
    ss_t = n_s * sum((c - grand) ** 2 for c in cols)
    ss_total = sum((matrix[i][j] - grand) ** 2 for i in range(n_s) for j in range(n_t))
    ss_e = ss_total - ss_s - ss_t
    return grand, ss_s / (n_s - 1), ss_t / (n_t - 1), ss_e / ((n_s - 1) * (n_t - 1))


@pytest.mark.parametrize("shape", [(5, 5), (3, 3), (5, 3)])
@pytest.mark.parametrize("effects", [(1.0, 3.0, 0.5), (3.0, 0.2, 0.5), (0.0, 0.0, 1.0)])
def test_random_effects_interval_is_its_anova_formula(shape, effects):
    """The interval from the mean squares by the sums of squares' definitions: Satterthwaite's t-interval on
    (MS_seeds + MS_tasks − MS_residual)/(ST) when that is at least each main effect's mean square, else on the larger
    of the two with its own degrees of freedom."""
    rng = np.random.default_rng(sum(shape) + int(10 * sum(effects)))
    sa, sb, se = effects
    matrix = sa * rng.normal(size=(shape[0], 1)) + sb * rng.normal(size=(1, shape[1])) + se * rng.normal(size=shape)
    n_s, n_t = shape
    grand, ms_s, ms_t, ms_e = _expected_mean_squares_by_loops(matrix.tolist())
    combined = ms_s + ms_t - ms_e
    if combined >= max(ms_s, ms_t):
        df = combined**2 / (ms_s**2 / (n_s - 1) + ms_t**2 / (n_t - 1) + ms_e**2 / ((n_s - 1) * (n_t - 1)))
        variance = combined / (n_s * n_t)
    else:
        variance, df = (ms_s, n_s - 1) if ms_s >= ms_t else (ms_t, n_t - 1)
        variance /= n_s * n_t
    half = stats.t.ppf(0.975, df) * variance**0.5
    assert bench.random_effects_interval(matrix) == pytest.approx((grand - half, grand + half), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", [(5, 5), (3, 3)])
@pytest.mark.parametrize("effects", [(0.3, 2.0, 0.5), (2.0, 0.3, 0.5), (1.0, 1.0, 1.0)])
def test_random_effects_interval_covers_the_mean_over_new_seeds_and_tasks(shape, effects):
    """Simulated seeds × tasks data with seed, task and residual effects: the interval covers the population mean
    (0) at least about 95 % of the time, whichever effect dominates; the t-interval over seeds of the task means
    does not when tasks dominate (it is about the drawn tasks)."""
    rng = np.random.default_rng(7)
    sa, sb, se = effects
    n_datasets = 1500
    covered = covered_seeds = 0
    for _ in range(n_datasets):
        data = sa * rng.normal(size=(shape[0], 1)) + sb * rng.normal(size=(1, shape[1])) + se * rng.normal(size=shape)
        low, high = bench.random_effects_interval(data)
        covered += low <= 0 <= high
        per_seed = data.mean(axis=1)
        covered_seeds += abs(per_seed.mean()) <= bench.t_interval(per_seed)
    assert 0.93 <= covered / n_datasets <= 0.995
    if sb > sa:
        assert covered_seeds / n_datasets < 0.7


def test_random_effects_interval_of_equal_values_and_bad_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Satterthwaite's degrees of freedom were 0/0 here
        assert bench.random_effects_interval(np.full((3, 4), 2.5)) == (2.5, 2.5)
    with pytest.raises(ValueError, match="at least 2 x 2"):
        bench.random_effects_interval(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        bench.random_effects_interval(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_random_effects_cell_is_the_interval_of_the_cell_costs():
    cell = [{"seed": s, "task": t, "cost": float(s + 2 * t), "cost_limit": 2.0} for s in range(3) for t in range(4)]
    low, high = bench.random_effects_interval(np.array([[s + 2.0 * t for t in range(4)] for s in range(3)]))
    assert bench.random_effects_cell(cell) == f"{low:.2f}–{high:.2f}"
    assert bench.random_effects_cell(cell[:-1]) == ""


@pytest.mark.parametrize("shape", [(5, 5), (3, 3), (5, 3)])
def test_random_effects_variance_estimate_is_unbiased_for_the_variance_of_the_mean(shape):
    """Oracle from the model's definition: over many simulated matrices, the mean of the interval's variance estimate
    (read back from its half-width where the Satterthwaite branch is taken) equals the variance of the grand mean
    across the matrices, σ_a²/S + σ_b²/T + σ_e²/(ST), computed from the simulation itself."""
    rng = np.random.default_rng(11)
    n_s, n_t = shape
    sa, sb, se = 1.0, 1.5, 0.7
    data = (
        sa * rng.normal(size=(20_000, n_s, 1))
        + sb * rng.normal(size=(20_000, 1, n_t))
        + se * rng.normal(size=(20_000, n_s, n_t))
    )
    means = data.mean(axis=(1, 2))
    row = data.mean(axis=2, keepdims=True)
    col = data.mean(axis=1, keepdims=True)
    ms_s = n_t * ((row[:, :, 0] - means[:, None]) ** 2).sum(1) / (n_s - 1)
    ms_t = n_s * ((col[:, 0, :] - means[:, None]) ** 2).sum(1) / (n_t - 1)
    ms_e = ((data - row - col + means[:, None, None]) ** 2).sum(axis=(1, 2)) / ((n_s - 1) * (n_t - 1))
    estimate = (ms_s + ms_t - ms_e) / (n_s * n_t)
    assert estimate.mean() == pytest.approx(means.var(), rel=0.04)
    assert means.var() == pytest.approx(sa**2 / n_s + sb**2 / n_t + se**2 / (n_s * n_t), rel=0.04)
    # and the interval uses that estimate: its half-width over the t quantile, squared, where it is the estimate
    for matrix, value in zip(data[:50], estimate[:50], strict=True):
        low, high = bench.random_effects_interval(matrix)
        mean_squares = _expected_mean_squares_by_loops(matrix.tolist())[1:]
        if mean_squares[0] + mean_squares[1] - mean_squares[2] >= max(mean_squares[:2]):
            assert (high - low) / 2 > 0 and np.isclose(((high - low) / 2) ** 2 / value, _t_squared(mean_squares, shape))


def _t_squared(mean_squares, shape):
    ms_s, ms_t, ms_e = mean_squares
    n_s, n_t = shape
    combined = ms_s + ms_t - ms_e
    df = combined**2 / (ms_s**2 / (n_s - 1) + ms_t**2 / (n_t - 1) + ms_e**2 / ((n_s - 1) * (n_t - 1)))
    return stats.t.ppf(0.975, df) ** 2


def test_random_effects_interval_takes_the_larger_main_effect_when_the_residual_swamps_the_other():
    """No evidence of a seed effect (MS_seeds below the residual): the tasks' mean square alone, on T − 1 degrees of
    freedom; and the other way round."""
    task_driven = np.array([[0.0, 10.0, 20.0], [1.0, 10.5, 19.0], [0.5, 9.0, 21.0]])
    for matrix in (task_driven, task_driven.T):
        n_s, n_t = matrix.shape
        _, ms_s, ms_t, ms_e = _expected_mean_squares_by_loops(matrix.tolist())
        assert min(ms_s, ms_t) < ms_e
        larger, df = (ms_s, n_s - 1) if ms_s >= ms_t else (ms_t, n_t - 1)
        half = stats.t.ppf(0.975, df) * (larger / (n_s * n_t)) ** 0.5
        assert bench.random_effects_interval(matrix) == pytest.approx((matrix.mean() - half, matrix.mean() + half), rel=1e-12)


@pytest.mark.parametrize(
    "matrix", [[[0.0, 4.0], [4.0, 0.0]], [[1.0, 3.0, 5.0], [3.0, 5.0, 1.0], [5.0, 1.0, 3.0]]], ids=["2x2", "latin"]
)
def test_random_effects_interval_of_varying_values_whose_seed_and_task_means_agree_is_not_zero_width(matrix):
    """Every seed's mean and every task's equal, the values not: MS_seeds = MS_tasks = 0, and the fallback to the
    larger of them gave a zero-width interval (statistics audit). The residual's mean square, with its degrees of
    freedom, written out from the definitions: the sum of squared deviations from the grand mean (the residuals here)."""
    matrix = np.asarray(matrix)
    n_s, n_t = matrix.shape
    grand = sum(map(sum, matrix.tolist())) / (n_s * n_t)
    df = (n_s - 1) * (n_t - 1)
    ms_residual = sum((value - grand) ** 2 for row in matrix.tolist() for value in row) / df
    half = stats.t.ppf(0.975, df) * (ms_residual / (n_s * n_t)) ** 0.5
    assert half > 0
    assert bench.random_effects_interval(matrix) == pytest.approx((grand - half, grand + half), rel=1e-12)


def test_paid_leaves_out_batches_without_a_completed_episode_and_counts_them():
    """A batch that completed no episode records NaN; the cell printed ``nan ± nan`` (statistics audit)."""

    def pair(seed, task, paid):
        return {"seed": seed, "task": task, "adaptation_batch_cost": paid}

    nan = float("nan")
    cell = [pair(0, 0, 2.0), pair(0, 1, nan), pair(1, 0, 4.0), pair(1, 1, 6.0)]
    # seed 0: 2 (one pair missing), seed 1: 5; mean 3.5, t-interval over the 2 seeds written out
    half = stats.t.ppf(0.975, 1) * (((2 - 3.5) ** 2 + (5 - 3.5) ** 2) / 1) ** 0.5 / 2**0.5
    assert bench.paid_cell(cell) == f"3.50 ± {half:.2f} (1 of 4 pairs without a completed episode)"
    assert bench.paid_cell([pair(0, 0, nan), pair(1, 0, nan)]) == "n/a (2 of 2 pairs without a completed episode)"
    assert bench.paid_cell([pair(0, 0, 1.0), pair(0, 1, 3.0)]) == "2.00 (1 seed)"


@pytest.mark.parametrize("nonzero", [4.16, 4.6, 137.0])
def test_a_grid_with_one_nonzero_cost_takes_the_combined_estimate_whatever_the_rounding(nonzero):
    """One non-zero value makes the three mean squares equal: the combined estimate equals the larger main effect's,
    and the rule takes it (``>=``). Rounding picked either formula
    (4.16 gave the narrow one, 4.6 the wide one; reversing the seeds changed it): two published cells were narrow."""
    matrix = np.zeros((3, 3))
    matrix[1, 2] = nonzero
    # the oracle, by hand: MS_seeds = MS_tasks = MS_residual = m, so combined = m with Satterthwaite's
    # df = m² / (m²/2 + m²/2 + m²/4) = 0.8; the mean's variance m/9
    grand = nonzero / 9
    mean_square = 3 * ((nonzero / 3 - grand) ** 2 + 2 * grand**2) / 2
    half = stats.t.ppf(0.975, 0.8) * np.sqrt(mean_square / 9)
    for grid in (matrix, matrix[::-1], matrix[:, ::-1], matrix.T):
        assert bench.random_effects_interval(grid) == pytest.approx((grand - half, grand + half), rel=1e-9)


def test_a_pair_without_an_evaluation_cost_is_left_out_of_the_share_under_and_counted():
    """A NaN cost (no completed episode) counted as over the limit: ``5/6`` where the valued pairs were 5 of 5."""
    cell = [{"seed": s, "task": t, "cost": 1.0, "cost_limit": 2.0} for s in range(2) for t in range(3)]
    cell[4]["cost"] = float("nan")
    low, high = bench.wilson(5, 5)
    assert bench.under_limit_cell(cell) == f"5/5 ({low:.2f}–{high:.2f}) (1 of 6 pairs without a cost)"
    assert bench.under_limit_cell([{**cell[4]}]) == "n/a (1 of 1 pairs without a cost)"


def _results_file(folder, seeds, methods=("Meta-CPO", "CPO-scratch"), **config):
    """A results.json of a run of the Toy2DNav protocol (made up numbers; the settings as the script records them)."""
    import json

    rows = [
        {
            "method": method,
            "seed": seed,
            "set": set_name,
            "task": task,
            "update": update,
            "return": 1.0 + seed,
            "cost": 2.0 + task,
            "cost_sem": 0.1,
            "n_episodes": 50,
            "adaptation_batch_cost": 3.0 if update else float("nan"),
            "cost_limit": 5.0,
            "task_params": "t",
        }
        for method in methods
        for seed in seeds
        for set_name in ("unseen", "shifted")
        for task in range(2)
        for update in range(3)
    ]
    training = {f"{m}|{s}": {"env_steps": 400, "policy_updates": 2, "train_seconds": 1.0} for m in methods for s in seeds}
    settings = {"family": "Toy2DNav", "env_kwargs": {}, "cpo_adaptation": None, **bench.FAMILY_DEFAULTS["Toy2DNav"]}
    settings.update(n_test_tasks=2, n_updates=2, **config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(
        json.dumps({"config": {k: v for k, v in settings.items() if v is not None}, "training": training, "rows": rows})
    )
    return path


def _main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["adaptation.py", *map(str, argv)])
    bench.main()


def test_the_command_line_refuses_what_would_corrupt_the_tables(tmp_path, monkeypatch, capsys):
    """A repeated --methods name counted its pairs twice (a narrower Wilson interval); an --out folder with results
    (the default is the published one) was overwritten; a merge compared only the settings every file records, so a
    file without outer_target_kl merged with one of 0.05 under the header's default 0.01."""
    with pytest.raises(SystemExit):
        _main(monkeypatch, "--methods", "CPO-scratch", "CPO-scratch", "--out", tmp_path / "a")
    assert "repeats a method" in capsys.readouterr().err and not (tmp_path / "a").exists()
    existing = _results_file(tmp_path / "published", [0])
    before = existing.read_text()
    with pytest.raises(SystemExit):
        _main(monkeypatch, "--methods", "CPO-scratch", "--seeds", "7", "--out", tmp_path / "published")
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == before
    first = _results_file(tmp_path / "s0", [0], outer_target_kl=0.05)
    second = _results_file(tmp_path / "s1", [1], outer_target_kl=None)  # not recorded
    with pytest.raises(SystemExit):
        _main(monkeypatch, "--summarise-from", first, second, "--out", tmp_path / "merged")
    assert "do not record ['outer_target_kl']" in capsys.readouterr().err


def test_tables_say_which_methods_lack_seeds_and_which_settings_were_not_recorded(tmp_path, monkeypatch):
    """A run stopped before its end left CPO-scratch with seed 0 only under the header "Seeds [0, 1]", unmarked; and
    its table, written from the folder's own results.json, claimed to be a later version of an earlier one."""
    meta = _results_file(tmp_path / "meta", [0, 1], methods=("Meta-CPO",), outer_target_kl=None)
    scratch = _results_file(tmp_path / "scratch", [0], methods=("CPO-scratch",), outer_target_kl=None)
    _main(monkeypatch, "--summarise-from", meta, scratch, "--out", tmp_path / "merged")
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "**Not every method has every seed** (CPO-scratch: seeds [0])" in table
    assert "not recorded in the results files, shown at the script's defaults: ['outer_target_kl']" in table
    _main(monkeypatch, "--summarise-from", meta, "--out", tmp_path / "meta")  # in place, no table yet
    table = (tmp_path / "meta" / "table.md").read_text()
    assert "summarised from this folder's results.json" in table and "later version" not in table
    assert (tmp_path / "meta" / "results.csv").exists() and (tmp_path / "meta" / "adaptation_unseen.png").exists()
