"""Numerics checked against independent oracles (torch.distributions, double backward of a KL written here, GAE
written out as a loop, explicit sums), each test failing on a mutant that every other test let through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from torch import nn
from torch.distributions import Normal, kl_divergence

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.constrained_step import StepConfig, StepResult
from sb3_metacpo.common.cpo_update import (
    CPOConfig,
    Params,
    PreparedBatch,
    cpo_update,
    gaussian_log_prob,
    prepare_batch,
)
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.rollouts import TaskBatch
from sb3_metacpo.metacpo.meta_objective import MetaObjective, TaskAdaptation

DTYPE = th.float64
OBS_DIM, ACT_DIM, N = 3, 2, 64


def make_policy(net_arch: list[int] | None = None, activation_fn: type[nn.Module] = nn.Tanh) -> CPOPolicy:
    """A float64 policy without observation normalisation and with a non-trivial mean head."""
    th.manual_seed(0)
    policy = CPOPolicy(
        spaces.Box(-1, 1, (OBS_DIM,), np.float32),
        spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        lambda _: 1e-3,
        net_arch=[8] if net_arch is None else net_arch,
        activation_fn=activation_fn,
        log_std_init=-0.3,
        normalize_observations=False,
    ).to(DTYPE)
    with th.no_grad():
        policy.action_net.weight.normal_(0, 0.5)
    return policy


def clone(params: Params) -> Params:
    return {name: value.detach().clone() for name, value in params.items()}


def make_batch(policy: CPOPolicy, params: Params, seed: int, constraint: float, widen: bool = False) -> PreparedBatch:
    """A batch sampled at ``params``; ``widen``: reward advantages favour actions far from the mean (the step
    raises the std), else random ones."""
    generator = th.Generator().manual_seed(seed)
    obs = th.randn(N, OBS_DIM, generator=generator, dtype=DTYPE)
    with th.no_grad():
        mean, log_std = policy.actor_mean_log_std(obs, params)
        noise = th.randn(N, ACT_DIM, generator=generator, dtype=DTYPE)
        actions = mean + log_std.exp() * noise
        log_prob = gaussian_log_prob(mean, log_std, actions)
    reward_adv = noise.square().sum(-1) if widen else th.randn(N, generator=generator, dtype=DTYPE)
    reward_adv = (reward_adv - reward_adv.mean()) / reward_adv.std()
    cost_adv = 0.3 * th.randn(N, 1, generator=generator, dtype=DTYPE)
    return PreparedBatch(
        observations=obs,
        actions=actions,
        log_prob_behaviour=log_prob,
        reward_advantages=reward_adv,
        cost_advantages=cost_adv - cost_adv.mean(0),
        constraint=np.array([constraint]),
        episode_costs=np.zeros(1),
        episode_reward=0.0,
        n_episodes=0,
        reward_returns=np.zeros(N),
        cost_returns=np.zeros((N, 1)),
    )


def mean_kl_old_new(old: tuple[th.Tensor, th.Tensor], new: tuple[th.Tensor, th.Tensor]) -> tuple[float, float]:
    """Mean over the samples of KL(old ‖ new) and of KL(new ‖ old), by torch.distributions, in float64."""
    p = Normal(old[0].double(), old[1].double().exp())
    q = Normal(new[0].double(), new[1].double().exp())
    return float(kl_divergence(p, q).sum(-1).mean()), float(kl_divergence(q, p).sum(-1).mean())


# --- M07 ----------------------------------------------------------------------------------------------------------
def test_gaussian_log_prob_is_the_normal_log_density():
    """gaussian_log_prob is the diagonal Normal's log-density summed over action dimensions (the -log σ term too)."""
    generator = th.Generator().manual_seed(7)
    mean = th.randn(10, 3, generator=generator, dtype=DTYPE)
    log_std = 0.8 * th.randn(10, 3, generator=generator, dtype=DTYPE)
    actions = mean + th.randn(10, 3, generator=generator, dtype=DTYPE)
    assert float(log_std.abs().min()) > 1e-3
    expected = Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    th.testing.assert_close(gaussian_log_prob(mean, log_std, actions), expected, rtol=1e-12, atol=1e-12)


