"""sb3-metacpo: safe meta-reinforcement learning (Meta-CPO) in the Stable-Baselines3 style."""

import os

from sb3_metacpo.cpo import CPO
from sb3_metacpo.meta_trpo import MetaTRPO
from sb3_metacpo.metacpo import MetaCPO
from sb3_metacpo.tasks import list_task_distributions, make_task_distribution

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as file_handler:
    __version__ = file_handler.read().strip()

__all__ = ["CPO", "MetaCPO", "MetaTRPO", "__version__", "list_task_distributions", "make_task_distribution"]
