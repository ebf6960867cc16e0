"""The CPO step numerics with one constraint against independent oracles: direct solves, explicit Hessians, cvxpy
on the primal problem, the KKT conditions and finite differences. Everything in float64 with fixed seeds.

The one-constraint problem goes through the m-constraint code (:func:`cpo_direction` with m = 1) via the small
adapters below; ``tests/test_several_constraints.py`` covers m = 2, 3."""

import math
from types import SimpleNamespace

import cvxpy as cp
import numpy as np
import pytest
import torch

from sb3_metacpo.common.conjugate_gradient import conjugate_gradient, fisher_vector_product_fn, flat_grad
from sb3_metacpo.common.constrained_step import LineSearch, StepConfig
from sb3_metacpo.common.constrained_step import backtracking_line_search as line_search_m
from sb3_metacpo.common.cpo_subproblem import CPO_CASES, solve_dual_analytic, solve_dual_cvxpylayers
from sb3_metacpo.common.cpo_subproblem import cpo_direction as cpo_direction_m

# cvxpylayers 1.2 + numpy 2.3 warn from inside the library on every call (harmless).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

DTYPE = torch.float64
SOLVERS = ("analytic", "cvxpylayers")


def cpo_direction(v, w, q, r, s, b, delta, solver="analytic", has_cost=True):
    """The one-constraint problem (w, r, s, b scalars or 1-D batches) through the m-constraint solver, with its
    per-constraint results as scalars."""
    if not has_cost or w is None:
        result = cpo_direction_m(v, None, q, None, None, None, delta, solver=solver)
        zeros = torch.zeros_like(result.lam)
        return SimpleNamespace(
            x=result.x,
            case=result.case,
            lam=result.lam,
            nu=zeros,
            expected_improvement=result.expected_improvement,
            expected_cost_change=zeros,
            cost_informative=torch.zeros_like(result.lam, dtype=torch.bool),
        )
    r, s, b = (torch.as_tensor(value, dtype=DTYPE) for value in (r, s, b))
    result = cpo_direction_m(
        v, w.unsqueeze(-2), q, r.unsqueeze(-1), s.reshape(*s.shape, 1, 1), b.unsqueeze(-1), delta, solver=solver
    )
    return SimpleNamespace(
        x=result.x,
        case=result.case,
        lam=result.lam,
        nu=result.nu[..., 0],
        expected_improvement=result.expected_improvement,
        expected_cost_change=result.expected_cost_changes[..., 0],
        cost_informative=result.informative[..., 0],
    )


def backtracking_line_search(evaluate, old_reward, old_cost, case, b, max_kl, max_backtracks=10, backtrack_coeff=0.8):
    """The one-constraint line search: ``evaluate(fraction) -> (kl, reward, cost)``, b None without cost information."""
    config = StepConfig(target_kl=max_kl, line_search_max_iter=max_backtracks, line_search_shrinking_factor=backtrack_coeff)

    def evaluate_step(step):
        kl, reward, cost = evaluate(float(step[0]))
        return kl, reward, [cost]

    constraints = () if b is None else (float(b),)
    m = len(constraints)
    outcome = line_search_m(
        LineSearch(evaluate_step, old_reward, [old_cost]),
        torch.ones(1, dtype=DTYPE),
        case,
        constraints,
        (1.0,) * m,
        (True,) * m,
        config,
    )
    return SimpleNamespace(
        fraction=outcome.fraction,
        accepted=outcome.accepted,
        n_backtracks=outcome.n_backtracks,
        kl=outcome.kl,
        reward_improvement=outcome.reward_improvement,
        cost_change=outcome.cost_changes[0] if m else 0.0,
    )


def t(value):
    return torch.as_tensor(value, dtype=DTYPE)


def random_spd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return m @ m.T + 0.5 * torch.eye(n, dtype=DTYPE)


def central_difference(fn, x, h=1e-6):
    """Gradient of the scalar fn at the tensor x by central differences, entry by entry."""
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[i] = h
        step = step.view_as(x)
        flat[i] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