# --- M08 ----------------------------------------------------------------------------------------------------------
def test_cpo_update_reports_the_kl_from_the_old_policy_to_the_new():
    """The KL a CPO step reports (and its line search bounds) is mean KL(π_old ‖ π_new), not KL(π_new ‖ π_old)."""
    policy = make_policy()
    params = clone(policy.actor_params())
    batch = make_batch(policy, params, seed=3, constraint=-1.0, widen=True)
    config = CPOConfig(StepConfig(target_kl=0.05, cg_max_steps=10))
    new_params, result = cpo_update(policy.actor_mean_log_std, params, batch, config)
    assert result.accepted and result.fraction > 0
    with th.no_grad():
        old = policy.actor_mean_log_std(batch.observations, params)
        new = policy.actor_mean_log_std(batch.observations, new_params)
    forward, reverse = mean_kl_old_new(old, new)
    assert float((new[1] - old[1]).abs().max()) > 0.05  # the std changed: the two directions differ
    assert abs(forward - reverse) > 1e-4 * forward
    assert result.kl == pytest.approx(forward, rel=1e-9), f"reported KL {result.kl} != KL(old||new) {forward}"


# --- M29 and M28: one meta-iteration of MetaCPO, the outer step recorded ------------------------------------------
FVP_SAMPLE_FREQ = 2
OUTER_TARGET_KL = 0.2  # a step large enough that KL(old ‖ new) and KL(new ‖ old) differ by ~3 %


def record_outer_step(outer_target_kl: float, seed: int) -> dict[str, Any]:
    """One meta-iteration on Toy2DNav: the outer step's StepResult, the observations of its first Fisher product, the
    pre-adaptation observations and the meta-policy's (mean, log_std) on them before and after the step (taken
    before the observation statistics are updated)."""
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaCPO(
        "MlpPolicy",
        distribution,
        meta_batch_size=2,
        n_steps=100,
        seed=seed,
        outer_target_kl=outer_target_kl,
        fvp_sample_freq=FVP_SAMPLE_FREQ,
        policy_kwargs=dict(net_arch=[8]),
    )
    record: dict[str, Any] = {"fisher_observations": []}
    fisher_product, outer_step = model.policy.fisher_product, model._outer_step

    def recording_fisher(params: Params, obs: th.Tensor, damping: float, create_graph: bool = False) -> Callable:
        if record.get("in_outer_step"):
            record["fisher_observations"].append(obs.detach().clone())
        return fisher_product(params, obs, damping, create_graph)

    def recording_outer_step(objective: MetaObjective, theta: Params, *args: Any) -> StepResult:
        start = clone(theta)
        record["in_outer_step"] = True
        result = outer_step(objective, theta, *args)
        record["in_outer_step"] = False
        observations = th.cat([task.batches[0].observations for task in objective.tasks])
        parts = _split(result.step, start)
        new = {name: value + part.view_as(value) for (name, value), part in zip(start.items(), parts, strict=True)}
        with th.no_grad():
            record["old"] = model.policy.actor_mean_log_std(observations, start)
            record["new"] = model.policy.actor_mean_log_std(observations, new)
        record["result"] = result
        record["pre_observations"] = observations
        record["validation_observations"] = th.cat([task.batches[-1].observations for task in objective.tasks])
        return result

    model.policy.fisher_product = recording_fisher  # type: ignore[method-assign]
    model._outer_step = recording_outer_step  # type: ignore[method-assign]
    model.learn(total_timesteps=400)
    model.close()
    assert "result" in record and model._n_updates == 1
    return record


@pytest.fixture(scope="module")
def outer_step_record() -> dict[str, Any]:
    return record_outer_step(OUTER_TARGET_KL, 0)


def _split(step: th.Tensor, params: Params) -> list[th.Tensor]:
    return list(step.detach().split([value.numel() for value in params.values()]))


def test_metacpo_outer_step_reports_the_kl_from_the_old_meta_policy_to_the_new(outer_step_record: dict[str, Any]):
    """The outer step's KL (logged as train/kl) is mean KL(π_θ ‖ π_θ') on the pre-adaptation data, not KL(π_θ' ‖ π_θ)."""
    result = outer_step_record["result"]
    assert result.accepted and result.fraction > 0
    forward, reverse = mean_kl_old_new(outer_step_record["old"], outer_step_record["new"])
    assert abs(forward - reverse) > 1e-2 * forward  # the two directions differ here far beyond the tolerance
    assert result.kl == pytest.approx(forward, rel=1e-5), f"reported KL {result.kl} != KL(old||new) {forward}"


