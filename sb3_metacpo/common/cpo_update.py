"""Functional CPO updates on parameter dictionaries, and K-step adaptation that the meta-gradient flows through.

Parameters are ``{name: tensor}`` dictionaries applied with :func:`torch.func.functional_call` (see
:meth:`CPOPolicy.actor_mean_log_std`), so an inner update never mutates the meta-parameters: it returns new tensors
that are functions of them. In second-order mode the whole update keeps its autograd graph (surrogate gradients,
Fisher-vector products, unrolled conjugate gradient and the dual solution); the accepted line-search fraction is a
constant. In first-order mode the update is added detached, so the Jacobian of the inner step is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch as th

from sb3_metacpo.common.buffers import LinearFeatureBaseline, compute_gae, discounted_returns, episode_steps
from sb3_metacpo.common.cpo_step import (
    backtracking_line_search,
    conjugate_gradient,
    cpo_direction,
    fisher_vector_product_fn,
    flat_grad,
)
from sb3_metacpo.common.profiling import phase
from sb3_metacpo.common.sampler import TaskBatch

Params = dict[str, th.Tensor]
#: ``actor(observations, params) -> (mean, log_std)`` of the diagonal Gaussian policy.
ActorFn = Callable[[th.Tensor, Params], tuple[th.Tensor, th.Tensor]]
#: ``values(observations) -> (reward values, cost values)``, numpy in and out; None selects the linear baseline.
CriticFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``fisher(params, observations, damping, create_graph) -> (v -> (F + damping I) v)``, as :func:`fisher_product`
#: (e.g. :meth:`CPOPolicy.fisher_product`, its closed form for the MLP actor).
FisherFn = Callable[[Params, th.Tensor, float, bool], Callable[[th.Tensor], th.Tensor]]


@dataclass(frozen=True)
class CPOConfig:
    """Settings of one CPO update (see the algorithms' constructor arguments for their meaning)."""

    target_kl: float
    cost_limit: float
    constrained: bool = True
    cg_max_steps: int = 10
    cg_damping: float = 0.1
    fvp_sample_freq: int = 1
    dual_solver: str = "analytic"
    line_search_max_iter: int = 10
    line_search_shrinking_factor: float = 0.8


@dataclass
class PreparedBatch:
    """A task batch as flat tensors with advantages and the constraint value, ready for a CPO update.

    ``cost_advantages`` stay in cost units (only centred): the linearised constraint ``b + aᵀx <= 0`` compares them
    with ``constraint = (J_C - cost_limit) / episode_length``, the episode-cost excess per step. The reward
    advantages are standardised, which does not change the direction of a trust-region step.
    """

    observations: th.Tensor
    actions: th.Tensor
    log_prob_behaviour: th.Tensor
    reward_advantages: th.Tensor
    cost_advantages: th.Tensor
    constraint: float
    episode_cost: float
    episode_reward: float
    reward_returns: np.ndarray  # critic targets (GAE lambda-returns), flat
    cost_returns: np.ndarray


def gaussian_log_prob(mean: th.Tensor, log_std: th.Tensor, actions: th.Tensor) -> th.Tensor:
    """Log-density of a diagonal Gaussian, summed over the action dimensions."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: th.Tensor, log_std_p: th.Tensor, mean_q: th.Tensor, log_std_q: th.Tensor) -> th.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the action dimensions."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def flatten(params: Params) -> th.Tensor:
    return th.cat([value.reshape(-1) for value in params.values()])


def add_flat(params: Params, step: th.Tensor) -> Params:
    """``params + step`` with ``step`` a flat vector in the dictionary's order."""
    result, offset = {}, 0
    for name, value in params.items():
        result[name] = value + step[offset : offset + value.numel()].view_as(value)
        offset += value.numel()
    return result


def prepare_batch(
    batch: TaskBatch,
    actor: ActorFn,
    params: Params,
    critic: CriticFn | None,
    gamma: float,
    gae_lambda: float,
    cost_limit: float,
    episode_length: int,
    cost_gamma: float = 1.0,
) -> PreparedBatch:
    """Advantages (GAE for reward and cost), behaviour log-probabilities and the constraint value of ``batch``.

    Cost advantages use ``cost_gamma`` (1 by default: the constraint is on the undiscounted episode cost, and a
    discounted cost advantage would understate the predicted cost change by a factor ~(1 - gamma^T) / ((1 - gamma) T)).
    ``critic=None`` fits a :class:`LinearFeatureBaseline` to this batch for reward and for cost. J_C is the mean cost
    of the batch's completed episodes; a batch without one uses its mean step cost times ``episode_length``.
    """
    dones = batch.dones
    if critic is None:
        steps = episode_steps(dones)
        next_steps = steps + 1
        values, next_values = [], []
        for signal, discount in ((batch.rewards, gamma), (batch.costs, cost_gamma)):
            baseline = LinearFeatureBaseline(episode_length)
            baseline.fit(batch.observations, steps, discounted_returns(signal, dones, discount))
            values.append(baseline.predict(batch.observations, steps))
            next_values.append(baseline.predict(batch.next_observations, next_steps))
    else:
        flat_obs = batch.observations.reshape(-1, batch.observations.shape[-1])
        flat_next = batch.next_observations.reshape(flat_obs.shape)
        (value_r, value_c), (next_r, next_c) = critic(flat_obs), critic(flat_next)
        shape = batch.rewards.shape
        values = [value_r.reshape(shape), value_c.reshape(shape)]
        next_values = [next_r.reshape(shape), next_c.reshape(shape)]
    advantages = [
        compute_gae(signal, value, next_value, batch.terminated, dones, discount, gae_lambda)
        for signal, value, next_value, discount in zip(
            (batch.rewards, batch.costs), values, next_values, (gamma, cost_gamma), strict=True
        )
    ]
    returns = [advantage + value for advantage, value in zip(advantages, values, strict=True)]

    reference = next(iter(params.values()))

    def to_tensor(array: np.ndarray) -> th.Tensor:
        return th.as_tensor(np.asarray(array).reshape(-1), dtype=reference.dtype, device=reference.device)

    observations = th.as_tensor(batch.observations.reshape(-1, batch.observations.shape[-1]), device=reference.device)
    actions = th.as_tensor(batch.actions.reshape(-1, batch.actions.shape[-1]), device=reference.device)
    observations, actions = observations.to(reference.dtype), actions.to(reference.dtype)
    with th.no_grad():
        log_prob = gaussian_log_prob(*actor(observations, params), actions)
    reward_adv, cost_adv = to_tensor(advantages[0]), to_tensor(advantages[1])
    reward_adv = (reward_adv - reward_adv.mean()) / (reward_adv.std() + 1e-8)
    cost_adv = cost_adv - cost_adv.mean()

    if batch.episodes:
        episode_cost = float(np.mean(batch.episode_costs))
        episode_reward = float(np.mean(batch.episode_rewards))
        length = float(np.mean([episode.length for episode in batch.episodes]))
    else:
        episode_cost = float(batch.costs.mean()) * episode_length
        episode_reward = float(batch.rewards.mean()) * episode_length
        length = float(episode_length)
    return PreparedBatch(
        observations=observations,
        actions=actions,
        log_prob_behaviour=log_prob,
        reward_advantages=reward_adv,
        cost_advantages=cost_adv,
        constraint=(episode_cost - cost_limit) / length,
        episode_cost=episode_cost,
        episode_reward=episode_reward,
        reward_returns=returns[0].reshape(-1),
        cost_returns=returns[1].reshape(-1),
    )


def surrogates(actor: ActorFn, params: Params, batch: PreparedBatch) -> tuple[th.Tensor, th.Tensor]:
    """Importance-weighted reward and cost surrogates ``mean(ratio * A)`` at ``params``."""
    mean, log_std = actor(batch.observations, params)
    ratio = th.exp(gaussian_log_prob(mean, log_std, batch.actions) - batch.log_prob_behaviour)
    return (ratio * batch.reward_advantages).mean(), (ratio * batch.cost_advantages).mean()


def fisher_product(
    actor: ActorFn, params: Params, observations: th.Tensor, damping: float, create_graph: bool
) -> Callable[[th.Tensor], th.Tensor]:
    """v -> (F + damping I) v, F the Fisher matrix of the actor at ``params`` on ``observations``.

    F is the Hessian of KL(pi_params || pi_{params + eps}) in ``eps`` at 0. Both arguments keep their dependence on
    ``params``, so with ``create_graph`` the product is exactly differentiable w.r.t. ``params`` (second-order
    meta-gradient); detaching the first argument instead would drop part of dF/dparams.
    """
    offsets = {name: th.zeros_like(value, requires_grad=True) for name, value in params.items()}
    mean, log_std = actor(observations, params)
    mean_new, log_std_new = actor(observations, {name: params[name] + offsets[name] for name in params})
    kl = gaussian_kl(mean, log_std, mean_new, log_std_new).mean()
    return fisher_vector_product_fn(kl, list(offsets.values()), damping, create_graph=create_graph)


@dataclass
class StepInfo:
    """What one CPO update did (for logging)."""

    case: str
    fraction: float
    accepted: bool
    kl: float
    lam: float  # the multipliers of the CPO dual (nu = 0 without an informative constraint)
    nu: float


def cpo_update(
    actor: ActorFn,
    params: Params,
    batch: PreparedBatch,
    config: CPOConfig,
    create_graph: bool = False,
    fraction: float | None = None,
    fisher: FisherFn | None = None,
) -> tuple[Params, StepInfo]:
    """One CPO step at ``params`` on ``batch``; returns the new parameters (functions of ``params``).

    ``fraction=None`` runs the backtracking line search; a given fraction replays a stored update (used to
    re-adapt from other meta-parameters on the same batches). ``fisher`` computes Fisher-vector products (default:
    the double backward of the KL of ``actor``, :func:`fisher_product`).
    """
    # First order: differentiate at a detached copy (no graph back to the meta-parameters is needed or kept).
    work = params if create_graph else {name: value.detach().requires_grad_(True) for name, value in params.items()}
    tensors = list(work.values())
    with phase("gradients"):
        reward_surrogate, cost_surrogate = surrogates(actor, work, batch)
        g = flat_grad(reward_surrogate, tensors, create_graph=create_graph, retain_graph=True)
        if config.constrained:
            a = flat_grad(cost_surrogate, tensors, create_graph=create_graph, retain_graph=True)
        fisher_observations = batch.observations[:: config.fvp_sample_freq]
        if fisher is None:
            fvp = fisher_product(actor, work, fisher_observations, config.cg_damping, create_graph)
        else:
            fvp = fisher(work, fisher_observations, config.cg_damping, create_graph)
    with phase("conjugate_gradient"):
        v = conjugate_gradient(fvp, g, config.cg_max_steps)
        if config.constrained:
            w = conjugate_gradient(fvp, a, config.cg_max_steps)
    with phase("dual_solve"):
        q = g @ v
        if config.constrained:
            b = th.as_tensor(batch.constraint, dtype=q.dtype, device=q.device)
            result = cpo_direction(v, w, q, g @ w, a @ w, b, config.target_kl, solver=config.dual_solver)
        else:
            result = cpo_direction(v, None, q, None, None, None, config.target_kl, has_cost=False)
    assert isinstance(result.case, str)

    accepted = True
    if fraction is None:
        old_mean, old_log_std = (value.detach() for value in actor(batch.observations, params))
        detached = {name: value.detach() for name, value in params.items()}
        step = result.x.detach()

        def evaluate(candidate_fraction: float) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
            candidate = add_flat(detached, candidate_fraction * step)
            mean, log_std = actor(batch.observations, candidate)
            kl = gaussian_kl(old_mean, old_log_std, mean, log_std).mean()
            return (kl, *surrogates(actor, candidate, batch))

        with phase("line_search"):
            search = backtracking_line_search(
                evaluate,
                reward_surrogate.item(),
                cost_surrogate.item(),
                result.case,
                batch.constraint if bool(result.cost_informative) else None,
                config.target_kl,
                config.line_search_max_iter,
                config.line_search_shrinking_factor,
            )
        fraction, accepted, kl = search.fraction, search.accepted, search.kl
    else:
        kl = float("nan")
    step = fraction * result.x
    new_params = add_flat(params, step if create_graph else step.detach())
    info = StepInfo(result.case, fraction, accepted, kl, float(result.lam.detach()), float(result.nu.detach()))
    return new_params, info


def adapt_on_batches(
    actor: ActorFn,
    params: Params,
    batches: Sequence[PreparedBatch],
    config: CPOConfig,
    create_graph: bool,
    fractions: Sequence[float],
    fisher: FisherFn | None = None,
) -> Params:
    """Replay K stored inner updates from ``params``: one CPO step per batch with the stored line-search fractions.

    This is phi^K(theta) of the meta-objective with the batches held fixed; it is differentiable w.r.t. ``params``
    (exactly in second-order mode, with an identity inner Jacobian in first-order mode).
    """
    for batch, fraction in zip(batches, fractions, strict=True):
        params, _ = cpo_update(actor, params, batch, config, create_graph, fraction, fisher)
    return params