def random_dual_instances(count, seed, n=5):
    """Dual-case problems of assorted scales, with b of both signs; returns (q, r, s, b, delta) stacked."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        h = random_spd(n, int(torch.randint(0, 2**31, (1,), generator=gen)))
        g = torch.randn(n, generator=gen, dtype=DTYPE) * 10 ** (4 * torch.rand(1, generator=gen, dtype=DTYPE) - 2)
        a = torch.randn(n, generator=gen, dtype=DTYPE) * 10 ** (4 * torch.rand(1, generator=gen, dtype=DTYPE) - 2)
        v, w = torch.linalg.solve(h, g), torch.linalg.solve(h, a)
        delta = 10 ** (3 * torch.rand((), generator=gen, dtype=DTYPE) - 3)
        s = a @ w
        b = (1.98 * torch.rand((), generator=gen, dtype=DTYPE) - 0.99) * torch.sqrt(2 * delta * s)
        rows.append((g @ v, g @ w, s, b, delta))
    return [torch.stack(column) for column in zip(*rows, strict=False)]


# ------------------------------------------------------------------------------------------- conjugate gradient


def test_conjugate_gradient_matches_direct_solve():
    h = random_spd(8, seed=1)
    rhs = torch.randn(8, dtype=DTYPE)
    x = conjugate_gradient(lambda p: h @ p, rhs, n_iters=30, residual_tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(h, rhs), rtol=1e-9, atol=1e-10)


def test_conjugate_gradient_zero_rhs_and_early_stop():
    h = random_spd(4, seed=2)
    calls = []

    def matvec(p):
        calls.append(1)
        return h @ p

    assert torch.equal(conjugate_gradient(matvec, torch.zeros(4, dtype=DTYPE)), torch.zeros(4, dtype=DTYPE))
    assert not calls
    # With an exact-arithmetic solve after n = 4 iterations the residual is ~0: at most 4 (+1 rounding) products.
    conjugate_gradient(matvec, torch.randn(4, dtype=DTYPE), n_iters=50, residual_tol=1e-20)
    assert 4 <= len(calls) <= 5


def test_conjugate_gradient_is_differentiable():
    n = 5
    m0 = torch.randn(n, n, dtype=DTYPE)
    rhs0 = torch.randn(n, dtype=DTYPE)
    weights = torch.randn(n, dtype=DTYPE)

    def loss(m, rhs):
        h = m @ m.T + torch.eye(n, dtype=DTYPE)
        # n iterations and no early stop: the same unrolled function for every perturbation.
        return weights @ conjugate_gradient(lambda p: h @ p, rhs, n_iters=n, residual_tol=0.0)

    m, rhs = m0.clone().requires_grad_(), rhs0.clone().requires_grad_()
    grad_m, grad_rhs = torch.autograd.grad(loss(m, rhs), (m, rhs))
    torch.testing.assert_close(grad_m, central_difference(lambda x: loss(x, rhs0), m0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_rhs, central_difference(lambda x: loss(m0, x), rhs0), rtol=1e-6, atol=1e-7)
    # ... and, CG being converged, both equal the gradients of the exact solve wᵀH⁻¹b.
    h0 = m0 @ m0.T + torch.eye(n, dtype=DTYPE)
    adjoint = torch.linalg.solve(h0, weights)
    torch.testing.assert_close(grad_rhs, adjoint, rtol=1e-8, atol=1e-9)
    solution = torch.linalg.solve(h0, rhs0)
    exact_grad_m = -(torch.outer(adjoint, solution) + torch.outer(solution, adjoint)) @ m0  # d/dM of wᵀ(MMᵀ+I)⁻¹b
    torch.testing.assert_close(grad_m, exact_grad_m, rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------------------------- Fisher-vector products


class GaussianPolicy:
    """Linear-mean diagonal Gaussian with a state-independent log-std, plus one parameter the KL does not use."""

    def __init__(self, obs_dim=3, act_dim=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = [(obs_dim, act_dim), (act_dim,), (act_dim,), (4,)]
        self.obs = torch.randn(7, obs_dim, generator=gen, dtype=DTYPE)
        self.flat0 = 0.5 * torch.randn(sum(math.prod(shape) for shape in self.shapes), generator=gen, dtype=DTYPE)

    def unflatten(self, flat):
        params, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            params.append(flat[start : start + size].view(shape))
            start += size
        return params

    def distribution(self, params):
        weight, bias, log_std, _unused = params
        return self.obs @ weight + bias, log_std.expand(self.obs.shape[0], -1)

    def mean_kl(self, old, params):
        """Mean over states of KL(old ‖ current) for diagonal Gaussians."""
        old_mean, old_log_std = old
        mean, log_std = self.distribution(params)
        kl = log_std - old_log_std + (torch.exp(2 * old_log_std) + (old_mean - mean) ** 2) / (2 * torch.exp(2 * log_std)) - 0.5
        return kl.sum(-1).mean()


def test_flat_grad_fills_unused_params_with_zeros():
    x, y, unused = (
        torch.tensor([1.0, 2.0], requires_grad=True),
        torch.tensor(3.0, requires_grad=True),
        torch.ones(2, 2, requires_grad=True),
    )
    grad = flat_grad((x**2).sum() * y, [x, y, unused])
    torch.testing.assert_close(grad, torch.tensor([6.0, 12.0, 5.0, 0.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("create_graph", [False, True])
def test_fisher_vector_product_matches_explicit_hessian(create_graph):
    policy = GaussianPolicy()
    params = [p.clone().requires_grad_() for p in policy.unflatten(policy.flat0)]
    old = tuple(x.detach() for x in policy.distribution(params))
    kl = policy.mean_kl(old, params)
    assert abs(kl.item()) < 1e-12
    damping = 0.1
    fvp = fisher_vector_product_fn(kl, params, damping, create_graph=create_graph)
    hessian = torch.autograd.functional.hessian(lambda flat: policy.mean_kl(old, policy.unflatten(flat)), policy.flat0)
    assert torch.all(hessian[-4:] == 0)  # the unused parameter
    for _ in range(3):  # repeated calls reuse the first-order graph
        vector = torch.randn(policy.flat0.numel(), dtype=DTYPE)
        torch.testing.assert_close(fvp(vector), hessian @ vector + damping * vector, rtol=1e-10, atol=1e-12)


def test_fisher_vector_product_keeps_its_graph():
    """With create_graph=True, d/dθ of uᵀ H(θ) v (old distribution fixed) equals finite differences of the explicit
    Hessian: the product is differentiable w.r.t. the parameters, as the meta-gradient through CG needs."""
    policy = GaussianPolicy(seed=1)
    old = tuple(x.detach() for x in policy.distribution(policy.unflatten(policy.flat0)))
    u, vector = torch.randn(policy.flat0.numel(), dtype=DTYPE), torch.randn(policy.flat0.numel(), dtype=DTYPE)

    def explicit(flat):
        return u @ torch.autograd.functional.hessian(lambda f: policy.mean_kl(old, policy.unflatten(f)), flat) @ vector

    flat = policy.flat0.clone().requires_grad_()
    params = policy.unflatten(flat)
    fvp = fisher_vector_product_fn(policy.mean_kl(old, params), params, damping=0.0, create_graph=True)
    (grad,) = torch.autograd.grad(u @ fvp(vector), flat)
    torch.testing.assert_close(grad, central_difference(explicit, policy.flat0, h=1e-5), rtol=1e-6, atol=1e-8)


def test_meta_gradient_through_conjugate_gradient_and_fisher_products():
    """d/dθ of Σ (H(θ) + damping)⁻¹g, by CG over Fisher-vector products with create_graph=True, equals the
    derivative of the exact solve with the explicit Hessian. The CG iterates depend on θ, so this also checks that
    the products do not differentiate through them. 200 iterations with residual_tol=0: CG must stop by itself
    before its residuals underflow (NaN gradients)."""
    policy = GaussianPolicy(seed=2)
    old = tuple(x.detach() for x in policy.distribution(policy.unflatten(policy.flat0)))
    rhs = torch.randn(policy.flat0.numel(), dtype=DTYPE)
    damping = 0.1

    flat = policy.flat0.clone().requires_grad_()
    hessian = torch.autograd.functional.hessian(lambda f: policy.mean_kl(old, policy.unflatten(f)), flat, create_graph=True)
    exact = torch.linalg.solve(hessian + damping * torch.eye(flat.numel(), dtype=DTYPE), rhs)
    (grad_exact,) = torch.autograd.grad(exact.sum(), flat)

    flat = policy.flat0.clone().requires_grad_()
    params = policy.unflatten(flat)
    fvp = fisher_vector_product_fn(policy.mean_kl(old, params), params, damping, create_graph=True)
    solution = conjugate_gradient(fvp, rhs, n_iters=200, residual_tol=0.0)
    (grad_cg,) = torch.autograd.grad(solution.sum(), flat)
    torch.testing.assert_close(solution, exact.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_cg, grad_exact, rtol=1e-8, atol=1e-10 * float(grad_exact.abs().max()))


# ------------------------------------------------------------------------------- CPO cases vs the primal problem

N = 5
DELTA = 0.05
H_MATRIX = random_spd(N, seed=42)


# Clarabel's solutions are accurate to only ~1e-6 in the slack-constraint cases at its default settings; these reach
# ~1e-7 on every problem below (with the trust region in the plain second-order-cone form ‖Lᵀx‖ ≤ √(2δ), H = LLᵀ).
CLARABEL_TIGHT = {
    "tol_gap_abs": 1e-11,
    "tol_gap_rel": 1e-11,
    "tol_feas": 1e-11,
    "tol_ktratio": 1e-11,
    "max_step_fraction": 0.95,
}


def trust_region_constraint(x, delta):
    """½ xᵀHx ≤ δ written as ‖Lᵀx‖ ≤ √(2δ); its dual value μ corresponds to λ = μ/√(2δ)."""
    return cp.norm(np.linalg.cholesky(H_MATRIX.numpy()).T @ x) <= math.sqrt(2 * float(delta))


def primal_reference(g, a, b, delta, with_constraint=True):
    """Solve max gᵀx s.t. ½xᵀHx ≤ δ (and b + aᵀx ≤ 0) with cvxpy/Clarabel; returns x, λ, ν and the status."""
    x = cp.Variable(N)
    trust = trust_region_constraint(x, delta)
    constraints = [trust]
    if with_constraint:
        linear = float(b) + a.numpy() @ x <= 0
        constraints.append(linear)
    problem = cp.Problem(cp.Maximize(g.numpy() @ x), constraints)
    problem.solve(solver="CLARABEL", **CLARABEL_TIGHT)
    if problem.status != "optimal":
        return None, None, None, problem.status
    lam = float(np.squeeze(trust.dual_value)) / math.sqrt(2 * float(delta))
    nu = float(np.squeeze(linear.dual_value)) if with_constraint else 0.0
    return torch.from_numpy(x.value), lam, nu, problem.status


def problem_terms(g, a):
    v, w = torch.linalg.solve(H_MATRIX, g), torch.linalg.solve(H_MATRIX, a)
    return v, w, g @ v, g @ w, a @ w


# Accuracy of each solver's step: the closed form to rounding, the layer to the SCS tolerance (1e-10).
KKT_TOL = {"analytic": 1e-10, "cvxpylayers": 1e-8}


def assert_kkt(x, lam, nu, g, a, b, delta, tol):
    """Exact optimality certificate of the convex primal: feasibility, stationarity, complementary slackness."""
    scale = float(torch.linalg.norm(g)) + float(nu) * float(torch.linalg.norm(a))
    trust_value = 0.5 * x @ H_MATRIX @ x - delta
    linear_value = b + a @ x
    assert trust_value <= tol * delta
    assert linear_value <= tol * max(abs(float(b)), 1.0)
    assert lam >= 0 and nu >= 0
    torch.testing.assert_close(g - nu * a, lam * (H_MATRIX @ x), rtol=0, atol=tol * scale)
    assert abs(lam * trust_value) <= tol * scale
    assert abs(nu * linear_value) <= tol * scale


def make_problem(kind):
    """Hand-built (g, a, b) for each regime; b is set relative to √(2δs), the largest |aᵀx| in the trust region."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(N, generator=gen, dtype=DTYPE)
    noise = torch.randn(N, generator=gen, dtype=DTYPE)
    a = {
        "binding_b_pos": g + 0.5 * noise,  # cost aligned with reward: the TRPO step would raise the cost
        "binding_b_neg": g + 0.3 * noise,
        "inactive_b_neg": -g + 0.3 * noise,  # the TRPO step lowers the cost: the constraint stays slack
        "parallel_opposed": -2.0 * g,  # g ∥ a with opposite directions: unique optimum
        "recovery": noise,
        "feasible_region": noise,
    }[kind]
    *_, s = problem_terms(g, a)
    radius = torch.sqrt(2 * DELTA * s)
    b = {
        "binding_b_pos": 0.4,
        "binding_b_neg": -0.5,
        "inactive_b_neg": -0.3,
        "parallel_opposed": 0.5,
        "recovery": 1.5,
        "feasible_region": -1.5,
    }[kind] * radius
    return g, a, b


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    ("kind", "expected_case", "binding"),
    [
        ("binding_b_pos", "dual", True),
        ("binding_b_neg", "dual", True),
        ("inactive_b_neg", "dual", False),
        ("parallel_opposed", "dual", False),  # the TRPO step lowers the cost most: it is feasible
        ("feasible_region", "trpo", False),
    ],
)
def test_step_matches_primal_solution(kind, expected_case, binding, solver):
    g, a, b = make_problem(kind)
    v, w, q, r, s = problem_terms(g, a)
    result = cpo_direction(v, w, q, r, s, b, DELTA, solver=solver)
    assert result.case == expected_case
    assert bool(result.cost_informative)
    x_ref, lam_ref, nu_ref, status = primal_reference(g, a, b, DELTA)
    assert status == "optimal"
    torch.testing.assert_close(result.x, x_ref, rtol=1e-6, atol=1e-6 * float(x_ref.abs().max()))
    # Multipliers: the exact KKT certificate, and the duals reported by the primal solver.
    assert_kkt(result.x, result.lam, result.nu, g, a, b, DELTA, KKT_TOL[solver])
    assert math.isclose(float(result.lam), lam_ref, rel_tol=1e-5)
    assert math.isclose(float(result.nu), nu_ref, rel_tol=1e-5, abs_tol=1e-7)
    assert (float(result.nu) > 1e-6) == binding
    # Predicted changes of the surrogates are gᵀx and aᵀx.
    torch.testing.assert_close(result.expected_improvement, g @ result.x)
    torch.testing.assert_close(result.expected_cost_change, a @ result.x)
    if binding:
        torch.testing.assert_close(b + a @ result.x, t(0.0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_recovery_step_minimises_the_cost(solver):
    g, a, b = make_problem("recovery")
    v, w, q, r, s = problem_terms(g, a)
    result = cpo_direction(v, w, q, r, s, b, DELTA, solver=solver)
    assert result.case == "recovery"
    # The primal has no feasible point ...
    x = cp.Variable(N)
    trust = trust_region_constraint(x, DELTA)
    infeasible = cp.Problem(cp.Maximize(g.numpy() @ x), [trust, float(b) + a.numpy() @ x <= 0])
    infeasible.solve(solver="CLARABEL")
    assert infeasible.status == "infeasible"
    # ... and the step is the minimiser of aᵀx over the trust region, −√(2δ/s)·w.
    torch.testing.assert_close(result.x, -torch.sqrt(2 * DELTA / s) * w)
    minimise_cost = cp.Problem(cp.Minimize(a.numpy() @ x), [trust])
    minimise_cost.solve(solver="CLARABEL", **CLARABEL_TIGHT)
    assert minimise_cost.status == "optimal"
    torch.testing.assert_close(result.x, torch.from_numpy(x.value), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.expected_cost_change, a @ result.x)
    torch.testing.assert_close(result.expected_improvement, g @ result.x)  # the reward surrogate's change, signed
    # the logged λ of x = −w/λ: √(s/2δ) (the step reaches the trust region's boundary)
    torch.testing.assert_close(result.lam, torch.sqrt(s / (2 * DELTA)))
    assert float(result.nu) == 0.0


@pytest.mark.parametrize(("solver", "tol"), [("analytic", 1e-7), ("cvxpylayers", 1e-4)])
def test_parallel_aligned_gradients_give_an_optimal_step(solver, tol):
    """g ∥ a pointing the same way: every point of the constraint plane inside the trust region is optimal, so only
    feasibility and the optimal value can be checked. λ* → 0 here and x = (v − νw)/λ amplifies errors in ν: the
    layer (SCS accuracy 1e-10, Cholesky jitter) is only accurate to ~1e-4 in this degenerate case."""
    g, _, _ = make_problem("binding_b_pos")
    a = 0.5 * g
    v, w, q, r, s = problem_terms(g, a)
    b = 0.4 * torch.sqrt(2 * DELTA * s)
    result = cpo_direction(v, w, q, r, s, b, DELTA, solver=solver)
    assert result.case == "dual"
    x_ref, _, _, status = primal_reference(g, a, b, DELTA)
    assert status == "optimal"
    assert torch.isfinite(result.x).all()
    assert 0.5 * result.x @ H_MATRIX @ result.x <= DELTA * (1 + tol)
    assert b + a @ result.x <= tol * abs(float(b))
    assert math.isclose(float(g @ result.x), float(g @ x_ref), rel_tol=tol)


@pytest.mark.parametrize("solver", SOLVERS)
def test_without_cost_information_the_step_is_trpo(solver):
    g, a, b = make_problem("binding_b_pos")
    x_ref, lam_ref, _, _ = primal_reference(g, a, b, DELTA, with_constraint=False)
    v, w, q, r, s = problem_terms(g, a)
    no_cost = cpo_direction(v, None, q, None, None, None, DELTA, solver=solver, has_cost=False)
    ignored = cpo_direction(v, w, q, r, s, b, DELTA, solver=solver, has_cost=False)
    tiny_a = 1e-6 * a  # s ≈ 1e-12 ≤ s_tol: treated as no cost information, whatever b says
    v, w, q, r, s = problem_terms(g, tiny_a)
    negligible = cpo_direction(v, w, q, r, s, b, DELTA, solver=solver)
    for result in (no_cost, ignored, negligible):
        assert result.case == "trpo"
        assert not bool(result.cost_informative)
        torch.testing.assert_close(result.x, torch.sqrt(2 * DELTA / q) * v)
        torch.testing.assert_close(result.x, x_ref, rtol=1e-6, atol=1e-7)
        assert math.isclose(float(result.lam), lam_ref, rel_tol=1e-5)
        assert float(result.nu) == 0.0 and float(result.expected_cost_change) == 0.0


@pytest.mark.parametrize(
    ("ratio", "expected_case"),
    [
        (-1.01, "trpo"),
        (-0.99, "dual"),
        (0.0, "dual"),
        (0.99, "dual"),
        (1 - 2e-6, "dual"),
        (1 - 5e-7, "recovery"),
        (1.0, "recovery"),
        (1.01, "recovery"),
    ],
)
def test_case_boundaries(ratio, expected_case):
    """b relative to √(2δs), the largest |aᵀx| in the trust region, decides the case: above 1 − FEASIBILITY_MARGIN
    (1e-6) the feasible set is a sliver (at 1.0, tangent: one point, which the recovery step reaches), judged as
    several constraints are (``cpo_direction``)."""
    g, a, _ = make_problem("binding_b_pos")
    v, w, q, r, s = problem_terms(g, a)
    b = ratio * torch.sqrt(2 * DELTA * s)
    result = cpo_direction(v, w, q, r, s, b, DELTA)
    assert result.case == expected_case
    # At ratio 1 the only feasible point is on the boundary of the trust region and λ* = ∞; the floor on B/2δ
    # (1e-8) caps λ, which leaves the step outside the trust region by that relative amount.
    assert 0.5 * result.x @ H_MATRIX @ result.x <= DELTA * (1 + 2e-8)
    if expected_case == "dual":
        assert b + a @ result.x <= 1e-4 * float(torch.sqrt(2 * DELTA * s))


def test_invalid_arguments_are_rejected():
    v = torch.ones(3, dtype=DTYPE)
    with pytest.raises(ValueError, match="analytic"):
        cpo_direction(v, v, t(1.0), t(0.0), t(1.0), t(0.0), 0.1, solver="newton")
    with pytest.raises(ValueError, match="required"):
        cpo_direction_m(v, None, t(1.0), t([0.0]), None, None, 0.1)
    m = 9  # more constraints than the exact solver enumerates
    with pytest.raises(ValueError, match="at most 8 constraints, got 9"):
        cpo_direction_m(
            v,
            torch.ones(m, 3, dtype=DTYPE),
            t(1.0),
            torch.zeros(m, dtype=DTYPE),
            torch.eye(m, dtype=DTYPE),
            -torch.ones(m, dtype=DTYPE),
            0.1,
        )


# ------------------------------------------------------------------------------------------ the two dual solvers


def test_layer_agrees_with_closed_form_on_random_instances():
    q, r, s, b, delta = random_dual_instances(150, seed=3)
    assert (b > 0).any() and (b < 0).any()
    lam_a, nu_a = solve_dual_analytic(q, r, s, b, delta)
    lam_l, nu_l = solve_dual_cvxpylayers(q, r, s, b, delta)
    # Relative to the problem's own scales: λ in units of √(q/2δ), ν in units of √(q/s).
    assert torch.all((lam_l - lam_a).abs() <= 1e-6 * lam_a)
    assert torch.all((nu_l - nu_a).abs() <= 1e-6 * (nu_a + torch.sqrt(q / s)))
    assert (nu_a > 0).sum() > 30 and (nu_a == 0).sum() > 30  # both the binding and the slack regime occur


def test_closed_form_solves_the_dual():
    """The closed form attains the maximum of the dual objective (compared with a dense grid search around it)."""
    q, r, s, b, delta = (x[:, None, None] for x in random_dual_instances(20, seed=4))
    lam, nu = solve_dual_analytic(q, r, s, b, delta)
    lam_grid = lam * torch.logspace(-1, 1, 401, dtype=DTYPE)[None, :, None]
    nu_grid = (nu + torch.sqrt(q / s)) * torch.linspace(0, 3, 401, dtype=DTYPE)[None, None, :]

    def dual(lam_, nu_):
        return -(q - 2 * r * nu_ + s * nu_**2) / (2 * lam_) + nu_ * b - lam_ * delta

    best_grid = dual(lam_grid, nu_grid).flatten(1).max(dim=1).values
    at_solution = dual(lam, nu).flatten()
    assert torch.all(at_solution >= best_grid - 1e-12 * best_grid.abs())


def test_batched_layer_call_equals_single_calls():
    q, r, s, b, delta = random_dual_instances(4, seed=5)
    lam_batch, nu_batch = solve_dual_cvxpylayers(q, r, s, b, delta)
    for i in range(4):
        lam_i, nu_i = solve_dual_cvxpylayers(q[i], r[i], s[i], b[i], delta[i])
        assert lam_i.shape == ()
        torch.testing.assert_close(lam_i, lam_batch[i], rtol=1e-12, atol=0)
        torch.testing.assert_close(nu_i, nu_batch[i], rtol=1e-12, atol=1e-15)


def test_batched_cpo_direction_equals_single_problems():
    q, r, s, b, delta = random_dual_instances(3, seed=6)
    # One problem per case in one batch: recovery, whole-region TRPO, and a dual problem.
    b = torch.stack([2 * torch.sqrt(2 * delta[0] * s[0]), -2 * torch.sqrt(2 * delta[1] * s[1]), b[2]])
    gen = torch.Generator().manual_seed(0)
    v, w = torch.randn(3, N, generator=gen, dtype=DTYPE), torch.randn(3, N, generator=gen, dtype=DTYPE)
    for solver in SOLVERS:
        batch = cpo_direction(v, w, q, r, s, b, delta, solver=solver)
        assert batch.case == ("recovery", "trpo", "dual")
        for i in range(3):
            single = cpo_direction(v[i], w[i], q[i], r[i], s[i], b[i], delta[i], solver=solver)
            assert single.case == batch.case[i]
            torch.testing.assert_close(single.x, batch.x[i], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(single.lam, batch.lam[i], rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["binding_b_pos", "binding_b_neg"])
def test_dual_gradients_match_finite_differences(kind):
    g, a, b = make_problem(kind)
    _, _, q, r, s = problem_terms(g, a)
    inputs0 = torch.stack([q, r, s, b, t(DELTA)])
    weights = torch.tensor([0.7, -1.3], dtype=DTYPE)

    def loss(inputs, solve):
        lam, nu = solve(*inputs)
        return weights[0] * lam + weights[1] * nu

    fd = central_difference(lambda x: loss(x, solve_dual_analytic), inputs0)
    grads = {}
    for name, solve in (("analytic", solve_dual_analytic), ("cvxpylayers", solve_dual_cvxpylayers)):
        inputs = inputs0.clone().requires_grad_()
        (grads[name],) = torch.autograd.grad(loss(inputs, solve), inputs)
    torch.testing.assert_close(grads["analytic"], fd, rtol=1e-7, atol=1e-8 * float(fd.abs().max()))
    torch.testing.assert_close(grads["cvxpylayers"], grads["analytic"], rtol=1e-6, atol=1e-6 * float(fd.abs().max()))
    # Finite differences of the layer itself; h is larger because the layer is accurate to ~1e-10, not to rounding.
    fd_layer = central_difference(lambda x: loss(x, solve_dual_cvxpylayers), inputs0, h=1e-4)
    torch.testing.assert_close(grads["cvxpylayers"], fd_layer, rtol=1e-4, atol=1e-4 * float(fd.abs().max()))


@pytest.mark.parametrize("solver", SOLVERS)
def test_step_gradients_through_v_and_w_match_finite_differences(solver):
    """End to end: d(cᵀx)/d(g, a, b, δ) with v = H⁻¹g and w = H⁻¹a, in a binding dual case."""
    g0, a0, b0 = make_problem("binding_b_pos")
    weights = torch.randn(N, dtype=DTYPE)
    packed0 = torch.cat([g0, a0, b0.reshape(1), t([DELTA])])

    def loss(packed, solver_name):
        g, a, b, delta = packed[:N], packed[N : 2 * N], packed[2 * N], packed[2 * N + 1]
        v, w, q, r, s = problem_terms(g, a)
        result = cpo_direction(v, w, q, r, s, b, delta, solver=solver_name)
        assert result.case == "dual"
        return weights @ result.x

    fd = central_difference(lambda x: loss(x, "analytic"), packed0)
    packed = packed0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(packed, solver), packed)
    tolerance = 1e-7 if solver == "analytic" else 1e-6
    torch.testing.assert_close(grad, fd, rtol=tolerance, atol=tolerance * float(fd.abs().max()))


# --------------------------------------------------------------------------------------------- degenerate inputs

EDGE_Q_S = [0.0, 1e-300, 1e-12, 1.0, 1e8]
EDGE_B = [-1e6, -1.0, -1e-12, 0.0, 1e-12, 0.3, 1.0, 1e6]
EDGE_DELTA = [0.0, 1e-10, 0.01, 10.0]


def edge_grid():
    rows = []
    for q in EDGE_Q_S:
        for s in EDGE_Q_S:
            bound = math.sqrt(q * s)
            for r in {-bound, -0.5 * bound, 0.0, bound, 2.0 * bound + 1e-3}:  # the last one breaks Cauchy-Schwarz
                for b in EDGE_B:
                    for delta in EDGE_DELTA:
                        rows.append((q, r, s, b, delta))
    return [t(column) for column in zip(*rows, strict=False)]


def test_closed_form_is_finite_on_degenerate_inputs():
    inputs = [x.clone().requires_grad_() for x in edge_grid()]
    lam, nu = solve_dual_analytic(*inputs)
    assert torch.isfinite(lam).all() and torch.isfinite(nu).all() and (lam > 0).all() and (nu >= 0).all()
    # Gradients are elementwise. With s ≈ 0 (a ≈ 0) ν ~ b/s may be ~1e150 and its gradient overflow; cpo_direction
    # never solves the dual there (s ≤ s_tol is the TRPO case).
    grads = torch.autograd.grad((lam + nu).sum(), inputs)
    usable = inputs[2] >= 1e-12
    assert all(torch.isfinite(grad[usable]).all() for grad in grads)


@pytest.mark.parametrize("solver", SOLVERS)
def test_cpo_direction_is_finite_on_degenerate_inputs(solver):
    q, r, s, b, delta = edge_grid()
    gen = torch.Generator().manual_seed(0)
    v, w = torch.randn(q.numel(), 3, generator=gen, dtype=DTYPE), torch.randn(q.numel(), 3, generator=gen, dtype=DTYPE)
    inputs = [x.clone().requires_grad_() for x in (v, w, q, r, s, b, delta)]
    result = cpo_direction(*inputs, solver=solver)
    assert set(result.case) == set(CPO_CASES)
    for value in (result.x, result.lam, result.nu, result.expected_improvement, result.expected_cost_change):
        assert torch.isfinite(value).all()
    grads = torch.autograd.grad(result.x.sum() + result.lam.sum(), inputs)
    assert all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("b_value", [6.94e-21, -6.94e-21, 1e-30, 1e-44])
def test_a_constraint_value_of_a_few_ulps_gives_finite_gradients_in_float32(b_value):
    """b = (J_C − limit)/L for a cost one float64 ulp over its limit is ~7e-21: in float32 d(−r/b)/db = r/b² of the
    closed form's unused branch overflowed, and the step's gradients were NaN. They are now the float64 ones (where
    b² is normal: the oracle), and the step is the one at b = 0."""
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE))

    def step_and_grads(dtype, b_given):
        g = torch.tensor([1.0, 0.5, -0.3, 0.2], dtype=dtype, requires_grad=True)
        a = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=dtype, requires_grad=True)
        b = torch.tensor(b_given, dtype=dtype, requires_grad=True)
        v, w = torch.linalg.solve(H.to(dtype), g), torch.linalg.solve(H.to(dtype), a)
        result = cpo_direction(v, w, g @ v, w @ g, a @ w, b, torch.tensor(0.01, dtype=dtype))
        grads = torch.autograd.grad(result.x.sum(), (g, a, b))
        return result.case, result.x.detach().double(), [grad.double() for grad in grads]

    case, x, grads = step_and_grads(torch.float32, b_value)
    case_64, x_64, grads_64 = step_and_grads(torch.float64, b_value)
    assert case == case_64 == "dual"
    assert all(torch.isfinite(grad).all() for grad in grads)
    torch.testing.assert_close(x, x_64, rtol=1e-5, atol=1e-6)
    for grad, grad_64 in zip(grads, grads_64, strict=True):
        torch.testing.assert_close(grad, grad_64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x, step_and_grads(torch.float32, 0.0)[1])


