"""Make safety-gymnasium 1.0.0 import and run on Python 3.11, gymnasium 0.29, mujoco 3.3 and numpy 2.3.

safety-gymnasium is installed with ``--no-deps`` (its own pins cannot be installed on Python 3.11). As released it
does not import on this stack, for three reasons:

* Python >= 3.11 rejects ``np.ndarray`` dataclass defaults (``color: np.array = COLOR[...]``) as mutable: every
  module defining a geom fails with ``ValueError: mutable default <class 'numpy.ndarray'> for field color``.
* ``import safety_gymnasium`` imports ``gymnasium_robotics`` (used by the multi-agent tasks only), whose releases
  conflict with this stack.
* gymnasium 0.29's marker rendering sets ``MjvGeom.texid``, which mujoco >= 3.2 removed: rendering a navigation task
  with ``render_mode="rgb_array"`` fails with an ``AttributeError``.

Importing ``sb3_metacpo`` (which imports this module) calls :func:`apply`, after which a plain
``import safety_gymnasium`` and ``safety_gymnasium.make("SafetyPointGoal1Gymnasium-v0")`` work, in any order and in
``SubprocVecEnv`` workers too (they import ``sb3_metacpo`` to unpickle their env factories).

**Exactly what changes, and for how long.**

1. :func:`apply` inserts one finder at the front of ``sys.meta_path``. It answers only for ``safety_gymnasium`` and
   its submodules: it finds their specs with the other finders, unchanged, and wraps the loader so that 2. and 3.
   hold while such a module executes. It returns ``None`` (defers to the next finder) for every other module.
2. *While a safety_gymnasium module executes* (and only then), ``dataclasses._get_field`` is wrapped so that an
   ``np.ndarray`` class default becomes ``field(default_factory=<copy of the array>)``; this changes behaviour only
   where Python would otherwise raise. The original function is put back when the (outermost) module finishes.
3. *While a safety_gymnasium module executes*, if ``gymnasium_robotics`` is not installed, stub modules
   ``gymnasium_robotics``, ``.envs``, ``.envs.multiagent_mujoco`` and ``.envs.multiagent_mujoco.mujoco_multi`` are in
   ``sys.modules``; the last one's ``MultiAgentMujocoEnv`` raises an ``ImportError`` when instantiated. They are
   removed afterwards, so ``import gymnasium_robotics`` elsewhere still fails as it should.
4. After ``safety_gymnasium.bases.underlying`` executes, and only when mujoco has no ``MjvGeom.texid``: that module's
   names ``OffScreenViewer`` and ``KeyboardViewer`` are bound to subclasses whose ``_add_marker_to_scene`` does not
   set ``texid``. gymnasium's own classes are not modified, so other MuJoCo envs render as they did.

Nothing else is touched: no module attribute of Python, numpy, gymnasium or mujoco stays changed after an import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

INSTALL_COMMAND = "pip install sb3-metacpo[safety-gym] && pip install --no-deps safety-gymnasium==1.0.0"

_PACKAGE = "safety_gymnasium"
_ROBOTICS_MODULES = (
    "gymnasium_robotics",
    "gymnasium_robotics.envs",
    "gymnasium_robotics.envs.multiagent_mujoco",
    "gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi",
)
_MARKER_MODULE = "safety_gymnasium.bases.underlying"

_lock = threading.RLock()
_depth = 0  # safety_gymnasium modules executing right now (imports nest)
_restore: list[Any] = []  # undo actions of the patches in force


# --- 2. numpy-array dataclass defaults ---------------------------------------------------------------------------
def _array_default_get_field(original: Any) -> Any:
    """``dataclasses._get_field`` that first turns an ``np.ndarray`` class default into a default factory."""

    @functools.wraps(original)
    def _get_field(cls: type, a_name: str, a_type: Any, *args: Any, **kwargs: Any) -> Any:
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if isinstance(default, np.ndarray):
            setattr(cls, a_name, dataclasses.field(default_factory=functools.partial(np.array, default)))
        return original(cls, a_name, a_type, *args, **kwargs)

    return _get_field


def _patch_dataclass_array_defaults() -> None:
    original = dataclasses._get_field  # type: ignore[attr-defined]
    patched = _array_default_get_field(original)
    dataclasses._get_field = patched  # type: ignore[attr-defined]

    def undo() -> None:
        if dataclasses._get_field is patched:  # type: ignore[attr-defined]  # leave anyone else's patch alone
            dataclasses._get_field = original  # type: ignore[attr-defined]

    _restore.append(undo)


# --- 3. gymnasium_robotics stub ----------------------------------------------------------------------------------
class _MultiAgentMujocoEnvUnavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("gymnasium_robotics is not installed; it is only needed by safety-gymnasium's multi-agent tasks")


@functools.cache
def _robotics_installed() -> bool:
    return importlib.util.find_spec("gymnasium_robotics") is not None


def _stub_gymnasium_robotics() -> None:
    if "gymnasium_robotics" in sys.modules or _robotics_installed():
        return
    stubs = {name: types.ModuleType(name) for name in _ROBOTICS_MODULES}
    stubs[_ROBOTICS_MODULES[-1]].MultiAgentMujocoEnv = _MultiAgentMujocoEnvUnavailable  # type: ignore[attr-defined]
    sys.modules.update(stubs)

    def undo() -> None:
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]

    _restore.append(undo)


@contextlib.contextmanager
def _import_patches() -> Iterator[None]:
    """2. and 3. of the module docstring, for the duration of the outermost safety_gymnasium module's execution."""
    global _depth
    with _lock:
        if _depth == 0:
            _patch_dataclass_array_defaults()
            _stub_gymnasium_robotics()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _restore:
                    _restore.pop()()


