"""A cost's units must not decide the step: rescaling a cost signal by c > 0 scales its gradient a and its
constraint value b by c and leaves the CPO problem (max gᵀx s.t. ½xᵀHx ≤ δ, b + aᵀx ≤ 0) unchanged. The tolerances
on a cost gradient (``s_tol``, ``cg_residual_tol``) were absolute: a cost in units a thousand times smaller was
dropped from the step (its s fell under ``s_tol``) and, a little larger, had its conjugate gradient stopped early."""

from __future__ import annotations

import dataclasses
import math

import cvxpy as cp
import numpy as np
import pytest
import torch as th
from test_meta_gradient import make_batch, make_policy

from sb3_metacpo.common.constrained_step import CostScales, FixedFraction, StepConfig, constrained_step
from sb3_metacpo.common.cpo_update import CPOConfig, PreparedBatch, cost_scales, cpo_update, prepare_batch
from sb3_metacpo.common.rollouts import EpisodeRecord, TaskBatch
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


@pytest.mark.parametrize("c", [1.0, 1e-2, 1e-3, 3e-4, 1e-5, 1e-7, 1e-8])
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
        cost_scales=CostScales(as_tensor([c * 2.0]), as_tensor([c * 0.05])),  # the cost's sizes in its own units
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
    """Costs (advantages, returns and constraint values) times 2⁻¹⁶, a power of two: every quantity of the step scales
    exactly, so the update must be the same bits (it dropped the constraints: s fell under s_tol)."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    batch = make_batch(policy, theta, seed=0, constraint=constraint)
    returns = batch.cost_advantages.numpy() + 1.5  # a cost signal of size about 1.5
    batch = batch.__class__(**{**batch.__dict__, "cost_returns": returns})
    scale = 2.0**-16
    small = batch.__class__(
        **{
            **batch.__dict__,
            "cost_advantages": batch.cost_advantages * scale,
            "cost_returns": batch.cost_returns * scale,
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
    for big, little in zip(vars(cost_scales([batch])).values(), vars(cost_scales([small])).values(), strict=True):
        np.testing.assert_array_equal(little.numpy(), scale * big.numpy())


def test_a_cost_the_policy_cannot_change_does_not_constrain_the_step():
    """One cost per step, always above its limit: its advantages are only the linear baseline's leftover noise, and
    so is its gradient. Measured against the noise itself (the advantages' size) that gradient counted as
    information and every update became a recovery step along it (a review found it); measured against the cost
    signal (its returns) it is nothing, and the step is TRPO's on the reward, as with the absolute tolerance."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    rng = np.random.default_rng(0)
    horizon, length = 200, 20
    obs = rng.uniform(-1, 1, (horizon, 1, 3))
    with th.no_grad():
        mean, log_std = policy.actor_mean_log_std(th.as_tensor(obs.reshape(-1, 3)), theta)
        actions = (mean + log_std.exp() * th.randn(mean.shape, dtype=mean.dtype)).numpy().reshape(horizon, 1, 2)
    steps = np.tile(np.arange(horizon) % length, (1, 1)).T
    rewards = actions[..., 0] + rng.normal(size=(horizon, 1))
    episodes = [
        EpisodeRecord(float(rewards[i : i + length].sum()), float(length), length, None, False, (float(length),))
        for i in range(0, horizon, length)
    ]
    batch = TaskBatch(
        None, obs, actions, rewards, np.ones((horizon, 1, 1)), np.zeros((horizon, 1), bool), steps == length - 1,
        obs.copy(), episodes, steps,
    )  # fmt: skip
    prepared = prepare_batch(batch, policy.actor_mean_log_std, theta, None, 0.99, 0.95, [10.0], length)
    assert prepared.constraint[0] > 0 and float(prepared.cost_advantages.abs().max()) < 1e-3  # over the limit; noise
    _, result = cpo_update(policy.actor_mean_log_std, theta, prepared, CPOConfig(StepConfig(target_kl=0.01)))
    assert result.informative == (False,) and result.case == "trpo" and result.expected_improvement > 0


def test_meta_constraints_take_the_units_of_their_stage_and_cost():
    """One unit per meta-constraint, in the order of constraint_names (stage-major), each the RMS of that cost's
    advantages over every task's batch of that stage (computed here by hand)."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}

    def batch(seed: int) -> PreparedBatch:  # cost returns neither zero nor centred: their RMS is not their spread
        made = make_batch(policy, theta, seed=seed, constraint=(0.1, 0.2))
        return dataclasses.replace(made, cost_returns=made.cost_advantages.numpy() + 1.5)

    tasks = [TaskAdaptation(stages=[theta, theta], batches=[batch(s) for s in seeds]) for seeds in ((0, 1), (2, 3))]
    objective = MetaObjective(
        policy.actor_mean_log_std, tasks, CPOConfig(StepConfig(0.02)), second_order=False, fisher=None, mode="stages",
        cost_names=("cost", "cost_hazards"),
    )  # fmt: skip
    scales = objective.constraint_scales()
    assert objective.constraint_names == ["stage0_cost", "stage0_cost_hazards", "stage1_cost", "stage1_cost_hazards"]
    for index, (stage, column) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        advantages = np.concatenate([task.batches[stage].cost_advantages[:, column].numpy() for task in tasks])
        returns = np.concatenate([task.batches[stage].cost_returns[:, column] for task in tasks])
        assert scales.advantages[index].item() == pytest.approx(math.sqrt(np.mean(advantages**2)), rel=1e-12)
        assert scales.signal[index].item() == pytest.approx(math.sqrt(np.mean(returns**2)), abs=1e-12)