@pytest.mark.filterwarnings("ignore:Solved/Inaccurate")  # SCS at max_iters on some degenerate problems
def test_layer_is_finite_on_degenerate_dual_problems():
    """The layer on a sample of the degenerate grid, whatever the case (every problem is bounded after scaling)."""
    q, r, s, b, delta = (x[::13] for x in edge_grid())
    inputs = [x.clone().requires_grad_() for x in (q, r, s, b, delta)]
    lam, nu = solve_dual_cvxpylayers(*inputs)
    assert torch.isfinite(lam).all() and torch.isfinite(nu).all()
    grads = torch.autograd.grad((lam + nu).sum(), inputs)
    assert all(torch.isfinite(grad).all() for grad in grads)


# ------------------------------------------------------------------------------------------------- line search


def quadratic_model(kl_scale=0.01, gain=1.0, cost_slope=-0.5, curvature=0.0):
    """evaluate(fraction) of a toy step: KL grows quadratically, the surrogates linearly (plus curvature)."""
    calls = []

    def evaluate(fraction):
        assert not torch.is_grad_enabled()
        calls.append(fraction)
        reward = 10.0 + gain * fraction - curvature * fraction**2
        kl = torch.tensor(kl_scale * fraction**2, dtype=DTYPE)
        return kl, torch.tensor(reward, dtype=DTYPE), 3.0 + cost_slope * fraction

    return evaluate, calls