# --- 4. marker rendering on mujoco >= 3.2 ------------------------------------------------------------------------
def _add_marker_to_scene(self: Any, marker: dict) -> None:
    """gymnasium 0.29's ``BaseRender._add_marker_to_scene`` without ``geom.texid`` (removed in mujoco 3.2)."""
    import mujoco

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


_FIXED_VIEWER_CLASSES: dict[type, type] = {}


def _marker_fixed_class(viewer_cls: type) -> type:
    """``viewer_cls`` with :func:`_add_marker_to_scene` (one subclass per class)."""
    if viewer_cls not in _FIXED_VIEWER_CLASSES:
        _FIXED_VIEWER_CLASSES[viewer_cls] = _subclass_with_marker_fix(viewer_cls)
    return _FIXED_VIEWER_CLASSES[viewer_cls]


def _subclass_with_marker_fix(viewer_cls: type) -> type:
    return type(
        viewer_cls.__name__,
        (viewer_cls,),
        {
            "__doc__": f"{viewer_cls.__name__} whose markers render on mujoco >= 3.2 (see sb3_metacpo.tasks.compat).",
            "__module__": __name__,
            "_add_marker_to_scene": _add_marker_to_scene,
            "_sb3_metacpo_marker_fix": True,
        },
    )


def _fix_marker_rendering(module: types.ModuleType) -> None:
    import mujoco

    if hasattr(mujoco.MjvGeom(), "texid"):
        return
    for name in ("OffScreenViewer", "KeyboardViewer"):
        viewer_cls = getattr(module, name, None)
        if not isinstance(viewer_cls, type) or getattr(viewer_cls, "_sb3_metacpo_marker_fix", False):
            continue
        setattr(module, name, _marker_fixed_class(viewer_cls))


def fix_viewer_markers(viewer: Any) -> None:
    """Make a gymnasium MuJoCo viewer (``OffScreenViewer``, ``WindowViewer``) draw markers on mujoco >= 3.2, where
    gymnasium 0.29's ``_add_marker_to_scene`` fails on the removed ``MjvGeom.texid`` (e.g. safety-gymnasium's velocity
    marker on a rendered HalfCheetah): the viewer becomes an instance of a subclass with the fixed method. A no-op
    where mujoco still has ``texid`` or the viewer is fixed already."""
    import mujoco

    if viewer is None or getattr(viewer, "_sb3_metacpo_marker_fix", False) or hasattr(mujoco.MjvGeom(), "texid"):
        return
    viewer.__class__ = _marker_fixed_class(type(viewer))


_POST_EXEC = {_MARKER_MODULE: _fix_marker_rendering}


# --- 1. the import hook ------------------------------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader of a safety_gymnasium module, with the import patches in force while it runs."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with _import_patches():
            self._loader.exec_module(module)
        post_exec = _POST_EXEC.get(module.__name__)
        if post_exec is not None:
            post_exec(module)

    def __getattr__(self, name: str) -> Any:  # get_data, get_filename, get_resource_reader, ...
        return getattr(self._loader, name)


class _SafetyGymnasiumFinder(importlib.abc.MetaPathFinder):
    """Finds safety_gymnasium modules with the other finders and wraps their loader in a :class:`_PatchingLoader`."""

    _sb3_metacpo_compat = True

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] != _PACKAGE:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_sb3_metacpo_compat", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                spec.loader = _PatchingLoader(spec.loader)  # type: ignore[arg-type]
            return spec
        return None


def apply() -> None:
    """Install the import hook (idempotent). Also fixes marker rendering if safety_gymnasium is already imported."""
    with _lock:
        if not any(getattr(finder, "_sb3_metacpo_compat", False) for finder in sys.meta_path):
            sys.meta_path.insert(0, _SafetyGymnasiumFinder())
    for name, post_exec in _POST_EXEC.items():
        module = sys.modules.get(name)
        if module is not None:
            post_exec(module)


def import_safety_gymnasium() -> types.ModuleType:
    """Return the ``safety_gymnasium`` module with the patches applied, or raise an ImportError saying how to install it."""
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ImportError(
            "safety-gymnasium is not installed. It cannot be installed with its own dependencies on Python 3.11; "
            f"install it with:\n    {INSTALL_COMMAND}\n(`make install` in the sb3-metacpo repository does this)."
        )
    apply()
    if _PACKAGE not in sys.modules:
        _import_on_a_fresh_stack(_PACKAGE)
    return importlib.import_module(_PACKAGE)


def _import_on_a_fresh_stack(name: str) -> None:
    """Import ``name`` on a thread of its own. A module that keeps an exception raised while it imports keeps that
    exception's traceback, and through its frames every caller's frame with its locals: gymnasium's ``mujoco_env``
    keeps mujoco_py's ``ImportError``, so the env whose construction first imported safety_gymnasium (its MuJoCo model
    and data, the skybox's 191 MB where it renders) was never freed. A thread's stack starts at the thread."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            importlib.import_module(name)
        except Exception as error:  # raised again on the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name=f"import {name}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


apply()
