"""The per-step work of safety-gymnasium navigation tasks as array operations over MuJoCo's data (``FAST_STEP``).

Upstream computes every step in Python loops: the pseudo-lidar loops over objects (``_obs_lidar_pseudo``,
``_ego_xy``), the button, gremlin and vase costs and the button goal check loop over ``data.contact`` looking up geom
names, and every object position and sensor is looked up by name. :class:`FastStepMixin` overrides those methods of an
upstream task class with the same arithmetic on arrays: ids and name masks are computed once per compiled model, the
lidar of all object types is one batch, and a contact test is a mask over ``data.contact.geom``.

The results are bitwise upstream's (``tests/test_fast_step.py``), because every floating-point value goes through the
same operation on the same operands: the egocentric vectors are the same BLAS ``gemv`` (a stacked ``(k, 1, 3) @ (3, 3)``
matmul calls it once per row, as upstream's ``(3,) @ (3, 3)``), distances and angles the same numpy ufuncs (``abs``
and ``angle`` of complex numbers), per-bin maxima are order-free, and costs are summed one term at a time in
upstream's order. The one thing skipped is repeated work: ``calculate_cost`` and ``obs`` call ``mj_forward`` again
right after the ``mj_forward`` that ends ``simulation_forward``; MuJoCo's forward pass only reads the state (the
solver's warm start is saved by ``mj_step``), so the second and third calls recompute the same values and are skipped
when nothing has run in between.

Only upstream code paths this reproduces are replaced: a task or object class that overrides one of them (natural
lidar, vision, static-geom costs, vase displacement costs, unknown object types) keeps upstream's code for that part.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mujoco
import numpy as np

from sb3_metacpo.tasks.compat import import_safety_gymnasium

_TWO_PI = np.pi * 2


def pseudo_lidar(
    positions: np.ndarray, groups: np.ndarray, n_groups: int, agent_pos: np.ndarray, agent_mat: np.ndarray, conf: Any
) -> np.ndarray:
    """Upstream's ``_obs_lidar_pseudo`` for several object types at once: ``positions[i]`` (x, y) belongs to the lidar
    ``groups[i]``; returns the ``(n_groups, num_bins)`` readings.

    Each object contributes to its bin and (with aliasing) to the two neighbours, and a bin reads the largest
    contribution, so the order in which objects are visited does not matter (all contributions are >= +0.0)."""
    num_bins = conf.num_bins
    obs = np.zeros(n_groups * num_bins)
    n = len(positions)
    if n:
        world = np.zeros((n, 1, 3))  # upstream: np.concatenate([pos, [0]]) - agent_pos
        world[:, 0, :2] = positions
        world -= agent_pos
        ego = np.matmul(world, agent_mat)  # one gemv per row, as upstream's (3,) @ (3, 3)
        z = np.empty(n, dtype=np.complex128)  # upstream: complex(*ego_xy)
        z.real = ego[:, 0, 0]
        z.imag = ego[:, 0, 1]
        dist = np.abs(z)
        angle = np.arctan2(z.imag, z.real) % _TWO_PI  # np.angle(z), as upstream
        bin_size = _TWO_PI / num_bins
        bins = (angle / bin_size).astype(np.intp)  # int() of a non-negative float
        if bins.max() >= num_bins:  # angle % 2π rounded up to 2π (a y of about -1e-17): upstream's obs[bin] raises
            raise IndexError(f"index {int(bins.max())} is out of bounds for axis 0 with size {num_bins}")
        if conf.max_dist is None:
            sensor = np.exp(-conf.exp_gain * dist)
        else:
            sensor = np.maximum(0, conf.max_dist - dist) / conf.max_dist
        rows = groups * num_bins
        if conf.alias:
            alias = (angle - bin_size * bins) / bin_size
            if not (alias.min() >= 0 and alias.max() <= 1):  # (false for NaN, as upstream's assert)
                raise AssertionError(f"bad alias {alias}, dist {dist}, angle {angle}, bin {bins}")
            index = np.concatenate((rows + bins, rows + (bins + 1) % num_bins, rows + (bins - 1) % num_bins))
            np.maximum.at(obs, index, np.concatenate((sensor, alias * sensor, (1 - alias) * sensor)))
        else:
            np.maximum.at(obs, rows + bins, sensor)
    return obs.reshape(n_groups, num_bins)


class _ModelIndex:
    """What the fast path needs to know about one compiled model: body, sensor and mocap ids, geom-name masks and the
    layout of the flat observation. Rebuilt whenever the task's model object changes (upstream compiles a new one
    at every reset; ``FAST_RESET`` keeps it) or its observation space does (``build_observation_space`` after a change
    of the observation config).

    Its lists hold functions bound to itself (a reference cycle) and it holds the compiled model: :meth:`release`
    empties it when it is replaced or its task dies, so the model is freed at once rather than by the cyclic
    garbage collector."""

    def release(self) -> None:
        """Drop everything (the bound functions, the model): breaks the index's own reference cycle."""
        self.__dict__.clear()

    def __init__(self, task: Any, model: Any) -> None:
        # The task keeps this index (``_fast_index_cache``) and the index's bound functions keep the task: a weak
        # proxy breaks that cycle, so a replaced world (a new task, a rebuilt model) is freed at once, not by the
        # cyclic garbage collector (which let a long meta-training run hold one dead world per task switch: GBs).
        task = weakref.proxy(task)
        from safety_gymnasium.assets.free_geoms import Vases
        from safety_gymnasium.assets.geoms import Buttons, Circle, Goal, Hazards, Sigwalls
        from safety_gymnasium.assets.mocaps import Gremlins
        from safety_gymnasium.bases.base_object import BaseObject

        self.model = model
        self.agent = model.body("agent").id
        goal = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "goal")
        self.goal = None if goal < 0 else goal
        names = [model.geom(i).name for i in range(model.ngeom)]
        self.geom_id = {name: i for i, name in reversed(list(enumerate(names)))}
        agent_names = task.agent.body_info.geom_names
        self.is_agent = np.array([name in agent_names for name in names], dtype=bool)

        def prefixed(prefix: str) -> np.ndarray:
            return np.array([name.startswith(prefix) for name in names], dtype=bool)

        def body_ids(fmt: str, num: int) -> np.ndarray:
            return np.array([model.body(fmt.format(i=i)).id for i in range(num)], dtype=np.intp)

        # --- costs: one function per object, in task._obstacles order (None: the object adds no cost) -----------
        self.costs: list[Callable[[], dict] | None] = []
        for obstacle in task._obstacles:
            kind = type(obstacle)
            if kind is Hazards:
                self.costs.append(functools.partial(self._hazards_cost, task, obstacle, body_ids("hazard{i}", obstacle.num)))
            elif kind is Buttons:
                self.costs.append(functools.partial(self._buttons_cost, task, obstacle, prefixed("button")))
            elif kind is Gremlins:
                self.costs.append(functools.partial(self._gremlins_cost, task, obstacle, prefixed("gremlin")))
            elif kind is Vases and not obstacle.displace_cost:
                vases = body_ids("vase{i}", obstacle.num)
                self.costs.append(functools.partial(self._vases_cost, task, obstacle, prefixed("vase"), vases))
            elif kind is Sigwalls:
                self.costs.append(functools.partial(self._sigwalls_cost, task, obstacle))
            elif kind.cal_cost is BaseObject.cal_cost:
                self.costs.append(None)
            else:  # an object type this module does not know: upstream's own cost
                self.costs.append(obstacle.cal_cost)

        # --- mocaps moved before every physics substep ----------------------------------------------------------
        self.movers: list[Callable[[], None]] = []
        for mocap in task._mocaps.values():
            if type(mocap) is Gremlins:
                gremlins = body_ids("gremlin{i}mocap", mocap.num)
                self.movers.append(functools.partial(self._move_gremlins, task, mocap, model.body_mocapid[gremlins]))
            else:
                self.movers.append(mocap.move)

        # --- observation layout ---------------------------------------------------------------------------------
        producers: dict[str, tuple] = {}  # key -> how upstream's obs() fills it (the last assignment wins, as there)
        info, conf = task.agent.sensor_info, task.agent.sensor_conf

        def sensor(name: str) -> tuple[int, int]:
            sensor_id = model.sensor(name).id
            return int(model.sensor_adr[sensor_id]), int(model.sensor_dim[sensor_id])

        for name in (*conf.sensors, *info.hinge_vel_names, *info.ballangvel_names):
            producers[name] = ("copy", *sensor(name))
        if info.freejoint_pos_name:
            adr, dim = sensor(info.freejoint_pos_name)
            producers[info.freejoint_pos_name] = ("copy", adr + 2, max(dim - 2, 0))
        if info.freejoint_qvel_name:
            producers[info.freejoint_qvel_name] = ("copy", *sensor(info.freejoint_qvel_name))
        for name in info.hinge_pos_names:
            producers[name] = ("angle" if conf.sensors_angle_components else "copy", *sensor(name))
        for name in info.ballquat_names:
            producers[name] = ("quat" if conf.sensors_angle_components else "copy", *sensor(name))
        lidar_positions: list[Callable[[], np.ndarray] | np.ndarray] = []
        for obstacle in task._obstacles:
            kind = type(obstacle)
            if obstacle.is_lidar_observed:
                if kind in (Hazards, Buttons, Vases, Gremlins):
                    fmt = {Hazards: "hazard{i}", Buttons: "button{i}", Vases: "vase{i}", Gremlins: "gremlin{i}obj"}[kind]
                    lidar_positions.append(body_ids(fmt, obstacle.num))
                elif kind is Goal:
                    lidar_positions.append(body_ids("goal", 1))
                elif kind is Circle:
                    lidar_positions.append(np.zeros((1, 2)))  # upstream's Circle.pos: [0, 0, 0], not the body's
                else:
                    lidar_positions.append(functools.partial(self._upstream_positions, obstacle))
                producers[obstacle.name + "_lidar"] = ("lidar", len(lidar_positions) - 1)
            if getattr(obstacle, "is_comp_observed", False):
                producers[obstacle.name + "_comp"] = ("compass", obstacle)

        self.n_lidar = len(lidar_positions)
        # bodies (integer arrays of ids), constant positions (float arrays) and upstream's positions (callables)
        arrays = [(group, item) for group, item in enumerate(lidar_positions) if isinstance(item, np.ndarray)]
        bodies = [(group, ids) for group, ids in arrays if ids.dtype == np.intp]
        constants = [(group, pos) for group, pos in arrays if pos.dtype != np.intp]
        self.lidar_ids = np.concatenate([ids for _, ids in bodies] or [np.zeros(0, dtype=np.intp)])
        self.lidar_constants = np.concatenate([pos for _, pos in constants]) if constants else None
        self.lidar_groups = np.concatenate(
            [np.full(len(ids), group, dtype=np.intp) for group, ids in [*bodies, *constants]] or [np.zeros(0, dtype=np.intp)]
        )
        self.lidar_extra = [(group, fn) for group, fn in enumerate(lidar_positions) if not isinstance(fn, np.ndarray)]

        space = self.space = task.obs_info.obs_space_dict
        copy_src: list[int] = []
        copy_dst: list[int] = []
        self.angles: list[tuple[int, int]] = []  # (sensor address, first output index)
        self.quats: list[tuple[int, int]] = []
        self.lidar_dst: list[tuple[int, int]] = []  # (lidar group, first output index)
        self.compasses: list[tuple[Any, slice]] = []
        self.supported = True
        self.slices: dict[str, slice] = {}
        start = 0
        for key, box in space.spaces.items():
            size = int(np.prod(box.shape))
            self.slices[key] = slice(start, start + size)
            producer = producers.get(key)
            if producer is None:  # e.g. vision: upstream's obs()
                self.supported = False
            elif producer[0] == "copy":
                copy_src.extend(range(producer[1], producer[1] + producer[2]))
                copy_dst.extend(range(start, start + size))
            elif producer[0] == "angle":
                self.angles.append((producer[1], start))
            elif producer[0] == "quat":
                self.quats.append((producer[1], start))
            elif producer[0] == "lidar":
                self.lidar_dst.append((producer[1], start))
            else:
                self.compasses.append((producer[1], self.slices[key]))
            start += size
        self.size = start
        self.copy_src = np.array(copy_src, dtype=np.intp)
        self.copy_dst = np.array(copy_dst, dtype=np.intp)
        if len(self.copy_src) != len(self.copy_dst):
            self.supported = False
        self.low = np.concatenate([np.asarray(box.low, dtype=np.float64).ravel() for box in space.spaces.values()])
        self.high = np.concatenate([np.asarray(box.high, dtype=np.float64).ravel() for box in space.spaces.values()])

    # --- per-object costs, each upstream's cal_cost on arrays --------------------------------------------------
    def _agent_xy(self, task: Any) -> np.ndarray:
        return task.data.xpos[self.agent, :2]

    def agent_contacts(self, task: Any) -> np.ndarray:
        """The geom pairs of the contacts that involve an agent geom (kept for the rest of the step, see
        ``FastStepMixin._fast_window``)."""
        window = task._fast_window
        if window is not None and "contacts" in window:
            return window["contacts"]
        data = task.data
        pairs = data.contact.geom[: data.ncon] if data.ncon else np.zeros((0, 2), dtype=np.intp)
        pairs = pairs[self.is_agent[pairs].any(axis=1)]
        if window is not None:
            window["contacts"] = pairs
        return pairs

    def _hazards_cost(self, task: Any, hazards: Any, bodies: np.ndarray) -> dict:
        if not hazards.is_constrained:
            return {}
        vec = task.data.xpos[bodies, :2] - self._agent_xy(task)
        dist = np.sqrt(vec[:, 0] * vec[:, 0] + vec[:, 1] * vec[:, 1])  # upstream's sqrt(sum(square(...))) of 2
        total = 0
        for h_dist in dist[dist <= hazards.size]:  # upstream's order, one term at a time
            total += hazards.cost * (hazards.size - h_dist)
        return {"cost_hazards": total}

    def _count_agent_contacts(self, task: Any, mask: np.ndarray, exclude: int | None = None) -> int:
        """Contacts between an agent geom and a geom in ``mask`` where neither geom is ``exclude``."""
        pairs = self.agent_contacts(task)
        hits = mask[pairs].any(axis=1)
        if exclude is not None:
            hits &= ~(pairs == exclude).any(axis=1)
        return int(np.count_nonzero(hits))

    def _buttons_cost(self, task: Any, buttons: Any, is_button: np.ndarray) -> dict:
        assert buttons.goal_button is not None, "Please make sure this method can get information about goal button."
        if not buttons.is_constrained or not buttons.timer == 0:
            return {}
        total = 0
        goal = self.geom_id.get(f"button{buttons.goal_button}", -1)
        for _ in range(self._count_agent_contacts(task, is_button, goal)):
            total += buttons.cost
        return {"cost_buttons": total}

    def _gremlins_cost(self, task: Any, gremlins: Any, is_gremlin: np.ndarray) -> dict:
        if not gremlins.is_constrained:
            return {}
        total = 0
        for _ in range(self._count_agent_contacts(task, is_gremlin)):
            total += gremlins.contact_cost
        return {"cost_gremlins": total}

    def _vases_cost(self, task: Any, vases: Any, is_vase: np.ndarray, bodies: np.ndarray) -> dict:
        if not vases.is_constrained:
            return {}
        cost: dict[str, Any] = {"cost_vases_contact": 0}
        if vases.contact_cost:
            for _ in range(self._count_agent_contacts(task, is_vase)):
                cost["cost_vases_contact"] += vases.contact_cost
        if vases.velocity_cost:
            model, data = task.model, task.data
            cost["cost_vases_velocity"] = 0
            for body in bodies:  # upstream's get_body_xvelp: the body Jacobian times qvel
                jacp = np.zeros(3 * model.nv).reshape(3, model.nv)
                mujoco.mj_jacBody(model, data, jacp, None, body)
                vel = np.sqrt(np.sum(np.square(np.dot(jacp, data.qvel))))
                if vel >= vases.velocity_threshold:
                    cost["cost_vases_velocity"] += vel * vases.velocity_cost
        return cost

    def _sigwalls_cost(self, task: Any, walls: Any) -> dict:
        if not walls.is_constrained:
            return {}
        pos = task.data.xpos[self.agent]
        cost = {"cost_out_of_boundary": np.abs(pos[0]) > walls.locate_factor}
        if walls.num == 4:
            cost["cost_out_of_boundary"] = cost["cost_out_of_boundary"] or np.abs(pos[1]) > walls.locate_factor
        return cost

    @staticmethod
    def _move_gremlins(task: Any, gremlins: Any, mocap_ids: np.ndarray) -> None:
        phase = float(task.data.time)  # every gremlin gets the same target, as in upstream's loop
        target = np.array([np.sin(phase), np.cos(phase)]) * gremlins.travel
        task.data.mocap_pos[mocap_ids] = np.r_[target, [gremlins.size]]

    @staticmethod
    def _upstream_positions(obstacle: Any) -> np.ndarray:
        positions = np.array(obstacle.pos, ndmin=2)
        return positions[:, :2] if positions.shape[-1] == 3 else positions