def test_line_search_accepts_full_step():
    evaluate, calls = quadratic_model()
    result = backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.1, max_kl=0.01)
    assert result.accepted and result.fraction == 1.0 and result.n_backtracks == 0 and calls == [1.0]
    assert math.isclose(result.reward_improvement, 1.0) and math.isclose(result.cost_change, -0.5)
    assert math.isclose(result.kl, 0.01)


def test_line_search_backtracks_on_kl():
    evaluate, calls = quadratic_model(kl_scale=0.04)  # KL(f) = 0.04 f² ≤ 0.01 needs f ≤ 0.5
    result = backtracking_line_search(evaluate, 10.0, 3.0, "trpo", b=-1.0, max_kl=0.01, backtrack_coeff=0.8)
    assert result.accepted and result.n_backtracks == 4 and math.isclose(result.fraction, 0.8**4)
    assert calls == pytest.approx([0.8**j for j in range(5)])


def test_line_search_requires_reward_improvement():
    evaluate, _ = quadratic_model(gain=1.0, curvature=1.5)  # improvement f − 1.5f² > 0 needs f < 2/3
    result = backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.0, max_kl=0.01, backtrack_coeff=0.5)
    assert result.accepted and result.fraction == 0.5
    evaluate, _ = quadratic_model(gain=0.0)  # no change is not an improvement
    assert not backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.0, max_kl=0.01).accepted
    evaluate, calls = quadratic_model(gain=-1.0)
    result = backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.0, max_kl=0.01, max_backtracks=5)
    assert not result.accepted and result.fraction == 0.0 and result.n_backtracks == 5 and len(calls) == 6


