"""Functional CPO updates on parameter dictionaries: a batch's advantages and constraint values, the surrogates, and
one update (:func:`cpo_update`) or a replay of stored ones (:func:`replay_updates`) that the meta-gradient flows
through.

Parameters are ``{name: tensor}`` dictionaries applied with :func:`torch.func.functional_call` (see
:meth:`CPOPolicy.actor_mean_log_std`), so an update never mutates the meta-parameters: it returns new tensors that
are functions of them. With ``differentiable=True`` the whole update keeps its autograd graph (surrogate gradients,
Fisher-vector products, unrolled conjugate gradient and the dual solution; the accepted line-search fraction is a
constant). Otherwise the update is added detached, so the Jacobian of the update is the identity (first order).

The constraint value carries its gradient: b_j(φ) = b_j(data) + L_Cj(φ) − L_Cj(φ_data), the same value on the data
and gradient a_j, so a second-order meta-gradient includes d(step)/db · db/dφ, and an update replayed from other
parameters sees the constraint value those parameters would have on the stored batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch as th
from stable_baselines3.common.utils import explained_variance

from sb3_metacpo.common.advantages import compute_gae, discounted_returns, episode_steps, linear_baseline_values
from sb3_metacpo.common.conjugate_gradient import fisher_vector_product_fn, flat_grad
from sb3_metacpo.common.constrained_step import (
    CostScales,
    FixedFraction,
    LineSearch,
    StepConfig,
    StepResult,
    constrained_step,
)
from sb3_metacpo.common.policies import log_std_bound
from sb3_metacpo.common.profiling import phase
from sb3_metacpo.common.rollouts import TaskBatch

Params = dict[str, th.Tensor]
#: When a CPO step takes the recovery step (see :func:`prepare_batch`).
RECOVERY_RULES = ("linearised", "violated", "confident")
#: ``actor(observations, params) -> (mean, log_std)`` of the diagonal Gaussian policy.
ActorFn = Callable[[th.Tensor, Params], tuple[th.Tensor, th.Tensor]]
#: ``values(observations, time_fractions) -> (reward values (n,), cost values (n, m))``, numpy, the time fraction being
#: step / episode length; None selects the linear baseline.
CriticFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``fisher(params, observations, damping, create_graph) -> (v -> (F + damping I) v)``, as :func:`fisher_product`
#: (e.g. :meth:`CPOPolicy.fisher_product`, its closed form for the MLP actor).
FisherFn = Callable[[Params, th.Tensor, float, bool], Callable[[th.Tensor], th.Tensor]]


@dataclass(frozen=True)
class CPOConfig:
    """Settings of one CPO update: the constrained step's, plus what builds its inputs.

    :ivar step: conjugate gradient, dual solver, trust region and line search
    :ivar constrained: False for TRPO updates (the costs are measured but constrain nothing)
    :ivar cg_damping: damping added to the Fisher matrix
    :ivar fvp_sample_freq: Fisher-vector products on every k-th sample
    """

    step: StepConfig
    constrained: bool = True
    cg_damping: float = 0.1
    fvp_sample_freq: int = 1


@dataclass
class PreparedBatch:
    """A task batch as flat tensors with advantages and constraint values, ready for a CPO update.

    ``cost_advantages`` (one column per constrained cost) stay in cost units (only centred): the linearised
    constraint ``b_j + a_jᵀx <= 0`` compares them with ``constraint[j] = (J_Cj + κ·SE_j - limit_j) / L``, the
    episode-cost excess per step: κ the ``cost_confidence`` margin on the standard error of J_Cj, L the mean length of
    the batch's completed episodes (``episode_length`` when none completed). The reward advantages are standardised,
    which does not change the direction of a trust-region step.
    """

    observations: th.Tensor
    actions: th.Tensor
    log_prob_behaviour: th.Tensor
    reward_advantages: th.Tensor
    cost_advantages: th.Tensor  # (n, m)
    constraint: np.ndarray  # (m,)
    episode_costs: np.ndarray  # (m,): mean episode sum of each constrained cost
    episode_reward: float
    n_episodes: int
    reward_returns: np.ndarray  # critic targets (GAE lambda-returns), flat
    cost_returns: np.ndarray  # (n, m)
    time_fractions: th.Tensor | None = None  # step / episode length of each sample (the cost critic's time input)
    episode_cost_sem: np.ndarray | None = None  # (m,): standard error of episode_costs (NaN with < 2 episodes)
    #: shape (m,), a step recovers whenever ``constraint[j]`` exceeds ``recovery_margin[j]`` (None for CPO's rule, see
    #: ``prepare_batch``)
    recovery_margin: np.ndarray | None = None
    #: shape (1 + m,): SB3's explained variance ``1 - Var(returns - values) / Var(returns)`` of the values the
    #: advantages were computed with (the critics' before their fit, or the per-batch linear baseline's) against the
    #: GAE lambda-returns, for the reward then each cost (NaN where the returns do not vary); None when not computed
    explained_variance: np.ndarray | None = None


def gaussian_log_prob(mean: th.Tensor, log_std: th.Tensor, actions: th.Tensor) -> th.Tensor:
    """Log-density of a diagonal Gaussian, summed over the action dimensions."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: th.Tensor, log_std_p: th.Tensor, mean_q: th.Tensor, log_std_q: th.Tensor) -> th.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the action dimensions."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def representable_std(log_std: th.Tensor) -> bool:
    """Whether the variances exp(2·log_std) and their inverses are finite and non-zero in ``log_std``'s dtype (in
    float32, ``abs(log_std) < 44.36``): outside, the Gaussian's density, KL and Fisher products are inf or NaN, and a
    policy there can never be updated again (a line search rejects such candidates)."""
    return bool((log_std.detach().abs() < log_std_bound(log_std.dtype)).all())


