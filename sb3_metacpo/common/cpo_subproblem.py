"""The CPO subproblem with any number of cost constraints: its cases, its dual and its step.

Convention (used everywhere in this package): the trust region is ``½ xᵀHx ≤ δ``. With m cost constraints the
subproblem is

    maximise gᵀx  subject to  ½ xᵀHx ≤ δ  and  b_j + a_jᵀx ≤ 0  (j = 1..m),

with g, a_j the gradients of the reward and cost surrogates, H the (damped) Fisher matrix and b_j = J_Cj − limit_j,
the current value of constraint j in the units of its cost surrogate (b_j > 0: violated now). With v = H⁻¹g,
w_j = H⁻¹a_j (the rows of W), q = gᵀv, r_j = gᵀw_j and S_jk = a_jᵀw_k its dual is

    maximise over λ > 0, ν ≥ 0 of  −(q − 2rᵀν + νᵀSν)/(2λ) + bᵀν − λδ,     and the step is  x* = (v − Wᵀν*)/λ*.

A constraint is *informative* when s_j = S_jj > ``s_tol`` (its gradient is not numerically zero); the others are
left out of the problem. Each step falls in one of three cases, named as logged (``train/cpo_case``):

* ``"trpo"``: no informative constraint, or the whole trust region satisfies every informative one
  (b_j < 0 and b_j²/s_j > 2δ for all j): x = √(2δ/q)·v, λ = √(q/2δ), ν = 0.
* ``"recovery"``: no point of the trust region satisfies all of them. The step is the solution of the *recovery
  program*: the point of the trust region that minimises the largest violation, each constraint measured in units
  of the largest decrease the trust region allows it, b̃_j + a_jᵀx/√(2δs_j) with b̃_j = b_j/√(2δs_j). Minimising the
  largest (rather than the total) violation treats every constraint alike whatever its units, and for m = 1 it is
  the classic CPO recovery step x = −√(2δ/s)·w, the step that decreases the cost surrogate most. The minimiser lies
  in the span of the w_j, so the program has m + 1 variables (:func:`cpo_recovery_layer`). With a
  ``recovery_margin``, also whenever some informative b_j is above 0 and above its margin (the algorithms'
  ``recovery="violated"`` and ``"confident"``), feasible points or not.
* ``"dual"``: otherwise; the dual is solved exactly (``solver="analytic"``: :func:`solve_dual_analytic`, the closed
  form, for m = 1; :func:`solve_dual_active_set`, the closed form on each support of ν, for 2 ≤ m ≤
  :data:`MAX_ACTIVE_SET_CONSTRAINTS`) or by the convex program of :func:`solve_dual_layer` (``"cvxpylayers"``, any m).

For m = 1 the case follows from b and s alone (infeasible iff b > 0 and b/√(2δs) > 1 − ``FEASIBILITY_MARGIN``, the
feasible set then being at most a sliver of the trust region; CPO's paper has b²/s > 2δ); for m ≥ 2 a problem is
infeasible when one constraint alone is, or when the recovery program's optimal largest violation is above
−``FEASIBILITY_MARGIN`` (the recovery program solved exactly by :func:`solve_recovery_active_set`, or by the layer of
:func:`solve_recovery_layer`).

All functions are plain torch and differentiable (the second-order meta-gradient goes through CG, the Fisher-vector
products and the dual solution). On finite inputs the dual solvers and :func:`cpo_direction` neither raise nor return
NaN/inf, and :func:`cpo_direction`'s gradients are finite too (a constraint value b so small that r/b² overflows is
taken as 0) unless the problem's own products overflow (q, s_j, r_j or their squares near the dtype's range: terms of
about 1e18 in float32, 1e150 in float64), where :func:`~sb3_metacpo.common.constrained_step.constrained_step`'s
checks reject the non-finite step or gradient; the small floors that guarantee this are documented where they are
applied.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cvxpylayers.torch import CvxpyLayer

#: What to install for the convex-program layers (``dual_solver="cvxpylayers"``, or more than
#: :data:`MAX_ACTIVE_SET_CONSTRAINTS` constraints): otherwise the default ``dual_solver="auto"`` solves exactly and needs
#: neither cvxpy nor cvxpylayers.
CVXPYLAYERS_EXTRA = "pip install sb3-metacpo[several-costs]"

TRPO, RECOVERY, DUAL = "trpo", "recovery", "dual"
CPO_CASES = (TRPO, RECOVERY, DUAL)
DUAL_SOLVERS = ("analytic", "cvxpylayers")

#: Options of the cvxpylayers layers, passed to diffcp. SCS with its built-in QDLDL factorisation (the MKL one,
#: picked by default when installed, stalled for minutes on a shared 2-core machine) at eps 1e-10, which it reaches
#: on these tiny problems: 1000 random dual-case problems match the closed form to < 1e-9 relative. Clarabel, the
#: interior-point alternative, stalls near √tol (1e-6 at tol 1e-14); SCS at eps < 1e-10 stalls at its rounding
#: floor. ``max_iters`` bounds the time spent on a degenerate problem; serial solves are faster for problems this small.
DEFAULT_LAYER_SOLVER_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "solve_method": "SCS",
        "linear_solver": "qdldl",
        "eps_abs": 1e-10,
        "eps_rel": 1e-10,
        "max_iters": 10_000,
        "n_jobs_forward": 1,
    }
)
#: Added when gradients are needed (diffcp rejects them in its solve-only path): dense differentiation of the tiny
#: cone program and a serial backward pass (together 2x faster than the defaults for a batch of 8).
_LAYER_DERIVATIVE_ARGS: Mapping[str, Any] = MappingProxyType({"mode": "dense", "n_jobs_backward": 1})

# Added to the diagonal of the normalised Gram matrix [[1, −ρᵀ], [−ρ, R]] (unit diagonal) before its Cholesky
# factor is passed to the dual layer: it keeps the factor and its derivative finite when g lies in the span of the
# a_j (|ρ| = 1 for m = 1) or the a_j are collinear. It perturbs q and s by a relative 1e-11, below the solver's
# accuracy. When g ∥ a (same direction) λ* → 0 and x = (v − νw)/λ amplifies both this bias and the solver error: the
# layer's step is then good to ~1e-4 only. Raised tenfold at a time if the factorisation still fails.
_CHOLESKY_JITTER = 1e-11

# Floor of B/2δ = 1 − b²/(2sδ), the share of the trust region the linearised constraint leaves. B → 0 means the
# feasible set shrinks to a point and λ → ∞; the floor caps λ at about 1e4·√(q/2δ), which moves x by about 1e-4 of
# its size in that degenerate case only. Shared by both dual solvers so that they solve the same problem.
_MIN_TRUST_SLACK = 1e-8

#: A problem whose recovery program cannot push the largest normalised violation below −FEASIBILITY_MARGIN is treated
#: as infeasible (its feasible set is a sliver where λ* would blow up); for m = 1, b̃ = b/√(2δs) > 1 − FEASIBILITY_MARGIN.
FEASIBILITY_MARGIN = 1e-6

# b̃_j = b_j/√(2δs_j) is clamped below at this value: any b̃_j ≤ −1 is slack over the whole trust region, and a
# constraint with b̃_j ≤ −2 can never bind in the dual or the recovery program. Also the stand-in of constraints left
# out (not informative).
_SLACK_STAND_IN = -2.0


def _floor(dtype: torch.dtype) -> float:
    """Smallest value used as a denominator: √tiny (≈1e-154 in float64, 1e-19 in float32), so its square is normal."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _safe_terms(q: torch.Tensor, s: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, s and δ floored for use as denominators.

    q = 0 (g = 0) and s = 0 (a = 0) are legitimate inputs: floored at √tiny. δ ≤ 0 is a misconfiguration: floored at
    the machine epsilon, far below any usable KL target, so that a zero trust region gives a step of about 0 and
    the gradients stay finite.
    """
    floor = _floor(q.dtype)
    return q.clamp_min(floor), s.clamp_min(floor), delta.clamp_min(torch.finfo(q.dtype).eps)


def _broadcast(*values: torch.Tensor | float) -> list[torch.Tensor]:
    """Tensors of one floating dtype (the first tensor's, else the default) broadcast to a common shape."""
    reference = next((value for value in values if isinstance(value, torch.Tensor)), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.get_default_dtype()
    device = reference.device if reference is not None else None
    return list(torch.broadcast_tensors(*(torch.as_tensor(value, dtype=dtype, device=device) for value in values)))


def solve_dual_analytic(
    q: torch.Tensor | float,
    r: torch.Tensor | float,
    s: torch.Tensor | float,
    b: torch.Tensor | float,
    delta: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form solution (λ*, ν*) of the CPO dual (Achiam et al. 2017, appendix 10.2), elementwise.

    Maximising over ν ≥ 0 first gives ν = max(0, (λb + r)/s), which splits λ > 0 into two intervals with the common
    endpoint −r/b: on S_a = {λb + r > 0} the dual is f_a(λ) = −A/(2λ) − λB/2 + rb/s, on S_b = {λb + r ≤ 0} it is
    f_b(λ) = −q/(2λ) − λδ, with A = q − r²/s and B = 2δ − b²/s. Each is maximised by projecting its unconstrained
    maximiser (√(A/B), resp. √(q/2δ)) onto its interval; the better of the two is the answer (the dual is concave in
    λ and continuous at −r/b, so this is exact).

    Only meaningful in the ``"dual"`` case (s > 0 and not b²/s > 2δ with b ≠ 0); elsewhere it returns finite but
    meaningless values, and where s ≈ 0 (ν ~ b/s) its gradients may overflow (:func:`cpo_direction` never solves
    the dual there). Inputs broadcast together (leading dims = independent problems); differentiable in all.

    :return: (λ, ν), each of the broadcast shape
    """
    q, r, s, b, delta = _broadcast(q, r, s, b, delta)
    floor, eps = _floor(q.dtype), torch.finfo(q.dtype).eps
    q_safe, s_safe, delta_safe = _safe_terms(q, s, delta)
    lam_b_free = torch.sqrt(q_safe / (2 * delta_safe))
    # A ≥ 0 by Cauchy-Schwarz (clamp the rounding). B ≥ 0 in the dual case; see _MIN_TRUST_SLACK for its floor.
    a_coef = (q - r * r / s_safe).clamp_min(0)
    b_coef = (2 * delta_safe - b * b / s_safe).clamp_min(_MIN_TRUST_SLACK * 2 * delta_safe)
    # A = 0 when g ∥ a, and then x = (v − νw)/λ divides the rounding error of v − (r/s)w by λ: the floor
    # λ_a ≥ √eps·λ_b bounds that error by about √eps (relative) and keeps the square root differentiable.
    lam_a_free = torch.sqrt(a_coef / b_coef + eps * lam_b_free**2)

    # A b so small that d(−r/b)/db = r/b² overflows is taken as 0: its endpoint −r/b is beyond every λ in the problem's
    # range, where b > 0, b < 0 and b = 0 pick the same interval, and the unused branch's infinite derivative would
    # otherwise reach the gradients as 0·inf = NaN (e.g. b = 1e-20 in float32: a cost one float64 ulp over its limit).
    negligible = (b * b).mul(torch.finfo(b.dtype).max / 16) <= r.abs()  # also every b with b² = 0 (underflow)
    b_pos, b_neg = (b > 0) & ~negligible, (b < 0) & ~negligible
    endpoint = -r / torch.where(b_pos | b_neg, b, torch.ones_like(b))  # −r/b (unused when b is taken as 0)
    # b > 0: S_a = (max(−r/b, 0), ∞), S_b = (0, −r/b]; b < 0: S_a = (0, −r/b), S_b = [−r/b, ∞) (within λ > 0);
    # b = 0: one of them is everything, depending on the sign of r.
    a_valid = torch.where(b_pos, True, torch.where(b_neg, endpoint > 0, r > 0))
    b_valid = torch.where(b_pos, endpoint > 0, torch.where(b_neg, True, r <= 0))
    lam_a = torch.where(
        b_pos, torch.maximum(lam_a_free, endpoint), torch.where(b_neg, torch.minimum(lam_a_free, endpoint), lam_a_free)
    )
    lam_b = torch.where(
        b_pos, torch.minimum(lam_b_free, endpoint), torch.where(b_neg, torch.maximum(lam_b_free, endpoint), lam_b_free)
    )

    with torch.no_grad():  # the choice between the candidates is piecewise constant: no gradient needed
        lam_a_pos, lam_b_pos = lam_a.clamp_min(floor), lam_b.clamp_min(floor)
        f_a = -a_coef / (2 * lam_a_pos) - lam_a_pos * b_coef / 2 + r * b / s_safe
        f_b = -q_safe / (2 * lam_b_pos) - lam_b_pos * delta_safe
        use_a = a_valid & (~b_valid | (f_a >= f_b))
    # λ ≥ floor: λ → 0 only in degenerate problems (g = 0, or g ∥ a with the constraint active); x stays finite.
    lam = torch.where(use_a, lam_a, lam_b).clamp_min(floor)
    nu = ((lam * b + r) / s_safe).clamp_min(0)
    return lam, nu


def cvxpylayers_available() -> bool:
    """Whether cvxpy and cvxpylayers can be imported (they are the ``several-costs`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("cvxpy", "cvxpylayers"))


def import_cvxpylayers() -> tuple[Any, type[CvxpyLayer]]:
    """``(cvxpy, CvxpyLayer)``, imported on first use, or an ImportError naming the extra to install."""
    try:
        import cvxpy
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as error:
        raise ImportError(
            f"several cost constraints (and dual_solver='cvxpylayers') need cvxpy and cvxpylayers: {CVXPYLAYERS_EXTRA} "
            f"({error})"
        ) from error
    return cvxpy, CvxpyLayer


@functools.cache
def cpo_dual_layer(n_constraints: int) -> CvxpyLayer:
    """The normalised CPO dual with ``n_constraints`` constraints as a ``cvxpylayers`` layer, built once per process
    and size (cvxpy is imported here, lazily).

    Variables λ ≥ 0, ν ≥ 0 (m); parameters U ((m+1)×(m+1), upper Cholesky factor of the normalised Gram matrix
    [[1, −ρᵀ], [−ρ, R]]) and b̃ (m); objective maximise −½ quad_over_lin(U[:, 0] + U[:, 1:]ν, λ) + b̃ᵀν − ½λ, which is
    the dual with q = 1, δ = ½ because ‖U[1, ν]ᵀ‖² = 1 − 2ρᵀν + νᵀRν. Written this way the problem is DPP (the
    literal expression is not even DCP). Call as ``layer(U, b, solver_args=...)``; returns (λ, ν).
    """
    cp, CvxpyLayer = import_cvxpylayers()

    lam, nu = cp.Variable(nonneg=True), cp.Variable(n_constraints, nonneg=True)
    factor, b = cp.Parameter((n_constraints + 1, n_constraints + 1)), cp.Parameter(n_constraints)
    objective = cp.Maximize(-0.5 * cp.quad_over_lin(factor[:, 0] + factor[:, 1:] @ nu, lam) + b @ nu - 0.5 * lam)
    return CvxpyLayer(cp.Problem(objective), parameters=[factor, b], variables=[lam, nu])


@functools.cache
def cpo_recovery_layer(n_constraints: int) -> CvxpyLayer:
    """The normalised recovery program with ``n_constraints`` constraints as a ``cvxpylayers`` layer.

    Variables μ̃ (m) and t; parameters R (m×m, the normalised Gram matrix of the a_j in the H⁻¹ metric), its lower
    Cholesky factor C and b̃ (m): minimise t subject to b̃ + Rμ̃ ≤ t·1 and ‖Cᵀμ̃‖² ≤ 1. With x = Σ_j μ_j w_j and
    μ_j = √(2δ/s_j)·μ̃_j this is: over the trust region, minimise the largest normalised violation
    (b_j + a_jᵀx)/√(2δs_j). Returns (μ̃, t); t ≤ 0 means the constraints can all be met.
    """
    cp, CvxpyLayer = import_cvxpylayers()

    mu, t = cp.Variable(n_constraints), cp.Variable()
    gram, factor, b = (
        cp.Parameter((n_constraints, n_constraints)),
        cp.Parameter((n_constraints, n_constraints)),
        cp.Parameter(n_constraints),
    )
    problem = cp.Problem(cp.Minimize(t), [b + gram @ mu <= t, cp.sum_squares(factor.T @ mu) <= 1])
    return CvxpyLayer(problem, parameters=[gram, factor, b], variables=[mu, t])


def _layer_args(solver_args: Mapping[str, Any] | None, *tensors: torch.Tensor) -> dict[str, Any]:
    """diffcp options: the defaults (or ``solver_args``), plus the derivative options when a gradient is needed
    (the layer's own test for whether it differentiates, which decides which options diffcp accepts)."""
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
    base = DEFAULT_LAYER_SOLVER_ARGS if solver_args is None else solver_args
    return {**(_LAYER_DERIVATIVE_ARGS if needs_grad else {}), **base}


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a batch of positive semi-definite matrices with unit diagonal, with the smallest
    diagonal jitter (from :data:`_CHOLESKY_JITTER`, tenfold at a time) under which every factorisation succeeds."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    jitter = _CHOLESKY_JITTER
    while True:
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if not bool((info > 0).any()) or jitter >= 1e-3:
            return factor
        jitter *= 10


def _normalised_terms(
    q: torch.Tensor, r: torch.Tensor, S: torch.Tensor, b: torch.Tensor, delta: torch.Tensor, informative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ρ_j = r_j/√(q s_j), R_jk = S_jk/√(s_j s_k), b̃_j = b_j/√(2δ s_j) and √s_j, with stand-ins (ρ = 0, unit rows
    of R, b̃ = −2) for constraints that are not informative, so that they can never bind."""
    floor = _floor(q.dtype)
    scale = torch.sqrt(torch.diagonal(S, dim1=-2, dim2=-1).clamp_min(floor))
    rho = (r / (torch.sqrt(q.clamp_min(floor)).unsqueeze(-1) * scale)).clamp(-1, 1)
    gram = (S / (scale.unsqueeze(-1) * scale.unsqueeze(-2))).clamp(-1, 1)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    pair = informative.unsqueeze(-1) & informative.unsqueeze(-2)
    gram = torch.where(pair, gram, eye)
    gram = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1)) + eye  # unit diagonal exactly
    rho = torch.where(informative, rho, torch.zeros_like(rho))
    b_scaled = b / torch.sqrt(2 * delta.clamp_min(torch.finfo(q.dtype).eps).unsqueeze(-1) * scale**2)
    b_scaled = torch.where(informative, b_scaled, torch.full_like(b_scaled, _SLACK_STAND_IN))
    return rho, gram, b_scaled.clamp_min(_SLACK_STAND_IN), scale


def solve_dual_layer(
    q: torch.Tensor,
    r: torch.Tensor,
    S: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    informative: torch.Tensor | None = None,
    solver_args: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ*, ν*) of the CPO dual with m constraints from :func:`cpo_dual_layer`: one layer call for a batch of
    problems, differentiable in every input.

    The problem is first scaled to unit size, λ = √(q/2δ)·λ̃ and ν_j = √(q/s_j)·ν̃_j, which leaves the dual with
    q̃ = 1, unit diagonal S̃ = R, r̃ = ρ, b̃_j = b_j/√(2s_jδ), δ̃ = ½ (up to a positive factor of the objective).
    Solver tolerances are then relative to the problem's own scale, whatever the magnitudes of q, S, b, δ.
    Constraints that are not ``informative`` get ν = 0. Only meaningful for feasible problems (the ``"dual"`` case):
    b̃_j is clamped to at most √(1 − 1e-8), as the closed form floors its trust slack, so every problem is bounded.

    :param q: gᵀH⁻¹g, shape (B,)
    :param r: gᵀH⁻¹a_j, shape (B, m)
    :param S: a_jᵀH⁻¹a_k, shape (B, m, m)
    :param b: constraint values, shape (B, m)
    :param delta: trust-region sizes, shape (B,)
    :param informative: which constraints take part, shape (B, m) (default: all)
    :param solver_args: diffcp/solver options replacing :data:`DEFAULT_LAYER_SOLVER_ARGS`
    :return: λ of shape (B,) and ν of shape (B, m)
    """
    return _solve_dual(q, r, S, b, delta, informative, functools.partial(_layer_dual, solver_args=solver_args))


#: A solver of the normalised dual (q = 1, δ = ½): (ρ (B, m), R (B, m, m), b̃ (B, m)) ↦ (λ̃ (B,), ν̃ (B, m)).
NormalisedDual = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: A solver of the normalised recovery program: (R (B, m, m), b̃ (B, m)) ↦ (μ̃ (B, m), t* (B,)).
NormalisedRecovery = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _solve_dual(
    q: torch.Tensor,
    r: torch.Tensor,
    S: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    informative: torch.Tensor | None,
    solve: NormalisedDual,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every dual solver shares: the problem scaled to unit size (see :func:`solve_dual_layer`), solved by
    ``solve``, and scaled back, with the floors on λ and ν = 0 for constraints that are not informative."""
    if informative is None:
        informative = torch.ones_like(b, dtype=torch.bool)
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(b)
    floor = _floor(q.dtype)
    q_safe, delta_safe = q.clamp_min(floor), delta.clamp_min(torch.finfo(q.dtype).eps)
    rho, gram, b_scaled, scale = _normalised_terms(q, r, S, b, delta, informative)
    lam_scaled, nu_scaled = solve(rho, gram, b_scaled.clamp_max(math.sqrt(1 - _MIN_TRUST_SLACK)))
    lam = torch.sqrt(q_safe / (2 * delta_safe)) * lam_scaled
    nu = torch.sqrt(q_safe).unsqueeze(-1) / scale * nu_scaled
    return lam.clamp_min(floor), torch.where(informative, nu.clamp_min(0), torch.zeros_like(nu))


class LayerSolverError(RuntimeError):
    """A cvxpylayers layer's solver failed on a subproblem (diffcp's ``SolverError``: SCS reported it infeasible or
    stopped at its iteration limit without a usable solution); :func:`~sb3_metacpo.common.constrained_step.constrained_step`
    makes it a skipped update."""


def _call_layer(layer: CvxpyLayer, *args: torch.Tensor, solver_args: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``layer(*args, solver_args=solver_args)``, its solver's failure raised as :class:`LayerSolverError`."""
    from diffcp.cone_program import SolverError  # installed with cvxpylayers (its solver interface)

    try:
        return layer(*args, solver_args=solver_args)
    except SolverError as error:
        raise LayerSolverError(f"the cvxpylayers solver failed on a CPO subproblem: {error}") from error


def _layer_dual(
    rho: torch.Tensor, gram: torch.Tensor, b_scaled: torch.Tensor, solver_args: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised dual by :func:`cpo_dual_layer` (a :data:`NormalisedDual`)."""
    m = rho.shape[-1]
    full = torch.empty((*rho.shape[:-1], m + 1, m + 1), dtype=rho.dtype, device=rho.device)
    full[..., 0, 0] = 1
    full[..., 0, 1:] = -rho
    full[..., 1:, 0] = -rho
    full[..., 1:, 1:] = gram
    upper = _cholesky(full).transpose(-1, -2)
    args = _layer_args(solver_args, rho, gram, b_scaled)
    # diffcp works in float64; cast there and back (differentiably).
    lam_scaled, nu_scaled = _call_layer(cpo_dual_layer(m), upper.double(), b_scaled.double(), solver_args=args)
    return lam_scaled.to(rho.dtype).reshape(rho.shape[:-1]), nu_scaled.to(rho.dtype).reshape(rho.shape)


def solve_dual_cvxpylayers(
    q: torch.Tensor | float,
    r: torch.Tensor | float,
    s: torch.Tensor | float,
    b: torch.Tensor | float,
    delta: torch.Tensor | float,
    solver_args: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ*, ν*) of the one-constraint CPO dual from the layer, elementwise like :func:`solve_dual_analytic` (inputs
    broadcast together, any shape), which it matches to solver precision."""
    q, r, s, b, delta = _broadcast(q, r, s, b, delta)
    shape = q.shape
    flat = [value.reshape(-1) for value in (q, r, s, b, delta)]
    lam, nu = solve_dual_layer(
        flat[0], flat[1].unsqueeze(-1), flat[2].reshape(-1, 1, 1), flat[3].unsqueeze(-1), flat[4], None, solver_args
    )
    return lam.reshape(shape), nu.reshape(shape)


def solve_recovery_layer(
    S: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    informative: torch.Tensor | None = None,
    solver_args: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recovery program of :func:`cpo_recovery_layer` for a batch: coefficients μ (x = Σ_j μ_j w_j) and the
    optimal largest normalised violation t*, differentiable.

    :param S: a_jᵀH⁻¹a_k, shape (B, m, m)
    :param b: constraint values, shape (B, m)
    :param delta: trust-region sizes, shape (B,)
    :param informative: which constraints take part, shape (B, m) (default: all); the others get μ = 0
    :return: μ of shape (B, m), inside the trust region, and the largest normalised violation it attains, t* up to
        the solver's accuracy (:func:`_attained_recovery`), of shape (B,)
    :raises LayerSolverError: the solver failed
    """
    return _solve_recovery(S, b, delta, informative, functools.partial(_layer_recovery, solver_args=solver_args))


def _solve_recovery(
    S: torch.Tensor, b: torch.Tensor, delta: torch.Tensor, informative: torch.Tensor | None, solve: NormalisedRecovery
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every recovery solver shares: the program in normalised units (R, b̃), solved by ``solve``, and μ scaled
    back, 0 for constraints that are not informative."""
    if informative is None:
        informative = torch.ones_like(b, dtype=torch.bool)
    if b.shape[0] == 0:
        return torch.zeros_like(b), torch.zeros_like(delta)
    _, gram, b_scaled, scale = _normalised_terms(torch.ones_like(delta), torch.zeros_like(b), S, b, delta, informative)
    # The program is invariant to b̃ → b̃ − c·1 (t → t − c, μ̃ unchanged), so it is solved for b̃ less its largest entry.
    # Then t ≥ −1 (the largest constraint falls by at most 1 in the unit trust region, |(Rμ̃)_j| ≤ 1), so a constraint
    # below −3 can never bind (it stays below −2), and clamping it there changes nothing but the scale: the binding
    # ones lie in [−2, 0]. Unshifted, the exact solver's w − 1 (w ≈ b̃²) lost the trust region's 1 (a zero or twice too
    # long step from b̃ ≈ 5e3 in float32), and SCS failed from b̃ ≈ 1e13, or returned a step 1e8 times too long when
    # one violation was 1e154 above another. The shift is a constant of the autograd graph (μ̃'s derivative is the
    # same at every shift); a clamped constraint's derivative is 0, as a non-binding one's.
    shift = b_scaled.detach().amax(-1, keepdim=True)
    shifted = (b_scaled - shift).clamp_min(-3.0)
    mu_scaled, worst = _attained_recovery(gram, shifted, solve(gram, shifted)[0])
    worst = worst + shift.squeeze(-1)
    delta_safe = delta.clamp_min(torch.finfo(b.dtype).eps)
    mu = torch.sqrt(2 * delta_safe).unsqueeze(-1) / scale * mu_scaled
    return torch.where(informative, mu, torch.zeros_like(mu)), worst


def _attained_recovery(
    gram: torch.Tensor, b_shifted: torch.Tensor, mu_scaled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A recovery solver's μ̃ brought into the trust region of the exact R (μ̃ᵀRμ̃ ≤ 1), and the largest normalised
    violation t_μ that it attains there: the step and an upper bound of t* whatever the solver's accuracy, instead of
    the solver's own t. SCS's t could be loose or fall below t* (4e-6 below t* = −3e-7, which made a recovery case a
    dual step that violated a linearised constraint), and where R is singular with more constraints than parameters
    its μ̃ could lie far outside the trust region (μ̃ᵀRμ̃ ≈ 3·10⁷); its step can still be suboptimal there (a largest
    violation of 0.96 where t* = 0.70), which t_μ then reports. The exact solver's t is t_μ already."""
    with torch.no_grad():
        norm = torch.sqrt((mu_scaled * (gram @ mu_scaled.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0))
    inside = mu_scaled / norm.clamp_min(1).unsqueeze(-1)  # a constant scale: the derivative stays μ̃'s
    with torch.no_grad():
        attained = (b_shifted + (gram @ inside.unsqueeze(-1)).squeeze(-1)).amax(-1)
    return inside, attained


def _layer_recovery(
    gram: torch.Tensor, b_scaled: torch.Tensor, solver_args: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised recovery program by :func:`cpo_recovery_layer` (a :data:`NormalisedRecovery`)."""
    factor = _cholesky(gram)
    args = _layer_args(solver_args, gram, b_scaled)
    layer = cpo_recovery_layer(b_scaled.shape[-1])
    mu_scaled, worst = _call_layer(layer, gram.double(), factor.double(), b_scaled.double(), solver_args=args)
    return mu_scaled.to(b_scaled.dtype).reshape(b_scaled.shape), worst.to(b_scaled.dtype).reshape(b_scaled.shape[:-1])


#: Most constraints the exact active-set solvers take (:func:`solve_dual_active_set`, :func:`solve_recovery_active_set`
#: enumerate all 2^m supports, one batched Cholesky solve for all of them); ``dual_solver="auto"`` uses the convex
#: program above this.
MAX_ACTIVE_SET_CONSTRAINTS = 8

# The dual leaves out a support whose normalised Gram matrix has a Cholesky pivot below this (squared: 1 − cos² of
# the angle between a constraint's gradient and the span of the others, in the H⁻¹ metric): its constraints are
# collinear to about 1e-5 rad, and a smaller support (one of the collinear constraints) carries the solution. The
# recovery program cannot: with gradients whose convex hull holds 0 (a_2 = −a_1, both violated) its optimum is
# inside the trust region, on a singular support; it adds the layer's jitter (_CHOLESKY_JITTER) instead, which
# leaves that solution good to ~1e-5 (relative) and every other one unchanged to ~1e-11.
_MIN_SUPPORT_PIVOT_SQUARED = 1e-10


def _supports(m: int, device: torch.device | None) -> torch.Tensor:
    """Every subset of the m constraints as a boolean mask, shape (2^m, m); row 0 is the empty set."""
    codes = torch.arange(2**m, device=device)
    return (codes.unsqueeze(-1) >> torch.arange(m, device=device)) & 1 == 1


def _support_solves(
    gram: torch.Tensor, supports: torch.Tensor, *vectors: torch.Tensor, jitter: float = 0.0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(R_AA + jitter·I)⁻¹ v_A for every support A (zero outside A) and whether R_AA is well conditioned (every
    Cholesky pivot² above :data:`_MIN_SUPPORT_PIVOT_SQUARED`, or, with a jitter, the factorisation succeeded).

    :param gram: R, shape (B, m, m), unit diagonal
    :param supports: masks, shape (K, m)
    :param vectors: each of shape (B, m)
    :return: the solutions, each of shape (K, B, m), and a mask (K, B)
    """
    pair = (supports.unsqueeze(-1) & supports.unsqueeze(-2)).unsqueeze(1)  # (K, 1, m, m)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    matrices = torch.where(pair, gram.unsqueeze(0) + jitter * eye, eye)  # R_AA, the identity outside A
    with torch.no_grad():
        factor, info = torch.linalg.cholesky_ex(matrices)
        pivots = torch.diagonal(factor, dim1=-2, dim2=-1)
        conditioned = (info == 0) & ((pivots**2 > _MIN_SUPPORT_PIVOT_SQUARED).all(-1) | (jitter > 0))
    # Ill-conditioned supports are solved with the identity in place of R_AA (finite values and gradients, never
    # selected); the others are factorised again, now differentiably.
    factor = torch.linalg.cholesky(torch.where(conditioned.unsqueeze(-1).unsqueeze(-1), matrices, eye))
    mask = supports.unsqueeze(1).to(gram.dtype)  # (K, 1, m)
    rhs = torch.stack([torch.broadcast_to(vector, gram.shape[:-1]).unsqueeze(0) * mask for vector in vectors], -1)
    solutions = torch.cholesky_solve(rhs, factor)
    return [solutions[..., i] * mask for i in range(len(vectors))], conditioned


def _pick(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the best-scoring valid candidate per problem (of all candidates where none is valid)."""
    score = score.detach()
    any_valid = valid.any(0, keepdim=True)
    return torch.where(valid | ~any_valid, score, torch.full_like(score, -torch.inf)).argmax(0)


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates[index[b], b, ...] for each problem b, differentiably (only the picked candidate gets gradients)."""
    shape = (1, *index.shape, *candidates.shape[2:])
    expanded = index.reshape(1, -1, *([1] * (candidates.dim() - 2))).expand(shape)
    return candidates.gather(0, expanded).squeeze(0)


def solve_dual_active_set(
    q: torch.Tensor,
    r: torch.Tensor,
    S: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    informative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ*, ν*) of the CPO dual with m constraints, exactly: the closed form on each support of ν, the best one kept.

    In the normalised problem of :func:`solve_dual_layer` (q = 1, δ = ½, unit-diagonal R, ρ, b̃) maximising over λ
    first gives λ = √Q(ν) with Q(ν) = 1 − 2ρᵀν + νᵀRν, and the dual becomes the concave g(ν) = −√Q(ν) + b̃ᵀν over
    ν ≥ 0. On a support A (ν_A > 0, the rest 0) its stationary point is ν_A = R_AA⁻¹(ρ_A + λb̃_A), and substituting
    it into λ² = Q(ν) gives λ² = (1 − ρ_AᵀR_AA⁻¹ρ_A)/(1 − b̃_AᵀR_AA⁻¹b̃_A): the m = 1 closed form (A/B of
    :func:`solve_dual_analytic`) on every face. Each of the 2^m candidates, projected onto ν ≥ 0, is a point of the
    dual, so g at it is a lower bound of the optimum, and the stationary point of the optimal support attains it:
    the candidate with ν_A ≥ 0 and the largest g is the solution (exact, up to rounding; no solver tolerance).
    The same floors as the closed form (trust slack at :data:`_MIN_TRUST_SLACK`, λ̃ ≥ √eps) and the same clamps of b̃
    as the layer, so that the three solve the same problem. Differentiable (autograd through the picked support's
    formula: the derivative of the solution while the active set does not change, as the layer's). Same arguments and
    return values as :func:`solve_dual_layer`; m ≤ :data:`MAX_ACTIVE_SET_CONSTRAINTS`.
    """
    return _solve_dual(q, r, S, b, delta, informative, _active_set_dual)


def _active_set_dual(rho: torch.Tensor, gram: torch.Tensor, b_scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised dual on every support, the best candidate kept (a :data:`NormalisedDual`; see
    :func:`solve_dual_active_set`)."""
    eps = torch.finfo(rho.dtype).eps
    supports = _supports(rho.shape[-1], rho.device)
    (alpha, beta), conditioned = _support_solves(gram, supports, rho, b_scaled)
    numerator = (1 - (rho * alpha).sum(-1)).clamp_min(0)  # ≥ 0 by Cauchy-Schwarz; clamp the rounding
    slack = (1 - (b_scaled * beta).sum(-1)).clamp_min(_MIN_TRUST_SLACK)
    lam = torch.sqrt(numerator / slack + eps)  # (K, B); the empty support gives 1, the unconstrained (TRPO) λ̃
    nu = alpha + lam.unsqueeze(-1) * beta  # (K, B, m), zero outside each support
    with torch.no_grad():
        point = nu.clamp_min(0)
        quadratic = 1 - 2 * (rho * point).sum(-1) + (point * (gram @ point.unsqueeze(-1)).squeeze(-1)).sum(-1)
        value = -torch.sqrt(quadratic.clamp_min(0)) + (b_scaled * point).sum(-1)
        nonnegative = (nu >= -1e-9 * (1 + nu.abs().amax(-1, keepdim=True))).all(-1)
        best = _pick(value, conditioned & nonnegative)
    return _take(lam, best), _take(nu, best).clamp_min(0) + 0.0  # + 0.0: an inactive constraint's -0.0 is 0.0


def solve_recovery_active_set(
    S: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    informative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recovery program of :func:`cpo_recovery_layer` exactly: the closed form on each set of binding
    constraints, the best one kept. Same arguments and return values as :func:`solve_recovery_layer`.

    Normalised (R unit-diagonal, b̃_j = b_j/√(2δs_j)): minimise t subject to b̃ + Rμ̃ ≤ t·1 and μ̃ᵀRμ̃ ≤ 1. Its KKT
    conditions give μ̃ = −y/κ with y ≥ 0, Σy = 1 the multipliers of the binding set A and κ that of the trust region;
    on A, b̃_A − R_AA y_A/κ = t·1, so y_A = κR_AA⁻¹(b̃_A − t·1), and μ̃ᵀRμ̃ = 1 with Σy = 1 leave the quadratic
    u t² − 2v t + w − 1 = 0 (u = 1ᵀR_AA⁻¹1, v = 1ᵀR_AA⁻¹b̃_A, w = b̃_AᵀR_AA⁻¹b̃_A), whose root with κ > 0 is
    t = (v − √(v² − u(w − 1)))/u (for m = 1: t = b̃ − 1, μ̃ = −1, the classic recovery step). Every candidate,
    shrunk into the trust region if it is outside, is a feasible point, its largest violation an upper bound of t*,
    and the optimal binding set attains it: the candidate with y_A ≥ 0 and the smallest largest violation is the
    solution. m ≤ :data:`MAX_ACTIVE_SET_CONSTRAINTS`.
    """
    return _solve_recovery(S, b, delta, informative, _active_set_recovery)


def _active_set_recovery(gram: torch.Tensor, b_scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised recovery program on every binding set, the best candidate kept (a :data:`NormalisedRecovery`;
    see :func:`solve_recovery_active_set`)."""
    floor = _floor(b_scaled.dtype)
    supports = _supports(b_scaled.shape[-1], b_scaled.device)[1:]  # a binding set is never empty (Σy = 1)
    ones = torch.ones_like(b_scaled)
    (gamma, beta), conditioned = _support_solves(gram, supports, ones, b_scaled, jitter=_CHOLESKY_JITTER)
    mask = supports.unsqueeze(1).to(b_scaled.dtype)
    u = (gamma * mask).sum(-1)  # ≥ 1 for a non-empty support
    v = (beta * mask).sum(-1)
    w = (b_scaled * beta).sum(-1)
    worst = (v - torch.sqrt((v * v - u * (w - 1)).clamp_min(0) + floor)) / u
    mu = -(beta - worst.unsqueeze(-1) * gamma)  # (K, B, m): −y/κ, zero outside each support
    with torch.no_grad():
        norm = torch.sqrt((mu * (gram @ mu.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0))
        point = mu / norm.clamp_min(1).unsqueeze(-1)
        violation = (b_scaled + (gram @ point.unsqueeze(-1)).squeeze(-1)).amax(-1)
        nonnegative = (mu <= 1e-9 * (1 + mu.abs().amax(-1, keepdim=True))).all(-1)
        best = _pick(-violation, conditioned & nonnegative)
    return _take(mu, best), _take(violation, best)


@dataclass(frozen=True)
class SubproblemSolution:
    """The solution of the CPO subproblem (:func:`cpo_direction`); tensors have the batch shape, plus n for ``x`` and
    m for the per-constraint ones.

    :ivar x: the step (apply θ + fraction·x after the line search)
    :ivar case: ``"trpo"``, ``"recovery"`` or ``"dual"``; a tuple of them for a batch
    :ivar lam: trust-region multiplier λ: λ* in the dual case, √(q/2δ) for TRPO; in recovery, 1/(−Σ_j μ_j) for the
        step x = Σ_j μ_j w_j (√(s/2δ) for m = 1, the classic recovery step's): a scale of that step in the constraints'
        own units, not a multiplier of the recovery program (it changes when a constraint is rescaled, x does not)
    :ivar nu: constraint multipliers ν (0 outside the dual case and for constraints that are not informative)
    :ivar expected_improvement: gᵀx, the predicted change of the reward surrogate
    :ivar expected_cost_changes: a_jᵀx, the predicted changes of the cost surrogates (0 where not informative)
    :ivar informative: which constraints entered the step (s_j > ``s_tol``)
    :ivar scale: √(2δs_j), the largest decrease of cost surrogate j the trust region allows (the units of the
        recovery program and of the line search's recovery test)
    """

    x: torch.Tensor
    case: str | tuple[str, ...]
    lam: torch.Tensor
    nu: torch.Tensor
    expected_improvement: torch.Tensor
    expected_cost_changes: torch.Tensor
    informative: torch.Tensor
    scale: torch.Tensor


def cpo_direction(
    v: torch.Tensor,
    W: torch.Tensor | None,
    q: torch.Tensor | float,
    r: torch.Tensor | None,
    S: torch.Tensor | None,
    b: torch.Tensor | None,
    delta: torch.Tensor | float,
    *,
    solver: str = "analytic",
    s_tol: float | torch.Tensor = 1e-8,
    solver_args: Mapping[str, Any] | None = None,
    recovery_margin: torch.Tensor | float | None = None,
) -> SubproblemSolution:
    """Pick the CPO case and return the step x, differentiable in v, W, q, r, S, b and δ.

    One problem (v of shape (n,), W (m, n), q scalar, r (m,), S (m, m), b (m,)) or a batch of B (a leading
    dimension B on each). ``W = r = S = b = None``, or m = 0, is the unconstrained (TRPO) problem. The dual is solved
    only for the problems in the ``"dual"`` case, all in one call of the chosen solver; for m ≥ 2 the recovery
    program is solved for every problem that is neither TRPO nor trivially infeasible, to tell the two other cases
    apart.

    :param v: H⁻¹g
    :param W: the rows H⁻¹a_j
    :param q: gᵀH⁻¹g
    :param r: gᵀH⁻¹a_j
    :param S: a_jᵀH⁻¹a_k
    :param b: constraint values J_Cj − limit_j, in the units of the cost surrogates (> 0: violated)
    :param delta: trust-region size (½ xᵀHx ≤ δ)
    :param solver: ``"analytic"`` (exact, m ≤ :data:`MAX_ACTIVE_SET_CONSTRAINTS`: the closed form for m = 1, about
        0.15 ms forward, 0.6 ms forward+backward, whatever B; the closed form on each support for m ≥ 2, recovery
        program included, about 2.5 ms per call of 1 or 4 dual-case problems with m = 2 or 3, 5-11 ms for 200 with
        m = 2 to 4) or ``"cvxpylayers"`` (the convex programs of :func:`solve_dual_layer` and
        :func:`solve_recovery_layer`: about 1 ms forward, 3 ms forward+backward for one problem with m = 1; 5-9 ms
        per call of 1 or 4 with m = 2 or 3, 0.2-0.4 s for 200 with m = 2 to 4; CPU seconds, float64)
    :param s_tol: s_j ≤ s_tol counts as no information on constraint j (a_j numerically zero): a step
        along a numerically zero w_j would be noise. s has the units of a²/H, i.e. of the cost squared: a number for
        every constraint, or one per constraint (shape (m,)), e.g. scaled by each cost's size
        (:func:`~sb3_metacpo.common.constrained_step.constrained_step`'s ``cost_scales``).
    :param solver_args: options of the layers, replacing :data:`DEFAULT_LAYER_SOLVER_ARGS`
    :param recovery_margin: also take the recovery step whenever an informative constraint's value exceeds its
        margin, b_j > margin_j (shape (m,) or (B, m), or a number for all; 0: whenever a constraint is violated), not
        only when no point of the trust region satisfies the linearised constraints (CPO's rule, ``None``, the
        default). Starting far outside the feasible set, CPO's rule lets the dual step spend the trust region on the
        reward as soon as the linear model *claims* the limit is reachable; with noisy cost gradients that claim is
        optimistic (s = aᵀH⁻¹a is inflated by the noise), and the cost then falls much more slowly than predicted.
    """
    if solver not in DUAL_SOLVERS:
        raise ValueError(f"Unknown dual solver {solver!r}; expected one of {DUAL_SOLVERS}")
    threshold = torch.as_tensor(s_tol, dtype=torch.float64)
    if not bool((torch.isfinite(threshold) & (threshold >= 0)).all()):  # NaN dropped every constraint (s > NaN is False)
        raise ValueError(f"s_tol must be a finite number >= 0 (or one per constraint), got {s_tol}")
    constraint_terms = (W, r, S, b)
    if any(term is None for term in constraint_terms) and not all(term is None for term in constraint_terms):
        raise ValueError("W, r, S and b are required together (all None for a problem without constraints)")
    single = v.dim() == 1
    if single:
        v = v.unsqueeze(0)
    batch, n = v.shape
    dtype = v.dtype
    q, delta = (
        torch.as_tensor(value, dtype=dtype, device=v.device).expand(batch)
        if torch.as_tensor(value).dim() == 0
        else torch.as_tensor(value, dtype=dtype, device=v.device).reshape(batch)
        for value in (q, delta)
    )
    if W is None or r is None or S is None or b is None:
        W, r, S, b = v.new_zeros(batch, 0, n), v.new_zeros(batch, 0), v.new_zeros(batch, 0, 0), v.new_zeros(batch, 0)
    elif single:
        W, r, S, b = W.unsqueeze(0), r.unsqueeze(0), S.unsqueeze(0), b.unsqueeze(0)
    m = b.shape[-1]
    if W.shape != (batch, m, n) or r.shape != (batch, m) or S.shape != (batch, m, m):
        raise ValueError(
            f"inconsistent shapes: v {tuple(v.shape)}, W {tuple(W.shape)}, r {tuple(r.shape)}, S {tuple(S.shape)}, "
            f"b {tuple(b.shape)}"
        )
    # S = A·Wᵀ from conjugate gradient is symmetric only up to CG's accuracy: use its symmetric part (the layers'
    # Cholesky factorisations read one triangle, and their derivatives assume a symmetric perturbation).
    S = 0.5 * (S + S.transpose(-1, -2))
    if solver == "analytic" and m > MAX_ACTIVE_SET_CONSTRAINTS:
        raise ValueError(
            f"the exact solvers enumerate the 2^m supports of at most {MAX_ACTIVE_SET_CONSTRAINTS} constraints, got "
            f"{m}: use dual_solver='cvxpylayers' (or 'auto', which picks it for more constraints)"
        )
    exact = solver == "analytic"
    solve_dual = solve_dual_active_set if exact else functools.partial(solve_dual_layer, solver_args=solver_args)
    solve_recovery = solve_recovery_active_set if exact else functools.partial(solve_recovery_layer, solver_args=solver_args)
    floor = _floor(dtype)
    q_safe, delta_safe = q.clamp_min(floor), delta.clamp_min(torch.finfo(dtype).eps)
    s = torch.diagonal(S, dim1=-2, dim2=-1)
    s_safe = s.clamp_min(floor)
    scale = torch.sqrt(2 * delta_safe.unsqueeze(-1) * s_safe)

    informative = s > threshold.to(dtype=dtype, device=s.device)
    one_sided = b * b > 2 * delta.unsqueeze(-1) * s  # b²/s > 2δ written without the division (s may be 0)
    slack = ~informative | ((b < 0) & one_sided)
    trpo = slack.all(-1)
    forced = torch.zeros_like(one_sided)
    if recovery_margin is not None:
        margin = torch.as_tensor(recovery_margin, dtype=dtype, device=b.device)
        if not bool(torch.isfinite(margin).all()):  # NaN silently fell back to CPO's rule (b > NaN is False)
            raise ValueError(f"recovery_margin must be finite, got {recovery_margin}")
        try:
            forced = b > margin.expand_as(b)
        except RuntimeError as error:
            raise ValueError(
                f"recovery_margin of shape {tuple(margin.shape)} does not fit the {m} constraints (b {tuple(b.shape)})"
            ) from error
    if m == 1:  # infeasible as m ≥ 2 judges it (below): b̃ = b/√(2δs) > 1 − FEASIBILITY_MARGIN, so that a constraint
        # given twice, or beside an uninformative one, gets the same case and step
        one_sided = b * b > (1 - FEASIBILITY_MARGIN) ** 2 * 2 * delta.unsqueeze(-1) * s
    recovery = (informative & (b > 0) & (one_sided | forced)).any(-1)
    mu = torch.zeros_like(b)
    if m == 1:
        mu = torch.where(recovery.unsqueeze(-1), -torch.sqrt(2 * delta_safe.unsqueeze(-1) / s_safe), mu)
    else:
        undecided = ~trpo
        if bool(undecided.any()):
            mu_sub, worst = solve_recovery(S[undecided], b[undecided], delta[undecided], informative[undecided])
            mu = mu.index_put((undecided,), mu_sub)
            infeasible = torch.zeros_like(trpo).index_put((undecided,), worst.detach() > -FEASIBILITY_MARGIN)
            recovery = recovery | infeasible
    dual = ~trpo & ~recovery

    lam = torch.sqrt(q_safe / (2 * delta_safe))
    nu = torch.zeros_like(b)
    if bool(dual.any()):
        if solver == "analytic" and m == 1:
            # Other cases get a harmless stand-in problem: their (unused) solution would otherwise feed inf·0 = NaN
            # into the gradients of the whole batch (e.g. ν ~ b/s with s = 0).
            one, zero = torch.ones_like(q), torch.zeros_like(q)
            stand_ins = (one, zero, one, zero, one)
            terms = (q, r[:, 0], s[:, 0], b[:, 0], delta)
            lam_dual, nu_dual = solve_dual_analytic(
                *(torch.where(dual, x, stand_in) for x, stand_in in zip(terms, stand_ins, strict=True))
            )
            nu_dual = nu_dual.unsqueeze(-1)
        else:
            # Solve only the dual-case problems, then scatter them back (index_put is differentiable).
            lam_sub, nu_sub = solve_dual(q[dual], r[dual], S[dual], b[dual], delta[dual], informative[dual])
            lam_dual, nu_dual = lam.index_put((dual,), lam_sub), nu.index_put((dual,), nu_sub)
        lam = torch.where(dual, lam_dual, lam)
        nu = torch.where(dual.unsqueeze(-1), nu_dual, nu)

    # Recovery: x = Σ μ_j w_j; otherwise x = (v − Σ ν_j w_j)/λ (ν = 0 for TRPO).
    recovery_x = (mu.unsqueeze(-1) * W).sum(-2)
    dual_x = (v - (nu.unsqueeze(-1) * W).sum(-2)) / lam.unsqueeze(-1)
    x = torch.where(recovery.unsqueeze(-1), recovery_x, dual_x)
    # Recovery's λ (logged): 1/(−Σμ), √(s/2δ) for m = 1; with several constraints it depends on their units.
    lam = torch.where(recovery, 1 / (-mu.sum(-1)).clamp_min(floor), lam)
    expected_improvement = torch.where(recovery, (mu * r).sum(-1), (q - (nu * r).sum(-1)) / lam)
    recovery_changes = (S @ mu.unsqueeze(-1)).squeeze(-1)
    dual_changes = (r - (S @ nu.unsqueeze(-1)).squeeze(-1)) / lam.unsqueeze(-1)
    changes = torch.where(recovery.unsqueeze(-1), recovery_changes, dual_changes)
    changes = torch.where(informative, changes, torch.zeros_like(changes))
    cases = tuple(CPO_CASES[code] for code in torch.where(trpo, 0, torch.where(recovery, 1, 2)).tolist())
    if single:
        return SubproblemSolution(x[0], cases[0], lam[0], nu[0], expected_improvement[0], changes[0], informative[0], scale[0])
    return SubproblemSolution(x, cases, lam, nu, expected_improvement, changes, informative, scale)