def test_line_search_recovery_uses_the_cost():
    # Reward falls but cost falls: accepted while the constraint is violated (recovery, or a dual step with b > 0),
    # rejected when it is satisfied.
    evaluate, _ = quadratic_model(gain=-1.0, cost_slope=-0.5)
    assert backtracking_line_search(evaluate, 10.0, 3.0, "recovery", b=0.2, max_kl=0.01).fraction == 1.0
    assert backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.2, max_kl=0.01).fraction == 1.0
    assert not backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=-0.2, max_kl=0.01).accepted
    # Cost rises or stays: a recovery step is rejected whatever the reward does.
    for cost_slope in (0.5, 0.0):
        evaluate, _ = quadratic_model(gain=1.0, cost_slope=cost_slope)
        assert not backtracking_line_search(evaluate, 10.0, 3.0, "recovery", b=0.2, max_kl=0.01).accepted


def test_line_search_cost_bound():
    # The cost may rise by at most max(−b, 0): by 0.3 when b = −0.3, not at all when b ≥ 0.
    evaluate, _ = quadratic_model(cost_slope=0.5)
    result = backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=-0.3, max_kl=0.01, backtrack_coeff=0.5)
    assert result.accepted and result.fraction == 0.5 and math.isclose(result.cost_change, 0.25)
    assert not backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=0.1, max_kl=0.01).accepted
    # Without cost information (b=None) the cost is not checked.
    assert backtracking_line_search(evaluate, 10.0, 3.0, "trpo", b=None, max_kl=0.01).fraction == 1.0


def test_line_search_rejects_non_finite_values_and_bad_arguments():
    def evaluate(fraction):
        return 0.0, math.inf if fraction == 1.0 else 10.0 + fraction, 3.0

    result = backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=None, max_kl=0.01)
    assert result.accepted and result.n_backtracks == 1
    with pytest.raises(ValueError, match="case"):
        backtracking_line_search(evaluate, 10.0, 3.0, "newton", b=None, max_kl=0.01)
    with pytest.raises(ValueError, match="line_search_shrinking_factor"):
        backtracking_line_search(evaluate, 10.0, 3.0, "dual", b=None, max_kl=0.01, backtrack_coeff=1.0)