def flatten(params: Params) -> th.Tensor:
    return th.cat([value.reshape(-1) for value in params.values()])


def add_flat(params: Params, step: th.Tensor) -> Params:
    """``params + step`` with ``step`` a flat vector in the dictionary's order."""
    result, offset = {}, 0
    for name, value in params.items():
        result[name] = value + step[offset : offset + value.numel()].view_as(value)
        offset += value.numel()
    return result


def detached(params: Params) -> Params:
    return {name: value.detach() for name, value in params.items()}


def prepare_batch(
    batch: TaskBatch,
    actor: ActorFn,
    params: Params,
    critic: CriticFn | None,
    gamma: float,
    gae_lambda: float,
    cost_limits: Sequence[float],
    episode_length: int,
    cost_gamma: float = 1.0,
    cost_confidence: float = 0.0,
    recovery: str = "linearised",
) -> PreparedBatch:
    """Advantages (GAE for reward and each cost), behaviour log-probabilities and the constraint values of ``batch``.

    ``cost_confidence`` (κ ≥ 0) makes the constraint value an upper confidence bound: J_C + κ·SE(J_C), SE the
    standard error of the mean over the batch's completed episodes (no correction with fewer than two). With
    κ = 1.64 the step is aimed so that J_C stays under the limit with ~95 % one-sided confidence under a normal
    approximation; κ = 0 (default) is CPO's plain estimate. A batch whose episodes saw no cost has SE = 0: it is
    evidence of slack only as strong as its number of episodes (size batches in episodes, see the algorithms'
    ``n_steps``), and its cost gradient is zero, so its step cannot account for the cost.

    Cost advantages use ``cost_gamma`` (1 by default: the constraint is on the undiscounted episode cost, and a
    discounted cost advantage would understate the predicted cost change by a factor ~(1 - gamma^T) / ((1 - gamma) T)).
    With ``cost_gamma = 1`` the cost-to-go is finite-horizon: an episode cut by the time limit has no cost left, so
    the cost is not bootstrapped at truncation (only at the end of the batch, mid-episode); bootstrapping the
    undiscounted cost there has no fixed point and made the cost critic diverge. The reward, discounted, is
    bootstrapped at truncation as usual. ``critic=None`` fits a :class:`LinearFeatureBaseline` to this batch for
    reward and for each cost; otherwise ``critic`` gets each observation's time within its episode. J_C is the mean
    cost of the batch's completed episodes; a batch without one uses its mean step cost times ``episode_length``.

    ``recovery`` sets when a CPO step on this batch takes the recovery step (:data:`RECOVERY_RULES`):
    ``"linearised"`` only when the linearised constraint cannot be met inside the trust region (CPO's rule);
    ``"violated"`` also whenever the constraint value is above its limit; ``"confident"`` also whenever the *lower*
    confidence bound J_C − κ·SE is above the limit (the batch is over the limit beyond its noise; with κ = 0 the
    same as ``"violated"``).
    """
    if recovery not in RECOVERY_RULES:
        raise ValueError(f"Unknown recovery rule {recovery!r}; expected one of {RECOVERY_RULES}")
    dones = batch.dones
    n_costs = batch.costs.shape[-1]
    if len(cost_limits) != n_costs:
        raise ValueError(f"{len(cost_limits)} cost limits for a batch of {n_costs} cost signals")
    signals = [batch.rewards, *(batch.costs[..., j] for j in range(n_costs))]
    discounts = [gamma] + [cost_gamma] * n_costs
    cost_terminal = dones if cost_gamma == 1.0 else batch.terminated
    terminals = [batch.terminated] + [cost_terminal] * n_costs
    steps = batch.episode_steps if batch.episode_steps is not None else episode_steps(dones)
    time_fractions = np.minimum(steps / episode_length, 1.0)
    if critic is None:
        targets = [discounted_returns(signal, dones, discount) for signal, discount in zip(signals, discounts, strict=True)]
        fitted = linear_baseline_values(batch.observations, batch.next_observations, steps, targets, episode_length)
        values, next_values = [value for value, _ in fitted], [next_value for _, next_value in fitted]
    else:
        flat_obs = batch.observations.reshape(-1, batch.observations.shape[-1])
        next_time = np.minimum((steps + 1) / episode_length, 1.0).reshape(-1)
        value_r, value_c = critic(flat_obs, time_fractions.reshape(-1))
        next_r, next_c = critic(batch.next_observations.reshape(flat_obs.shape), next_time)
        shape = batch.rewards.shape
        values = [value_r.reshape(shape), *(value_c[:, j].reshape(shape) for j in range(n_costs))]
        next_values = [next_r.reshape(shape), *(next_c[:, j].reshape(shape) for j in range(n_costs))]
    advantages = [
        compute_gae(signal, value, next_value, terminal, dones, discount, gae_lambda)
        for signal, value, next_value, terminal, discount in zip(
            signals, values, next_values, terminals, discounts, strict=True
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
    reward_adv = to_tensor(advantages[0])
    reward_adv = (reward_adv - reward_adv.mean()) / (reward_adv.std() + 1e-8)
    cost_adv = th.stack([to_tensor(advantage) for advantage in advantages[1:]], dim=-1)
    cost_adv = cost_adv - cost_adv.mean(0)

    if batch.episodes:
        per_episode = batch.episode_constraint_costs
        episode_costs = per_episode.mean(0)
        sem = per_episode.std(0, ddof=1) / np.sqrt(len(per_episode)) if len(per_episode) > 1 else np.full(n_costs, np.nan)
        episode_reward = float(np.mean(batch.episode_rewards))
        length = float(np.mean([episode.length for episode in batch.episodes]))
    else:
        episode_costs = batch.costs.reshape(-1, n_costs).mean(0) * episode_length
        sem = np.full(n_costs, np.nan)
        episode_reward = float(batch.rewards.mean()) * episode_length
        length = float(episode_length)
    if recovery == "linearised":
        margin = None
    else:  # b = (J_C + κ·SE − limit)/length exceeds 2κ·SE/length exactly when J_C − κ·SE exceeds the limit
        spread = 2 * cost_confidence * np.nan_to_num(sem, nan=0.0) if recovery == "confident" else np.zeros(n_costs)
        margin = np.asarray(spread, dtype=np.float64) / length
    return PreparedBatch(
        observations=observations,
        actions=actions,
        log_prob_behaviour=log_prob,
        reward_advantages=reward_adv,
        cost_advantages=cost_adv,
        constraint=(
            np.asarray(episode_costs, dtype=np.float64)
            + cost_confidence * np.nan_to_num(sem, nan=0.0)
            - np.asarray(cost_limits, dtype=np.float64)
        )
        / length,
        episode_costs=np.asarray(episode_costs, dtype=np.float64),
        episode_reward=episode_reward,
        n_episodes=len(batch.episodes),
        reward_returns=returns[0].reshape(-1),
        cost_returns=np.stack([ret.reshape(-1) for ret in returns[1:]], axis=-1),
        time_fractions=to_tensor(time_fractions),
        episode_cost_sem=sem,
        recovery_margin=margin,
        explained_variance=np.array(
            [explained_variance(np.ravel(value), np.ravel(ret)) for value, ret in zip(values, returns, strict=True)]
        ),
    )


def surrogates(actor: ActorFn, params: Params, batch: PreparedBatch) -> tuple[th.Tensor, th.Tensor]:
    """Importance-weighted reward and cost surrogates ``mean(ratio * A)`` at ``params``: a scalar and (m,)."""
    mean, log_std = actor(batch.observations, params)
    ratio = th.exp(gaussian_log_prob(mean, log_std, batch.actions) - batch.log_prob_behaviour)
    return (ratio * batch.reward_advantages).mean(), (ratio.unsqueeze(-1) * batch.cost_advantages).mean(0)


def cost_scales(batches: Sequence[PreparedBatch]) -> CostScales:
    """The size of each cost signal of ``batches`` (pooled), for the tolerances on its gradient: the root mean square
    of its returns and of its advantages (:class:`~sb3_metacpo.common.constrained_step.CostScales`)."""
    returns = np.concatenate([np.asarray(batch.cost_returns, dtype=np.float64) for batch in batches])
    advantages = th.cat([batch.cost_advantages.detach().double() for batch in batches])
    return CostScales(th.from_numpy(np.sqrt(np.mean(returns**2, axis=0))), advantages.pow(2).mean(0).sqrt())


def constraint_values(batch: PreparedBatch, cost_surrogates: th.Tensor) -> th.Tensor:
    """b(φ) = b(data) + L_C(φ) − L_C(φ_data) for the cost surrogates ``L_C(φ)`` of ``batch``: the data's constraint
    values, with the gradient of the surrogates (L_C(φ_data) = mean of the advantages, the ratio being 1 there)."""
    data = th.as_tensor(batch.constraint, dtype=cost_surrogates.dtype, device=cost_surrogates.device)
    return data + cost_surrogates - batch.cost_advantages.mean(0).to(cost_surrogates.dtype)


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


def kl_and_surrogates(
    actor: ActorFn, params: Params, batch: PreparedBatch, reference: tuple[th.Tensor, th.Tensor]
) -> tuple[float, float, list[float]]:
    """Mean KL from the ``reference`` (mean, log_std) on the batch's observations, and the surrogates at ``params``:
    what a line search checks."""
    mean, log_std = actor(batch.observations, params)
    kl = gaussian_kl(*reference, mean, log_std).mean()
    reward, costs = surrogates(actor, params, batch)
    # a std beyond the dtype's range: its KL can look finite (an infinite variance divides to 0), the policy is lost
    return float(kl) if representable_std(log_std) else math.inf, float(reward), costs.tolist()


def cpo_update(
    actor: ActorFn,
    params: Params,
    batch: PreparedBatch,
    config: CPOConfig,
    *,
    differentiable: bool = False,
    fraction: float | Literal["line_search"] = "line_search",
    fisher: FisherFn | None = None,
) -> tuple[Params, StepResult]:
    """One CPO update at ``params`` on ``batch``; returns the new parameters (functions of ``params``) and the step.

    :param differentiable: keep the graph of the update (second-order meta-gradient)
    :param fraction: ``"line_search"`` to choose the step's fraction by backtracking, or a stored fraction to replay
        an update (used to re-adapt from other meta-parameters on the same batches)
    :param fisher: computes Fisher-vector products (default: the double backward of the KL of ``actor``,
        :func:`fisher_product`)
    """
    # Not differentiable: differentiate at a detached copy (no graph back to the meta-parameters is kept).
    work = params if differentiable else {name: value.detach().requires_grad_(True) for name, value in params.items()}
    tensors = list(work.values())
    with phase("gradients"):
        reward_surrogate, cost_surrogates = surrogates(actor, work, batch)
        g = flat_grad(reward_surrogate, tensors, create_graph=differentiable, retain_graph=True)
        A = b = None
        if config.constrained:
            A = th.stack(
                [flat_grad(cost, tensors, create_graph=differentiable, retain_graph=True) for cost in cost_surrogates]
            )
            b = constraint_values(batch, cost_surrogates)
            if not differentiable:
                b = b.detach()
        fisher_observations = batch.observations[:: config.fvp_sample_freq]
        fisher = fisher or (lambda p, obs, damping, graph: fisher_product(actor, p, obs, damping, graph))
        fvp = fisher(work, fisher_observations, config.cg_damping, differentiable)

    step_size: LineSearch | FixedFraction
    if fraction == "line_search":
        reference = tuple(value.detach() for value in actor(batch.observations, params))
        start = detached(params)
        step_size = LineSearch(
            lambda step: kl_and_surrogates(actor, add_flat(start, step), batch, reference),  # type: ignore[arg-type]
            reward_surrogate.item(),
            cost_surrogates.tolist() if config.constrained else [],
        )
    else:
        step_size = FixedFraction(float(fraction))
    margin = None
    if b is not None and batch.recovery_margin is not None:
        margin = th.as_tensor(batch.recovery_margin, dtype=b.dtype, device=b.device)
    scales = None if A is None else cost_scales([batch])
    result = constrained_step(g, A, b, fvp, config.step, step_size, margin, scales)
    new_params = add_flat(params, result.step if differentiable else result.step.detach())
    return new_params, result


def replay_updates(
    actor: ActorFn,
    params: Params,
    batches: Sequence[PreparedBatch],
    config: CPOConfig,
    fractions: Sequence[float],
    *,
    differentiable: bool,
    fisher: FisherFn | None = None,
) -> list[Params]:
    """Replay K stored updates from ``params``: one CPO step per batch with the stored line-search fractions.

    Returns the parameters at every stage, [φ⁰ = params, φ¹, …, φᴷ], with the batches held fixed: φᴷ(θ) of the
    meta-objective, differentiable w.r.t. ``params`` (exactly with ``differentiable``, with an identity update
    Jacobian otherwise).
    """
    stages = [params]
    for batch, fraction in zip(batches, fractions, strict=True):
        params, _ = cpo_update(actor, params, batch, config, differentiable=differentiable, fraction=fraction, fisher=fisher)
        stages.append(params)
    return stages
