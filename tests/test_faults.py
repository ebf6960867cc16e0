"""Fault injection: every numerical fault of a constrained step makes the update a skipped one, with its cause in
``StepResult.rejection`` and in the logs; training goes on and no parameter ever becomes non-finite."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure

import sb3_metacpo.common.constrained_step as constrained_step_module
import sb3_metacpo.common.cpo_update as cpo_update_module
import sb3_metacpo.metacpo.metacpo as metacpo_module
from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.constrained_step import FixedFraction, LineSearch, StepConfig, constrained_step
from sb3_metacpo.common.cpo_subproblem import cpo_direction

SMALL = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
NAN, INF = float("nan"), float("inf")

#: One injected fault: ``(g, A, b, fisher_product) -> (g, A, b, fisher_product)``.
Fault = Callable[[th.Tensor, Any, Any, Callable[[th.Tensor], th.Tensor]], tuple[Any, Any, Any, Any]]


def _poison(tensor: th.Tensor, value: float) -> th.Tensor:
    poisoned = tensor.detach().clone()
    poisoned.view(-1)[0] = value
    return poisoned


def _fisher_poisoned(value: float) -> Fault:
    def fault(g, A, b, fvp):
        return g, A, b, lambda v: _poison(fvp(v), value)

    return fault


#: fault name -> (fault, expected rejection). The direction's fault is injected into the subproblem (below).
FAULTS: dict[str, tuple[Fault, str]] = {
    "NaN in g (CG input)": (lambda g, A, b, f: (_poison(g, NAN), A, b, f), "non-finite reward gradient"),
    "inf in g (CG input)": (lambda g, A, b, f: (_poison(g, INF), A, b, f), "non-finite reward gradient"),
    "NaN in A (CG input)": (
        lambda g, A, b, f: (g, None if A is None else _poison(A, NAN), b, f),
        "non-finite cost gradient",
    ),
    "NaN constraint value": (
        lambda g, A, b, f: (g, A, None if b is None else _poison(b, NAN), f),
        "non-finite constraint value",
    ),
    "inf constraint value": (
        lambda g, A, b, f: (g, A, None if b is None else _poison(b, INF), f),
        "non-finite constraint value",
    ),
    "overflowing g (finite, squared norm inf)": (
        lambda g, A, b, f: (g * th.finfo(g.dtype).max ** 0.75, A, b, f),
        "reward gradient too large",
    ),
    "overflowing A (finite, squared norm inf)": (
        lambda g, A, b, f: (g, None if A is None else A * th.finfo(A.dtype).max ** 0.75, b, f),
        "cost gradient too large",
    ),
    "NaN Fisher product": (_fisher_poisoned(NAN), "non-finite Fisher product"),
    "inf Fisher product": (_fisher_poisoned(INF), "non-finite Fisher product"),
    "zero Fisher product": (lambda g, A, b, f: (g, A, b, lambda v: th.zeros_like(v)), "Fisher product not positive definite"),
    # positive curvature along g (the first search direction), negative along a later one: conjugate gradient stopped
    # there and reported "ok" with a partial x, and the step was taken
    "indefinite Fisher product (after the first CG step)": (
        lambda g, A, b, f: (g, A, b, lambda v: f(v) - 0.9 * float(g @ f(g) / (g @ g)) * v),
        "Fisher product not positive definite",
    ),
    # positive but denormal curvature: conjugate gradient's step overflowed and it reported "ok" with an inf/NaN x
    "denormal Fisher product": (
        lambda g, A, b, f: (g, A, b, lambda v: v * (th.finfo(v.dtype).tiny * 1e-3)),
        "non-finite Fisher product",
    ),
    "parallel reward and cost gradients": (
        lambda g, A, b, f: (g, None if A is None else 3.0 * g.detach().expand_as(A).clone(), th.zeros_like(b), f),
        "parallel reward and cost gradients",
    ),
}


def _problem(n: int = 6, dtype: th.dtype = th.float64) -> tuple[th.Tensor, th.Tensor, th.Tensor, Callable]:
    gen = th.Generator().manual_seed(0)
    root = th.randn(n, n, generator=gen, dtype=dtype)
    h = root @ root.T / n + 0.1 * th.eye(n, dtype=dtype)
    g = th.randn(n, generator=gen, dtype=dtype)
    A = th.randn(1, n, generator=gen, dtype=dtype)
    return g, A, th.tensor([-0.001], dtype=dtype), lambda v: h @ v


def _search(n: int) -> LineSearch:
    return LineSearch(lambda step: (0.0, float(step.sum()), [0.0]), 0.0, [0.0])


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_each_fault_skips_the_step_with_its_cause(name: str, dtype: th.dtype) -> None:
    fault, expected = FAULTS[name]
    g, A, b, fvp = fault(*_problem(dtype=dtype))
    for step_size in (FixedFraction(1.0), _search(len(g))):
        result = constrained_step(g, A, b, fvp, StepConfig(target_kl=0.01), step_size)
        assert result.rejection is not None and result.rejection.startswith(expected), result.rejection
        assert not result.accepted and result.fraction == 0.0
        assert th.equal(result.step, th.zeros_like(g))  # exactly zero, never 0 * NaN


def test_a_non_finite_direction_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_direction(*args: Any, **kwargs: Any) -> Any:
        solution = cpo_direction(*args, **kwargs)
        return dataclasses.replace(solution, x=th.full_like(solution.x, NAN))

    monkeypatch.setattr(constrained_step_module, "cpo_direction", nan_direction)
    g, A, b, fvp = _problem()
    result = constrained_step(g, A, b, fvp, StepConfig(target_kl=0.01), FixedFraction(1.0))
    assert result.rejection == "non-finite step" and th.equal(result.step, th.zeros_like(g))


def test_unfaulted_problem_is_accepted_and_zero_gradient_is_a_zero_step() -> None:
    g, A, b, fvp = _problem()
    assert constrained_step(g, A, b, fvp, StepConfig(target_kl=0.01), FixedFraction(1.0)).rejection is None
    result = constrained_step(th.zeros_like(g), None, None, fvp, StepConfig(target_kl=0.01), _search(len(g)))
    assert result.rejection == "zero step" and not result.accepted
    # Anti-parallel gradients (improving the reward lowers the cost) are no conflict: a TRPO step.
    assert constrained_step(g, -g[None], b, fvp, StepConfig(target_kl=0.01), FixedFraction(1.0)).rejection is None


@pytest.mark.parametrize("m", [2, 3])
def test_a_reward_gradient_within_conjugate_gradients_tolerance_gives_no_step_outside_the_trust_region(m: int) -> None:
    """‖g‖² below CG's absolute tolerance: v = 0 and q = 0, but r = W g was not 0, and with several binding
    constraints the dual step's ½xᵀHx came out ~1e15 δ, accepted when replayed (FixedFraction)."""
    gen = th.Generator().manual_seed(1)
    n, delta = 20, 0.01
    root = th.randn(n, n, generator=gen, dtype=th.float64)
    h = root @ root.T / n + 0.1 * th.eye(n, dtype=th.float64)
    g = th.randn(n, generator=gen, dtype=th.float64)
    A = th.randn(m, n, generator=gen, dtype=th.float64)
    A[0] += 0.8 * g
    A[1:] -= 0.3 * g
    s = th.einsum("ij,ij->i", A, th.linalg.solve(h, A.T).T)
    b = th.tensor([0.3, -0.2, 0.1][:m], dtype=th.float64) * th.sqrt(2 * delta * s)  # every constraint binds
    config = StepConfig(target_kl=delta, cg_max_steps=n)
    assert constrained_step(g, A, b, lambda v: h @ v, config, FixedFraction(1.0)).case == "dual"
    result = constrained_step(1e-6 * g, A, b, lambda v: h @ v, config, FixedFraction(1.0))
    x = result.direction.detach()
    assert float(0.5 * x @ h @ x) <= delta * (1 + 1e-6), result.rejection


