"""The throughput benchmark's two bounds against hand-computed values: the ceiling (everything but the env and the
matrix products free) and the batched-tasks bound (the per-task phases at 1/M of their time)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_modules import load_benchmark

throughput = load_benchmark("throughput")


def test_ceiling_is_env_time_over_env_and_products_time():
    # 1000 steps/s, 200 steps per iteration: 0.2 s of env; 0.05 s of products: 0.2 / 0.25
    assert throughput.ceiling(1000.0, 200, 0.05) == pytest.approx(0.8)


def test_batched_bound_divides_only_the_per_task_phases_by_the_tasks():
    times = {
        "total": 0.5,
        "sampling": 0.25,
        "advantages": 0.02,
        "inner_update": 0.06,
        "inner_update/conjugate_gradient": 0.04,  # part of inner_update: not counted twice
        "meta_gradient": 0.08,
        "outer_step": 0.07,  # once per iteration, but for its line search (per task)
        "outer_step/line_search": 0.04,
    }
    # per-task phases 0.02 + 0.06 + 0.08 + 0.04 = 0.2; with M = 4 they would cost 0.05: 0.5 - 0.15 = 0.35 s.
    # 1000 steps/s, 200 steps per iteration: 0.2 s of env, so 0.2 / 0.35.
    assert throughput.batched_bound(1000.0, 200, times, 4) == pytest.approx(0.2 / 0.35)
    # one task: nothing to batch, the measured ratio (0.2 / 0.5)
    assert throughput.batched_bound(1000.0, 200, times, 1) == pytest.approx(0.4)


def test_each_mode_is_compared_with_the_limit_measured_around_it():
    times = {"total": 0.5}
    products = throughput.ProductTimes(profiled=0.1, replayed=0.05, same_computation=True)
    meta = throughput.MetaThroughput(
        limits=[1000.0, 800.0, 400.0],  # before the first mode, between the modes, after the second
        speeds={"first_order": [450.0], "second_order": [300.0]},
        phases={"first_order": [times], "second_order": [times]},
        products={"first_order": products, "second_order": products},
        steps_per_iteration=200,
        tasks=4,
    )
    assert meta.mode_limit("first_order") == 900.0 and meta.mode_limit("second_order") == 600.0
    assert meta.ratio("first_order") == pytest.approx(0.5) and meta.ratio("second_order") == pytest.approx(0.5)
    # ceiling of the second order: 200 / 600 s of env, 0.05 s of products
    assert meta.ceiling("second_order") == pytest.approx((1 / 3) / (1 / 3 + 0.05))
    assert meta.limit == 800.0 and meta.drift() == pytest.approx(1.5)


def test_interleaved_rounds_take_each_run_against_its_own_limits_and_the_median():
    products = throughput.ProductTimes(profiled=0.1, replayed=0.05, same_computation=True)
    first = [{"total": 0.5, "advantages": 0.1}, {"total": 0.4, "advantages": 0.2}, {"total": 0.6, "advantages": 0.0}]
    meta = throughput.MetaThroughput(
        # L, first order, L, second order, L, first order, L, ...: run r of mode m sits between limits 2r+m and 2r+m+1
        limits=[1000.0, 1000.0, 600.0, 600.0, 800.0, 800.0, 400.0],
        speeds={"first_order": [500.0, 540.0, 160.0], "second_order": [300.0, 210.0, 100.0]},
        phases={"first_order": first, "second_order": first},
        products={"first_order": products, "second_order": products},
        steps_per_iteration=200,
        tasks=2,
    )
    assert meta.rounds == 3
    # first order: 500 / 1000, 540 / 600, 160 / 800; second order: 300 / 800, 210 / 700, 100 / 600
    assert meta.ratios("first_order") == pytest.approx([0.5, 0.9, 0.2])
    assert meta.ratio("first_order") == pytest.approx(0.5)
    assert meta.ratios("second_order") == pytest.approx([0.375, 0.3, 1 / 6])
    assert meta.ratio("second_order") == pytest.approx(0.3)
    assert meta.mode_limit("first_order") == 800.0 and meta.mode_limit("second_order") == 700.0
    assert meta.speed("first_order") == 500.0
    assert meta.mean_phases("first_order") == pytest.approx({"total": 0.5, "advantages": 0.1})
    # a phase that one round lacks counts as 0 there
    partial = throughput.MetaThroughput(
        limits=[1.0, 1.0, 1.0, 1.0, 1.0],
        speeds={"first_order": [1.0, 1.0], "second_order": [1.0, 1.0]},
        phases={"first_order": [{"total": 0.2}, {"total": 0.4, "x": 0.2}], "second_order": [{"total": 1.0}] * 2},
        products={"first_order": products, "second_order": products},
        steps_per_iteration=1,
        tasks=1,
    )
    assert partial.mean_phases("first_order") == pytest.approx({"total": 0.3, "x": 0.1})
    # each run's bound against its own limit: 0.2 s / (0.5 - 0.05), 200 / 600 / (0.4 - 0.1), 0.25 / 0.6; the median
    bounds = [0.2 / 0.45, (1 / 3) / 0.3, 0.25 / 0.6]
    assert meta.batched_bound("first_order") == pytest.approx(sorted(bounds)[1])


def test_standard_env_rows_are_the_median_of_ratios_to_the_raw_env_of_the_same_round():
    products = throughput.ProductTimes(profiled=0.1, replayed=0.05, same_computation=True)
    result = throughput.StandardEnvThroughput(
        rounds={throughput.RAW_OURS: [1000.0, 2000.0, 500.0], throughput.CPO_OURS: [900.0, 1000.0, 300.0]},
        cpo_products=products,
        steps_per_update=200,
    )
    assert result.round_ratios(throughput.CPO_OURS) == pytest.approx([0.9, 0.5, 0.6])
    assert result.ratio(throughput.CPO_OURS) == pytest.approx(0.6)  # not 900 / 1000, the ratio of the medians
    assert result.speeds == {throughput.RAW_OURS: 1000.0, throughput.CPO_OURS: 900.0}
    # the ceiling at the median raw env: 0.2 s of env and 0.05 s of products per update
    assert result.cpo_ceiling() == pytest.approx(0.2 / 0.25)
