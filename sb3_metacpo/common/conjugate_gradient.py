"""Conjugate gradient and Fisher-vector products: the linear algebra of a trust-region step in the Fisher metric.

Everything is out-of-place torch, so with graphs kept the results are differentiable (the second-order meta-gradient
differentiates through unrolled conjugate gradient and through the Fisher-vector products).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CGResult:
    """What :func:`conjugate_gradient_solve` found.

    :ivar x: the approximate solution of H x = b
    :ivar status: ``"ok"`` (converged or ran its iterations), ``"non-finite"`` (a product Hp, a curvature or a
        residual was NaN or inf: x is not a solution) or ``"not positive definite"`` (pᵀHp ≤ 0 on the first
        direction, b itself: H is zero or indefinite along b and x = 0 says nothing)
    :ivar iterations: iterations run
    """

    x: torch.Tensor
    status: str
    iterations: int


def conjugate_gradient_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    n_iters: int = 10,
    residual_tol: float = 1e-10,
) -> CGResult:
    """Approximately solve H x = b for a symmetric positive definite H known only through ``matvec(p) = H p``,
    and say whether the result can be trusted (see :class:`CGResult`).

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
    """
    return conjugate_gradient_solves(matvec, [b], n_iters, residual_tol)[0]


def conjugate_gradient_solves(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: Sequence[torch.Tensor],
    n_iters: int = 10,
    residual_tol: float = 1e-10,
) -> list[CGResult]:
    """:func:`conjugate_gradient_solve` for each of the k right-hand sides ``rhs`` (one H), with one product per
    iteration for all the systems still running.

    Every system runs exactly the iterations, checks and arithmetic it would run alone (its dot products one by one,
    as ``@`` on its own vectors); only the products with H are batched: ``matvec`` gets a (k', n) stack of the
    running systems' directions when it accepts batches (a ``accepts_batches`` attribute set to True, as the
    closed-form Fisher product of :meth:`~sb3_metacpo.common.policies.CPOPolicy.fisher_product` has without a
    graph). A batched product whose rows equal the one-vector products (the closed-form Fisher product's do bit for
    bit: see its tests) gives every system the result it gets alone. A ``matvec`` that does not accept batches
    solves the systems one after the other, as separate calls would (with graphs, the order in which they are built
    is the order in which the backward pass sums their contributions).

    :param matvec: the product with H, (n,) → (n,), or (k', n) → (k', n) when it accepts batches
    :param rhs: the right-hand sides, each of shape (n,)
    :return: one :class:`CGResult` per right-hand side, in order
    """
    if not getattr(matvec, "accepts_batches", False):
        return [_solve_together(lambda directions: [matvec(directions[0])], [b], n_iters, residual_tol)[0] for b in rhs]
    return _solve_together(lambda directions: list(matvec(torch.stack(directions))), rhs, n_iters, residual_tol)


def _solve_together(
    products: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    rhs: Sequence[torch.Tensor],
    n_iters: int,
    residual_tol: float,
) -> list[CGResult]:
    """The iterations of :func:`conjugate_gradient_solves`, with ``products`` mapping the running systems'
    directions to their products with H."""
    results: list[CGResult | None] = [None] * len(rhs)
    xs, residuals, directions, squares, stops = [], [], [], [], []
    for index, b in enumerate(rhs):
        residual_sq = b @ b
        xs.append(torch.zeros_like(b))
        residuals.append(b)
        directions.append(b)
        squares.append(residual_sq)
        if not math.isfinite(residual_sq.item()):
            results[index] = CGResult(xs[index], "non-finite", 0)
        # The backward pass divides by squared residuals, which must not underflow: whatever residual_tol says,
        # stop at ‖r‖²/‖b‖² = tiny^⅓ (3e-103 in float64, 2e-13 in float32), past the convergence of x and of its
        # derivative.
        stops.append(max(residual_tol, torch.finfo(b.dtype).tiny ** (1 / 3) * residual_sq.item()))
    for iteration in range(n_iters):
        running = []
        for index in range(len(rhs)):
            if results[index] is None and not squares[index].item() > stops[index]:
                results[index] = CGResult(xs[index], "ok", iteration)
            if results[index] is None:
                running.append(index)
        if not running:
            break
        for index, h_direction in zip(running, products([directions[index] for index in running]), strict=True):
            direction, residual, residual_sq = directions[index], residuals[index], squares[index]
            curvature = direction @ h_direction
            value = curvature.item()
            if not (math.isfinite(value) and bool(torch.isfinite(h_direction.detach()).all())):
                results[index] = CGResult(xs[index], "non-finite", iteration)
                continue
            if not value > 0:
                results[index] = CGResult(xs[index], "not positive definite" if iteration == 0 else "ok", iteration)
                continue
            step = residual_sq / curvature
            xs[index] = xs[index] + step * direction
            residual = residual - step * h_direction
            new_residual_sq = residual @ residual
            directions[index] = residual + (new_residual_sq / residual_sq) * direction
            residuals[index], squares[index] = residual, new_residual_sq
    return [CGResult(xs[index], "ok", n_iters) if result is None else result for index, result in enumerate(results)]


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    n_iters: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """x ≈ H⁻¹b by :func:`conjugate_gradient_solve` (zeros if ``b`` is zero), without its status."""
    return conjugate_gradient_solve(matvec, b, n_iters, residual_tol).x


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
