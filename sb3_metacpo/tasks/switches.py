"""The module switches between the library's fast simulator code and upstream's, as one value that goes with env
factories to worker processes.

``safety_gym.FAST_STEP``, ``safety_gym.FAST_RESET``, ``safety_gym.UNRENDERED_SKYBOX`` and ``velocity.FAST_STEP`` are
read when an env is made (``velocity.FAST_STEP`` at every step). A worker process started with ``forkserver`` or
``spawn`` (the library's ``SubprocVecEnv``, Ray's workers) imports the modules afresh, with the defaults: a switch set
in the main process would not reach it. :class:`SimulatorSwitches` takes their values where an env factory is made
and sets them in the process that builds the envs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatorSwitches:
    """The values of the simulator switches (see the module docstring)."""

    navigation_fast_step: bool
    navigation_fast_reset: bool
    unrendered_skybox: bool
    velocity_fast_step: bool

    @classmethod
    def current(cls) -> SimulatorSwitches:
        """The switches as they are set in this process now."""
        from sb3_metacpo.tasks import safety_gym, velocity

        return cls(safety_gym.FAST_STEP, safety_gym.FAST_RESET, safety_gym.UNRENDERED_SKYBOX, velocity.FAST_STEP)

    def apply(self) -> None:
        """Set the switches of this process to these values (for the envs made from now on)."""
        from sb3_metacpo.tasks import safety_gym, velocity

        safety_gym.FAST_STEP = self.navigation_fast_step
        safety_gym.FAST_RESET = self.navigation_fast_reset
        safety_gym.UNRENDERED_SKYBOX = self.unrendered_skybox
        velocity.FAST_STEP = self.velocity_fast_step
