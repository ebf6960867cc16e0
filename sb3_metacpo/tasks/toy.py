"""Toy2DNav: a pure-numpy 2-D point that must reach a goal while avoiding circular hazards.

Fast enough (tens of thousands of steps/s) for tests and quick experiments. The observation is the point's position
only: neither the goal nor the hazards are observed, so a policy must learn them from reward and cost, which is what
makes fast adaptation (and meta-learning) matter, as in MAML's 2-D navigation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from sb3_metacpo.tasks.base import ParamRange, Task, TaskDistribution, register_task_distribution

ARENA = 2.0  # positions are clipped to [-ARENA, ARENA]^2
START_RADIUS = 0.1  # episodes start uniformly in this disc around the origin
STEP_SIZE = 0.1  # an action in [-1, 1]^2 moves the point by at most STEP_SIZE per axis
LIDAR_BINS = 8  # observe_hazards: angular bins of the hazard lidar
LIDAR_RANGE = 1.0  # observe_hazards: a hazard's edge this far away reads 0, touching it reads 1
_MAX_HAZARD_TRIES = 10_000  # hazard placements tried before a task is declared impossible to lay out


@dataclass(frozen=True, kw_only=True)
class Toy2DNavTask(Task):
    """Goal at ``goal_distance`` from the origin in direction ``goal_angle`` (radians); ``n_hazards`` discs of
    ``hazard_radius``, placed from ``layout_seed`` across the straight path from the start to the goal."""

    family: ClassVar[str] = "Toy2DNav"
    goal_angle: float = 0.0
    goal_distance: float = 0.8
    n_hazards: int = 2
    hazard_radius: float = 0.15

    @property
    def goal(self) -> np.ndarray:
        return self.goal_distance * np.array([math.cos(self.goal_angle), math.sin(self.goal_angle)])

    def hazard_centers(self) -> np.ndarray:
        """(n_hazards, 2) hazard centres across the middle of the start-goal segment, clear of the start and goal."""
        rng = np.random.default_rng(self.layout_seed)
        goal = self.goal
        normal = np.array([-goal[1], goal[0]]) / self.goal_distance
        # Far enough from the goal that a policy jittering there does not brush a hazard.
        clearance = self.hazard_radius + 0.15
        centers: list[np.ndarray] = []
        for _ in range(_MAX_HAZARD_TRIES):
            if len(centers) == self.n_hazards:
                break
            candidate = rng.uniform(0.3, 0.7) * goal + rng.uniform(-2.0, 2.0) * self.hazard_radius * normal
            if np.linalg.norm(candidate) < clearance + START_RADIUS or np.linalg.norm(candidate - goal) < clearance:
                continue
            centers.append(candidate)
        if len(centers) < self.n_hazards:
            raise ValueError(
                f"Toy2DNav task ({self.short()}): no place for its hazards clear of the start and the goal in "
                f"{_MAX_HAZARD_TRIES} tries: the goal is too close for hazards of this radius (they lie within 2 radii "
                "of the start-goal line, 0.3 to 0.7 of the way); use a larger goal_distance (the default ranges use 0.5 "
                "to 1.0)"
            )
        return np.array(centers, dtype=np.float64).reshape(self.n_hazards, 2)


class Toy2DNavEnv(gym.Env):
    """The env of one :class:`Toy2DNavTask`. Reward ``-distance to goal`` per step; cost 1 per step in a hazard.

    ``info`` reports ``cost_hazards`` (1 per step in a hazard) and, with a ``speed_limit``, ``cost_speed`` (1 per
    step whose move is longer than ``speed_limit * STEP_SIZE``); ``cost`` is their sum, as in safety-gymnasium.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 10}  # gymnasium: an instance variable

    def __init__(
        self,
        task: Toy2DNavTask,
        render_mode: str | None = None,
        speed_limit: float | None = None,
        observe_hazards: bool = False,
    ) -> None:
        self.task = task
        self.speed_limit = speed_limit
        self.observe_hazards = observe_hazards
        self.render_mode = render_mode
        if observe_hazards:
            low = np.r_[np.full(2, -ARENA), np.zeros(LIDAR_BINS)].astype(np.float32)
            high = np.r_[np.full(2, ARENA), np.ones(LIDAR_BINS)].astype(np.float32)
            self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        else:
            self.observation_space = gym.spaces.Box(-ARENA, ARENA, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._goal = task.goal
        self._hazards = task.hazard_centers()
        self._hazard_radius_sq = task.hazard_radius**2
        self._position = np.zeros(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start uniformly in the start disc around the origin."""
        super().reset(seed=seed)
        radius = START_RADIUS * math.sqrt(self.np_random.uniform())
        angle = self.np_random.uniform(0.0, 2 * math.pi)
        self._position = np.array([radius * math.cos(angle), radius * math.sin(angle)])
        return self._observation(), {}

    def _observation(self) -> np.ndarray:
        """The position, and with ``observe_hazards`` a pseudo-lidar of the hazards (as safety-gymnasium's): per
        angular bin, the closeness 1 − (distance to the hazard's edge)/LIDAR_RANGE of the nearest hazard in it."""
        if not self.observe_hazards:
            return self._position.astype(np.float32)
        lidar = np.zeros(LIDAR_BINS)
        if self._hazards.size:
            offsets = self._hazards - self._position
            gaps = np.maximum(np.linalg.norm(offsets, axis=1) - self.task.hazard_radius, 0.0)
            bins = (np.floor(np.arctan2(offsets[:, 1], offsets[:, 0]) % (2 * math.pi) / (2 * math.pi / LIDAR_BINS))).astype(
                int
            )
            np.maximum.at(lidar, bins % LIDAR_BINS, np.clip(1.0 - gaps / LIDAR_RANGE, 0.0, 1.0))
        return np.r_[self._position, lidar].astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Move by ``STEP_SIZE * clip(action)``; the episode only ends by the time limit."""
        move = np.clip(action, -1.0, 1.0) * STEP_SIZE
        self._position = np.clip(self._position + move, -ARENA, ARENA)
        reward = -float(np.linalg.norm(self._position - self._goal))
        in_hazard = float(
            self._hazards.size > 0
            and bool((np.sum((self._hazards - self._position) ** 2, axis=1) < self._hazard_radius_sq).any())
        )
        info = {"cost": in_hazard, "cost_hazards": in_hazard}
        if self.speed_limit is not None:
            too_fast = float(np.linalg.norm(move) > self.speed_limit * STEP_SIZE)
            info["cost_speed"] = too_fast
            info["cost"] = in_hazard + too_fast
        return self._observation(), reward, False, False, info

    # gymnasium types render() with a TypeVar (RenderFrame) bound nowhere, which no concrete frame type matches
    def render(self) -> np.ndarray:  # type: ignore[override]
        """A top-down RGB image: goal green, hazards blue, the point red."""
        size = 128
        scale = size / (2 * ARENA)
        ys, xs = np.mgrid[0:size, 0:size]
        world = np.stack([(xs + 0.5) / scale - ARENA, ARENA - (ys + 0.5) / scale], axis=-1)
        image = np.full((size, size, 3), 255, dtype=np.uint8)
        for center in self._hazards:
            image[np.sum((world - center) ** 2, axis=-1) < self._hazard_radius_sq] = (60, 90, 230)
        image[np.sum((world - self._goal) ** 2, axis=-1) < 0.05**2] = (40, 180, 60)
        image[np.sum((world - self._position) ** 2, axis=-1) < 0.04**2] = (220, 40, 40)
        return image


@register_task_distribution
class Toy2DNav(TaskDistribution):
    """Toy 2-D navigation. Training goals lie at distance 0.5-1.0 in any direction with 1-3 hazards; held-out tasks
    have 4-5 hazards.

    :param observe_hazards: observe a pseudo-lidar of the hazards (8 angular bins, as safety-gymnasium's lidar)
        beside the position; by default hazards are unobserved, so the only safe behaviour on a new task is caution
    :param speed_limit: adds a second cost signal, ``cost_speed``: 1 per step whose move is longer than
        ``speed_limit`` times the largest move per axis (e.g. 1.0: the diagonal full-speed moves are too fast). The
        hazard cost is ``cost_hazards``; ``cost`` is the sum. None (default): hazards only.

    Other arguments: see :class:`~sb3_metacpo.tasks.base.TaskDistribution`.
    """

    name = "Toy2DNav"
    task_cls = Toy2DNavTask
    limits: ClassVar[dict[str, ParamRange]] = {
        "goal_angle": ParamRange(-2 * math.pi, 2 * math.pi),
        "goal_distance": ParamRange(0.3, 1.8),
        "n_hazards": ParamRange(0, 8, integer=True),
        "hazard_radius": ParamRange(0.02, 0.4),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "goal_angle": ParamRange(0.0, 2 * math.pi),
        "goal_distance": ParamRange(0.5, 1.0),
        "n_hazards": ParamRange(1, 3, integer=True),
        "hazard_radius": ParamRange(0.1, 0.15),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "goal_angle": ParamRange(0.0, 2 * math.pi),
        "goal_distance": ParamRange(0.5, 1.0),
        "n_hazards": ParamRange(4, 5, integer=True),
        "hazard_radius": ParamRange(0.1, 0.15),
    }
    default_max_episode_steps = 100
    default_cost_limit = 5.0

    def __init__(self, *args: Any, speed_limit: float | None = None, observe_hazards: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(observe_hazards, bool):
            raise ValueError(f"observe_hazards must be True or False, got {observe_hazards!r}")
        self.observe_hazards = observe_hazards
        if speed_limit is not None and (
            isinstance(speed_limit, bool) or not isinstance(speed_limit, numbers.Real) or not 0 < speed_limit < math.sqrt(2)
        ):
            raise ValueError(f"speed_limit must be None or a number in (0, sqrt(2)), got {speed_limit!r}")
        self.speed_limit = None if speed_limit is None else float(speed_limit)

    @property
    def cost_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cost", "cost_hazards") if self.speed_limit is None else ("cost", "cost_hazards", "cost_speed")

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "speed_limit": self.speed_limit, "observe_hazards": self.observe_hazards}

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        assert isinstance(task, Toy2DNavTask)
        env = Toy2DNavEnv(task, render_mode=render_mode, speed_limit=self.speed_limit, observe_hazards=self.observe_hazards)
        return gym.wrappers.TimeLimit(env, self.max_episode_steps)