def test_step_settings_and_replayed_fractions_are_validated() -> None:
    for bad in (
        dict(target_kl=-1.0),
        dict(target_kl=NAN),
        dict(target_kl=0.01, cg_max_steps=0),
        dict(target_kl=0.01, s_tol=NAN),
    ):
        with pytest.raises(ValueError, match="must be"):
            StepConfig(**bad)
    for fraction in (NAN, INF, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"a replayed step's fraction must be in \[0, 1\]"):
            FixedFraction(fraction)
    v, W, q = th.ones(1, 3), th.ones(1, 2, 3), th.ones(1)
    r, S, b = th.ones(1, 2), th.eye(2)[None], th.ones(1, 2)
    with pytest.raises(ValueError, match="s_tol must be a finite number"):
        cpo_direction(v, W, q, r, S, b, 0.01, s_tol=NAN)
    with pytest.raises(ValueError, match="recovery_margin must be finite"):
        cpo_direction(v, W, q, r, S, b, 0.01, recovery_margin=NAN)
    with pytest.raises(ValueError, match="does not fit the 2 constraints"):
        cpo_direction(v, W, q, r, S, b, 0.01, recovery_margin=th.zeros(3))


def _inject(monkeypatch: pytest.MonkeyPatch, fault: Fault, calls: set[int]) -> list[str | None]:
    """Corrupt the inputs of the ``calls``-th constrained steps (counting every step: inner, outer and CPO's);
    returns the list that collects every step's rejection."""
    rejections: list[str | None] = []
    counter = {"n": 0}

    def faulty(g, A, b, fisher_product, config, step_size, recovery_margin=None, cost_scales=None):
        index = counter["n"]
        counter["n"] += 1
        if index in calls:
            g, A, b, fisher_product = fault(g, A, b, fisher_product)
        result = constrained_step(g, A, b, fisher_product, config, step_size, recovery_margin, cost_scales)
        rejections.append(result.rejection)
        return result

    for module in (cpo_update_module, metacpo_module):
        monkeypatch.setattr(module, "constrained_step", faulty)
    return rejections


