"""The phase breakdown: nested phases keyed by their path, each charged by the clock it is given."""

import itertools

from sb3_metacpo.common.profiling import phase, phase_times


def test_phases_are_charged_by_the_given_clock_and_nested_by_path():
    ticks = itertools.count()  # a clock that advances by one at every reading

    def clock() -> float:
        return float(next(ticks))

    with phase_times(clock) as times:
        with phase("outer"):  # reads 0 ... 5
            with phase("inner"):  # reads 1, 2
                pass
            with phase("inner"):  # reads 3, 4
                pass
    assert times == {"outer/inner": 2.0, "outer": 5.0}


def test_nothing_is_recorded_outside_a_block_and_the_default_clock_comes_back():
    with phase("ignored"):
        pass
    with phase_times(lambda: 0.0) as fixed:
        with phase("a"):
            pass
    assert fixed == {"a": 0.0}
    with phase_times() as wall:  # perf_counter again: a non-negative duration
        with phase("b"):
            pass
    assert set(wall) == {"b"} and wall["b"] >= 0.0
