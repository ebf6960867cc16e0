"""Opt-in wall-clock breakdown of the algorithms' phases.

The algorithms mark their phases with :func:`phase`; nothing is measured (one global check per phase) unless a
:func:`phase_times` block is active::

    with phase_times() as times:
        model.learn(20_000)
    # times: {"sampling": 4.1, "inner_update": 0.9, "inner_update/conjugate_gradient": 0.3, ...} in seconds

Nested phases are keyed by their path (``"outer_line_search/cpo/conjugate_gradient"``), so a child's time is also
part of its parent's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_times: dict[str, float] | None = None
_stack: list[str] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the wall time of the block to ``name`` (under the enclosing phases) when recording."""
    if _times is None:
        yield
        return
    _stack.append(name)
    key = "/".join(_stack)
    start = time.perf_counter()
    try:
        yield
    finally:
        _times[key] = _times.get(key, 0.0) + time.perf_counter() - start
        _stack.pop()


@contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """Record the phases run inside the block; yields the dictionary of seconds per phase path, filled as it runs."""
    global _times
    previous, _times = _times, {}
    try:
        yield _times
    finally:
        _times = previous
