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
        residual was NaN or inf: x is not a solution) or ``"not positive definite"`` (pᵀHp ≤ 0 on a search
        direction: H is zero or indefinite there, and x is not a solution of H x = b)
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
    :param residual_tol: tolerance on the squared residual norm ‖b − Hx‖², absolute as in sb3-contrib's TRPO and
        OmniSafe: a right-hand side with ‖b‖² ≤ ``residual_tol`` gets x = 0, and a small one few iterations
    """
    x = torch.zeros_like(b)
    residual = b
    direction = b
    residual_sq = residual @ residual
    residual_value = residual_sq.item()
    if not math.isfinite(residual_value):
        return CGResult(x, "non-finite", 0)
    # The backward pass divides by squared residuals, which must not underflow: whatever residual_tol says, stop at
    # ‖r‖²/‖b‖² = tiny^⅓ (3e-103 in float64, 2e-13 in float32), past the convergence of x and of its derivative.
    stop_at = max(residual_tol, torch.finfo(b.dtype).tiny ** (1 / 3) * residual_value)
    for iteration in range(n_iters):
        if not residual_value > stop_at:
            return CGResult(x, "ok", iteration)
        h_direction = matvec(direction)
        curvature = direction @ h_direction
        value = curvature.item()
        # A finite curvature means a finite Hp: a NaN or inf entry of Hp makes its term of the dot product NaN or
        # inf (0·inf is NaN where the direction is 0), and no sum of terms turns NaN or inf back into a number.
        if not math.isfinite(value):
            return CGResult(x, "non-finite", iteration)
        if not value > 0:
            return CGResult(x, "not positive definite", iteration)
        step = residual_sq / curvature
        x = x + step * direction
        residual = residual - step * h_direction
        new_residual_sq = residual @ residual
        residual_value = new_residual_sq.item()
        if not math.isfinite(residual_value):  # e.g. a denormal curvature: the step overflowed
            return CGResult(x, "non-finite", iteration + 1)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return CGResult(x, "ok", n_iters)


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
