"""Upstream's rejection sampler of navigation layouts, with its long runs of rejected draws done as one array batch.

safety-gymnasium places a world's objects one after the other (``RandomGenerator.sample_layout``): up to 100 uniform
draws per object until one keeps its distance from every object placed before, else the whole layout is drawn again.
With a task's objects pinned to their locations (the families here) a pinned object whose spot the robot's random
start took fails all 100 of its draws, every time: a PointGoalHazard reset makes ~900 draws, each a few Python calls
(~2.6 ms of a ~4 ms reset, which now takes ~1.2 ms). An object's first ``SCALAR_TRIES`` tries are made one by one
in Python floats (:func:`first_try`), and :func:`first_valid_draw` makes the rest as one block from the same
``RandomState`` stream and tests them all at once; the generator is then left exactly where upstream's loop leaves
it (having drawn up to and including the accepted candidate), so every later draw of the episode is upstream's.

The values are bitwise upstream's (``tests/test_fast_layout.py``): a draw is ``low + (high - low) * u`` for the
stream's next double ``u`` (``RandomState.uniform``'s arithmetic), and a distance is ``sqrt(dx² + dy²)`` compared with
``(keepout_other + margin) + keepout``, the same operations on the same operands. Objects placed on one of several
rectangles (a draw picks the rectangle first) keep upstream's own draw.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

#: Upstream's tries per object before the layout is drawn again (``sample_layout``).
TRIES_PER_OBJECT = 100

#: Tries made one by one (:func:`first_try`) before the rest go as one block (:func:`first_valid_draw`). A block
#: costs ~75 µs more than its draws (saving and restoring the stream's state, to rewind it past the accepted try),
#: a single try ~3 µs. Measured per reset of ``SafetyPointButton1Gymnasium-v0`` (random layouts, many objects, most
#: accepted within a few tries), CPU ms: 1 try first 41.7, 3 23.4, 6 18.4, 10 17.0, 20 16.1; PointGoalHazard (pinned
#: objects, whose rejected tries all fail) 1.52, 1.54, 1.59, 1.61, 1.76.
SCALAR_TRIES = 10


def first_valid_draw(
    random_state: np.random.RandomState,
    rectangle: tuple[float, float, float, float],
    placed: np.ndarray,
    thresholds: np.ndarray,
    tries: int,
) -> np.ndarray | None:
    """Draw up to ``tries`` points uniformly in ``rectangle`` (xmin, ymin, xmax, ymax) as upstream does, x then y
    per try, and return the first one whose distance to every point of ``placed`` (``(m, 2)``) is at least its
    ``thresholds`` entry (not less than, as upstream tests), or None after ``tries`` rejections. ``random_state`` is
    left as if the draws had stopped at the returned point (or after all ``tries``)."""
    xmin, ymin, xmax, ymax = rectangle
    saved = random_state.get_state() if tries > 1 else None
    u = random_state.random_sample(2 * tries)
    x = xmin + (xmax - xmin) * u[0::2]
    y = ymin + (ymax - ymin) * u[1::2]
    if len(placed):
        dx = x[:, None] - placed[None, :, 0]
        dy = y[:, None] - placed[None, :, 1]
        distance = np.sqrt(np.square(dx) + np.square(dy))
        valid = ~(distance < thresholds[None, :]).any(axis=1)
        accepted = np.flatnonzero(valid)
        if not len(accepted):
            return None
        first = int(accepted[0])
    else:
        first = 0
    if first + 1 < tries and saved is not None:  # rewind to just after the accepted draw
        random_state.set_state(saved)
        random_state.random_sample(2 * (first + 1))
    return np.array([x[first], y[first]])


def first_try(
    random_state: np.random.RandomState,
    rectangle: tuple[float, float, float, float],
    placed: list[tuple[float, float]],
    thresholds: list[float],
) -> np.ndarray | None:
    """:func:`first_valid_draw` with one try, in Python floats (the same IEEE double operations, with ``math.sqrt``
    as correctly rounded as ``np.sqrt``): most objects keep one of their first few tries, and for a dozen placed
    objects a loop of float operations is cheaper than array calls and far cheaper than a block's rewind."""
    xmin, ymin, xmax, ymax = rectangle
    x = xmin + (xmax - xmin) * random_state.random_sample()
    y = ymin + (ymax - ymin) * random_state.random_sample()
    for (other_x, other_y), threshold in zip(placed, thresholds, strict=True):
        dx, dy = x - other_x, y - other_y
        if math.sqrt(dx * dx + dy * dy) < threshold:
            return None
    return np.array([x, y])


@functools.cache
def fast_layout_class() -> type:
    """A subclass of upstream's ``RandomGenerator`` whose ``sample_layout`` draws each object's tries as one block
    (:func:`first_valid_draw`); everything else is upstream's. Defined lazily (safety_gymnasium is imported late)."""
    from safety_gymnasium.utils.random_generator import RandomGenerator

    class FastLayoutGenerator(RandomGenerator):
        """Upstream's generator with batched layout tries (:mod:`sb3_metacpo.tasks.fast_layout`)."""

        def _single_rectangle(self, placements: Any, keepout: float) -> tuple[float, float, float, float] | None:
            """The one rectangle upstream's ``draw_placement`` draws from without a choice, else None."""
            if placements is None:
                return self.constrain_placement(self.placements_extents, keepout)  # type: ignore[return-value]
            constrained = []
            for placement in placements:
                xmin, ymin, xmax, ymax = self.constrain_placement(placement, keepout)
                if not (xmin > xmax or ymin > ymax):
                    constrained.append((xmin, ymin, xmax, ymax))
            return constrained[0] if len(constrained) == 1 else None

        def sample_layout(self) -> bool:
            layout: dict[str, np.ndarray] = {}
            placed = np.empty((len(self.placements), 2))  # the objects placed so far: placed[:count]
            keepouts = np.empty(len(self.placements))
            placed_list: list[tuple[float, float]] = []  # the same, as Python floats for the first try
            keepout_list: list[float] = []
            for count, (name, (placements, keepout)) in enumerate(self.placements.items()):
                rectangle = self._single_rectangle(placements, keepout)
                thresholds = (keepouts[:count] + self.placements_margin) + keepout
                if rectangle is None:  # several rectangles: upstream's draw (a choice, then x and y) one try at a time
                    xy = None
                    for _ in range(TRIES_PER_OBJECT):
                        candidate = self.draw_placement(placements, keepout)
                        if not (np.sqrt(np.square(candidate - placed[:count]).sum(axis=1)) < thresholds).any():
                            xy = candidate
                            break
                else:  # the first tries one by one (most objects keep one of them), then the rest as one block
                    margin = self.placements_margin
                    scalar_thresholds = [k + margin + keepout for k in keepout_list]
                    for _ in range(SCALAR_TRIES):
                        xy = first_try(self.random_generator, rectangle, placed_list, scalar_thresholds)
                        if xy is not None:
                            break
                    if xy is None:
                        tries = TRIES_PER_OBJECT - SCALAR_TRIES
                        xy = first_valid_draw(self.random_generator, rectangle, placed[:count], thresholds, tries)
                if xy is None:
                    return False
                layout[name] = xy
                placed[count] = xy
                keepouts[count] = self.placements[name][1]
                placed_list.append((float(xy[0]), float(xy[1])))
                keepout_list.append(self.placements[name][1])
            self.layout = layout
            return True

    return FastLayoutGenerator
