"""Make safety-gymnasium 1.0.0 import and run on Python 3.11, gymnasium 0.29, mujoco 3.3 and numpy 2.3.

safety-gymnasium is installed with ``--no-deps`` (its own pins cannot be installed on Python 3.11), which leaves three
problems that :func:`import_safety_gymnasium` fixes before the first import, in whichever process builds a task env
(the main process or a ``SubprocVecEnv`` worker alike):

* Python >= 3.11 rejects ``np.ndarray`` dataclass defaults (``color: np.array = COLOR[...]``) as mutable: they are
  turned into ``default_factory`` copies. This only changes behaviour where Python would otherwise raise.
* ``import safety_gymnasium`` imports ``gymnasium_robotics`` (used by the multi-agent tasks only), whose releases
  conflict with this stack: a stub module is registered when it is absent.
* gymnasium 0.29's marker rendering sets ``MjvGeom.texid``, which mujoco >= 3.2 removed: the marker code is replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
import types
from typing import Any

import numpy as np

INSTALL_COMMAND = "pip install --no-deps safety-gymnasium==1.0.0 xmltodict pyyaml imageio"

_ROBOTICS_MODULES = (
    "gymnasium_robotics",
    "gymnasium_robotics.envs",
    "gymnasium_robotics.envs.multiagent_mujoco",
    "gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi",
)

_applied = False


def _patch_dataclass_array_defaults() -> None:
    original = dataclasses._get_field  # type: ignore[attr-defined]
    if getattr(original, "_sb3_metacpo_patched", False):
        return

    def _get_field(cls: type, a_name: str, a_type: Any, *args: Any, **kwargs: Any) -> Any:
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if isinstance(default, np.ndarray):
            setattr(cls, a_name, dataclasses.field(default_factory=functools.partial(np.array, default)))
        return original(cls, a_name, a_type, *args, **kwargs)

    _get_field._sb3_metacpo_patched = True  # type: ignore[attr-defined]
    dataclasses._get_field = _get_field  # type: ignore[attr-defined]


class _MultiAgentMujocoEnvUnavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("gymnasium_robotics is not installed; it is only needed by safety-gymnasium's multi-agent tasks")


def _stub_gymnasium_robotics() -> None:
    if importlib.util.find_spec("gymnasium_robotics") is not None:
        return
    for name in _ROBOTICS_MODULES:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[_ROBOTICS_MODULES[-1]].MultiAgentMujocoEnv = _MultiAgentMujocoEnvUnavailable  # type: ignore[attr-defined]


def _patch_marker_rendering() -> None:
    import mujoco

    if hasattr(mujoco.MjvGeom(), "texid"):
        return
    from gymnasium.envs.mujoco import mujoco_rendering

    def _add_marker_to_scene(self: Any, marker: dict) -> None:
        if self.scn.ngeom >= self.scn.maxgeom:
            raise RuntimeError(f"Ran out of geoms. maxgeom: {self.scn.maxgeom}")
        geom = self.scn.geoms[self.scn.ngeom]
        mujoco.mjv_initGeom(
            geom, mujoco.mjtGeom.mjGEOM_BOX, np.ones(3) * 0.1, np.zeros(3), np.eye(3).flatten(), np.ones(4, np.float32)
        )
        geom.category = mujoco.mjtCatBit.mjCAT_DECOR
        for key, value in marker.items():
            if isinstance(value, (int, float, mujoco.mjtGeom)):
                setattr(geom, key, value)
            elif isinstance(value, (tuple, list, np.ndarray)):
                attribute = getattr(geom, key)
                attribute[:] = np.asarray(value).reshape(attribute.shape)
            elif isinstance(value, str):
                geom.label = value
            else:
                raise ValueError(f"Unsupported marker field {key!r} of type {type(value).__name__}")
        self.scn.ngeom += 1

    mujoco_rendering.BaseRender._add_marker_to_scene = _add_marker_to_scene


def apply() -> None:
    """Install the compatibility patches (idempotent); must run before ``safety_gymnasium`` is imported."""
    global _applied
    if _applied:
        return
    _patch_dataclass_array_defaults()
    _stub_gymnasium_robotics()
    _patch_marker_rendering()
    _applied = True


def import_safety_gymnasium() -> types.ModuleType:
    """Return the ``safety_gymnasium`` module with the patches applied, or raise an ImportError saying how to install it."""
    if importlib.util.find_spec("safety_gymnasium") is None:
        raise ImportError(
            "safety-gymnasium is not installed. It cannot be installed with its own dependencies on Python 3.11; "
            f"install it with:\n    {INSTALL_COMMAND}\n(`make install` in the sb3-metacpo repository does this)."
        )
    apply()
    return importlib.import_module("safety_gymnasium")
