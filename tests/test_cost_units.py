"""A cost's units must not decide the step: rescaling a cost signal by c > 0 scales its gradient a and its
constraint value b by c and leaves the CPO problem (max gᵀx s.t. ½xᵀHx ≤ δ, b + aᵀx ≤ 0) unchanged. The tolerances
on a cost gradient (``s_tol``, ``cg_residual_tol``) were absolute: a cost in units a thousand times smaller was
dropped from the step (its s fell under ``s_tol``) and, a little larger, had its conjugate gradient stopped early."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch as th
from test_meta_gradient import make_batch, make_policy

from sb3_metacpo.common.constrained_step import FixedFraction, StepConfig, constrained_step
from sb3_metacpo.common.cpo_update import CPOConfig, cost_units, cpo_update
from sb3_metacpo.metacpo.meta_objective import MetaObjective, TaskAdaptation


def binding_problem() -> tuple[np.ndarray, np.ndarray, float, np.ndarray, float]:
    """H (Fisher + damping), g, a violated but reachable constraint (b, a): the constraint binds."""
    n, delta = 6, 0.01
    rng = np.random.default_rng(3)
    root = rng.standard_normal((n, n)) * 0.3
    H = root @ root.T + 0.1 * np.eye(n)
    g = 0.05 * rng.standard_normal(n)
    a = 0.05 * rng.standard_normal(n) + 0.03 * g
    b = 0.3 * math.sqrt(2 * delta * a @ np.linalg.solve(H, a))
    return H, g, b, a, delta


@pytest.mark.parametrize("c", [1.0, 1e-2, 1e-3, 3e-4, 1e-5])
def test_the_step_does_not_depend_on_a_costs_units(c):
    """Oracle: cvxpy's primal, solved once (the problem is the same for every c)."""
    H, g, b, a, delta = binding_problem()
    x, cholesky = cp.Variable(len(g)), np.linalg.cholesky(H)
    cp.Problem(cp.Maximize(g @ x), [cp.norm(cholesky.T @ x) <= math.sqrt(2 * delta), b + a @ x <= 0]).solve(solver="CLARABEL")
    as_tensor = lambda value: th.tensor(value, dtype=th.float64)  # noqa: E731
    result = constrained_step(
        as_tensor(g),
        as_tensor(c * a[None]),
        as_tensor([c * b]),
        lambda p: as_tensor(H) @ p,
        StepConfig(target_kl=delta),
        FixedFraction(1.0),
        cost_units=as_tensor([c * 0.05]),  # the cost's size in its own units
    )
    assert result.case == "dual" and result.informative == (True,)
    step = result.direction.numpy()
    assert np.linalg.norm(step - x.value) <= 1e-4 * np.linalg.norm(x.value)
    assert b + a @ step <= 1e-6 * b


def test_without_units_a_small_cost_was_dropped():
    """The defect the units fix, kept visible: the same problem at c = 3e-4 with the absolute tolerances."""
    H, g, b, a, delta = binding_problem()
    as_tensor = lambda value: th.tensor(value, dtype=th.float64)  # noqa: E731
    result = constrained_step(
        as_tensor(g), as_tensor(3e-4 * a[None]), as_tensor([3e-4 * b]), lambda p: as_tensor(H) @ p,
        StepConfig(target_kl=delta), FixedFraction(1.0),
    )  # fmt: skip
    assert result.informative == (False,) and result.case == "trpo"


@pytest.mark.parametrize("constraint", [0.02, (0.02, -0.01)])
def test_a_cpo_update_is_the_same_bits_with_its_costs_in_other_units(constraint):
    """Costs (advantages and constraint values) times 2⁻¹⁶, a power of two: every quantity of the step scales
    exactly, so the update must be the same bits (it dropped the constraints: s fell under s_tol)."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    batch = make_batch(policy, theta, seed=0, constraint=constraint)
    scale = 2.0**-16
    small = batch.__class__(
        **{
            **batch.__dict__,
            "cost_advantages": batch.cost_advantages * scale,
            "constraint": np.asarray(batch.constraint) * scale,
        }
    )
    config = CPOConfig(StepConfig(target_kl=0.02, cg_max_steps=8))
    params, result = cpo_update(policy.actor_mean_log_std, theta, batch, config)
    small_params, small_result = cpo_update(policy.actor_mean_log_std, theta, small, config)
    assert all(result.informative) and small_result.informative == result.informative
    assert small_result.case == result.case and small_result.fraction == result.fraction
    for name, value in params.items():
        assert th.equal(value, small_params[name]), name
    np.testing.assert_array_equal(cost_units(small.cost_advantages).numpy(), scale * cost_units(batch.cost_advantages).numpy())


def test_meta_constraints_take_the_units_of_their_stage_and_cost():
    """One unit per meta-constraint, in the order of constraint_names (stage-major), each the RMS of that cost's
    advantages over every task's batch of that stage (computed here by hand)."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    tasks = [
        TaskAdaptation(
            stages=[theta, theta], batches=[make_batch(policy, theta, seed=s, constraint=(0.1, 0.2)) for s in seeds]
        )
        for seeds in ((0, 1), (2, 3))
    ]
    objective = MetaObjective(
        policy.actor_mean_log_std, tasks, CPOConfig(StepConfig(0.02)), second_order=False, fisher=None, mode="stages",
        cost_names=("cost", "cost_hazards"),
    )  # fmt: skip
    units = objective.constraint_units()
    assert objective.constraint_names == ["stage0_cost", "stage0_cost_hazards", "stage1_cost", "stage1_cost_hazards"]
    for index, (stage, column) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        values = np.concatenate([task.batches[stage].cost_advantages[:, column].numpy() for task in tasks])
        assert units[index].item() == pytest.approx(math.sqrt(np.mean(values**2)), rel=1e-12)


def test_cost_units_are_checked():
    H, g, b, a, delta = binding_problem()
    as_tensor = lambda value: th.tensor(value, dtype=th.float64)  # noqa: E731
    for units in ([1.0, 1.0], [float("nan")], [-1.0]):
        with pytest.raises(ValueError, match="cost_units must be 1 finite numbers >= 0"):
            constrained_step(
                as_tensor(g), as_tensor(a[None]), as_tensor([b]), lambda p: as_tensor(H) @ p, StepConfig(target_kl=delta),
                FixedFraction(1.0), cost_units=as_tensor(units),
            )  # fmt: skip