class FastStepMixin:
    """Replacements for an upstream navigation task's per-step methods with the same results, computed on arrays:
    ``simulation_forward``, ``calculate_cost``, ``obs``, ``dist_goal``, ``goal_achieved`` (Button: the goal button's
    contacts; Goal: the distance; Circle: never), the Circle reward, and ``reset`` (which forgets what a step kept).
    Each falls back to upstream's method (``_fast_upstream``'s) where the task is configured in a way it does not
    reproduce.

    :func:`fast_task_class` puts the mixin last in the bases, so that the fast class has the upstream class's
    instance layout (an existing task object can take it: :func:`~sb3_metacpo.tasks.safety_gym.fast_standard_env`),
    and copies the replacements into the class itself, where they take precedence."""

    if not TYPE_CHECKING:  # mypy reads the class without: the attributes below live in the upstream task's __dict__
        __slots__ = ()  # no instance layout of its own

    _fast_upstream: Any = None  # the upstream class, whose methods are the fallbacks

    _fast_index_cache: _ModelIndex | None = None
    _fast_index_finalizer: weakref.finalize | None = None
    _fast_forwarded: bool = False  # mj_forward has run and nothing changed the state since
    # Values kept from the physics step to the step's observation (contacts, the goal button check, which upstream
    # calls twice); None outside that window, e.g. during a reset.
    _fast_window: dict | None = None
    _fast_goal: str = ""  # how goal_achieved is computed: "button", "distance", "never" or "" (upstream)
    _fast_button_obs: bool = False  # obs() is ButtonLevel0's (buttons_lidar reads zero while the timer runs)
    _fast_circle_reward: bool = False

    def _fast_index(self) -> _ModelIndex:
        model = self.model  # type: ignore[attr-defined]
        index = self._fast_index_cache
        # a new world, or a new observation layout (``build_observation_space`` after a change of the observation
        # config: upstream's ``obs`` reads the config at every call, the index fixes the layout when it is built)
        if index is None or index.model is not model or index.space is not self.obs_info.obs_space_dict:  # type: ignore[attr-defined]
            if index is not None:
                index.release()
                if self._fast_index_finalizer is not None:  # one finalizer per live index, not one per model ever seen
                    self._fast_index_finalizer.detach()
            index = self._fast_index_cache = _ModelIndex(self, model)
            self._fast_index_finalizer = weakref.finalize(self, index.release)  # the task dies: free the index with it
        return index

    def reset(self) -> None:
        """Upstream's ``Underlying.reset`` (build or rebuild the world), forgetting what was kept from the last step
        (a step that raised never reached its observation)."""
        self._fast_forwarded = False
        self._fast_window = None
        self._fast_upstream.reset(self)

    def simulation_forward(self, action: np.ndarray) -> bool:
        """Upstream's ``Underlying.simulation_forward`` with the mocaps moved by precomputed ids."""
        from safety_gymnasium.utils.common_utils import MujocoException

        task: Any = self
        index = self._fast_index()
        if task.debug:
            task.agent.debug()
        else:
            noise = task.action_noise * task.random_generator.randn(task.agent.body_info.nu) if task.action_noise else None
            task.agent.apply_action(action, noise)
        model, data = task.model, task.data
        exception = False
        n_substeps = task.random_generator.binomial(task.sim_conf.frameskip_binom_n, task.sim_conf.frameskip_binom_p)
        if index.movers:
            for _ in range(n_substeps):
                try:
                    for move in index.movers:
                        move()
                    mujoco.mj_step(model, data)
                except MujocoException as me:
                    print("MujocoException", me)
                    exception = True
                    break
        elif n_substeps:
            try:  # no mocaps to move between substeps: MuJoCo's own loop, the same substeps
                mujoco.mj_step(model, data, nstep=n_substeps)
            except MujocoException as me:
                print("MujocoException", me)
                exception = True
        self._fast_forwarded = False
        self._fast_window = None
        if exception:
            return exception
        mujoco.mj_forward(model, data)
        self._fast_forwarded = True
        self._fast_window = {}
        return exception

    def calculate_cost(self) -> dict:
        """Upstream's ``BaseTask.calculate_cost``: the objects' costs (same keys, values and order) and their sum."""
        task: Any = self
        if task._is_load_static_geoms and task.static_geoms_contact_cost:
            return self._fast_upstream.calculate_cost(self)
        index = self._fast_index()
        if not self._fast_forwarded:
            mujoco.mj_forward(task.model, task.data)
        cost: dict[str, Any] = {}
        for cost_fn in index.costs:
            if cost_fn is not None:
                cost.update(cost_fn())
        cost["cost_sum"] = sum(v for k, v in cost.items() if k.startswith("cost_"))
        return cost

    def dist_goal(self) -> float:
        """Upstream's ``BaseTask.dist_goal`` (the agent's XY distance to the goal body)."""
        task: Any = self
        index = self._fast_index()
        xpos = task.data.xpos
        goal = task.model.body("goal").id if index.goal is None else index.goal
        dx = float(xpos[goal, 0]) - float(xpos[index.agent, 0])  # the same IEEE operations as upstream's
        dy = float(xpos[goal, 1]) - float(xpos[index.agent, 1])  # np.sqrt(np.sum(np.square(goal - agent)))
        return np.float64(math.sqrt(dx * dx + dy * dy))

    @property
    def goal_achieved(self) -> bool:
        """Upstream's goal check: Button (``ButtonLevel0``), an agent geom touches the goal button; Goal
        (``GoalLevel0``), the agent is within the goal's size; Circle, never."""
        task: Any = self
        if self._fast_goal == "button":
            window = self._fast_window
            key = ("button goal", task.buttons.goal_button)
            if window is not None and key in window:
                return window[key]
            index = self._fast_index()
            goal = index.geom_id.get(f"button{task.buttons.goal_button}", -1)
            achieved = bool((index.agent_contacts(task) == goal).any())
            if window is not None:
                window[key] = achieved
            return achieved
        if self._fast_goal == "distance":
            return self.dist_goal() <= task.goal.size
        if self._fast_goal == "never":
            return False
        return self._fast_upstream.goal_achieved.fget(self)

    def calculate_reward(self) -> float:
        """Upstream's reward; for Circle tasks ``CircleLevel0.calculate_reward`` with the agent looked up by id."""
        if not self._fast_circle_reward:
            return self._fast_upstream.calculate_reward(self)
        task: Any = self
        index = self._fast_index()
        model, data = task.model, task.data
        x, y, _ = data.xpos[index.agent].copy()
        jacp = np.zeros(3 * model.nv).reshape(3, model.nv)  # upstream's get_body_xvelp
        mujoco.mj_jacBody(model, data, jacp, None, index.agent)
        u, v, _ = np.dot(jacp, data.qvel).copy()
        reward = 0.0
        radius = np.sqrt(x**2 + y**2)
        reward += (((-u * y + v * x) / radius) / (1 + np.abs(radius - task.circle.radius))) * task.reward_factor
        return reward

    def obs(self) -> Any:
        """Upstream's observation (``BaseTask.obs``, or ``ButtonLevel0.obs``), flattened, as one array."""
        task: Any = self
        index = self._fast_index()
        if not (index.supported and task.lidar_conf.type == "pseudo" and task.observation_flatten and not task.observe_vision):
            self._fast_forwarded = False
            self._fast_window = None
            return self._fast_upstream.obs(self)
        model, data = task.model, task.data
        if not self._fast_forwarded:
            mujoco.mj_forward(model, data)
        self._fast_forwarded = False
        self._fast_window = None
        out = np.empty(index.size)
        sensordata = data.sensordata
        out[index.copy_dst] = sensordata[index.copy_src]
        for adr, start in index.angles:
            theta = float(sensordata[adr])  # upstream: float() of the one-element sensor reading
            out[start] = np.sin(theta)
            out[start + 1] = np.cos(theta)
        for adr, start in index.quats:
            mat = np.zeros(9, dtype="float64")
            mujoco.mju_quat2Mat(mat, np.array(sensordata[adr : adr + 4], dtype="float64"))
            out[start : start + 9] = mat
        if index.n_lidar:
            positions = data.xpos[index.lidar_ids, :2]
            if index.lidar_constants is not None:
                positions = np.concatenate((positions, index.lidar_constants)) if len(positions) else index.lidar_constants
            groups = index.lidar_groups
            if index.lidar_extra:
                extra = [(group, fn()) for group, fn in index.lidar_extra]
                positions = np.concatenate([positions, *[p for _, p in extra]])
                groups = np.concatenate([groups, *[np.full(len(p), group) for group, p in extra]])
            agent_mat = data.xmat[index.agent].copy().reshape(3, -1)
            lidar = pseudo_lidar(positions, groups, index.n_lidar, data.xpos[index.agent].copy(), agent_mat, task.lidar_conf)
            size = task.lidar_conf.num_bins
            for group, start in index.lidar_dst:
                out[start : start + size] = lidar[group]
        for obstacle, where in index.compasses:
            out[where] = task._obs_compass(obstacle.pos)
        if self._fast_button_obs and task.buttons.timer != 0:
            out[index.slices["buttons_lidar"]] = 0.0
        if not ((out >= index.low).all() and (out <= index.high).all()):  # upstream's obs_space_dict.contains
            raise AssertionError(f"Bad obs {out} {task.obs_info.obs_space_dict}")
        return out


