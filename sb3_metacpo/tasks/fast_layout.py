"""Upstream's rejection sampler of navigation layouts, with its long runs of rejected draws done as one array batch.

safety-gymnasium places a world's objects one after the other (``RandomGenerator.sample_layout``): up to 100 uniform
draws per object until one keeps its distance from every object placed before, else the whole layout is drawn again.
With a task's objects pinned to their locations (the families here) a pinned object whose spot the robot's random
start took fails all 100 of its draws, every time: a PointGoalHazard reset makes ~900 draws, each a few Python calls
(~2.6 ms of a ~4 ms reset, which takes ~1.4 ms with the batches). :func:`first_valid_draw` makes the draws of one
object as one block from the same ``RandomState`` stream and tests them all at once; the generator is then left
exactly where upstream's loop leaves it (having drawn up to and including the accepted candidate), so every later
draw of the episode is upstream's.

The values are bitwise upstream's (``tests/test_fast_layout.py``): a draw is ``low + (high - low) * u`` for the
stream's next double ``u`` (``RandomState.uniform``'s arithmetic), and a distance is ``sqrt(dx² + dy²)`` compared with
``(keepout_other + margin) + keepout``, the same operations on the same operands. Objects placed on one of several
rectangles (a draw picks the rectangle first) keep upstream's own draw.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: Upstream's tries per object before the layout is drawn again (``sample_layout``).
TRIES_PER_OBJECT = 100


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
            placed = np.zeros((0, 2))
            keepouts = np.zeros(0)
            for name, (placements, keepout) in self.placements.items():
                rectangle = self._single_rectangle(placements, keepout)
                thresholds = (keepouts + self.placements_margin) + keepout
                if rectangle is None:  # several rectangles: upstream's draw (a choice, then x and y) one try at a time
                    xy = None
                    for _ in range(TRIES_PER_OBJECT):
                        candidate = self.draw_placement(placements, keepout)
                        if not (np.sqrt(np.square(candidate - placed).sum(axis=1)) < thresholds).any():
                            xy = candidate
                            break
                else:  # the first try alone (most objects keep it), then the other 99 as one block
                    xy = first_valid_draw(self.random_generator, rectangle, placed, thresholds, 1)
                    if xy is None:
                        xy = first_valid_draw(self.random_generator, rectangle, placed, thresholds, TRIES_PER_OBJECT - 1)
                if xy is None:
                    return False
                layout[name] = xy
                placed = np.vstack([placed, xy[None]])
                keepouts = np.append(keepouts, self.placements[name][1])
            self.layout = layout
            return True

    return FastLayoutGenerator