def _finite(model: Any) -> bool:
    return all(bool(th.isfinite(value).all()) for value in model.policy.state_dict().values())


def _log(path: Path) -> list[dict[str, str]]:
    with open(path / "progress.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_metacpo_outer_fault_is_skipped_logged_and_training_continues(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fault, expected = FAULTS[name]
    model = MetaCPO(
        "MlpPolicy",
        make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50),
        meta_constraint="mean",
        **SMALL,
    )
    model.set_logger(configure(str(tmp_path), ["csv"]))
    theta = {k: v.clone() for k, v in model.policy.actor_params().items()}
    # Steps 0, 1: the first iteration's inner steps (2 tasks); step 2: its outer step, faulted.
    rejections = _inject(monkeypatch, fault, {2})
    model.learn(800)
    assert model._n_updates == 2 and _finite(model)
    log = _log(tmp_path)
    assert log[0]["train/step_rejection"].startswith(expected), log[0]["train/step_rejection"]
    assert rejections[2] is not None and rejections[2].startswith(expected)
    assert log[1]["train/step_rejection"] != log[0]["train/step_rejection"]  # the next update is computed afresh
    assert any(not th.equal(theta[k], v) for k, v in model.policy.actor_params().items())  # training went on


@pytest.mark.parametrize("name", ["NaN in g (CG input)", "NaN Fisher product", "zero Fisher product"])
def test_metacpo_inner_fault_is_skipped_and_logged(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fault, expected = FAULTS[name]
    model = MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50), **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    _inject(monkeypatch, fault, {0})
    model.learn(400)
    assert _finite(model)
    assert expected in _log(tmp_path)[0]["train/inner_step_rejections"]


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_cpo_fault_is_skipped_logged_and_training_continues(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fault, expected = FAULTS[name]
    model = CPO("MlpPolicy", "Toy2DNav", n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]), n_critic_updates=1)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    rejections = _inject(monkeypatch, fault, {0})
    model.learn(200)
    assert model._n_updates == 2 and _finite(model)
    assert rejections[0] is not None and rejections[0].startswith(expected)
    # SB3 dumps the logs before train(): the first update's keys are in the second row.
    assert _log(tmp_path)[1]["train/step_rejection"].startswith(expected)


