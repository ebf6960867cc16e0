"""When a step recovers (``recovery``): the margins of ``prepare_batch`` against the confidence bounds computed from
the batch's episode costs directly, their aggregation over tasks in the meta-objective, and the rule in the step."""

from dataclasses import replace

import numpy as np
import pytest
import torch as th
from test_meta_gradient import make_batch, make_policy

from sb3_metacpo import make_task_distribution
from sb3_metacpo.common.cpo_subproblem import cpo_direction
from sb3_metacpo.common.cpo_update import prepare_batch
from sb3_metacpo.common.rollouts import RolloutSampler
from sb3_metacpo.metacpo.meta_objective import MetaObjective, TaskAdaptation


@pytest.fixture(scope="module")
def costly_batch():
    """A Toy2DNav batch of several 100-step episodes with hazard costs, from a wide random policy."""
    dist = make_task_distribution("Toy2DNav", seed=3)
    task = dist.sample(1)[0]
    rng = np.random.default_rng(0)
    sampler = RolloutSampler(dist, n_envs=1, seed=3)
    (batch,) = sampler.collect([task], lambda obs, idx: rng.normal(0, 1.0, (obs.shape[0], 2)), 1000)
    sampler.close()
    costs = batch.episode_constraint_costs[:, 0]
    assert len(costs) >= 5 and costs.std() > 0  # episodes with different costs: the bounds differ
    return batch, dist.max_episode_steps


def actor(observations, params):
    return th.zeros(observations.shape[0], 2, dtype=th.float64), th.zeros(2, dtype=th.float64)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 1.64])
def test_margins_recover_exactly_when_the_chosen_bound_is_above_the_limit(costly_batch, kappa):
    batch, length = costly_batch
    costs = batch.episode_constraint_costs[:, 0]
    mean, sem = costs.mean(), costs.std(ddof=1) / np.sqrt(len(costs))
    params = {"w": th.zeros(1, dtype=th.float64)}
    for limit in np.linspace(mean - 3 * sem, mean + 3 * sem, 13):
        expected = {"linearised": False, "violated": mean + kappa * sem > limit, "confident": mean - kappa * sem > limit}
        for rule, recovers in expected.items():
            prepared = prepare_batch(batch, actor, params, None, 0.99, 0.95, [limit], length, 1.0, kappa, rule)
            if rule == "linearised":
                assert prepared.recovery_margin is None
                continue
            b = prepared.constraint[0]
            assert (b > 0 and b > prepared.recovery_margin[0]) == recovers, (rule, limit)
    with pytest.raises(ValueError, match="Unknown recovery rule"):
        prepare_batch(batch, actor, params, None, 0.99, 0.95, [1.0], length, 1.0, kappa, "always")


@pytest.mark.parametrize("mode", ["mean", "stages", "stages_cvar"])
def test_the_outer_margins_aggregate_over_tasks_as_the_constraint_values(mode):
    """Per task and stage a margin; the meta-objective averages them over the tasks (the CVaR's worst tasks, chosen
    by constraint value) exactly as it averages the constraint values."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    rng = np.random.default_rng(1)
    tasks = []
    for task in range(4):
        stages = [theta, theta]
        batches = [
            replace(make_batch(policy, theta, 10 * task + k, rng.normal(0, 0.1)), recovery_margin=rng.uniform(0, 0.05, 1))
            for k in range(2)
        ]
        tasks.append(TaskAdaptation(stages=stages, batches=batches, fractions=[0.0]))
    objective = MetaObjective(
        policy.actor_mean_log_std, tasks, None, second_order=False, fisher=None, mode=mode, cvar_alpha=0.5
    )  # type: ignore[arg-type]
    value = objective.value([task.stages for task in tasks])
    stages = [1] if mode == "mean" else [0, 1]
    constraints = np.array([[task.batches[k].constraint[0] for k in stages] for task in tasks])  # (tasks, stages)
    margins = np.array([[task.batches[k].recovery_margin[0] for k in stages] for task in tasks])
    if mode == "stages_cvar":
        worst = np.argsort(-constraints, axis=0)[:2]
        margins = np.take_along_axis(margins, worst, axis=0)
    np.testing.assert_allclose(value.recovery_margins.numpy(), margins.mean(0), rtol=1e-12)
    # one batch under CPO's rule: the outer step follows it too
    tasks[0].batches[1] = replace(tasks[0].batches[1], recovery_margin=None)
    assert objective.value([task.stages for task in tasks]).recovery_margins is None


@pytest.mark.parametrize("alpha, n_worst", [(0.3, 2), (0.25, 1), (0.6, 3), (1.0, 4)])
def test_the_cvar_averages_the_ceiling_of_alpha_m_worst_tasks(alpha, n_worst):
    """stages_cvar: the constraint of each stage is the mean over the ⌈αM⌉ tasks with the largest constraint values
    (at least one), written out from the tasks' own values."""
    policy = make_policy()
    theta = {name: value.detach().clone() for name, value in policy.actor_params().items()}
    rng = np.random.default_rng(2)
    tasks = [
        TaskAdaptation(
            stages=[theta, theta],
            batches=[make_batch(policy, theta, 10 * t + k, rng.normal(0, 0.1)) for k in range(2)],
            fractions=[0.0],
        )
        for t in range(4)
    ]
    objective = MetaObjective(
        policy.actor_mean_log_std, tasks, None, second_order=False, fisher=None, mode="stages_cvar", cvar_alpha=alpha
    )  # type: ignore[arg-type]
    value = objective.value([task.stages for task in tasks])
    for k in range(2):
        values = np.sort([task.batches[k].constraint[0] for task in tasks])[::-1]
        assert float(value.constraints[k]) == pytest.approx(values[:n_worst].mean(), rel=1e-12)


def test_a_margin_switches_the_case_only_above_it():
    v, w = th.tensor([1.0, 0.0], dtype=th.float64), th.tensor([[0.0, 1.0]], dtype=th.float64)
    q, r, S = th.tensor(1.0, dtype=th.float64), th.tensor([0.0], dtype=th.float64), th.tensor([[1.0]], dtype=th.float64)
    b = th.tensor([0.05], dtype=th.float64)  # violated, reachable inside the trust region (√(2δs) = 0.141)
    assert cpo_direction(v, w, q, r, S, b, 0.01).case == "dual"
    assert cpo_direction(v, w, q, r, S, b, 0.01, recovery_margin=0.04).case == "recovery"
    assert cpo_direction(v, w, q, r, S, b, 0.01, recovery_margin=0.06).case == "dual"
    assert cpo_direction(v, w, q, r, S, -b, 0.01, recovery_margin=0.0).case == "dual"  # satisfied: never
