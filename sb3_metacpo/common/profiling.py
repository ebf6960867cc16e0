"""Opt-in breakdown of the algorithms' phases, in wall-clock or CPU seconds.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_times: dict[str, float] | None = None
_stack: list[str] = []
_clock: Callable[[], float] = time.perf_counter


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the time of the block to ``name`` (under the enclosing phases) when recording."""
    if _times is None:
        yield
        return
    _stack.append(name)
    key = "/".join(_stack)
    start = _clock()
    try:
        yield
    finally:
        _times[key] = _times.get(key, 0.0) + _clock() - start
        _stack.pop()


@contextmanager
def phase_times(clock: Callable[[], float] = time.perf_counter) -> Iterator[dict[str, float]]:
    """Record the phases run inside the block; yields the dictionary of seconds per phase path, filled as it runs.

    :param clock: ``time.perf_counter`` (wall time, the default) or ``time.process_time`` (CPU time of this process:
        on a shared machine, what the phases cost whatever else runs)
    """
    global _times, _clock
    previous, previous_clock, _times, _clock = _times, _clock, {}, clock
    try:
        yield _times
    finally:
        _times, _clock = previous, previous_clock