def test_fault_table_is_complete() -> None:
    # Every fault the issue names has an entry (the docs' fault-injection table is generated from FAULTS).
    names = " ".join(FAULTS)
    for word in ("g (CG input)", "constraint value", "Fisher product", "zero Fisher", "parallel"):
        assert word in names
    assert math.isnan(NAN) and np.isinf(INF)


@pytest.mark.parametrize("solver", ["analytic", "cvxpylayers"])
def test_opposing_satisfied_constraints_do_not_raise(solver: str) -> None:
    """Two opposing constraints (a₂ = −2a₁), both satisfied or at their limits: the feasible set is a slice of the
    trust region, which the subproblem classes as recovery; the line search then took the largest violation of an
    empty set of violated constraints and raised ValueError mid-training. It judges the step on the informative
    constraints now: no exception, and a finite step that moves no constraint past its bound."""
    g, A, _, fvp = _problem()
    A = th.cat([A, -2.0 * A])
    search = LineSearch(lambda step: (0.0, float(g @ step), [float(a @ step) for a in A]), 0.0, [0.0, 0.0])
    for values in ([0.0, 0.0], [-1e-9, -1e-9], [-1e-12, -1e-12]):
        b = th.tensor(values, dtype=th.float64)
        result = constrained_step(g, A, b, fvp, StepConfig(target_kl=0.01, dual_solver=solver), search)
        assert th.isfinite(result.step).all()
        assert bool((b + A @ result.step <= 1e-9).all()), (values, result.case, result.rejection)


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_representable_std_is_where_the_variance_and_its_inverse_are_finite(dtype: th.dtype) -> None:
    from sb3_metacpo.common.cpo_update import representable_std

    bound = th.tensor(math.log(th.finfo(dtype).max) / 2, dtype=dtype)
    for x in (th.nextafter(bound, th.tensor(0.0, dtype=dtype)), th.tensor(0.0, dtype=dtype), th.tensor(-3.5, dtype=dtype)):
        for log_std in (x, -x):
            variance, inverse = (2 * log_std).exp(), (-2 * log_std).exp()
            assert representable_std(log_std.reshape(1))
            assert bool(th.isfinite(variance) & th.isfinite(inverse) & (variance > 0) & (inverse > 0))
    outside = th.nextafter(bound, th.tensor(math.inf, dtype=dtype)) * 1.001
    for log_std in (outside, -outside):
        assert not representable_std(log_std.reshape(1))
        assert not bool(th.isfinite((2 * log_std.abs()).exp()))


@pytest.mark.parametrize("algo", ["CPO", "MetaCPO"])
def test_a_step_to_a_std_beyond_float32_is_rejected_not_taken(algo: str) -> None:
    """A huge trust region: one accepted step put log_std near 9448 (the KL of an infinite variance looked finite), and
    every later update was skipped as non-finite, silently. Now such candidates fail the line search."""
    import gymnasium as gym
    from bandits import costly_bandit

    from sb3_metacpo.common.cpo_update import representable_std

    if algo == "CPO":
        env = gym.wrappers.TimeLimit(costly_bandit(), 10)
        model: Any = CPO("MlpPolicy", env, n_steps=50, seed=0, target_kl=1e8, policy_kwargs=dict(net_arch=[8]))
        model.learn(300)
    else:
        toy = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
        model = MetaCPO("MlpPolicy", toy, meta_batch_size=2, n_steps=40, seed=0, inner_target_kl=1e8, outer_target_kl=1e8)
        model.learn(320)
    log_std = model.policy.actor_params()["log_std"]
    assert representable_std(log_std) and bool(th.isfinite(log_std).all())
