"""Task families on upstream safety-gymnasium navigation tasks (Point/Car robots; Button, Goal and Circle tasks).

The upstream task classes are subclassed and configured; nothing is vendored. A task's objects (buttons, hazards,
goal) are placed once, by safety-gymnasium's own placement sampler seeded with the task's ``layout_seed``, and then
pinned with upstream's ``locations`` mechanism, so every episode of a task shares the layout while the robot's start
pose still comes from the episode's seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym

from sb3_metacpo.tasks.base import ParamRange, Task, TaskDistribution, register_task_distribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium


def _pin_layout(task: Any, layout_seed: int) -> None:
    """Sample the objects' positions from ``layout_seed`` with upstream's sampler and fix them as ``locations``."""
    from safety_gymnasium.utils.random_generator import RandomGenerator

    task._build_placements_dict()
    sampler = RandomGenerator()
    sampler.set_placements_info(task.placements_conf.placements, task.placements_conf.extents, task.placements_conf.margin)
    sampler.set_random_seed(layout_seed)
    layout = sampler.build_layout()
    for obstacle in task._obstacles:
        if hasattr(obstacle, "num"):
            obstacle.locations = [tuple(layout[f"{obstacle.name[:-1]}{i}"]) for i in range(obstacle.num)]
        else:
            obstacle.locations = [tuple(layout[obstacle.name])]
    task.placements_conf.placements = None  # rebuilt at the first reset, now from the pinned locations


@functools.cache
def _task_classes() -> dict[str, type]:
    """The configured upstream task subclasses (defined lazily: safety_gymnasium needs the compat patches first)."""
    import_safety_gymnasium()
    from safety_gymnasium.assets.geoms import Hazards
    from safety_gymnasium.tasks.safe_navigation.button.button_level0 import ButtonLevel0
    from safety_gymnasium.tasks.safe_navigation.circle.circle_level1 import CircleLevel1
    from safety_gymnasium.tasks.safe_navigation.goal.goal_level0 import GoalLevel0

    class ButtonHazardTask(ButtonLevel0):
        """Press the goal button among ``n_buttons``; cost for hazards and for pressing a wrong button."""

        def __init__(self, config: dict, params: PointButtonHazardTask, max_episode_steps: int) -> None:
            super().__init__(config=config)
            self.num_steps = max_episode_steps
            extent = params.extent
            self.placements_conf.extents = [-extent, -extent, extent, extent]
            self.buttons.num = params.n_buttons
            self.buttons.is_constrained = True
            self._add_geoms(Hazards(num=params.n_hazards, keepout=0.18))
            _pin_layout(self, params.layout_seed)

    class GoalHazardTask(GoalLevel0):
        """Reach a fixed goal while avoiding hazards; the episode ends when the goal is reached."""

        def __init__(self, config: dict, params: PointGoalHazardTask, max_episode_steps: int) -> None:
            super().__init__(config=config)
            self.num_steps = max_episode_steps
            extent = params.extent
            self.placements_conf.extents = [-extent, -extent, extent, extent]
            self._add_geoms(Hazards(num=params.n_hazards, keepout=0.18))
            # A pinned goal would respawn under the robot, paying the goal bonus every step: end the episode instead.
            self.mechanism_conf.continue_goal = False
            _pin_layout(self, params.layout_seed)

    class CircleWallsTask(CircleLevel1):
        """Run along a circle of ``radius``; cost when ``|x|`` exceeds ``wall_distance``."""

        def __init__(self, config: dict, params: CarCircleTask, max_episode_steps: int) -> None:
            super().__init__(config=config)
            self.num_steps = max_episode_steps
            self.circle.radius = params.radius
            distance = params.wall_distance
            self.sigwalls.locate_factor = distance
            self.sigwalls.locations = [(distance, 0), (-distance, 0), (0, distance), (0, -distance)]
            # Start strictly inside the walls: safety-gymnasium refuses a world with a cost at reset.
            start = min(0.8, distance - 0.1)
            self.agent.placements = [(-start, -start, start, start)]

    return {"button": ButtonHazardTask, "goal": GoalHazardTask, "circle": CircleWallsTask}


def _make_navigation_env(kind: str, robot: str, task: Task, max_episode_steps: int, render_mode: str | None) -> gym.Env:
    import_safety_gymnasium()
    from safety_gymnasium.builder import Builder
    from safety_gymnasium.wrappers import SafetyGymnasium2Gymnasium

    task_class = _task_classes()[kind]

    class _TaskBuilder(Builder):
        def _get_task(self) -> Any:
            world = task_class({"agent_name": robot}, task, max_episode_steps)
            world.build_observation_space()
            return world

    task_id = f"Safety{robot}{type(task).family}-v0"
    builder = _TaskBuilder(task_id=task_id, config={"agent_name": robot}, render_mode=render_mode)
    builder.spec = None
    return SafetyGymnasium2Gymnasium(builder)


@dataclass(frozen=True, kw_only=True)
class PointButtonHazardTask(Task):
    """Point robot, Button task: ``n_buttons`` buttons and ``n_hazards`` hazards in ``[-extent, extent]^2``."""

    family: ClassVar[str] = "PointButtonHazard"
    n_buttons: int = 4
    n_hazards: int = 4
    extent: float = 1.5


@register_task_distribution
class PointButtonHazard(TaskDistribution):
    """Point-Button-Hazard (the paper's showcase). Reward: progress towards the goal button, +1 for pressing it
    (a new goal button is then drawn). Cost 1 per step in a hazard or touching a wrong button.
    Test tasks are harder than training tasks: more buttons and hazards in a larger arena."""

    name = "PointButtonHazard"
    task_cls = PointButtonHazardTask
    limits: ClassVar[dict[str, ParamRange]] = {
        "n_buttons": ParamRange(1, 10, integer=True),
        "n_hazards": ParamRange(0, 16, integer=True),
        "extent": ParamRange(1.0, 3.0),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "n_buttons": ParamRange(3, 6, integer=True),
        "n_hazards": ParamRange(4, 8, integer=True),
        "extent": ParamRange(1.5, 2.0),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "n_buttons": ParamRange(7, 8, integer=True),
        "n_hazards": ParamRange(10, 14, integer=True),
        "extent": ParamRange(2.25, 2.75),
    }
    default_max_episode_steps = 500
    default_cost_limit = 25.0

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        return _make_navigation_env("button", "Point", task, self.max_episode_steps, render_mode)


@dataclass(frozen=True, kw_only=True)
class PointGoalHazardTask(Task):
    """Point robot, Goal task: a fixed goal and ``n_hazards`` fixed hazards in ``[-extent, extent]^2``."""

    family: ClassVar[str] = "PointGoalHazard"
    n_hazards: int = 8
    extent: float = 1.5


@register_task_distribution
class PointGoalHazard(TaskDistribution):
    """Point-Goal-Hazard: reach the task's goal (reward: progress towards it, +1 on arrival, which ends the episode)
    while avoiding its hazards (cost 1 per step inside one). Test tasks have more hazards in a larger arena."""

    name = "PointGoalHazard"
    task_cls = PointGoalHazardTask
    limits: ClassVar[dict[str, ParamRange]] = {
        "n_hazards": ParamRange(0, 16, integer=True),
        "extent": ParamRange(1.0, 3.0),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "n_hazards": ParamRange(4, 8, integer=True),
        "extent": ParamRange(1.25, 1.75),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "n_hazards": ParamRange(10, 12, integer=True),
        "extent": ParamRange(1.75, 2.0),
    }
    default_max_episode_steps = 500
    default_cost_limit = 25.0

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        return _make_navigation_env("goal", "Point", task, self.max_episode_steps, render_mode)


@dataclass(frozen=True, kw_only=True)
class CarCircleTask(Task):
    """Car robot, Circle task: circle of ``radius``, cost walls at ``x = +-wall_distance``."""

    family: ClassVar[str] = "CarCircle"
    radius: float = 1.5
    wall_distance: float = 1.125


@register_task_distribution
class CarCircle(TaskDistribution):
    """Car-Circle: drive fast along a circle of the task's radius (reward: tangential speed, discounted by the
    distance to the circle) without crossing the walls at ``|x| = wall_distance`` (cost 1 per step outside).
    Test tasks have larger circles, with walls that cut them more."""

    name = "CarCircle"
    task_cls = CarCircleTask
    limits: ClassVar[dict[str, ParamRange]] = {
        "radius": ParamRange(0.5, 3.0),
        "wall_distance": ParamRange(0.3, 3.0),
    }
    default_train_ranges: ClassVar[dict[str, ParamRange]] = {
        "radius": ParamRange(1.0, 1.5),
        "wall_distance": ParamRange(0.6, 1.1),
    }
    default_test_ranges: ClassVar[dict[str, ParamRange]] = {
        "radius": ParamRange(1.75, 2.25),
        "wall_distance": ParamRange(1.0, 1.4),
    }
    default_max_episode_steps = 500
    default_cost_limit = 25.0

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        return _make_navigation_env("circle", "Car", task, self.max_episode_steps, render_mode)
