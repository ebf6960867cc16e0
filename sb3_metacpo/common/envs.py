"""Vectorised safe-RL envs for the algorithms: standard env ids, single tasks and multi-task training.

Every env is wrapped in a :class:`~sb3_metacpo.tasks.monitor.CostMonitor`, so episode costs reach
``info["episode"]["c"]``. Env factories are small picklable classes, so ``SubprocVecEnv`` workers build their env
(and apply the safety-gymnasium compatibility patches) in their own process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeGuard

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper, VecEnvObs, VecEnvStepReturn
from stable_baselines3.common.vec_env.subproc_vec_env import _worker
from stable_baselines3.common.vec_env.util import dict_to_obs

from sb3_metacpo.tasks.base import Task, TaskDistribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.monitor import CostMonitor
from sb3_metacpo.tasks.safety_gym import fast_standard_env
from sb3_metacpo.tasks.switches import SimulatorSwitches
from sb3_metacpo.tasks.task_env import REPLAY_OPTION, TaskEnv

#: What the algorithms accept as an env (a gymnasium env, a VecEnv, an env id, a task distribution, or a task).
SafeEnv = gym.Env | VecEnv | str | TaskDistribution | Task


class EnvWorkerError(RuntimeError):
    """An env of a VecEnv failed: the message names the env (worker) index and the original exception, which is
    also the ``__cause__`` when it could be sent back from the worker process."""

    def __init__(self, message: str, env_index: int | None = None) -> None:
        super().__init__(message)
        self.env_index = env_index


@dataclass(frozen=True)
class _WorkerFailure:
    """What a worker of :class:`ReportingSubprocVecEnv` sends back instead of a reply when its env raised."""

    type_name: str
    message: str
    traceback: str
    exception: BaseException | None


def _reporting_worker(remote: Connection, parent_remote: Connection, env_fn_wrapper: CloudpickleWrapper) -> None:
    """SB3's worker loop; if it raises (the env failed), send the exception back before the process ends.

    The worker ignores SIGINT: a Ctrl-C in a terminal reaches every process of its group, and the main process decides
    what it means (``sb3-metacpo train`` stops at the next env step and saves the run; a plain script ends, and the
    daemon workers with it). SB3's workers died of it, so an interrupted run could not stop between two updates."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker(remote, parent_remote, env_fn_wrapper)
    except Exception as error:  # anything the env raised: reported to the main process, which raises it there
        text = "".join(traceback.format_exception(error))
        try:
            remote.send(_WorkerFailure(type(error).__name__, str(error), text, error))
        except Exception:  # the exception itself does not pickle: send its description
            remote.send(_WorkerFailure(type(error).__name__, str(error), text, None))


class _CheckedRemote:
    """The main process's end of a worker's pipe: a failure report or a dead worker becomes an
    :class:`EnvWorkerError` naming the worker."""

    def __init__(self, connection: Connection, index: int, process: Any) -> None:
        self.connection, self.index, self.process = connection, index, process
        #: whether this worker failed: the VecEnv's pipes no longer pair requests with answers
        self.failed = False

    def _died(self, error: BaseException) -> EnvWorkerError:
        self.failed = True
        self.process.join(timeout=1.0)
        return EnvWorkerError(
            f"env worker {self.index} died (exit code {self.process.exitcode}, {type(error).__name__}): its env is "
            "gone; a model rebuilds a VecEnv it built at its next collect (one you gave it: pass a new one)",
            self.index,
        )

    def send(self, data: Any) -> None:
        try:
            self.connection.send(data)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as error:
            raise self._died(error) from error

    def recv(self) -> Any:
        try:
            data = self.connection.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError) as error:
            raise self._died(error) from error
        if isinstance(data, _WorkerFailure):
            self.failed = True
            raise EnvWorkerError(
                f"env worker {self.index} raised {data.type_name}: {data.message}\n"
                f"--- traceback in the worker ---\n{data.traceback}",
                self.index,
            ) from data.exception
        return data

    def close(self) -> None:
        self.connection.close()


