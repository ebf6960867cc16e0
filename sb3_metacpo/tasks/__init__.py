"""Task distributions: families of constrained tasks for meta-training and held-out evaluation."""

from sb3_metacpo.tasks.base import (
    ParamRange,
    Task,
    TaskDistribution,
    list_task_distributions,
    make_task_distribution,
    register_task_distribution,
    task_distribution_class,
)
from sb3_metacpo.tasks.safety_gym import (
    CarCircle,
    CarCircleTask,
    PointButtonHazard,
    PointButtonHazardTask,
    PointGoalHazard,
    PointGoalHazardTask,
)
from sb3_metacpo.tasks.task_env import TaskEnv
from sb3_metacpo.tasks.toy import Toy2DNav, Toy2DNavTask
from sb3_metacpo.tasks.velocity import HalfCheetahVelocity, HalfCheetahVelocityTask

__all__ = [
    "CarCircle",
    "CarCircleTask",
    "HalfCheetahVelocity",
    "HalfCheetahVelocityTask",
    "ParamRange",
    "PointButtonHazard",
    "PointButtonHazardTask",
    "PointGoalHazard",
    "PointGoalHazardTask",
    "Task",
    "TaskDistribution",
    "TaskEnv",
    "Toy2DNav",
    "Toy2DNavTask",
    "list_task_distributions",
    "make_task_distribution",
    "register_task_distribution",
    "task_distribution_class",
]
