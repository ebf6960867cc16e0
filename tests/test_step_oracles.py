"""Oracles for what the constrained step and the batch preparation promise, written from their definitions (found
missing by mutation testing: each test fails on a mutant that every other test let through)."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

from sb3_metacpo.common.conjugate_gradient import conjugate_gradient_solve
from sb3_metacpo.common.constrained_step import (
    LineSearch,
    StepConfig,
    backtracking_line_search,
    constrained_step,
    recovery_level,
)
from sb3_metacpo.common.cpo_update import prepare_batch
from sb3_metacpo.common.rollouts import EpisodeRecord, TaskBatch

DTYPE = torch.float64


def test_an_accepted_step_is_the_accepted_fraction_of_the_direction_and_inside_the_trust_region():
    """H = 2I, KL(x) = xᵀx exactly (twice the quadratic model the direction is sized by): the full direction has KL
    2δ, so the line search backtracks; the step applied must be that fraction of the direction, with KL ≤ δ."""
    g = torch.tensor([1.0, 0.5, -0.25], dtype=DTYPE)
    config = StepConfig(target_kl=0.01)

    def evaluate(step):
        return float(step @ step), float(g @ step), []

    result = constrained_step(g, None, None, lambda v: v, config, LineSearch(evaluate, 0.0))
    assert result.accepted and 0 < result.fraction < 1 and result.n_backtracks > 0
    torch.testing.assert_close(result.step, result.fraction * result.direction)
    assert evaluate(result.step)[0] <= config.target_kl
    assert float(0.5 * result.direction @ result.direction) == pytest.approx(config.target_kl)  # the direction's own size


def test_a_constraint_exactly_at_its_limit_is_held_to_its_linearised_bound():
    """b = 0 (the mean episode cost equals the limit, e.g. episodes of 20 and 30 against 25) is satisfied: a
    candidate that raises its cost surrogate leaves the bound b + Δ ≤ 0 and must be refused."""

    def evaluate(step):
        return 0.001, 0.1, [0.05]

    outcome = backtracking_line_search(
        LineSearch(evaluate, 0.0, [0.0]), torch.ones(2, dtype=DTYPE), "dual", [0.0], [1.0], [True], StepConfig(0.01)
    )
    assert not outcome.accepted and outcome.rejection == "line search: a satisfied constraint left its linearised bound"


def test_a_recovery_step_with_every_constraint_satisfied_must_still_reduce_the_worst_one():
    """The recovery case with no violated constraint (a feasible set too thin to step in): the docstring's rule is the
    largest normalised value over the informative constraints, not the reward."""

    def evaluate(step):  # more reward, but the worst normalised value rises from -1e-9 to -5e-10
        return 0.001, 0.1, [5e-10, -1e-10]

    outcome = backtracking_line_search(
        LineSearch(evaluate, 0.0, [0.0, 0.0]),
        torch.ones(2, dtype=DTYPE),
        "recovery",
        [-1e-9, -1e-9],
        [1.0, 1.0],
        [True, True],
        StepConfig(0.01),
    )
    assert not outcome.accepted and outcome.rejection == "line search: violation not reduced"


def random_spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return m @ m.T / n + 1e-3 * torch.eye(n, dtype=DTYPE)


@pytest.mark.parametrize("tol", [1e-4, 1e-10])
def test_conjugate_gradient_stops_only_once_the_true_residual_is_within_its_tolerance(tol):
    """An ill-conditioned system: CG stops early with status "ok"; the residual ‖b − Hx‖², computed directly (not by
    CG's recurrence), must then be at most the tolerance, and ``iterations`` the number of products it took."""
    H = random_spd(40, 0)
    b = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    calls = []

    def matvec(p):
        calls.append(1)
        return H @ p

    result = conjugate_gradient_solve(matvec, b, n_iters=200, residual_tol=tol)
    assert result.status == "ok" and 0 < result.iterations < 200
    residual = b - H @ result.x
    assert float(residual @ residual) <= tol
    assert result.iterations == len(calls)
    one = conjugate_gradient_solve(matvec, b, n_iters=1, residual_tol=0.0)
    assert one.iterations == 1  # constrained_step reads it (r = W g only after at least one iteration)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("at_call", "index"), [(1, 1), (1, 2), (3, 2)])
def test_conjugate_gradient_reports_any_non_finite_entry_of_a_product(value, at_call, index):
    """Conjugate gradient trusts a product Hp when the curvature pᵀHp is finite: a NaN or inf anywhere in Hp must
    still stop it as "non-finite", with the iterate of the iterations before, also where p is 0 (entry 1 of the
    first direction b: 0·inf is NaN)."""
    H = random_spd(6, 2)
    b = torch.tensor([1.0, 0.0, -2.0, 0.5, 0.0, 3.0], dtype=DTYPE)
    clean = conjugate_gradient_solve(lambda p: H @ p, b, n_iters=at_call - 1, residual_tol=0.0)
    calls = []

    def matvec(p):
        calls.append(1)
        product = H @ p
        if len(calls) == at_call:
            assert bool(p[index] == 0) == ((at_call, index) == (1, 1))
            product[index] = value
        return product

    result = conjugate_gradient_solve(matvec, b, n_iters=10, residual_tol=0.0)
    assert result.status == "non-finite" and result.iterations == at_call - 1
    assert torch.equal(result.x, clean.x)


def batch_of(episode_lengths: list[int], episode_costs: list[float], tail: int, tail_cost: float = 0.0) -> TaskBatch:
    """One env: episodes that terminated after the given lengths, each paying its cost at its last step, then
    ``tail`` steps of an episode in flight paying ``tail_cost`` per step."""
    rng = np.random.default_rng(0)
    steps = sum(episode_lengths) + tail
    costs = np.zeros((steps, 1, 1), np.float32)
    terminated = np.zeros((steps, 1), bool)
    episodes, t = [], 0
    for length, cost in zip(episode_lengths, episode_costs, strict=True):
        t += length
        terminated[t - 1, 0] = True
        costs[t - 1, 0, 0] = cost
        reward = float(length) / 2  # a return of its own per episode
        episodes.append(EpisodeRecord(reward=reward, cost=cost, length=length, seed=None, terminated=True, costs=(cost,)))
    costs[t:, 0, 0] = tail_cost
    observations = rng.normal(size=(steps, 1, 2)).astype(np.float32)
    return TaskBatch(
        task=None,
        observations=observations,
        actions=rng.normal(size=(steps, 1, 2)).astype(np.float32),
        rewards=rng.normal(size=(steps, 1)).astype(np.float32),
        costs=costs,
        terminated=terminated,
        truncated=np.zeros((steps, 1), bool),
        next_observations=np.roll(observations, -1, axis=0),
        episodes=episodes,
    )


def zero_actor(observations, params):
    return torch.zeros(observations.shape[0], 2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)


PARAMS = {"w": torch.zeros(1, dtype=DTYPE)}


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_constraint_values_of_episodes_of_unequal_lengths(kappa):
    """b = (J_C + κ·SE − limit)/L with J_C and SE the mean and standard error of the completed episodes' costs and L
    their mean length, written out: episodes of 10 and 12 steps costing 3 and 5, limit 2."""
    batch = batch_of([10, 12], [3.0, 5.0], tail=8)
    prepared = prepare_batch(batch, zero_actor, PARAMS, None, 0.99, 0.95, [2.0], 50, 1.0, kappa)
    sem = np.std([3.0, 5.0], ddof=1) / math.sqrt(2)  # = 1
    assert prepared.constraint[0] == pytest.approx((4.0 + kappa * sem - 2.0) / 11.0, rel=1e-12)
    assert prepared.episode_costs[0] == pytest.approx(4.0) and prepared.n_episodes == 2
    assert prepared.episode_reward == pytest.approx((5.0 + 6.0) / 2)  # the mean return of the completed episodes


def test_constraint_value_of_a_batch_without_a_completed_episode():
    """No episode ended: J_C is the mean step cost times the episode length, and L the episode length."""
    batch = batch_of([], [], tail=20, tail_cost=0.25)
    prepared = prepare_batch(batch, zero_actor, PARAMS, None, 0.99, 0.95, [10.0], 100, 1.0, 1.0)
    assert prepared.episode_costs[0] == pytest.approx(25.0)
    assert prepared.constraint[0] == pytest.approx((25.0 - 10.0) / 100.0, rel=1e-6)


def test_reward_advantages_are_standardised_and_cost_advantages_centred():
    """The reward advantages are standardised (mean 0, std 1) and the cost advantages only centred (mean 0 per
    column, in cost units), as PreparedBatch documents."""
    batch = batch_of([10, 12, 9], [3.0, 5.0, 1.0], tail=5, tail_cost=0.5)
    batch.rewards += 3.0  # far from centred before standardising
    prepared = prepare_batch(batch, zero_actor, PARAMS, None, 0.99, 0.95, [2.0], 50)
    reward, cost = prepared.reward_advantages, prepared.cost_advantages
    assert abs(float(reward.mean())) < 1e-12 and float(reward.std()) == pytest.approx(1.0, rel=1e-6)
    assert abs(float(cost.mean(0)[0])) < 1e-12 and float(cost.abs().max()) > 0.1  # centred, not rescaled


@pytest.mark.parametrize("freq", [1, 3])
def test_the_fisher_products_of_an_update_use_every_freq_th_sample_from_the_first(freq):
    """``fvp_sample_freq=k``: the Fisher matrix of the step is that of observations[::k] (all of them for k = 1)."""
    from sb3_metacpo.common.cpo_update import CPOConfig, cpo_update

    batch = batch_of([10, 12], [3.0, 5.0], tail=8)
    weight = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    params = {"weight": weight, "log_std": torch.zeros(2, dtype=DTYPE)}

    def actor(observations, p):
        return observations.to(DTYPE) @ p["weight"], p["log_std"]

    prepared = prepare_batch(batch, actor, params, None, 0.99, 0.95, [2.0], 50)
    seen = []

    def fisher(p, observations, damping, graph):
        seen.append(observations)
        return lambda v: v + damping * v

    config = CPOConfig(StepConfig(target_kl=0.01), True, 0.1, freq)
    cpo_update(actor, params, prepared, config, fisher=fisher)
    (used,) = seen
    torch.testing.assert_close(used, prepared.observations[::freq])


def test_the_time_fraction_of_a_step_past_the_episode_length_is_one():
    """The cost critic's time input is step / episode length, clipped at 1 for steps past the length the algorithm
    assumes (an env whose episodes outlast it)."""
    batch = batch_of([30], [1.0], tail=10)
    prepared = prepare_batch(batch, zero_actor, PARAMS, None, 0.99, 0.95, [2.0], 20)
    steps = np.concatenate([np.arange(30), np.arange(10)])
    expected = np.minimum(steps / 20, 1.0)
    np.testing.assert_allclose(prepared.time_fractions.numpy(), expected)


def test_a_recovery_step_may_spend_a_satisfied_constraints_slack_as_the_recovery_program_does():
    """Two conflicting costs, the first violated beyond the trust region's reach, the second satisfied with a little
    slack: the recovery program (here cvxpy's minimax, an independent oracle) lowers the worst normalised violation
    by raising the second to the same level t* > 0. With exactly linear surrogates and an exactly quadratic KL the
    linear model is the truth, so the line search must accept the program's direction (it once refused every
    fraction: each one took the second constraint past its own limit)."""
    n, delta = 4, 0.01
    rng = np.random.default_rng(0)
    root = rng.standard_normal((n, n))
    H = root @ root.T + 0.5 * np.eye(n)
    g = rng.standard_normal(n)
    a1 = rng.standard_normal(n)
    A = np.stack([a1, -a1 + 0.3 * rng.standard_normal(n)])
    scale = np.sqrt(2 * delta * np.diag(A @ np.linalg.solve(H, A.T)))
    b = np.array([1.5, -0.02]) * scale
    x, t = cp.Variable(n), cp.Variable()
    cholesky = np.linalg.cholesky(H)
    constraints = [cp.norm(cholesky.T @ x) <= math.sqrt(2 * delta), (b + A @ x) / scale <= t]
    cp.Problem(cp.Minimize(t), constraints).solve(solver="CLARABEL")
    level = float(t.value)
    assert 0 < level < 1.5  # infeasible, and the program lowers the worst violation

    def evaluate(step):
        s = step.numpy()
        return float(0.5 * s @ H @ s), float(g @ s), list(A @ s)

    as_tensor = lambda value: torch.tensor(value, dtype=DTYPE)  # noqa: E731
    result = constrained_step(
        as_tensor(g),
        as_tensor(A),
        as_tensor(b),
        lambda p: as_tensor(H) @ p,
        StepConfig(target_kl=delta * 1.0001, cg_max_steps=50),
        LineSearch(evaluate, 0.0, [0.0, 0.0]),
    )
    assert result.case == "recovery" and result.accepted, result.rejection
    normalised = (b + A @ result.step.numpy()) / scale
    assert normalised.max() < 1.5
    assert result.fraction == 1.0  # the linear model is exact here: the program's full step passes
    np.testing.assert_allclose(normalised, [level, level], atol=1e-4)
    assert normalised[1] <= level + 1e-4  # the satisfied one rose no further than the program's level


def test_the_recovery_level_is_the_largest_normalised_value_at_the_full_step() -> None:
    """max_j (b_j + Δ_j)/scale_j over the informative constraints, written out: (2 − 1)/4 = 0.25, (−0.05 + 0.3)/0.5
    = 0.5 (raw, the first would be the larger: 1 against 0.25); a constraint without information does not count."""
    assert recovery_level([2.0, -0.05], [-1.0, 0.3], [4.0, 0.5], [True, True]) == pytest.approx(0.5)
    assert recovery_level([2.0, -0.05], [-1.0, 0.3], [4.0, 0.5], [True, False]) == pytest.approx(0.25)
    assert recovery_level([2.0], [-1.0], [4.0], [False]) == 0.0


def test_the_line_search_judges_violations_in_each_constraints_own_scale() -> None:
    """Both constraints violated, normalised 2/10 = 0.2 and 0.5/0.1 = 5: a step that cuts the first (raw 2 → 0.5) and
    lets the second rise (0.5 → 0.51, normalised 5 → 5.1) raises the worst normalised violation, so it is refused,
    although the worst raw violation falls (2 → 0.51)."""

    def evaluate(step: torch.Tensor) -> tuple[float, float, list[float]]:
        return 0.001, 1.0, [-1.5, 0.01]

    outcome = backtracking_line_search(
        LineSearch(evaluate, 0.0, [0.0, 0.0]),
        torch.ones(2, dtype=DTYPE),
        "dual",
        [2.0, 0.5],
        [10.0, 0.1],
        [True, True],
        StepConfig(0.01, line_search_max_iter=0),
    )
    assert not outcome.accepted and outcome.rejection == "line search: violation not reduced"


@pytest.mark.parametrize(
    ("level", "rise", "accepted"),
    [
        (0.5, 0.45, True),  # within the program's level: b₂ + Δ₂ = 0.4 ≤ 0.5 (scale 1)
        (0.5, 0.6, False),  # beyond it: 0.55 > 0.5
        (-0.1, 0.15, False),  # the program is feasible (t ≤ 0): the satisfied constraint keeps its own limit
    ],
)
def test_in_recovery_a_satisfied_constraint_may_rise_only_to_the_programs_level(level, rise, accepted):
    """Constraint 1 violated (b = 2, falls to 1), constraint 2 satisfied (b = −0.05) rising by ``rise``: accepted only
    while b₂ + Δ₂ ≤ max(0, level)·scale (scales 1)."""

    def evaluate(step):
        return 0.001, 0.0, [-1.0, rise]

    outcome = backtracking_line_search(
        LineSearch(evaluate, 0.0, [0.0, 0.0]),
        torch.ones(2, dtype=DTYPE),
        "recovery",
        [2.0, -0.05],
        [1.0, 1.0],
        [True, True],
        StepConfig(0.01, line_search_max_iter=0),
        level,
    )
    assert outcome.accepted is accepted
    if not accepted:
        assert outcome.rejection == "line search: a satisfied constraint left its linearised bound"