class ReportingSubprocVecEnv(SubprocVecEnv):
    """SB3's ``SubprocVecEnv`` whose failures are explicit: an env that raises in its worker, or a worker that dies,
    gives an :class:`EnvWorkerError` naming the worker and carrying the exception and its traceback (SB3's gives
    ``EOFError('')`` and then ``BrokenPipeError`` on every later call). :meth:`close` never raises. The algorithms
    use it wherever ``SubprocVecEnv`` is asked for.

    :param env_fns: env constructors, one per worker
    :param start_method: multiprocessing start method (default: ``forkserver`` where available, else ``spawn``)
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], start_method: str | None = None) -> None:
        self.waiting = False
        self.closed = False
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        remotes: list[_CheckedRemote] = []
        self.processes = []
        for index, env_fn in enumerate(env_fns):
            parent_end, worker_end = context.Pipe()
            process = context.Process(  # type: ignore[attr-defined]
                target=_reporting_worker, args=(worker_end, parent_end, CloudpickleWrapper(env_fn)), daemon=True
            )
            process.start()
            worker_end.close()
            self.processes.append(process)
            remotes.append(_CheckedRemote(parent_end, index, process))
        self.remotes = remotes  # type: ignore[assignment]
        try:
            self.remotes[0].send(("get_spaces", None))
            observation_space, action_space = self.remotes[0].recv()
        except EnvWorkerError:  # an env failed to build: the other workers would outlive the error
            self._end_workers()
            raise
        VecEnv.__init__(self, len(env_fns), observation_space, action_space)

    @property
    def failed(self) -> bool:
        """Whether a worker failed (raised or died): the VecEnv cannot step again; close it and build another."""
        return any(remote.failed for remote in self.remotes)  # type: ignore[attr-defined]

    def _end_workers(self) -> None:
        """Terminate every worker still running (a broken VecEnv's), and mark the VecEnv closed."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=1.0)
        self.closed = True

    def close(self) -> None:
        """Close every worker; after a worker failed, terminate them all instead (SB3's close would wait for answers
        to a step the other workers had already given, or never will)."""
        if self.closed:
            return
        if self.failed:
            self._end_workers()
            return
        try:
            super().close()
        except EnvWorkerError:
            self._end_workers()


class LeanDummyVecEnv(DummyVecEnv):
    """SB3's ``DummyVecEnv`` whose :meth:`step_wait` returns a shallow copy of each env's info dict where SB3 returns
    a deep copy of all of them: the same observations, rewards, dones and info entries (``TimeLimit.truncated``,
    ``terminal_observation``, the costs), without walking every info value at every step (13 % of a first-order
    meta-iteration on HalfCheetahVelocity). Info dicts are new objects at every step, so later steps never change
    the ones returned; an env that later mutates an object it returned (a nested info value, an observation array)
    would show the change (SB3's deep copy would not). The observations are copied array by array instead of by a
    deep copy of their buffer dict. The algorithms build it wherever ``DummyVecEnv`` (or nothing) is asked for."""

    def step_wait(self) -> VecEnvStepReturn:
        # an unstructured (e.g. Box) space has the one buffer buf_obs[None]: stored into directly, as _save_obs does
        flat_obs = self.buf_obs[None] if self.keys == [None] else None  # type: ignore[index]  # SB3 types keys as str
        for index, env in enumerate(self.envs):
            try:
                obs, reward, terminated, truncated, info = env.step(self.actions[index])
            except (ValueError, TypeError) as error:  # e.g. the cost monitor's checks, which cannot know the index
                if type(error) not in (ValueError, TypeError):  # another class's constructor may take other arguments
                    raise
                raise type(error)(f"env {index} of the VecEnv: {error}") from error
            done = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if done:  # the VecEnv convention: report the last observation in the info, return the next episode's
                info["terminal_observation"] = obs
                obs, self.reset_infos[index] = env.reset()
            self.buf_rews[index], self.buf_dones[index], self.buf_infos[index] = reward, done, info
            if flat_obs is not None:
                flat_obs[index] = obs
            else:
                self._save_obs(index, obs)
        infos = [dict(info) for info in self.buf_infos]
        return self._obs_from_buf(), np.copy(self.buf_rews), np.copy(self.buf_dones), infos

    def _obs_from_buf(self) -> VecEnvObs:
        """A copy of the observation buffers, as SB3's, by ``np.copy`` of each array instead of a ``deepcopy`` of
        their dict (numeric arrays: the same copies, without the generic deep-copy walk at every step); for an
        unstructured space, the copy of its one buffer (what ``dict_to_obs`` returns of the dict)."""
        if self.keys == [None]:
            return np.copy(self.buf_obs[None])  # type: ignore[index]
        return dict_to_obs(self.observation_space, OrderedDict((key, np.copy(value)) for key, value in self.buf_obs.items()))


def failed_vec_env(env: Any) -> TypeGuard[ReportingSubprocVecEnv]:
    """Whether ``env`` is a :class:`ReportingSubprocVecEnv` one of whose workers failed (it cannot step again)."""
    return isinstance(env, ReportingSubprocVecEnv) and env.failed


def reporting_vec_env_cls(
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None,
) -> type[DummyVecEnv] | type[SubprocVecEnv]:
    """The VecEnv class to build: :class:`ReportingSubprocVecEnv` for SB3's ``SubprocVecEnv``,
    :class:`LeanDummyVecEnv` for SB3's ``DummyVecEnv`` or None, any other class (e.g. a subclass) as given."""
    if vec_env_cls is None or vec_env_cls is DummyVecEnv:
        return LeanDummyVecEnv
    return ReportingSubprocVecEnv if vec_env_cls is SubprocVecEnv else vec_env_cls


def vec_env_time_limit(vec_env: VecEnv) -> int | None:
    """The episode length of ``vec_env``'s first env: its registered spec's ``max_episode_steps``, else that of a
    ``TimeLimit`` in its wrappers (an env object wrapped by hand has no spec to carry it); None without either."""
    spec = vec_env.get_attr("spec", indices=[0])[0]
    if spec is not None and spec.max_episode_steps is not None:
        return int(spec.max_episode_steps)
    if vec_env.env_is_wrapped(gym.wrappers.TimeLimit, indices=[0])[0]:
        return int(vec_env.env_method("get_wrapper_attr", "_max_episode_steps", indices=[0])[0])
    return None


class ResampleTaskOnReset(gym.Wrapper):
    """A task env that switches to a freshly drawn training task of its distribution at every reset.

    Task draws come from their own stream, seeded by a ``reset(seed=...)`` (separately from the episode seeds) together
    with the distribution's ``seed`` and the env's ``index`` in its VecEnv, so a seeded VecEnv sees the same task
    sequence on every run, and runs of other seeds other tasks: SB3 seeds env ``j`` of a run of seed ``s`` with
    ``s + j``, which alone gave env ``j + 1`` of seed ``s`` the tasks of env ``j`` of seed ``s + 1``.
    ``reset(options={"episode_seed": s})`` replays episode ``s`` of the current task (no new task is drawn).

    :param distribution: the training tasks' family
    :param index: the env's index in its VecEnv (:func:`make_safe_vec_env` numbers them; envs built by hand with the
        default 0 share their streams across run seeds as before when their distribution's seed is fixed)
    """

    def __init__(self, distribution: TaskDistribution, index: int = 0) -> None:
        self._rng = np.random.default_rng()
        self.distribution = distribution
        self.index = int(index)
        super().__init__(distribution.make_env(distribution.sample(1, self._rng)[0]))
        task_env = self.env
        while not isinstance(task_env, TaskEnv):
            task_env = task_env.env  # type: ignore[attr-defined]
        self._task_env = task_env

    @property
    def task(self) -> Task:
        return self._task_env.task

    def task_rng_state(self) -> dict[str, Any]:
        """The state of the task stream (JSON-serialisable)."""
        return dict(self._rng.bit_generator.state)

    def set_task_rng_state(self, state: dict[str, Any]) -> None:
        """Continue the task stream from ``state`` (of :meth:`task_rng_state`)."""
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if seed is not None:
            # the trailing 3 keeps the key from ending in zeros (numpy seeds (a, b, 0) as (a, b))
            self._rng = self.distribution.training_rng((self.distribution.seed, seed, self.index, 3))
        if not (options and REPLAY_OPTION in options):
            self._task_env.set_task(self.distribution.sample(1, self._rng)[0])
        return self.env.reset(seed=seed, options=options)


class EnvFactory:
    """Picklable env constructor: an env id, a task, or (``task=None``) a distribution's resampling env.

    It keeps the simulator switches (``safety_gym.FAST_STEP``, ...) as they are where it is made, and sets them in
    another process that calls it (a ``SubprocVecEnv`` worker started with ``forkserver`` or ``spawn`` imports the
    modules afresh, with their defaults); in the process that made it, the switches as they are when it is called."""

    def __init__(
        self,
        env_id: str | None = None,
        distribution: TaskDistribution | None = None,
        task: Task | None = None,
        index: int = 0,
    ):
        self.env_id, self.distribution, self.task, self.index = env_id, distribution, task, index
        self.switches, self._made_in = SimulatorSwitches.current(), os.getpid()

    def __call__(self) -> gym.Env:
        if os.getpid() != self._made_in:
            self.switches.apply()
        if self.distribution is not None:
            if self.task is None:
                return ResampleTaskOnReset(self.distribution, self.index)
            return self.distribution.make_env(self.task)
        assert self.env_id is not None
        if self.env_id.startswith("Safety"):
            import_safety_gymnasium()  # registers the safety-gymnasium ids, after the compatibility patches
        return CostMonitor(fast_standard_env(gym.make(self.env_id)))


def check_gymnasium_api_id(env_id: str) -> None:
    """A ``ValueError`` for safety-gymnasium's own id of an env (``SafetyPointGoal1-v0``), whose ``step`` returns six
    values (the cost apart), where gymnasium's id of the same env (``SafetyPointGoal1Gymnasium-v0``) gives the five of
    gymnasium's API with the cost in ``info``: the env built, and failed at its first step in gymnasium's checker."""
    match = re.fullmatch(r"(Safety\w+?)(-v\d+)", env_id)
    if match is None or match.group(1).endswith("Gymnasium"):
        return
    import_safety_gymnasium()  # registers both kinds of ids
    suggestion = f"{match.group(1)}Gymnasium{match.group(2)}"
    if suggestion in gym.registry:
        raise ValueError(
            f"{env_id!r} is safety-gymnasium's own id, whose step returns six values (the cost apart); the library takes "
            f"gymnasium's API, with the cost in info: use {suggestion!r}"
        )


def make_safe_vec_env(
    env: SafeEnv,
    n_envs: int = 1,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
    distribution: TaskDistribution | None = None,
) -> VecEnv:
    """A VecEnv of ``env`` whose envs report episode costs.

    :param env: a gymnasium env (wrapped in a :class:`~sb3_metacpo.tasks.monitor.CostMonitor` unless it already is), a
        VecEnv of cost-monitored envs (returned as is), a gymnasium id (e.g. ``"SafetyPointGoal1Gymnasium-v0"``), a
        :class:`~sb3_metacpo.tasks.base.TaskDistribution` (every env trains on a new task drawn at each reset) or a
        :class:`~sb3_metacpo.tasks.base.Task` of ``distribution``
    :param n_envs: number of envs for ids, distributions and tasks
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``, for ids, distributions and tasks
    :param distribution: the family of a :class:`~sb3_metacpo.tasks.base.Task` ``env``
    """
    if isinstance(env, VecEnv):
        if not all(env.env_is_wrapped(CostMonitor)):
            raise ValueError(
                "the VecEnv's envs must be wrapped in sb3_metacpo.tasks.monitor.CostMonitor (SB3's Monitor drops the "
                "episode cost); or pass the env id, a gymnasium env or a TaskDistribution instead"
            )
        return env
    if isinstance(env, gym.Env):
        if not is_wrapped(env, CostMonitor):
            if is_wrapped(env, Monitor):
                raise ValueError(
                    "the env is wrapped in SB3's Monitor, which drops the episode cost: wrap it in "
                    "sb3_metacpo.tasks.monitor.CostMonitor instead"
                )
            env = CostMonitor(env)
        return LeanDummyVecEnv([lambda: env])
    if isinstance(n_envs, bool) or not isinstance(n_envs, (int, np.integer)) or n_envs < 1:
        raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
    if isinstance(env, TaskDistribution):
        _ = env.spaces  # known before the factory is copied to workers: each then checks its tasks against them
        factories = [EnvFactory(distribution=env, index=index) for index in range(int(n_envs))]
    elif isinstance(env, Task):
        if distribution is None:
            raise ValueError(
                f"a {type(env).__name__} needs its TaskDistribution to build its env: build the model on the family "
                "(the TaskDistribution or its registered name), then call set_env(task) to train on this task"
            )
        distribution.validate_task(env)
        _ = distribution.spaces  # as above
        factories = [EnvFactory(distribution=distribution, task=env)] * int(n_envs)
    elif isinstance(env, str):
        check_gymnasium_api_id(env)
        factories = [EnvFactory(env_id=env)] * int(n_envs)
    else:
        raise TypeError(
            f"env must be a gymnasium env, a VecEnv, an env id, a TaskDistribution or a Task, got {type(env).__name__}"
        )
    return reporting_vec_env_cls(vec_env_cls)(factories)  # type: ignore[arg-type]
