"""The CPO step: conjugate gradient, Fisher-vector products, the dual of the CPO subproblem, the step and its line search.

Convention (used everywhere in this package): the trust region is ``½ xᵀHx ≤ δ``. The subproblem is

    maximise gᵀx  subject to  ½ xᵀHx ≤ δ  and  b + aᵀx ≤ 0,

with g, a the gradients of the reward and cost surrogates, H the (damped) Fisher matrix and b = J_C − limit, the
current constraint value in the units of the cost surrogate (b > 0: the constraint is violated now). With
v = H⁻¹g, w = H⁻¹a, q = gᵀv, r = gᵀw and s = aᵀw its dual is

    maximise over λ > 0, ν ≥ 0 of  −(q − 2rν + sν²)/(2λ) + νb − λδ,     and the step is  x* = (v − ν*w)/λ*.

Each step falls in one of three cases, named as logged (``train/cpo_case``):

* ``"trpo"``: no cost information (``has_cost=False`` or s ≤ ``s_tol``), or the whole trust region satisfies the
  linearised constraint (b < 0 and b²/s > 2δ): x = √(2δ/q)·v, λ = √(q/2δ), ν = 0.
* ``"recovery"``: no point of the trust region satisfies it (b > 0 and b²/s > 2δ): x = −√(2δ/s)·w, the step that
  decreases the cost surrogate most.
* ``"dual"``: otherwise; the dual is solved by :func:`solve_dual_analytic` or :func:`solve_dual_cvxpylayers`.

All functions are plain torch and differentiable (the second-order meta-gradient goes through CG, the Fisher-vector
products and the dual solution). On finite inputs the dual solvers and :func:`cpo_direction` neither raise nor return
NaN/inf (nor does :func:`cpo_direction` give NaN/inf gradients); the small floors that guarantee this are documented
where they are applied.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cvxpylayers.torch import CvxpyLayer

TRPO, RECOVERY, DUAL = "trpo", "recovery", "dual"
CPO_CASES = (TRPO, RECOVERY, DUAL)
DUAL_SOLVERS = ("analytic", "cvxpylayers")

#: Options of the cvxpylayers dual layer (passed to diffcp): SCS with its built-in QDLDL factorisation (the MKL one,
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

# Added to 1 − ρ² (ρ = r/√(qs), the normalised cost-reward correlation) before the square root that fills the
# Cholesky factor passed to the layer: it keeps the factor and its derivative finite when g ∥ a (ρ = ±1). It
# perturbs s by a relative 1e-11, below the solver's accuracy. When g ∥ a (same direction) λ* → 0 and the step
# x = (v − νw)/λ amplifies both this bias and the solver error: the layer's step is then good to ~1e-4 only.
_CHOLESKY_JITTER = 1e-11

# Floor of B/2δ = 1 − b²/(2sδ), the share of the trust region the linearised constraint leaves. B → 0 means the
# feasible set shrinks to a point and λ → ∞; the floor caps λ at about 1e4·√(q/2δ), which moves x by about 1e-4 of
# its size in that degenerate case only. Shared by both dual solvers so that they solve the same problem.
_MIN_TRUST_SLACK = 1e-8


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


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    n_iters: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Approximately solve H x = b for a symmetric positive definite H known only through ``matvec(p) = H p``.

    Only out-of-place operations are used, so if ``matvec`` and ``b`` carry autograd graphs the unrolled iterations
    are differentiable (as needed for the second-order meta-gradient). Stops early once the squared residual norm
    falls below ``residual_tol``, or if the curvature pᵀHp is not positive (H not positive definite numerically);
    both checks read detached values, so they only decide how many iterations are unrolled. The derivative of the
    unrolled iterations converges more slowly than x itself: for meta-gradients, give it a few iterations beyond
    the convergence of x (a tight ``residual_tol``).

    :param matvec: the product with H (1-D tensor to 1-D tensor)
    :param b: the right-hand side (1-D)
    :param n_iters: maximum number of iterations
    :param residual_tol: tolerance on the squared residual norm ‖b − Hx‖²
    :return: x, the same shape as ``b`` (zeros if ``b`` is zero)
    """
    x = torch.zeros_like(b)
    residual = b
    direction = b
    residual_sq = residual @ residual
    # The backward pass divides by squared residuals, which must not underflow: whatever residual_tol says, stop at
    # ‖r‖²/‖b‖² = tiny^⅓ (3e-103 in float64, 2e-13 in float32), past the convergence of x and of its derivative.
    stop_at = max(residual_tol, torch.finfo(b.dtype).tiny ** (1 / 3) * residual_sq.item())
    for _ in range(n_iters):
        if not residual_sq.item() > stop_at:
            break
        h_direction = matvec(direction)
        curvature = direction @ h_direction
        if not curvature.item() > 0:
            break
        step = residual_sq / curvature
        x = x + step * direction
        residual = residual - step * h_direction
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def flat_grad(
    output: torch.Tensor,
    params: Sequence[torch.Tensor],
    create_graph: bool = False,
    retain_graph: bool | None = None,
    grad_outputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of a scalar ``output`` w.r.t. ``params`` (or, with ``grad_outputs``, the vector-Jacobian product
    ``grad_outputsᵀ ∂output/∂params``), flattened and concatenated; zeros for params that do not influence it."""
    grads = torch.autograd.grad(
        output, params, grad_outputs, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return torch.cat(
        [(torch.zeros_like(param) if grad is None else grad).reshape(-1) for param, grad in zip(params, grads, strict=False)]
    )


def fisher_vector_product_fn(
    kl: torch.Tensor,
    params: Sequence[torch.Tensor],
    damping: float,
    create_graph: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map v ↦ (H + damping·I) v, where H is the Hessian of ``kl`` w.r.t. ``params`` (double backward).

    ``kl`` is the mean KL between a detached copy of the current distribution and the current one (a function of
    ``params``): its value and gradient are 0 and its Hessian is the Fisher information matrix. The first-order
    gradient graph is built once here; each call then costs one more backward pass and can be repeated.

    Hv is the vector-Jacobian product of ∇kl with v as ``grad_outputs``, not the gradient of ∇kl·v: when v itself
    depends on ``params`` (the CG iterates do, under ``create_graph=True``) the latter would also differentiate
    through v, at a cost growing with every CG iteration and with a wrong second-order term.

    :param kl: scalar mean KL
    :param params: the tensors H is taken with respect to (flattened and concatenated in this order)
    :param damping: added multiple of the identity (keeps CG well conditioned)
    :param create_graph: keep the graph of each product, differentiable w.r.t. ``params`` and ``v`` (to
        differentiate through CG)
    """
    params = list(params)
    kl_grad = flat_grad(kl, params, create_graph=True)

    def fisher_vector_product(vector: torch.Tensor) -> torch.Tensor:
        hessian_vector = flat_grad(kl_grad, params, create_graph=create_graph, retain_graph=True, grad_outputs=vector)
        return hessian_vector + damping * vector

    return fisher_vector_product


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

    b_pos, b_neg = b > 0, b < 0
    endpoint = -r / torch.where(b_pos | b_neg, b, torch.ones_like(b))  # −r/b (unused when b = 0)
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


@functools.cache
def cpo_dual_layer() -> CvxpyLayer:
    """The CPO dual as a ``cvxpylayers`` layer, built once per process (cvxpy is imported here, lazily).

    Variables λ, ν ≥ 0; parameters U (2×2, upper Cholesky factor of [[q, −r], [−r, s]]), b and δ ≥ 0; objective
    maximise −½ quad_over_lin(U[:, 0] + U[:, 1]·ν, λ) + bν − δλ, which equals the dual because
    ‖U[1, ν]ᵀ‖² = q − 2rν + sν². Written this way the problem is DPP (the literal expression is not even DCP).
    Call as ``layer(U, b, delta, solver_args=...)``; returns (λ, ν).
    """
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    lam, nu = cp.Variable(nonneg=True), cp.Variable(nonneg=True)
    factor, b, delta = cp.Parameter((2, 2)), cp.Parameter(), cp.Parameter(nonneg=True)
    objective = cp.Maximize(-0.5 * cp.quad_over_lin(factor[:, 0] + factor[:, 1] * nu, lam) + b * nu - delta * lam)
    return CvxpyLayer(cp.Problem(objective), parameters=[factor, b, delta], variables=[lam, nu])


def solve_dual_cvxpylayers(
    q: torch.Tensor | float,
    r: torch.Tensor | float,
    s: torch.Tensor | float,
    b: torch.Tensor | float,
    delta: torch.Tensor | float,
    solver_args: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ*, ν*) of the CPO dual from :func:`cpo_dual_layer`: one layer call for all problems, differentiable.

    The problem is first scaled to unit size, λ = √(q/2δ)·λ̃ and ν = √(q/s)·ν̃, which leaves the dual with q̃ = s̃ = 1,
    r̃ = ρ = r/√(qs), b̃ = b/√(2sδ), δ̃ = ½ (up to a positive factor of the objective). Solver tolerances are then
    relative to the problem's own scale, whatever the magnitudes of q, s, b, δ. Same cases and floors as
    :func:`solve_dual_analytic`, which it matches to solver precision.

    :param solver_args: diffcp/solver options replacing :data:`DEFAULT_LAYER_SOLVER_ARGS`
    :return: (λ, ν), each of the broadcast shape of the inputs (any shape; flattened into one batch)
    """
    q, r, s, b, delta = _broadcast(q, r, s, b, delta)
    shape, dtype = q.shape, q.dtype
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(q)
    floor = _floor(dtype)
    q_safe, s_safe, delta_safe = _safe_terms(q, s, delta)
    # |ρ| ≤ 1 by Cauchy-Schwarz; clamp the rounding so that 1 − ρ² ≥ 0.
    rho = (r / torch.sqrt(q_safe * s_safe)).clamp(-1, 1).reshape(-1)
    # b̃² = b²/(2sδ), so the dual case is −1 < b̃ ≤ 1. Clamping keeps every problem bounded and well scaled without
    # changing a meaningful solution: any b̃ ≤ −1 gives ν = 0, λ̃ = 1 (TRPO), and the upper clamp is the same floor
    # B/2δ = 1 − b̃² ≥ _MIN_TRUST_SLACK as in the closed form (b̃ > 1, infeasible, is the recovery case).
    b_scaled = (b / torch.sqrt(2 * s_safe * delta_safe)).clamp(-2, math.sqrt(1 - _MIN_TRUST_SLACK)).reshape(-1)
    factor = torch.stack(
        [
            torch.stack([torch.ones_like(rho), -rho], dim=-1),
            torch.stack([torch.zeros_like(rho), torch.sqrt(1 - rho * rho + _CHOLESKY_JITTER)], dim=-1),
        ],
        dim=-2,
    )
    # The layer's own test for whether it differentiates, which decides which options diffcp accepts.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, r, s, b, delta))
    base_args = DEFAULT_LAYER_SOLVER_ARGS if solver_args is None else solver_args
    args = {**(_LAYER_DERIVATIVE_ARGS if needs_grad else {}), **base_args}
    # diffcp works in float64; cast there and back (differentiably).
    lam_scaled, nu_scaled = cpo_dual_layer()(
        factor.double(), b_scaled.double(), torch.full_like(b_scaled, 0.5, dtype=torch.float64), solver_args=args
    )
    lam = torch.sqrt(q_safe / (2 * delta_safe)) * lam_scaled.to(dtype).reshape(shape)
    nu = torch.sqrt(q_safe / s_safe) * nu_scaled.to(dtype).reshape(shape)
    return lam.clamp_min(floor), nu.clamp_min(0)


@dataclass(frozen=True)
class CPOStepResult:
    """The CPO step of :func:`cpo_direction` (tensors have the batch shape of q, plus n for ``x``).

    :ivar x: the step (apply θ + fraction·x after the line search)
    :ivar case: ``"trpo"``, ``"recovery"`` or ``"dual"``; a tuple of them for a batch
    :ivar lam: trust-region multiplier λ: λ* in the dual case, √(q/2δ) for TRPO, √(s/2δ) for recovery (the
        multiplier of min aᵀx over the trust region)
    :ivar nu: constraint multiplier ν (0 outside the dual case)
    :ivar expected_improvement: gᵀx, the predicted change of the reward surrogate
    :ivar expected_cost_change: aᵀx, the predicted change of the cost surrogate (0 without cost information)
    :ivar cost_informative: whether the cost entered the step (False if ``has_cost=False`` or s ≤ ``s_tol``); where
        it is False, pass ``b=None`` to :func:`backtracking_line_search` to skip its cost check
    """

    x: torch.Tensor
    case: str | tuple[str, ...]
    lam: torch.Tensor
    nu: torch.Tensor
    expected_improvement: torch.Tensor
    expected_cost_change: torch.Tensor
    cost_informative: torch.Tensor


def cpo_direction(
    v: torch.Tensor,
    w: torch.Tensor | None,
    q: torch.Tensor,
    r: torch.Tensor | float | None,
    s: torch.Tensor | float | None,
    b: torch.Tensor | float | None,
    delta: torch.Tensor | float,
    solver: str = "analytic",
    has_cost: bool = True,
    s_tol: float = 1e-8,
    solver_args: Mapping[str, Any] | None = None,
) -> CPOStepResult:
    """Pick the CPO case and return the step x, differentiable in v, w, q, r, s, b and δ.

    One problem (v, w of shape (n,), q, r, s, b scalars) or a batch of B (v, w of shape (B, n), q, r, s, b of shape
    (B,)). The dual is solved only for the problems in the ``"dual"`` case, all in one call of the chosen solver.

    :param v: H⁻¹g
    :param w: H⁻¹a (may be None when ``has_cost=False``, as may r, s, b)
    :param q: gᵀH⁻¹g
    :param r: gᵀH⁻¹a
    :param s: aᵀH⁻¹a
    :param b: constraint value J_C − limit, in the units of the cost surrogate (> 0: violated)
    :param delta: trust-region size (½ xᵀHx ≤ δ)
    :param solver: ``"analytic"`` (the closed form: about 0.15 ms forward, 0.6 ms forward+backward, whatever B) or
        ``"cvxpylayers"`` (the convex program of :func:`solve_dual_cvxpylayers`: about 1 ms forward, 3 ms
        forward+backward for one problem, 11 ms for a batch of 8; medians on 2 shared CPU cores, float64)
    :param has_cost: False to ignore the cost entirely (plain TRPO step)
    :param s_tol: s ≤ s_tol counts as no cost information (a ≈ 0, e.g. no cost in the batch): a recovery step along
        a numerically zero w would be noise. s has the units of a²/H; adjust if the cost surrogate is scaled.
    :param solver_args: options of the ``"cvxpylayers"`` solver, replacing :data:`DEFAULT_LAYER_SOLVER_ARGS`
    """
    if solver not in DUAL_SOLVERS:
        raise ValueError(f"Unknown dual solver {solver!r}; expected one of {DUAL_SOLVERS}")
    if has_cost and (w is None or r is None or s is None or b is None):
        raise ValueError("w, r, s and b are required when has_cost=True")
    if w is None or r is None or s is None or b is None:
        w, r, s, b = torch.zeros_like(v), 0.0, 0.0, 0.0
    q, r, s, b, delta = _broadcast(q, r, s, b, delta)
    if q.dim() > 1:
        raise ValueError(f"q, r, s, b must be scalars or 1-D batches, got shape {tuple(q.shape)}")
    single = q.dim() == 0
    if single:  # work on a batch of one
        v, w, q, r, s, b, delta = (x.unsqueeze(0) for x in (v, w, q, r, s, b, delta))
    q_safe, s_safe, delta_safe = _safe_terms(q, s, delta)

    informative = (s > s_tol) & has_cost
    # b²/s > 2δ written without the division (s may be 0).
    region_one_sided = b * b > 2 * delta * s
    trpo = ~informative | ((b < 0) & region_one_sided)
    recovery = informative & (b > 0) & region_one_sided
    dual = ~trpo & ~recovery

    lam = torch.where(recovery, torch.sqrt(s_safe / (2 * delta_safe)), torch.sqrt(q_safe / (2 * delta_safe)))
    nu = torch.zeros_like(q)
    if bool(dual.any()):
        if solver == "analytic":
            # Other cases get a harmless stand-in problem: their (unused) solution would otherwise feed inf·0 = NaN
            # into the gradients of the whole batch (e.g. ν ~ b/s with s = 0).
            one, zero = torch.ones_like(q), torch.zeros_like(q)
            stand_ins = (one, zero, one, zero, one)
            lam_dual, nu_dual = solve_dual_analytic(
                *(torch.where(dual, x, stand_in) for x, stand_in in zip((q, r, s, b, delta), stand_ins, strict=False))
            )
        else:
            # Solve only the dual-case problems, then scatter them back (index_put is differentiable).
            lam_sub, nu_sub = solve_dual_cvxpylayers(q[dual], r[dual], s[dual], b[dual], delta[dual], solver_args)
            lam_dual = lam.index_put((dual,), lam_sub)
            nu_dual = nu.index_put((dual,), nu_sub)
        lam = torch.where(dual, lam_dual, lam)
        nu = torch.where(dual, nu_dual, nu)

    # Recovery: x = −w/λ with λ = √(s/2δ); otherwise x = (v − νw)/λ (ν = 0 for TRPO).
    x = torch.where(recovery.unsqueeze(-1), -w / lam.unsqueeze(-1), (v - nu.unsqueeze(-1) * w) / lam.unsqueeze(-1))
    expected_improvement = torch.where(recovery, -r, q - nu * r) / lam
    expected_cost_change = torch.where(informative, torch.where(recovery, -s, r - nu * s) / lam, torch.zeros_like(q))
    cases = tuple(CPO_CASES[code] for code in torch.where(trpo, 0, torch.where(recovery, 1, 2)).tolist())
    if single:
        return CPOStepResult(x[0], cases[0], lam[0], nu[0], expected_improvement[0], expected_cost_change[0], informative[0])
    return CPOStepResult(x, cases, lam, nu, expected_improvement, expected_cost_change, informative)


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of :func:`backtracking_line_search` (improvements and KL at the accepted fraction, else 0)."""

    fraction: float
    accepted: bool
    n_backtracks: int
    kl: float
    reward_improvement: float
    cost_change: float


def backtracking_line_search(
    evaluate: Callable[[float], tuple[torch.Tensor | float, torch.Tensor | float, torch.Tensor | float]],
    old_reward: float,
    old_cost: float,
    case: str,
    b: float | torch.Tensor | None,
    max_kl: float,
    max_backtracks: int = 10,
    backtrack_coeff: float = 0.8,
) -> LineSearchResult:
    """Accept the first fraction βʲ (j = 0, …, ``max_backtracks``) of the step that passes every check.

    Checks at θ + βʲx: the values are finite; mean KL ≤ ``max_kl``; the reward surrogate strictly improves, except
    while the constraint is violated (the ``"recovery"`` case, or b > 0), where the cost surrogate must strictly
    decrease instead (a step back into the feasible set may have to give up reward; demanding a reward gain there
    rejects every fraction and leaves the policy stuck above the limit); and, when ``b`` is given, the cost
    surrogate change stays inside the linearised bound: new − old ≤ max(−b, 0). If nothing passes, the fraction is 0.

    ``evaluate`` is run under ``torch.no_grad()``. It may leave the parameters anywhere: the caller sets
    θ + fraction·x afterwards.

    :param evaluate: fraction ↦ (mean KL, reward surrogate, cost surrogate) at θ + fraction·x
    :param old_reward: reward surrogate at fraction 0
    :param old_cost: cost surrogate at fraction 0
    :param case: the CPO case of the step (see :data:`CPO_CASES`)
    :param b: constraint value J_C − limit; None when there is no cost information (skips the cost check)
    :param max_kl: KL bound (δ)
    :param max_backtracks: number of times the fraction may shrink (at most ``max_backtracks + 1`` evaluations)
    :param backtrack_coeff: β in (0, 1)
    """
    if case not in CPO_CASES:
        raise ValueError(f"Unknown CPO case {case!r}; expected one of {CPO_CASES}")
    if not 0 < backtrack_coeff < 1:
        raise ValueError(f"backtrack_coeff must be in (0, 1), got {backtrack_coeff}")
    if max_backtracks < 0:
        raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}")
    cost_bound = None if b is None else max(-float(b), 0.0)
    restore_feasibility = case == RECOVERY or (b is not None and float(b) > 0)
    with torch.no_grad():
        for n_backtracks in range(max_backtracks + 1):
            fraction = backtrack_coeff**n_backtracks
            kl, reward, cost = (float(value) for value in evaluate(fraction))
            reward_improvement, cost_change = reward - float(old_reward), cost - float(old_cost)
            accepted = (
                all(math.isfinite(value) for value in (kl, reward_improvement, cost_change))
                and kl <= max_kl
                and (cost_change < 0 if restore_feasibility else reward_improvement > 0)
                and (cost_bound is None or cost_change <= cost_bound)
            )
            if accepted:
                return LineSearchResult(fraction, True, n_backtracks, kl, reward_improvement, cost_change)
    return LineSearchResult(0.0, False, max_backtracks, 0.0, 0.0, 0.0)
