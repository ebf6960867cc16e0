"""The cost constraints of an algorithm: which per-step cost signals of ``info`` are limited, and to what.

``cost_limit`` is a float (one limit on ``info["cost"]``, the total cost every safe env reports) or a mapping from
cost names to limits, e.g. ``{"cost_hazards": 10.0, "cost_gremlins": 5.0}``, each read from ``info[name]`` at every
step. safety-gymnasium reports each cost type under its own name (``cost_hazards``, ``cost_vases_contact``,
``cost_gremlins``, ``cost_buttons``, ...) beside their sum ``cost``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sb3_metacpo.tasks.monitor import TOTAL_COST, is_cost_key

#: The largest cost limit, since the constraint values are computed in the policy's float32 (max ~3.4e38).
MAX_COST_LIMIT = 1e30


def _check_limit(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"cost_limit: the limit of {name!r} must be a number >= 0, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(
            f"cost_limit: the limit of {name!r} must be finite and >= 0 (an expected episode cost), got {value!r}"
        )
    if float(value) > MAX_COST_LIMIT:  # the constraint value (J_C - limit) / L would overflow the float32 step
        raise ValueError(
            f"cost_limit: the limit of {name!r} must be at most {MAX_COST_LIMIT:g} (larger limits overflow the float32 "
            f"step computation; a limit above every episode cost constrains nothing: use TRPO or MetaTRPO), got {value!r}"
        )
    return float(value)


def within_limits(costs: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    """Whether each cost named in ``limits`` is at most its limit in ``costs`` (expected episode sums, by name; a NaN
    cost is not)."""
    return all(costs[name] <= limit for name, limit in limits.items())


def close_cost_names(missing: Sequence[str], reported: Sequence[str]) -> str:
    """``"; did you mean 'cost_hazards'?"`` for the reported names closest to misspelt ``missing`` ones ("" if none)."""
    close = [match[0] for name in missing if (match := difflib.get_close_matches(name, sorted(reported), n=1))]
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


@dataclass(frozen=True)
class CostConstraints:
    """m named cost signals, each with a limit on its expected undiscounted episode sum."""

    names: tuple[str, ...]
    limits: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("cost_limit names no cost: give a float or a mapping with at least one entry")
        if len(self.names) != len(self.limits):
            raise ValueError(f"{len(self.names)} cost names but {len(self.limits)} limits")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"cost names must be distinct, got {self.names}")
        for name, limit in zip(self.names, self.limits, strict=True):
            if not isinstance(name, str) or not name:
                raise ValueError(f"cost names must be non-empty strings, got {name!r}")
            if not is_cost_key(name):
                raise ValueError(
                    f"cost_limit names {name!r}, which is not a cost signal's name: the episode monitors sum the info "
                    f"keys 'cost' and 'cost_<type>' (safety-gymnasium's names); report it as 'cost_{name}' in the "
                    "env's info and limit that"
                )
            _check_limit(name, limit)

    @classmethod
    def from_cost_limit(cls, cost_limit: float | Mapping[str, float]) -> CostConstraints:
        """Parse a ``cost_limit`` argument (a float for ``info["cost"]``, or a mapping of names to limits)."""
        if isinstance(cost_limit, Mapping):
            if not cost_limit:
                raise ValueError("cost_limit is an empty mapping: name at least one cost, e.g. {'cost_hazards': 10.0}")
            names = tuple(cost_limit)
            for name in names:
                if not isinstance(name, str):
                    raise ValueError(f"cost_limit's keys must be cost names (str), got {name!r}")
            return cls(names, tuple(_check_limit(name, cost_limit[name]) for name in names))
        return cls((TOTAL_COST,), (_check_limit(TOTAL_COST, cost_limit),))

    def __len__(self) -> int:
        return len(self.names)

    def check_reported(self, reported: Sequence[str], source: str) -> None:
        """Raise a ``ValueError`` naming the costs that ``source`` does not report (``reported``: its cost names)."""
        missing = [name for name in self.names if name not in reported]
        if missing:
            raise ValueError(
                f"cost_limit names {missing}, which {source} does not report; it reports {sorted(reported)}"
                + close_cost_names(missing, reported)
            )

    def limit_of(self, name: str) -> float | None:
        """The limit of the cost ``name``, None if it is not constrained."""
        return self.limits[self.names.index(name)] if name in self.names else None

    def satisfied_by(self, costs: Mapping[str, float]) -> bool:
        """Whether every constrained cost's expected episode sum in ``costs`` (by name) is at most its limit (a NaN
        cost is not)."""
        return within_limits(costs, self.as_mapping())

    def as_mapping(self) -> dict[str, float]:
        """The limits by cost name, in constraint order."""
        return dict(zip(self.names, self.limits, strict=True))

    def log_suffix(self, index: int) -> str:
        """The suffix of per-constraint logger keys: ``""`` for the total cost, ``"_<name>"`` otherwise."""
        name = self.names[index]
        return "" if name == TOTAL_COST else f"_{name}"