def test_metacpo_outer_fisher_is_built_on_the_pre_adaptation_data(outer_step_record: dict[str, Any]):
    """The outer step's Fisher products are on every fvp_sample_freq-th pre-adaptation observation, not validation."""
    first, *_ = outer_step_record["fisher_observations"]
    pre, validation = outer_step_record["pre_observations"], outer_step_record["validation_observations"]
    assert not th.equal(pre, validation)
    assert th.equal(first, pre[::FVP_SAMPLE_FREQ]), "the outer Fisher was not built on the pre-adaptation observations"


# --- M03 ----------------------------------------------------------------------------------------------------------
def test_reward_gae_bootstraps_at_truncation_and_not_at_termination():
    """Reward GAE bootstraps V(next obs) where an episode is truncated (and at the batch end), 0 where terminated."""
    rng = np.random.default_rng(3)
    steps, gamma, lam = 8, 0.9, 0.8
    terminated, truncated = np.zeros((steps, 1), bool), np.zeros((steps, 1), bool)
    truncated[2, 0] = True  # episode 1: time limit after 3 steps
    terminated[5, 0] = True  # episode 2: terminal state after 3 steps; episode 3 runs past the batch end
    observations = rng.normal(size=(steps, 1, OBS_DIM)).astype(np.float32)
    next_observations = np.roll(observations, -1, axis=0)
    next_observations[[2, 5, 7]] = rng.normal(size=(3, 1, OBS_DIM)).astype(np.float32)  # terminal observations
    next_observations[2, 0] = [1.0, -1.0, 0.5]  # V = 4 at the truncation's terminal observation
    batch = TaskBatch(
        task=None,
        observations=observations,
        actions=rng.normal(size=(steps, 1, ACT_DIM)).astype(np.float32),
        rewards=rng.normal(size=(steps, 1)).astype(np.float32),
        costs=rng.uniform(size=(steps, 1, 1)).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        next_observations=next_observations,
    )

    def value(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1, OBS_DIM)
        return 1.0 + 2.0 * obs[:, 0] - obs[:, 1]

    def critic(obs: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return value(obs), 0.5 * value(obs)[:, None]

    def actor(obs: th.Tensor, params: Params) -> tuple[th.Tensor, th.Tensor]:
        return obs[:, :ACT_DIM] * params["w"], params["log_std"].expand(len(obs), ACT_DIM)

    params = {"w": th.ones(1, dtype=DTYPE), "log_std": th.zeros(ACT_DIM, dtype=DTYPE)}
    prepared = prepare_batch(batch, actor, params, critic, gamma, lam, [1.0], 50)

    rewards, values, next_values = batch.rewards[:, 0].astype(np.float64), value(observations), value(next_observations)
    advantages, following = np.zeros(steps), 0.0
    for t in reversed(range(steps)):
        bootstrap = 0.0 if terminated[t, 0] else gamma * next_values[t]
        episode_ends = terminated[t, 0] or truncated[t, 0] or t == steps - 1
        following = rewards[t] + bootstrap - values[t] + (0.0 if episode_ends else gamma * lam * following)
        advantages[t] = following
    assert next_values[2] == 4.0  # the truncation's bootstrap matters
    np.testing.assert_allclose(
        prepared.reward_returns, advantages + values, rtol=1e-6, atol=1e-6, err_msg="reward returns are not the GAE's"
    )
    standardised = (advantages - advantages.mean()) / (advantages.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(prepared.reward_advantages.numpy(), standardised, rtol=1e-6, atol=1e-6)
    # the logged explained variance (SB3's train/explained_variance): of the critic's values against these returns
    returns = advantages + values
    assert prepared.explained_variance is not None
    np.testing.assert_allclose(prepared.explained_variance[0], 1 - np.var(returns - values) / np.var(returns), rtol=1e-5)
    cost_returns = prepared.cost_returns[:, 0]  # the cost critic predicts 0.5 V: its returns' own check is above's
    expected_cost = 1 - np.var(cost_returns - 0.5 * values) / np.var(cost_returns)
    np.testing.assert_allclose(prepared.explained_variance[1], expected_cost, rtol=1e-5)


# --- M51 ----------------------------------------------------------------------------------------------------------
def test_first_order_candidate_stages_are_the_adapted_stages_plus_the_step():
    """First order: every task's candidate stage k at θ + Δ is φ_ik + Δ (inner steps held fixed), not θ + Δ."""
    policy = make_policy()
    config = CPOConfig(StepConfig(target_kl=0.02, cg_max_steps=8))
    theta = clone(policy.actor_params())
    tasks = []
    for task in range(2):
        stages, batches, fractions = [theta], [], []
        for k in range(2):
            batches.append(make_batch(policy, stages[-1], seed=10 * task + k, constraint=-1.0))
            params, result = cpo_update(policy.actor_mean_log_std, stages[-1], batches[-1], config)
            stages.append(params)
            fractions.append(result.fraction)
        batches.append(make_batch(policy, stages[-1], seed=10 * task + 9, constraint=-1.0))
        tasks.append(TaskAdaptation(stages=stages, batches=batches, fractions=fractions))
    objective = MetaObjective(policy.actor_mean_log_std, tasks, config, second_order=False, fisher=None, mode="stages")
    step = 1e-2 * th.randn(sum(value.numel() for value in theta.values()), dtype=DTYPE)
    candidates = objective.stages_at(theta, step)
    parts = _split(step, theta)
    for task, task_candidates in zip(tasks, candidates, strict=True):
        assert len(task_candidates) == len(task.stages) == 3
        for k, (stage, candidate) in enumerate(zip(task.stages, task_candidates, strict=True)):
            if k > 0:
                assert any(not th.equal(stage[name], theta[name]) for name in theta)  # φ_ik ≠ θ
            for (name, value), part in zip(stage.items(), parts, strict=True):
                expected = value.detach() + part.view_as(value)
                assert th.equal(candidate[name], expected), f"task stage {k}: {name} is not φ_ik + Δ"


# --- M78 ----------------------------------------------------------------------------------------------------------
def test_closed_form_fisher_composes_consecutive_element_wise_maps():
    """The closed-form Fisher product equals the double backward of mean KL(π_θ ‖ π_θ') with Tanh then Softplus."""
    policy = make_policy([8], nn.Tanh)
    policy.mlp_extractor.policy_net.append(nn.Softplus())  # Linear, Tanh, Softplus: two element-wise maps in a row
    kinds = [type(module) for module in policy.mlp_extractor.policy_net]
    assert kinds == [nn.Linear, nn.Tanh, nn.Softplus]
    params = clone(policy.actor_params())
    generator = th.Generator().manual_seed(5)
    obs = th.randn(N, OBS_DIM, generator=generator, dtype=DTYPE)
    vector = th.randn(sum(value.numel() for value in params.values()), generator=generator, dtype=DTYPE)
    damping = 0.1

    def mean_and_std(p: Params) -> tuple[th.Tensor, th.Tensor]:  # the network written out
        hidden = nn.functional.linear(obs, p["mlp_extractor.policy_net.0.weight"], p["mlp_extractor.policy_net.0.bias"])
        mean = nn.functional.linear(nn.functional.softplus(th.tanh(hidden)), p["action_net.weight"], p["action_net.bias"])
        return mean, p["log_std"].exp().expand_as(mean)

    leaves = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    old_mean, old_std = (value.detach() for value in mean_and_std(params))
    th.testing.assert_close(policy.actor_mean_log_std(obs, params)[0], old_mean, rtol=1e-12, atol=1e-12)
    kl = kl_divergence(Normal(old_mean, old_std), Normal(*mean_and_std(leaves))).sum(-1).mean()
    grads = th.autograd.grad(kl, list(leaves.values()), create_graph=True)
    flat_grad = th.cat([grad.reshape(-1) for grad in grads])
    hessian_vector = th.autograd.grad(flat_grad @ vector, list(leaves.values()))
    expected = th.cat([value.reshape(-1) for value in hessian_vector]) + damping * vector
    closed_form = policy.fisher_product(params, obs, damping)(vector)
    th.testing.assert_close(closed_form, expected, rtol=1e-10, atol=1e-10)
