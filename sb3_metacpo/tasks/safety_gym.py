"""Task families on upstream safety-gymnasium navigation tasks (Point/Car robots; Button, Goal and Circle tasks).

The upstream task classes are subclassed and configured; nothing is vendored. A task's objects (buttons, hazards,
goal) are placed once, by safety-gymnasium's own placement sampler seeded with the task's ``layout_seed``, and then
pinned with upstream's ``locations`` mechanism, so every episode of a task shares the layout while the robot's start
pose still comes from the episode's seed.

Upstream compiles a new MuJoCo model from a new XML at every reset (~0.3 s, mostly decoding the skybox texture). With
the layout pinned, consecutive XMLs differ only in poses, so the envs here move the bodies of the already compiled
model instead (:func:`_reusing_world_class`); episodes are bitwise identical to upstream's. A new task still needs
a compile; a world that is never rendered compiles without the skybox (``UNRENDERED_SKYBOX``), ~1 ms instead of
~0.27 s, and upstream's asset list (``configs/assets.yaml``) is parsed once per process instead of at every build
(~7.5 ms). Each reset's layout is drawn by upstream's rejection sampler with its runs of rejected tries batched
(:mod:`sb3_metacpo.tasks.fast_layout`): the same draws, a PointGoalHazard reset ~4 → ~1.2 ms.

Upstream's step spends most of its time in Python loops (pseudo-lidar, contact costs, name look-ups). The envs here use
task classes whose per-step methods compute the same values on arrays (:mod:`sb3_metacpo.tasks.fast_step`,
``FAST_STEP``); :func:`fast_standard_env` gives the standard ids (``SafetyPointGoal1Gymnasium-v0``, ...) the same.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from sb3_metacpo.tasks.base import ParamRange, Task, TaskDistribution, register_task_distribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.fast_layout import fast_layout_class

FAST_RESET = True
"""Whether navigation envs made from now on reuse their compiled MuJoCo model across resets when only poses change.
Set it to ``False`` (before making the envs) for upstream's reset, which recompiles the model every episode and
draws each layout try by try; the episodes are the same either way (``tests/test_fast_reset.py``,
``tests/test_fast_layout.py``), only slower. For standard ids (:func:`fast_standard_env`) it applies with
``FAST_STEP`` only. Worker processes of the library's ``SubprocVecEnv`` and Ray sampler get the value set where
their env factories (the sampler) are made (:class:`~sb3_metacpo.tasks.switches.SimulatorSwitches`), as do
``UNRENDERED_SKYBOX`` and ``FAST_STEP``."""

UNRENDERED_SKYBOX = False
"""Whether navigation worlds that are never rendered (made without a ``render_mode`` and without vision
observations) still compile upstream's skybox: six 3259x3259 star photographs, 191 MB of texture per model, whose
decoding is ~0.27 s of every compile of a new world (a new task) against ~1 ms for the rest. Without it, every other
model array (the physics, the geoms, materials, sensors) is the same and episodes are bitwise identical
(``tests/test_fast_reset.py``). Set it to ``True`` (before making the envs) to compile it anyway, e.g. to render a
world's model with your own renderer; envs made with a ``render_mode`` always have it. Applies with ``FAST_RESET``
(upstream's own world, ``FAST_RESET = False``, is left as it is)."""

FAST_STEP = True
"""Whether navigation envs made from now on (the families here, and standard ids built by the library) compute their
observations, costs and goal checks on arrays (:class:`~sb3_metacpo.tasks.fast_step.FastStepMixin`) instead of
upstream's Python loops. Set it to ``False`` (before making the envs) for upstream's code; the episodes are the same
either way (``tests/test_fast_step.py``), only slower, with one exception: a task without hazards (``n_hazards=0``,
which the families allow) makes upstream's pseudo-lidar raise ``AssertionError: Bad pos []`` at reset, where the fast
one reads zeros."""


def _pin_layout(task: Any, layout_seed: int) -> None:
    """Sample the objects' positions from ``layout_seed`` with upstream's sampler and fix them as ``locations``."""
    from safety_gymnasium.utils.common_utils import ResamplingError
    from safety_gymnasium.utils.random_generator import RandomGenerator

    task._build_placements_dict()
    sampler = fast_layout_class()() if FAST_RESET else RandomGenerator()
    sampler.set_placements_info(task.placements_conf.placements, task.placements_conf.extents, task.placements_conf.margin)
    sampler.set_random_seed(layout_seed)
    try:
        layout = sampler.build_layout()
    except ResamplingError as error:  # upstream's bare "Failed to sample layout of objects"
        counts = {obstacle.name: getattr(obstacle, "num", 1) for obstacle in task._obstacles}
        raise ValueError(
            f"no layout of this task's objects {counts} fits its arena [{', '.join(map(str, task.placements_conf.extents))}] "
            f"(upstream's sampler gave up after its tries, layout_seed={layout_seed}): give the task a larger extent or "
            "fewer objects (and keep the distribution's ranges to tasks that fit)"
        ) from error
    for obstacle in task._obstacles:
        if hasattr(obstacle, "num"):
            obstacle.locations = [tuple(layout[f"{obstacle.name[:-1]}{i}"]) for i in range(obstacle.num)]
        else:
            obstacle.locations = [tuple(layout[obstacle.name])]
    task.placements_conf.placements = None  # rebuilt at the first reset, now from the pinned locations


def _plain(value: Any) -> Any:
    """Nested dicts, lists and arrays as plain Python values, so that world configs compare with ``==``."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    return value


def _plain_free_body(name: str, config: dict) -> bool:
    """Whether ``World.build`` writes a free geom as a plain free body (``pos``, ``quat`` from ``rot``, a free joint,
    one geom): vases and gremlins' boxes, not the push box (five geoms) or meshes (oriented by ``euler``)."""
    return name != "push_box" and config["type"] != "mesh"


def _without_poses(config: dict) -> Any:
    """A world config without the poses that :class:`ReusingWorld` sets in the compiled model: what else the XML holds.
    Mocaps (gremlins) lose theirs too, but for meshes, whose geom frame the compiler combines with the mesh's."""
    fixed = {key: value for key, value in config.items() if key not in ("agent_xy", "agent_rot")}
    fixed["geoms"] = {
        name: {k: v for k, v in geom.items() if k not in ("pos", "rot")} for name, geom in config["geoms"].items()
    }
    fixed["free_geoms"] = {
        name: {k: v for k, v in geom.items() if k not in ("pos", "rot")} if _plain_free_body(name, geom) else geom
        for name, geom in config.get("free_geoms", {}).items()
    }
    fixed["mocaps"] = {
        name: {k: v for k, v in mocap.items() if k not in ("pos", "rot")} if mocap["type"] != "mesh" else mocap
        for name, mocap in config.get("mocaps", {}).items()
    }
    return _plain(fixed)


_FRAME_EPS = 1e-6  # the compiler's kFrameEps (user_model.cc): frames closer than this, element-wise, are the same


def _same_quat(quat1: np.ndarray, quat2: np.ndarray) -> bool:
    """The compiler's ``IsSameQuat``: element-wise within ``_FRAME_EPS``, either sign (double cover)."""
    return bool(np.all(np.abs(quat1 - quat2) < _FRAME_EPS) or np.all(np.abs(quat1 + quat2) < _FRAME_EPS))


def _same_frame(pos: np.ndarray, quat: np.ndarray, ipos: np.ndarray | None = None, iquat: np.ndarray | None = None) -> int:
    """The compiler's ``sameframe`` of a body (``ipos``, ``iquat`` not given: of its inertial frame ``pos``, ``quat``)
    or of a geom (``pos``, ``quat`` in its body with inertial frame ``ipos``, ``iquat``): ``mjtSameFrame``, tested in
    the compiler's order."""
    import mujoco

    frame = mujoco.mjtSameFrame
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    if np.all(np.abs(pos) < _FRAME_EPS) and _same_quat(quat, identity):
        return int(frame.mjSAMEFRAME_BODY)
    if _same_quat(quat, identity):
        return int(frame.mjSAMEFRAME_BODYROT)
    if ipos is None or iquat is None:
        return int(frame.mjSAMEFRAME_NONE)
    if np.all(np.abs(pos - ipos) < _FRAME_EPS) and _same_quat(quat, iquat):
        return int(frame.mjSAMEFRAME_INERTIA)
    if _same_quat(quat, iquat):
        return int(frame.mjSAMEFRAME_INERTIAROT)
    return int(frame.mjSAMEFRAME_NONE)


def _xyaxes_to_quat(x: list[float], y: list[float]) -> list[float]:
    """The MuJoCo compiler's conversion of a frame's ``xyaxes`` to a quaternion (``user_util.cc``), operation for
    operation so that the result is bitwise the compiled one."""

    def normalize(vec: list[float]) -> list[float]:  # mjuu_normvec: left alone when already within 1e-14 of unit length
        norm = math.sqrt(sum(item * item for item in vec))
        return vec if abs(norm - 1) <= 1e-14 else [item / norm for item in vec]

    x = normalize(x)
    dot = x[0] * y[0] + x[1] * y[1] + x[2] * y[2]
    y = normalize([y[i] - x[i] * dot for i in range(3)])
    z = normalize([x[1] * y[2] - x[2] * y[1], x[2] * y[0] - x[0] * y[2], x[0] * y[1] - x[1] * y[0]])
    mat = (x, y, z)  # columns: mat[c][r]
    if mat[0][0] + mat[1][1] + mat[2][2] > 0:
        w = 0.5 * math.sqrt(1 + mat[0][0] + mat[1][1] + mat[2][2])
        quat = [w, 0.25 * (mat[1][2] - mat[2][1]) / w, 0.25 * (mat[2][0] - mat[0][2]) / w, 0.25 * (mat[0][1] - mat[1][0]) / w]
    elif mat[0][0] > mat[1][1] and mat[0][0] > mat[2][2]:
        q1 = 0.5 * math.sqrt(1 + mat[0][0] - mat[1][1] - mat[2][2])
        quat = [
            0.25 * (mat[1][2] - mat[2][1]) / q1,
            q1,
            0.25 * (mat[1][0] + mat[0][1]) / q1,
            0.25 * (mat[2][0] + mat[0][2]) / q1,
        ]
    elif mat[1][1] > mat[2][2]:
        q2 = 0.5 * math.sqrt(1 - mat[0][0] + mat[1][1] - mat[2][2])
        quat = [
            0.25 * (mat[2][0] - mat[0][2]) / q2,
            0.25 * (mat[1][0] + mat[0][1]) / q2,
            q2,
            0.25 * (mat[2][1] + mat[1][2]) / q2,
        ]
    else:
        q3 = 0.5 * math.sqrt(1 - mat[0][0] - mat[1][1] + mat[2][2])
        quat = [
            0.25 * (mat[0][1] - mat[1][0]) / q3,
            0.25 * (mat[2][0] + mat[0][2]) / q3,
            0.25 * (mat[2][1] + mat[1][2]) / q3,
            q3,
        ]
    return normalize(quat)


#: What the :class:`ReusingWorld` building on this thread wants of upstream's world module (``reusing``: its build is
#: running; ``without_skybox``: it compiles no skybox). The module's stand-ins read it, so that a build of upstream's
#: own ``World`` on another thread at the same time (a stock env, or ``FAST_RESET = False``) is upstream's, bitwise.
_BUILDING = threading.local()


class _XmlWithoutSkybox:
    """``xmltodict`` as upstream's ``World.build`` uses it, but, while a :class:`ReusingWorld` without the skybox builds
    on this thread, ``unparse`` leaves the skybox texture out of the XML it writes (the world's own dict keeps it);
    upstream's ``unparse`` itself for every other build."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def unparse(self, document: dict, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_BUILDING, "without_skybox", False):
            return self._module.unparse(document, *args, **kwargs)
        root = document["mujoco"]
        textures = root.get("asset", {}).get("texture")
        if isinstance(textures, list):
            kept = [texture for texture in textures if texture.get("@type") != "skybox"]
            document = {**document, "mujoco": {**root, "asset": {**root["asset"], "texture": kept}}}
        return str(self._module.unparse(document, *args, **kwargs))


class _YamlParsingOnce:
    """``yaml`` as upstream's ``World.build`` uses it, but, while a :class:`ReusingWorld` builds on this thread, ``load``
    parses each text once per process and returns a deep copy of that value from then on (upstream's ``load`` itself
    for every other build). Upstream reads its ``configs/assets.yaml`` (3.4 kB) with the pure-Python loader at every
    build of a new world: ~7.5 ms of a ~14 ms build of a new navigation task. The value is the same (the same text,
    loader and parse); the copy keeps the world's XML dict from sharing objects with the cache."""

    _parsed: ClassVar[dict[tuple[str, type], Any]] = {}

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def load(self, stream: Any, Loader: type) -> Any:
        if not getattr(_BUILDING, "reusing", False):
            return self._module.load(stream, Loader=Loader)
        text = stream if isinstance(stream, str) else stream.read()
        key = (text, Loader)
        if key not in self._parsed:
            self._parsed[key] = self._module.load(text, Loader=Loader)
        return copy.deepcopy(self._parsed[key])


def _batch_layout_tries(task: Any) -> None:
    """Give ``task``'s random generator (shared by its robot and objects) the batched layout tries of
    :mod:`~sb3_metacpo.tasks.fast_layout`, in place: the same draws and layouts as upstream's."""
    task.random_generator.__class__ = fast_layout_class()


def _reusing_world(task: Any, render_mode: str | None) -> Any:
    """A :class:`ReusingWorld` for an upstream navigation ``task``; without the skybox unless the env renders (a
    ``render_mode``, or vision observations) or ``UNRENDERED_SKYBOX``."""
    world = _reusing_world_class()(task.agent, task._obstacles)
    world.skybox = render_mode is not None or task.observe_vision or UNRENDERED_SKYBOX
    return world


@functools.cache
def _reusing_world_class() -> type:
    """A safety-gymnasium ``World`` that skips the recompile when only poses change (defined lazily, like the tasks)."""
    import_safety_gymnasium()
    import mujoco
    from safety_gymnasium.utils.common_utils import rot2quat
    from safety_gymnasium.world import World

    # The stand-ins stay in upstream's world module from now on (this runs once per process): a build that is not a
    # ReusingWorld's on its own thread gets upstream's xmltodict and yaml through them, unchanged.
    module = sys.modules[World.__module__]
    module.xmltodict = _XmlWithoutSkybox(module.xmltodict)  # type: ignore[attr-defined]
    module.yaml = _YamlParsingOnce(module.yaml)  # type: ignore[attr-defined]

    class ReusingWorld(World):
        """Upstream's reset samples a layout and start pose, writes them into a new XML and compiles it (``rebuild``).
        When that XML would differ from the compiled one only in body poses (the agent's start pose and its tracking
        camera, the pinned objects, which upstream re-samples within 1e-9 of their locations, their random rotations,
        and gremlins: a mocap body's geom and the free body welded to it), this sets those poses in the compiled model,
        as the compiler would read them from the XML, derives what the compiler derives from them the way it does, and
        resets the data instead. The rest of the reset is upstream's own code, before ``rebuild`` (every random draw:
        layout, start pose, rotations) and after it (goal choice, last goal distance, button timer)."""

        _compiled: Any = None  # _without_poses of the config the model was compiled from
        #: Compile the skybox texture (set False for a world that is never rendered: see ``UNRENDERED_SKYBOX``).
        skybox: bool = True

        def build(self) -> None:
            """Upstream's build, with what the stand-ins in upstream's world module give a world built on this
            thread: ``yaml``, whose asset list is parsed once per process (:class:`_YamlParsingOnce`), and for a world
            without ``skybox`` ``xmltodict``, which writes its XML (and so compiles its model) without the skybox
            texture. Other threads' builds, upstream's own worlds' among them, go on as upstream's meanwhile."""
            previous = getattr(_BUILDING, "reusing", False), getattr(_BUILDING, "without_skybox", False)
            _BUILDING.reusing, _BUILDING.without_skybox = True, not self.skybox
            try:
                super().build()
            finally:
                _BUILDING.reusing, _BUILDING.without_skybox = previous

        def rebuild(self, config: dict | None = None, state: bool = True) -> None:
            if config is not None:
                self.parse(config)
            fixed = _without_poses(self.config)
            # first build, a kept state, a different XML or (rarely) a frame flag the poses cannot set: upstream's path
            if state or fixed != self._compiled or not self._set_poses():
                super().rebuild(state=state)
                self._compiled = fixed
                return
            model, data = self.model, self.data
            # The compiler's last step (mjCModel::TryCompile, user_model.cc): mj_setConst on fresh data
            # (mocap bodies at their model pose, not where the last episode left them), contacts disabled.
            mujoco.mj_resetData(model, data)
            flags = model.opt.disableflags
            model.opt.disableflags = flags | mujoco.mjtDisableBit.mjDSBL_CONTACT
            mujoco.mj_setConst(model, data)  # the constants (and welds' reference poses) derived from qpos0
            model.opt.disableflags = flags
            mujoco.mj_resetData(model, data)  # what a fresh MjData holds
            mujoco.mj_forward(model, data)

        def _set_poses(self) -> bool:
            """The poses ``World.build`` writes into the XML, as the compiler reads them: XML numbers are Python's
            shortest round-trip repr, so the doubles come back unchanged; ``rot2quat`` is unit length within 1e-14, so
            the compiler does not renormalise it; the tracking camera's ``xyaxes`` go through the compiler's own
            conversion. False (the model then half set, to be replaced by a compiled one) where a body's inertial
            frame would start or stop coinciding with its frame, which changes which bodies are "simple"."""
            model = self.model
            agent = model.body("agent")
            agent.pos[:] = np.r_[self.agent_xy, self._agent.z_height]
            agent.quat[:] = rot2quat(self.agent_rot)
            framed = []  # bodies whose inertial frame, or whose geoms' frames, follow the poses set here
            free = [(name, geom) for name, geom in self.free_geoms.items() if _plain_free_body(name, geom)]
            for name, geom in [*self.geoms.items(), *free]:
                body = model.body(name)
                body.pos[:] = geom["pos"]
                if geom["type"] != "mesh":  # mesh geoms are oriented by a fixed ``euler`` instead
                    body.quat[:] = rot2quat(geom["rot"])
                # The compiler gives a body without geoms in its inertia groups (0-5 by default: the goal, circle and
                # walls) its own frame as inertial frame; the others' comes from their geoms, in body coordinates.
                if not np.any((model.geom_bodyid == body.id) & (model.geom_group <= 5)):
                    body.ipos[:] = body.pos
                    body.iquat[:] = body.quat
                    framed.append(body)
            for name, mocap in self.mocaps.items():
                if mocap["type"] != "mesh":  # (_without_poses keeps a mesh's pose: any change recompiles)
                    framed.append(self._set_mocap_pose(name, mocap))
            for body in [agent, *[model.body(name) for name, _ in free]]:  # the Car's, vases' and gremlins' free joints
                self._start_free_joints(body)
            theta = self.agent_rot + np.pi  # the tracking camera, as World.build places it
            camera = model.camera("track")
            camera.pos[:] = [0 * np.cos(theta) + (-2) * np.sin(theta), 0 * (-np.sin(theta)) + (-2) * np.cos(theta), 2]
            camera.quat[:] = _xyaxes_to_quat([np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 1])
            return self._set_same_frames(framed)

        def _set_mocap_pose(self, name: str, mocap: dict) -> Any:
            """A mocap as ``World.build`` writes it: a body at the world's origin (its pose, and so the data's initial
            ``mocap_pos``, never change) holding one geom at the mocap's pose, and a weld to its free body without a
            ``relpose``. The compiler copies a body's single massive geom's frame (in an inertia group) as its
            inertial frame (``mjCBody::InertiaFromGeom``), and leaves the weld's reference pose zero for
            ``mj_setConst`` to compute from qpos0 (``eq_data[3:10]``: body2's pose in body1's frame). Returns the
            body."""
            model = self.model
            body, geom = model.body(name), model.geom(name)
            geom.pos[:] = mocap["pos"]
            geom.quat[:] = rot2quat(mocap["rot"])
            model.eq_data[model.equality(name).id, 3:10] = 0.0
            if body.geomnum[0] == 1 and 0 <= geom.group[0] <= 5 and body.mass[0] > 1e-14:  # mjEPS
                body.ipos[:] = geom.pos
                body.iquat[:] = geom.quat
            return body  # (otherwise the body's own frame stays its inertial frame)

        def _set_same_frames(self, bodies: list[Any]) -> bool:
            """The compiler's ``sameframe`` flags (which frames coincide within 1e-6, read by ``mj_kinematics``) of
            ``bodies``, whose inertial frames or geoms moved, and of their geoms; False where a body's would change to or from
            ``mjSAMEFRAME_BODY``, on which ``body_simple`` depends (then the model must be compiled)."""
            model = self.model
            body_frame = int(mujoco.mjtSameFrame.mjSAMEFRAME_BODY)
            for body in bodies:
                flag = _same_frame(body.ipos, body.iquat)
                if flag != model.body_sameframe[body.id] and body_frame in (flag, model.body_sameframe[body.id]):
                    return False
                model.body_sameframe[body.id] = flag
                for geom in range(body.geomadr[0], body.geomadr[0] + body.geomnum[0]):
                    model.geom_sameframe[geom] = _same_frame(
                        model.geom_pos[geom], model.geom_quat[geom], body.ipos, body.iquat
                    )
            return True

        def _start_free_joints(self, body: Any) -> None:
            """A free joint of ``body`` starts at the body's pose (the compiler's ``qpos0``, and its spring pose)."""
            model = self.model
            for joint in range(body.jntadr[0], body.jntadr[0] + body.jntnum[0]):
                if model.jnt_type[joint] == mujoco.mjtJoint.mjJNT_FREE:
                    start = model.jnt_qposadr[joint]
                    model.qpos0[start : start + 7] = np.r_[body.pos, body.quat]
                    model.qpos_spring[start : start + 7] = model.qpos0[start : start + 7]

    return ReusingWorld


@functools.cache
def _task_classes() -> dict[str, type]:
    """The configured upstream task subclasses (defined lazily: safety_gymnasium needs the compat patches first)."""
    import_safety_gymnasium()
    from safety_gymnasium.assets.free_geoms import Vases
    from safety_gymnasium.assets.geoms import Hazards
    from safety_gymnasium.assets.mocaps import Gremlins
    from safety_gymnasium.tasks.safe_navigation.button.button_level0 import ButtonLevel0
    from safety_gymnasium.tasks.safe_navigation.circle.circle_level1 import CircleLevel1
    from safety_gymnasium.tasks.safe_navigation.goal.goal_level0 import GoalLevel0

    class ButtonHazardTask(ButtonLevel0):
        """Press the goal button among ``n_buttons``; cost for hazards and for pressing a wrong button (and, with
        ``n_gremlins``, for touching a gremlin)."""

        def __init__(self, config: dict, params: PointButtonHazardTask, max_episode_steps: int, n_gremlins: int = 0) -> None:
            super().__init__(config=config)
            self.num_steps = max_episode_steps
            extent = params.extent
            self.placements_conf.extents = [-extent, -extent, extent, extent]
            self.buttons.num = params.n_buttons
            self.buttons.is_constrained = True
            self._add_geoms(Hazards(num=params.n_hazards, keepout=0.18))
            if n_gremlins:  # as in upstream's ButtonLevel1
                self._add_mocaps(Gremlins(num=n_gremlins, travel=0.35, keepout=0.4))
            _pin_layout(self, params.layout_seed)

    class GoalHazardTask(GoalLevel0):
        """Reach a fixed goal while avoiding hazards (and, with ``n_vases``, constrained vases); the episode ends when
        the goal is reached."""

        def __init__(self, config: dict, params: PointGoalHazardTask, max_episode_steps: int, n_vases: int = 0) -> None:
            super().__init__(config=config)
            self.num_steps = max_episode_steps
            extent = params.extent
            self.placements_conf.extents = [-extent, -extent, extent, extent]
            self._add_geoms(Hazards(num=params.n_hazards, keepout=0.18))
            if n_vases:  # as in upstream's GoalLevel2: contact and velocity costs
                self._add_free_geoms(Vases(num=n_vases, is_constrained=True))
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


def _make_navigation_env(
    kind: str, robot: str, task: Task, max_episode_steps: int, render_mode: str | None, **options: int
) -> gym.Env:
    """The env of ``task`` on the ``kind`` ("button", "goal", "circle") task class with ``robot`` ("Point", "Car");
    ``options`` go to the task class (``n_gremlins`` for Button, ``n_vases`` for Goal)."""
    import_safety_gymnasium()
    from safety_gymnasium.builder import Builder
    from safety_gymnasium.wrappers import SafetyGymnasium2Gymnasium

    task_class = _task_classes()[kind]
    if FAST_STEP:
        from sb3_metacpo.tasks.fast_step import fast_task_class  # imports MuJoCo: only once an env is built

        task_class = fast_task_class(task_class)
    fast_reset = FAST_RESET

    class _TaskBuilder(Builder):
        def _get_task(self) -> Any:
            navigation = task_class({"agent_name": robot}, task, max_episode_steps, **options)
            navigation.build_observation_space()
            if fast_reset:  # upstream's resets rebuild an existing world (the first one creates a plain World if none)
                navigation.world = _reusing_world(navigation, render_mode)
                _batch_layout_tries(navigation)
            return navigation

    task_id = f"Safety{robot}{type(task).family}-v0"
    # Renders look down on the whole arena ("fixedfar"), which shows a task's layout; upstream's default follows the robot.
    camera = None if render_mode is None else "fixedfar"
    builder = _TaskBuilder(task_id=task_id, config={"agent_name": robot}, render_mode=render_mode, camera_name=camera)
    builder.spec = None
    return SafetyGymnasium2Gymnasium(builder)


_STANDARD_TASKS = ("GoalLevel", "ButtonLevel", "CircleLevel")  # upstream task classes the fast step reproduces
_STANDARD_AGENTS = ("Point", "Car")


def fast_standard_env(env: gym.Env) -> gym.Env:
    """Give a safety-gymnasium navigation env made from a standard id (``SafetyPointGoal1Gymnasium-v0``, Goal, Button
    and Circle tasks of levels 0-2, Point and Car robots) the fast per-step methods, in place, when ``FAST_STEP`` is
    on, and (with ``FAST_RESET``, before its first reset) the world that moves bodies instead of recompiling when only
    poses change: every reset of Goal, Button and Circle tasks (random layouts are poses, gremlins' included), and the
    layout sampler with batched tries (:mod:`~sb3_metacpo.tasks.fast_layout`, the same draws). Returns
    ``env``. Other envs (other tasks or robots) are returned unchanged; vision or
    natural-lidar variants keep upstream's observation code inside the fast class."""
    if not FAST_STEP or "safety_gymnasium" not in sys.modules:
        return env
    from safety_gymnasium.builder import Builder

    from sb3_metacpo.tasks.fast_step import FastStepMixin, fast_task_class

    builder = env.unwrapped
    if not isinstance(builder, Builder):
        return env
    task = builder.task
    kind: type = type(task)
    standard = kind.__module__.startswith("safety_gymnasium.tasks.safe_navigation.") and kind.__name__.startswith(
        _STANDARD_TASKS
    )
    if standard and type(task.agent).__name__ in _STANDARD_AGENTS and not isinstance(task, FastStepMixin):
        task.__class__ = fast_task_class(kind)
        if FAST_RESET:
            _batch_layout_tries(task)
            if task.world is None:  # (upstream's first reset then builds into this world)
                task.world = _reusing_world(task, builder.render_mode)
    return env


def _object_count(name: str, value: int, high: int = 10) -> int:
    """A family's count of optional objects, checked (an integer in ``[0, high]``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= high:
        raise ValueError(f"{name} must be an integer in [0, {high}], got {value!r}")
    return int(value)


def _with_count(params: dict[str, Any], name: str, value: int) -> dict[str, Any]:
    """``params`` with an optional-object count, left out at its default 0 (older parameter dicts stay valid)."""
    return {**params, name: value} if value else params


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
    Test tasks are harder than training tasks: more buttons and hazards in a larger arena.

    Per-type costs in ``info``: ``cost_hazards``, and ``cost_buttons`` while wrong buttons count (not during the
    10 steps after a goal press, as upstream), besides their indicator ``cost_sum``.

    :param n_gremlins: gremlins in every task (default 0: none), upstream's moving boxes circling their pinned spot
        (as in ``SafetyPointButton1``); touching one costs, reported as ``info["cost_gremlins"]``. They are placed
        by the same layout sampler after the other objects, which may then be placed differently (the sampler starts
        over when an object does not fit).
    :param kwargs: the :class:`~sb3_metacpo.tasks.base.TaskDistribution` arguments.
    """

    name = "PointButtonHazard"
    task_cls = PointButtonHazardTask
    limits: ClassVar[dict[str, ParamRange]] = {
        # at least 2: upstream draws the next goal among all buttons, the one just pressed (and still touched)
        # included, and pays +1 at every step of contact with the goal: with one button, every step on it
        "n_buttons": ParamRange(2, 10, integer=True),
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

    def __init__(self, *args: Any, n_gremlins: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_gremlins = _object_count("n_gremlins", n_gremlins)

    @property
    def cost_names(self) -> tuple[str, ...]:  # type: ignore[override]
        gremlins = ("cost_gremlins",) if self.n_gremlins else ()
        return ("cost", "cost_hazards", "cost_buttons", *gremlins, "cost_sum")  # cost_sum: upstream's total again

    def get_params(self) -> dict[str, Any]:
        return _with_count(super().get_params(), "n_gremlins", self.n_gremlins)

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        options = {"n_gremlins": self.n_gremlins} if self.n_gremlins else {}
        return _make_navigation_env("button", "Point", task, self.max_episode_steps, render_mode, **options)


@dataclass(frozen=True, kw_only=True)
class PointGoalHazardTask(Task):
    """Point robot, Goal task: a fixed goal and ``n_hazards`` fixed hazards in ``[-extent, extent]^2``."""

    family: ClassVar[str] = "PointGoalHazard"
    n_hazards: int = 8
    extent: float = 1.5


@register_task_distribution
class PointGoalHazard(TaskDistribution):
    """Point-Goal-Hazard: reach the task's goal (reward: progress towards it, +1 on arrival, which ends the episode)
    while avoiding its hazards (cost 1 per step inside one). Test tasks have more hazards (disjoint counts) in an
    arena at least as large (extents 1.75–2.0 against 1.25–1.75).

    Per-type costs in ``info``: ``cost_hazards`` (and the vases' below), besides their indicator ``cost_sum``.

    :param n_vases: constrained vases in every task (default 0: none), upstream's free boxes as in
        ``SafetyPointGoal2``: touching one, or leaving one moving, costs, reported as ``info["cost_vases_contact"]``
        and ``info["cost_vases_velocity"]``. They are placed by the same layout sampler after the other objects,
        which may then be placed differently (the sampler starts over when an object does not fit).
    :param kwargs: the :class:`~sb3_metacpo.tasks.base.TaskDistribution` arguments.
    """

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

    def __init__(self, *args: Any, n_vases: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_vases = _object_count("n_vases", n_vases)

    @property
    def cost_names(self) -> tuple[str, ...]:  # type: ignore[override]
        vases = ("cost_vases_contact", "cost_vases_velocity") if self.n_vases else ()
        return ("cost", "cost_hazards", *vases, "cost_sum")  # cost_sum: upstream's total again

    def get_params(self) -> dict[str, Any]:
        return _with_count(super().get_params(), "n_vases", self.n_vases)

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        options = {"n_vases": self.n_vases} if self.n_vases else {}
        return _make_navigation_env("goal", "Point", task, self.max_episode_steps, render_mode, **options)


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
    cost_names: ClassVar[tuple[str, ...]] = ("cost", "cost_out_of_boundary", "cost_sum")  # cost_sum: the total again

    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        return _make_navigation_env("circle", "Car", task, self.max_episode_steps, render_mode)