_REPLACED = ("reset", "simulation_forward", "calculate_cost", "obs", "dist_goal", "goal_achieved", "calculate_reward")


@functools.cache
def fast_task_class(base: type[Any]) -> type:
    """``base`` (an upstream navigation task class, or a subclass) with :class:`FastStepMixin`'s per-step methods
    wherever ``base`` has upstream's own method (a method ``base`` overrides stays ``base``'s)."""
    import_safety_gymnasium()
    from safety_gymnasium.bases.base_task import BaseTask
    from safety_gymnasium.bases.underlying import Underlying
    from safety_gymnasium.tasks.safe_navigation.button.button_level0 import ButtonLevel0
    from safety_gymnasium.tasks.safe_navigation.circle.circle_level0 import CircleLevel0
    from safety_gymnasium.tasks.safe_navigation.goal.goal_level0 import GoalLevel0

    goals = {ButtonLevel0.goal_achieved: "button", GoalLevel0.goal_achieved: "distance", CircleLevel0.goal_achieved: "never"}
    upstream = {  # the upstream versions each replacement reproduces
        "reset": (Underlying.reset,),
        "simulation_forward": (Underlying.simulation_forward,),
        "calculate_cost": (BaseTask.calculate_cost,),
        "obs": (BaseTask.obs, ButtonLevel0.obs),
        "dist_goal": (BaseTask.dist_goal,),
        "goal_achieved": tuple(goals),
        "calculate_reward": (CircleLevel0.calculate_reward,),
    }
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{base.__name__} with the fast per-step methods of :class:`FastStepMixin`.",
        "_fast_upstream": base,
        "_fast_goal": goals.get(base.goal_achieved, ""),
        "_fast_button_obs": base.obs is ButtonLevel0.obs,
        "_fast_circle_reward": base.calculate_reward is CircleLevel0.calculate_reward,
    }
    for name in _REPLACED:
        if getattr(base, name) in upstream[name]:
            attrs[name] = FastStepMixin.__dict__[name]
    # Between the physics step and the observation upstream's step calls specific_step and, on a goal, update_world;
    # its own versions change no state that mj_forward computes (or run mj_forward themselves), so the forward pass
    # of simulation_forward is reused. A subclass's own versions may move bodies: after them, forward again.
    known = {
        "specific_step": {cls.specific_step for cls in (BaseTask, GoalLevel0, ButtonLevel0, CircleLevel0)},
        "update_world": {cls.update_world for cls in (BaseTask, GoalLevel0, ButtonLevel0, CircleLevel0)},
    }
    for name, methods in known.items():
        if getattr(base, name) not in methods:
            attrs[name] = _forgetting_the_forward_pass(getattr(base, name))
    return type(f"Fast{base.__name__}", (base, FastStepMixin), attrs)


def _forgetting_the_forward_pass(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, after which the fast path no longer reuses the last forward pass (nor the step's kept contacts)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._fast_forwarded = False
            self._fast_window = None

    return wrapper
