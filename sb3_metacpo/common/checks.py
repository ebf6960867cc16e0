"""Constructor-argument validation shared by the algorithms: a clear ``ValueError`` before any work starts."""

from __future__ import annotations

from typing import Any

from sb3_metacpo.common.cpo_step import DUAL_SOLVERS


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def check_positive_ints(model: Any, *names: str) -> None:
    for name in names:
        value = getattr(model, name)
        check(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")


def check_cpo_step_hyperparameters(model: Any) -> None:
    """The arguments every CPO-step algorithm has: conjugate gradient, line search, discounting, dual, cost limit."""
    check_positive_ints(model, "cg_max_steps", "fvp_sample_freq")
    check(model.line_search_max_iter >= 0, f"line_search_max_iter must be >= 0, got {model.line_search_max_iter}")
    check(model.cg_damping >= 0, f"cg_damping must be >= 0, got {model.cg_damping}")
    check(0 < model.gamma <= 1, f"gamma must be in (0, 1], got {model.gamma}")
    check(0 < model.cost_gamma <= 1, f"cost_gamma must be in (0, 1], got {model.cost_gamma}")
    check(0 <= model.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {model.gae_lambda}")
    check(
        0 < model.line_search_shrinking_factor < 1,
        f"line_search_shrinking_factor must be in (0, 1), got {model.line_search_shrinking_factor}",
    )
    check(model.dual_solver in DUAL_SOLVERS, f"dual_solver must be one of {DUAL_SOLVERS}, got {model.dual_solver!r}")
    check(
        model.cost_limit is None or model.cost_limit > 0,
        f"cost_limit must be > 0 (an expected episode cost), got {model.cost_limit!r}",
    )
