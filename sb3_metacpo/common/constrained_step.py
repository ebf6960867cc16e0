"""One constrained trust-region step, used by every update of the package: the inner (adaptation) CPO updates, the
outer (meta) update, CPO, and MetaTRPO (no constraint).

:func:`constrained_step` takes the reward gradient g, the m cost gradients (rows of A), the m constraint values b
and a Fisher-vector product; it runs conjugate gradient for H⁻¹g and every H⁻¹a_j, solves the CPO subproblem
(:func:`~sb3_metacpo.common.cpo_subproblem.cpo_direction`: its case, dual and step), then either runs the
backtracking line search (:class:`LineSearch`) or applies a given fraction of the step (:class:`FixedFraction`, to
replay a stored update), and returns one :class:`StepResult`.

Nothing non-finite leaves this function as a step. Every numerical fault makes the step a skipped update, its
returned ``step`` exactly zero (never ``0 * NaN``) and its cause in :attr:`StepResult.rejection` (logged by the
algorithms as ``train/step_rejection``):

==========================================================  =====================================================
fault                                                        ``rejection``
==========================================================  =====================================================
NaN or inf in g                                              ``"non-finite reward gradient"``
NaN or inf in a row of A                                     ``"non-finite cost gradient"``
NaN or inf in b                                              ``"non-finite constraint value"``
g or a_j so large that its squared norm overflows            ``"reward gradient too large ..."`` / ``"cost ..."``
NaN or inf from the Fisher product (in conjugate gradient)   ``"non-finite Fisher product"``
a zero or indefinite Fisher product (pᵀHp ≤ 0 on a search    ``"Fisher product not positive definite"``
direction of conjugate gradient, for g or a_j)
reward and cost gradients parallel (cosine ≥ 1 − 1e-5 in     ``"parallel reward and cost gradients"``
the H⁻¹ metric) where that constraint binds (dual case)
the cvxpylayers solver fails on the subproblem (SCS:          ``"dual solver failed"``
infeasible or inaccurate at its iteration limit)
NaN or inf in the subproblem's direction                     ``"non-finite step"``
a zero direction (zero gradients, nothing to restore)        ``"zero step"``
the line search accepts no fraction                          ``"line search: ..."`` (the check that failed last)
==========================================================  =====================================================

Parallel gradients: with g = c·a (c > 0, improving the reward costs as much) and the constraint binding, every point
of the constraint's boundary in the trust region has the same objective; the dual's λ* → 0 and x = (v − νw)/λ is
rounding error divided by a tiny λ (in float32 the "solution" violates its own linearised constraint). There is no
well-defined step to take, so none is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sb3_metacpo.common.conjugate_gradient import conjugate_gradient_solve
from sb3_metacpo.common.cpo_subproblem import CPO_CASES, DUAL_SOLVERS, RECOVERY, LayerSolverError, cpo_direction
from sb3_metacpo.common.profiling import phase

#: Reward and cost gradients whose cosine in the H⁻¹ metric, r_j/√(q·s_j), is at least this are parallel (see the
#: module docstring); float32 rounding of r, q and s is ~1e-6 relative.
PARALLEL_COSINE = 1.0 - 1e-5

#: ``evaluate(step) -> (mean KL, reward surrogate, cost surrogates)`` at the current parameters plus ``step``.
Evaluate = Callable[[torch.Tensor], tuple[float, float, Sequence[float]]]


@dataclass(frozen=True)
class StepConfig:
    """Settings of a constrained step (see the algorithms' constructor arguments for their meaning).

    :ivar target_kl: trust-region size δ (½ xᵀHx ≤ δ; the line search checks the mean KL against it)
    :ivar cg_max_steps: conjugate-gradient iterations for each of H⁻¹g and H⁻¹a_j
    :ivar dual_solver: ``"analytic"`` (exact, up to :data:`~sb3_metacpo.common.cpo_subproblem.MAX_ACTIVE_SET_CONSTRAINTS`
        constraints) or ``"cvxpylayers"`` (the convex program, any number)
    :ivar line_search_max_iter: times the line search may shrink the step
    :ivar line_search_shrinking_factor: the factor it shrinks by
    :ivar s_tol: a cost gradient with a_jᵀH⁻¹a_j ≤ s_tol carries no information (see ``cpo_direction``); in the
        units of the cost squared: the algorithms give each cost's size (:class:`CostScales`), by which it is scaled
    :ivar cg_residual_tol: conjugate gradient stops once the squared residual is below it (absolute for the reward
        gradient, of normalised advantages, as sb3-contrib's TRPO and OmniSafe; for a cost gradient times the square of
        its advantages' size, :class:`CostScales`, when the algorithms give it); 0 runs every iteration (up to an
        underflow guard), so that the number of iterations does not depend on the parameters: what a step
        differentiated for the second-order meta-gradient needs (the derivative of a solve stopped early follows the
        iterations run, not H⁻¹)
    :ivar solver_args: options of the cvxpylayers layers (None: the defaults)
    """

    target_kl: float
    cg_max_steps: int = 10
    dual_solver: str = "analytic"
    line_search_max_iter: int = 10
    line_search_shrinking_factor: float = 0.8
    s_tol: float = 1e-8
    solver_args: Mapping[str, Any] | None = None
    cg_residual_tol: float = 1e-10

    def __post_init__(self) -> None:
        if self.dual_solver not in DUAL_SOLVERS:
            raise ValueError(f"Unknown dual solver {self.dual_solver!r}; expected one of {DUAL_SOLVERS}")
        if not 0 < self.line_search_shrinking_factor < 1:
            raise ValueError(f"line_search_shrinking_factor must be in (0, 1), got {self.line_search_shrinking_factor}")
        if self.line_search_max_iter < 0:
            raise ValueError(f"line_search_max_iter must be >= 0, got {self.line_search_max_iter}")
        if not (math.isfinite(self.target_kl) and self.target_kl > 0):
            raise ValueError(f"target_kl must be a finite number > 0, got {self.target_kl}")
        if self.cg_max_steps < 1:
            raise ValueError(f"cg_max_steps must be >= 1, got {self.cg_max_steps}")
        if not (math.isfinite(self.s_tol) and self.s_tol >= 0):
            raise ValueError(f"s_tol must be a finite number >= 0, got {self.s_tol}")
        if not (math.isfinite(self.cg_residual_tol) and self.cg_residual_tol >= 0):
            raise ValueError(f"cg_residual_tol must be a finite number >= 0, got {self.cg_residual_tol}")


@dataclass(frozen=True)
class CostScales:
    """The size of each cost signal, in which the tolerances on its gradient a_j are taken, so that a cost's units do
    not decide the step (rescaling a cost by c > 0 scales a_j, b_j and both sizes by c, and leaves the problem as it
    was).

    :ivar signal: (m,) the root mean square of each cost's returns: a_j is numerically zero, the constraint left out
        of the step, when a_jᵀH⁻¹a_j ≤ ``s_tol``·signal_j² (beside the cost itself its gradient is nothing, e.g. the
        noise a baseline leaves when the cost is the same at every step). A batch without cost is not such a case:
        its returns and advantages are the cost critic's values, so signal_j and a_j are what the critic predicts
    :ivar advantages: (m,) the root mean square of each cost's advantages, the scale of a_j: its conjugate gradient has
        converged when ‖r‖² ≤ ``cg_residual_tol``·advantages_j²
    """

    signal: torch.Tensor
    advantages: torch.Tensor


@dataclass(frozen=True)
class LineSearch:
    """Choose the step's fraction by backtracking: ``evaluate`` gives (KL, reward surrogate, cost surrogates) at the
    current parameters plus a candidate step; ``reward`` and ``costs`` are the surrogates at the current parameters."""

    evaluate: Evaluate
    reward: float
    costs: Sequence[float] = ()


@dataclass(frozen=True)
class FixedFraction:
    """Apply this fraction of the step without a line search (replaying a stored update)."""

    fraction: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 <= self.fraction <= 1):
            raise ValueError(f"a replayed step's fraction must be in [0, 1], got {self.fraction}")


@dataclass(frozen=True)
class StepResult:
    """Everything one constrained step did.

    :ivar step: the change to apply, ``fraction * direction`` (keeps the graph of ``direction``); exactly zero when
        the step was rejected
    :ivar direction: the full step x of the subproblem
    :ivar fraction: the accepted fraction (0 if rejected)
    :ivar accepted: whether a non-zero step is applied
    :ivar case: ``"trpo"``, ``"dual"`` or ``"recovery"``; ``"skipped"`` when a fault stopped the step before the
        subproblem was solved
    :ivar lam: trust-region multiplier
    :ivar nu: one multiplier per constraint
    :ivar informative: per constraint, whether it entered the step
    :ivar kl: mean KL at the accepted step (line search), NaN when replayed
    :ivar reward_improvement: measured change of the reward surrogate (line search), NaN when replayed
    :ivar cost_changes: measured changes of the cost surrogates (line search)
    :ivar expected_improvement: gᵀx
    :ivar expected_cost_changes: a_jᵀx
    :ivar n_backtracks: how many times the line search shrank the step
    :ivar rejection: why the step was rejected or shrunk to nothing (None when accepted)
    """

    step: torch.Tensor
    direction: torch.Tensor
    fraction: float
    accepted: bool
    case: str
    lam: float
    nu: tuple[float, ...]
    informative: tuple[bool, ...]
    kl: float = math.nan
    reward_improvement: float = math.nan
    cost_changes: tuple[float, ...] = field(default_factory=tuple)
    expected_improvement: float = math.nan
    expected_cost_changes: tuple[float, ...] = field(default_factory=tuple)
    n_backtracks: int = 0
    rejection: str | None = None


def constrained_step(
    g: torch.Tensor,
    A: torch.Tensor | None,
    b: torch.Tensor | None,
    fisher_product: Callable[[torch.Tensor], torch.Tensor],
    config: StepConfig,
    step_size: LineSearch | FixedFraction,
    recovery_margin: torch.Tensor | None = None,
    cost_scales: CostScales | None = None,
) -> StepResult:
    """One trust-region step maximising gᵀx subject to b_j + a_jᵀx ≤ 0 (see the module docstring).

    Differentiable in g, A, b and whatever the Fisher product depends on (the line search's fraction is a constant).

    :param g: reward gradient, shape (n,)
    :param A: cost gradients, shape (m, n); None (or m = 0) for an unconstrained (TRPO) step
    :param b: constraint values, shape (m,), in the units of the cost surrogates (> 0: violated)
    :param fisher_product: v ↦ (F + damping·I)v
    :param config: the step's settings
    :param step_size: :class:`LineSearch` to choose the fraction, :class:`FixedFraction` to replay one
    :param recovery_margin: (m,) recover whenever some b_j exceeds its margin (``cpo_direction``); None: CPO's rule
    :param cost_scales: the size of each cost signal (:class:`CostScales`), in which the tolerances on its gradient
        are taken; None: 1 for every cost, the tolerances absolute (a cost in units a thousand times smaller was
        dropped from the step, its solve stopped early)
    """
    if A is not None and A.shape[0] == 0:
        A, b = None, None
    if (A is None) != (b is None):
        raise ValueError("A and b are required together (both None for an unconstrained step)")
    m = 0 if A is None else A.shape[0]
    if isinstance(step_size, LineSearch) and len(step_size.costs) < m:
        raise ValueError(f"LineSearch.costs has {len(step_size.costs)} cost surrogates for {m} constraints: give one each")
    fault = _input_fault(g, A, b)  # first: non-finite costs make non-finite units too, and a skipped step
    if fault is not None:
        return _skipped(g, m, fault)
    signal, gradient_scale = [1.0] * m, [1.0] * m
    if cost_scales is not None:
        signal, gradient_scale = (
            [float(value) for value in sizes.detach().reshape(-1)] for sizes in (cost_scales.signal, cost_scales.advantages)
        )
    if not all(len(sizes) == m and all(math.isfinite(v) and v >= 0 for v in sizes) for sizes in (signal, gradient_scale)):
        raise ValueError(f"cost_scales must hold {m} finite numbers >= 0 each (one per constraint), got {cost_scales}")
    with phase("conjugate_gradient"):
        tol = config.cg_residual_tol
        solves = [conjugate_gradient_solve(fisher_product, g, config.cg_max_steps, tol)]
        if A is not None:
            solves.extend(
                conjugate_gradient_solve(fisher_product, a, config.cg_max_steps, tol * scale**2)
                for a, scale in zip(A, gradient_scale, strict=True)
            )
    statuses = {solve.status for solve in solves}
    if "non-finite" in statuses:
        return _skipped(g, m, "non-finite Fisher product")
    if "not positive definite" in statuses:
        return _skipped(g, m, "Fisher product not positive definite")
    v = solves[0].x
    W = None if A is None else torch.stack([solve.x for solve in solves[1:]])
    q = g @ v
    r = S = None
    if W is None or A is None or b is None:
        with phase("dual_solve"):
            solution = cpo_direction(v, None, q, None, None, None, config.target_kl, solver=config.dual_solver)
    else:
        # r = W g = A H⁻¹g; a reward gradient within conjugate gradient's (absolute) tolerance gets v = 0, q = 0, and
        # then r = A v = 0 too (W g would pair a non-zero r with q = 0: a step far outside the trust region)
        r, S = (W @ g if solves[0].iterations > 0 else torch.zeros_like(b)), A @ W.T
        with phase("dual_solve"):
            try:
                solution = cpo_direction(
                    v,
                    W,
                    q,
                    r,
                    S,
                    b,
                    config.target_kl,
                    solver=config.dual_solver,
                    s_tol=config.s_tol
                    if cost_scales is None
                    else torch.tensor([config.s_tol * size**2 for size in signal], dtype=torch.float64),
                    solver_args=config.solver_args,
                    recovery_margin=recovery_margin,
                )
            except LayerSolverError:
                return _skipped(g, m, "dual solver failed")
    assert isinstance(solution.case, str)
    x = solution.x
    # What every outcome below shares: the subproblem's solution, with a zero step until one is accepted.
    rejected = StepResult(
        step=torch.zeros_like(x),
        direction=x,
        fraction=0.0,
        accepted=False,
        case=solution.case,
        lam=float(solution.lam.detach()),
        nu=tuple(float(value) for value in solution.nu.detach()),
        informative=tuple(bool(value) for value in solution.informative),
        expected_improvement=float(solution.expected_improvement.detach()),
        expected_cost_changes=tuple(float(value) for value in solution.expected_cost_changes.detach()),
    )
    if not bool(torch.isfinite(x.detach()).all()):
        return replace(rejected, rejection="non-finite step")
    if r is not None and S is not None and solution.case == "dual":
        q_value, r_values, s_values = float(q.detach()), r.detach().tolist(), torch.diagonal(S.detach()).tolist()
        for j, (r_j, s_j, nu_j, used) in enumerate(zip(r_values, s_values, rejected.nu, rejected.informative, strict=True)):
            if used and nu_j > 0 and q_value > 0 and r_j / math.sqrt(q_value * s_j) >= PARALLEL_COSINE:
                return replace(rejected, rejection=f"parallel reward and cost gradients (constraint {j})")
    if not bool((x.detach() != 0).any()):
        return replace(rejected, rejection="zero step")
    if isinstance(step_size, FixedFraction):
        fraction = float(step_size.fraction)
        return replace(rejected, step=fraction * x, fraction=fraction, accepted=fraction > 0)

    b_values = () if b is None else tuple(float(value) for value in b.detach())
    scales = tuple(float(value) for value in solution.scale.detach())
    level = recovery_level(b_values, rejected.expected_cost_changes, scales, rejected.informative)
    with phase("line_search"):
        outcome = backtracking_line_search(
            step_size, x.detach(), solution.case, b_values, scales, rejected.informative, config, level
        )
    step = outcome.fraction * x if outcome.accepted else torch.zeros_like(x)
    return replace(
        rejected,
        step=step,
        fraction=outcome.fraction,
        accepted=outcome.accepted,
        kl=outcome.kl,
        reward_improvement=outcome.reward_improvement,
        cost_changes=outcome.cost_changes,
        n_backtracks=outcome.n_backtracks,
        rejection=outcome.rejection,
    )


def _input_fault(g: torch.Tensor, A: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    """The first non-finite input of a step (its rejection), or None."""
    if not bool(torch.isfinite(g.detach()).all()):
        return "non-finite reward gradient"
    if A is not None and not bool(torch.isfinite(A.detach()).all()):
        return "non-finite cost gradient"
    if b is not None and not bool(torch.isfinite(b.detach()).all()):
        return "non-finite constraint value"
    # finite, but conjugate gradient's squared norms would overflow (e.g. 1e20 in float32)
    if not math.isfinite(float(g.detach() @ g.detach())):
        return "reward gradient too large (its squared norm overflows)"
    if A is not None and not bool(torch.isfinite((A.detach() * A.detach()).sum(-1)).all()):
        return "cost gradient too large (its squared norm overflows)"
    return None


def _skipped(g: torch.Tensor, n_constraints: int, rejection: str) -> StepResult:
    """A step skipped before the subproblem was solved: zero step and direction, NaN multipliers."""
    zero = torch.zeros_like(g.detach())
    return StepResult(
        step=zero,
        direction=zero,
        fraction=0.0,
        accepted=False,
        case="skipped",
        lam=math.nan,
        nu=(math.nan,) * n_constraints,
        informative=(False,) * n_constraints,
        expected_improvement=math.nan,
        expected_cost_changes=(math.nan,) * n_constraints,
        rejection=rejection,
    )


def recovery_level(
    b: Sequence[float], expected_changes: Sequence[float], scales: Sequence[float], informative: Sequence[bool]
) -> float:
    """The largest normalised constraint value the linear model predicts at the full step, max_j (b_j + a_jᵀx)/√(2δs_j)
    over the informative constraints (0 without one): in the recovery case, the level t the recovery program reaches."""
    terms = zip(b, expected_changes, scales, informative, strict=True)
    return max(((value + change) / scale for value, change, scale, used in terms if used), default=0.0)


@dataclass(frozen=True)
class LineSearchOutcome:
    """What :func:`backtracking_line_search` accepted (all zero when nothing passed, with the reason)."""

    fraction: float
    accepted: bool
    n_backtracks: int
    kl: float
    reward_improvement: float
    cost_changes: tuple[float, ...]
    rejection: str | None


def backtracking_line_search(
    search: LineSearch,
    direction: torch.Tensor,
    case: str,
    b: Sequence[float],
    scales: Sequence[float],
    informative: Sequence[bool],
    config: StepConfig,
    level: float = 0.0,
) -> LineSearchOutcome:
    """Accept the first fraction βʲ (j = 0, …, ``line_search_max_iter``) of the step that passes every check:

    * the KL and surrogates are finite and the mean KL is at most δ;
    * while some informative constraint is violated (b_j > 0, or the ``"recovery"`` case): the largest normalised
      violation among the violated constraints (in the recovery case with none violated, a feasible set too thin to
      step in: among all informative ones), (b_j + Δ_j)/√(2δs_j), strictly decreases (a step back into the
      feasible set may have to give up reward: demanding a reward gain there would leave the policy stuck above
      the limit); otherwise the reward surrogate strictly improves;
    * every informative constraint that is satisfied stays inside its linearised bound: Δ_j ≤ −b_j; in the recovery
      case with ``level`` t > 0 (no point of the trust region satisfies every linearised constraint, and the
      recovery program spends a satisfied constraint's slack to lower the worst violation, every normalised value
      ending at most t), inside the program's bound instead: (b_j + Δ_j)/√(2δs_j) ≤ t. Held to Δ_j ≤ −b_j, no
      fraction of the program's own direction could be accepted there.

    For m = 1 this is the classic CPO line search; with m = 0 (no constraint, or no cost information) only the
    KL and the reward are checked.

    :param search: the surrogates' evaluation and their current values
    :param direction: the full step x (candidates are βʲx)
    :param case: the CPO case of the step
    :param b: constraint values; ``scales``: √(2δs_j) of each; ``informative``: which constraints count
    :param config: δ, the number of backtracks and β
    :param level: the recovery program's level at the full step (:func:`recovery_level`); used only in the recovery
        case
    """
    if case not in CPO_CASES:
        raise ValueError(f"Unknown CPO case {case!r}; expected one of {CPO_CASES}")
    violated = [j for j, (value, used) in enumerate(zip(b, informative, strict=True)) if used and value > 0]
    restore = case == RECOVERY or bool(violated)
    if restore and not violated:  # the recovery case with every constraint satisfied (a sliver of a feasible set):
        violated = [j for j, used in enumerate(informative) if used]  # the recovery program's worst one must drop
    worst_now = max((b[j] / scales[j] for j in violated), default=0.0)
    # the most each satisfied constraint's surrogate may rise: to its limit, or to the recovery program's level
    spend = case == RECOVERY and level > 0
    room = [level * scale - value if spend else -value for value, scale in zip(b, scales, strict=True)]
    reason = "no candidate"
    with torch.no_grad():
        for n_backtracks in range(config.line_search_max_iter + 1):
            fraction = config.line_search_shrinking_factor**n_backtracks
            kl, reward, costs = search.evaluate(fraction * direction)
            kl, reward_improvement = float(kl), float(reward) - float(search.reward)
            # Only the constrained surrogates count (an unconstrained step may still be given the costs).
            cost_changes = tuple(float(new) - float(old) for new, old in zip(costs, search.costs[: len(b)], strict=False))
            if not all(math.isfinite(value) for value in (kl, reward_improvement, *cost_changes)):
                reason = "line search: non-finite KL or surrogate"
            elif kl > config.target_kl:
                reason = "line search: KL above target_kl"
            elif restore and not max(((b[j] + cost_changes[j]) / scales[j] for j in violated), default=-math.inf) < worst_now:
                reason = "line search: violation not reduced"
            elif not restore and not reward_improvement > 0:
                reason = "line search: no reward improvement"
            elif any(
                used and value <= 0 and change > allowed
                for value, change, allowed, used in zip(b, cost_changes, room, informative, strict=True)
            ):
                reason = "line search: a satisfied constraint left its linearised bound"
            else:
                return LineSearchOutcome(fraction, True, n_backtracks, kl, reward_improvement, cost_changes, None)
    zeros = tuple(0.0 for _ in b)
    return LineSearchOutcome(0.0, False, config.line_search_max_iter, 0.0, 0.0, zeros, reason)
