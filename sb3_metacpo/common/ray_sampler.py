"""Rollouts on a Ray cluster: one Ray actor per worker owns a share of the envs; the driver decides everything random.

:class:`RaySampler` runs the same ``n_envs`` logical envs as :class:`~sb3_metacpo.common.rollouts.RolloutSampler`,
split into contiguous blocks, one per worker (a Ray actor holding a ``DummyVecEnv`` of its block, built from the task
distribution in the actor's own process: envs never cross the wire). At every collect the driver sends each worker
its envs' tasks (small values), their episode-seed stream states and one
:class:`~sb3_metacpo.common.policies.NumpyActor` (the actor parameters of every task and the observation
statistics, put once in Ray's object store); the worker runs its envs and returns their arrays, finished episodes,
infos and new stream states. Task assignment (:func:`~sb3_metacpo.common.rollouts.round_plan`), episode seeds and
action noise (seeded by the driver, one row per env) do not depend on which worker runs an env or which answers first, so the
batches are those of the local sampler with the same seed, bit for bit.

A worker that dies (its process killed, its node lost) is restarted by Ray (``max_restarts``) or, when that fails,
re-created, and its share of the collect is re-run from the same inputs, so the result is unchanged; each failure is
logged (``logging`` warning naming the worker and Ray's reason). Errors raised by an env are not retried: they reach
the caller as the env's exception.

Ray is an optional dependency: ``pip install sb3-metacpo[ray]``.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_metacpo.common.envs import EnvFactory
from sb3_metacpo.common.policies import NumpyActor
from sb3_metacpo.common.rollouts import (
    CollectionStopped,
    EpisodeRecord,
    OnStep,
    RolloutPolicy,
    RolloutStorage,
    Sampler,
    TaskBatch,
    VecStep,
    box_space,
    initial_episode_streams,
    round_batches,
    round_plan,
    run_round,
)
from sb3_metacpo.tasks.base import Task, TaskDistribution
from sb3_metacpo.tasks.monitor import TOTAL_COST
from sb3_metacpo.tasks.switches import SimulatorSwitches

logger = logging.getLogger(__name__)

#: The options of ``MetaCPO(..., sampler="ray", sampler_kwargs={...})`` (the keyword arguments of
#: :class:`RaySampler` the algorithms do not set themselves).
RAY_SAMPLER_OPTIONS = (
    "num_workers",
    "num_cpus_per_worker",
    "max_restarts",
    "max_retries",
    "ray_init_kwargs",
    "measure_transfer",
)


#: Seconds the sampler waits for its workers to start before it warns that Ray lacks the CPUs they need.
START_WARNING_SECONDS = 15.0


def import_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "sampler='ray' needs Ray, an optional dependency: pip install sb3-metacpo[ray] (or pip install 'ray>=2.9')"
        ) from error
    return ray


#: Seconds a sampler waits for Ray to restart a dead worker (max_restarts) before it re-creates the worker itself.
_RESTART_WAIT_S = 60.0


def _ray_failures(ray: Any) -> tuple[type[BaseException], ...]:
    """The exceptions of a lost worker (not of an env that raised): retried."""
    exceptions = ray.exceptions
    return tuple(
        getattr(exceptions, name)
        for name in ("RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError")
        if hasattr(exceptions, name)
    )


@dataclass
class _RoundRequest:
    """One round of a worker's share: the round's tasks, each of the worker's envs' task index within them."""

    index: int
    tasks: list[Task | None]
    owners: np.ndarray  # of the worker's envs, into ``tasks``
    set_offset: int  # the parameter set of a task is ``set_offset + its index in tasks``
    horizon: int


@dataclass
class _WorkerRequest:
    """A worker's share of a collect: its envs' global indices, their episode streams and the rounds."""

    env_indices: np.ndarray
    n_envs: int  # of the whole sampler (the noise is drawn for all, each env takes its row)
    streams: list[dict[str, Any]]
    rounds: list[_RoundRequest]
    keep_infos: bool
    crash_after_steps: int | None = None  # testing: the worker process exits after this many steps (once)


@dataclass
class _RoundResult:
    """A worker's envs in one round: the storage arrays, ``(t, local env index, episode)`` of every ended episode,
    the observation after the last step and the infos of every step (if asked)."""

    arrays: dict[str, np.ndarray]
    ended: list[tuple[int, int, EpisodeRecord]]
    final_obs: np.ndarray
    infos: list[list[dict[str, Any]]] | None


@dataclass
class _WorkerResult:
    rounds: list[_RoundResult]
    streams: list[dict[str, Any]]
    seconds: float  # time spent stepping envs and acting
    nbytes: int = 0  # size of this result pickled (only when the driver measures transfers)


# every array has the envs on axis 1 (cost_missing: one row per cost name)
_STORAGE_ARRAYS = (
    "observations",
    "next_observations",
    "actions",
    "rewards",
    "costs",
    "terminated",
    "truncated",
    "cost_missing",
)


class RolloutWorker:
    """What runs inside a Ray actor: a ``DummyVecEnv`` of ``n_envs`` envs of ``distribution``, built here with the
    driver's simulator ``switches`` (the worker's process imports the modules afresh, with their defaults)."""

    def __init__(
        self,
        distribution: TaskDistribution,
        n_envs: int,
        cost_names: Sequence[str],
        measure: bool,
        switches: SimulatorSwitches | None = None,
    ) -> None:
        import torch as th

        th.set_num_threads(1)  # one CPU per worker; acting is numpy
        if switches is not None:
            switches.apply()
        self.initial_task: Task | None = distribution.test_tasks(1)[0]
        self.vec_env = DummyVecEnv([EnvFactory(distribution=distribution, task=self.initial_task)] * n_envs)  # type: ignore[list-item]
        self.env_tasks: list[Task | None] = [self.initial_task] * n_envs
        self.cost_names = tuple(cost_names)
        self.measure = measure
        self.observation_space = box_space(self.vec_env.observation_space, "observation")
        self.action_space = box_space(self.vec_env.action_space, "action")

    def ping(self) -> int:
        """The worker's process id (to wait until it is up, and for tests)."""
        return os.getpid()

    def run(self, actor: NumpyActor, request: _WorkerRequest) -> _WorkerResult:
        """Run the rounds of ``request`` on this worker's envs with ``actor``."""
        start = time.perf_counter()
        self.vec_env._reset_seeds()
        for index, state in enumerate(request.streams):
            self.vec_env.env_method("set_episode_rng_state", state, indices=[index])
        steps_done = 0
        crash_at = request.crash_after_steps
        rounds = []
        for round_request in request.rounds:
            for index, owner in enumerate(round_request.owners.tolist()):
                task = round_request.tasks[owner]
                if self.env_tasks[index] != task:
                    self.vec_env.env_method("set_task", task, indices=[index])
                    self.env_tasks[index] = task
            infos: list[list[dict[str, Any]]] | None = [] if request.keep_infos else None

            def hook(t: int, *step: Any, infos: list[list[dict[str, Any]]] | None = infos) -> None:
                nonlocal steps_done
                steps_done += 1
                if crash_at is not None and steps_done >= crash_at:
                    os._exit(1)  # a test's simulated crash of the worker process
                if infos is not None:
                    infos.append(step[-1])

            policy = actor.bind(
                round_request.owners + round_request.set_offset, request.env_indices, round_request.index, request.n_envs
            )
            storage, ended, final_obs = run_round(
                self.vec_env,
                policy,
                round_request.horizon,
                self.action_space,
                self.observation_space,
                self.cost_names,
                hook,
                env_offset=int(request.env_indices[0]),
            )
            arrays = {name: getattr(storage, name) for name in _STORAGE_ARRAYS}
            rounds.append(_RoundResult(arrays, ended, final_obs, infos))
        streams = list(self.vec_env.env_method("episode_rng_state"))
        result = _WorkerResult(rounds, streams, time.perf_counter() - start)
        if self.measure:
            result.nbytes = len(pickle.dumps(result, protocol=5))
        return result


@dataclass
class CollectStats:
    """What collects cost (one collect, or :attr:`RaySampler.totals` of all): the bytes that crossed the wire, measured
    when ``measure_transfer=True`` (``sent``: the actor snapshot once per worker and each worker's request;
    ``received``: the workers' results, pickled); the seconds the workers spent running envs (``worker_seconds``,
    summed over the workers; ``busiest_worker_seconds``, the slowest worker's, the part of a collect that more
    workers shorten) and the seconds the driver waited for them (``wait_seconds``)."""

    collects: int = 0
    sent: int = 0
    received: int = 0
    worker_seconds: float = 0.0
    busiest_worker_seconds: float = 0.0
    wait_seconds: float = 0.0

    def add(self, other: CollectStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class RaySampler(Sampler):
    """Rollouts of a policy on several tasks of one :class:`~sb3_metacpo.tasks.base.TaskDistribution`, by
    ``num_workers`` Ray actors that together run ``n_envs`` envs (worker ``w`` owns a contiguous block of
    ``n_envs // num_workers`` or one more).

    Collects give the same batches as :class:`~sb3_metacpo.common.rollouts.RolloutSampler` with the same
    ``n_envs`` and ``seed`` when the policy is a :class:`~sb3_metacpo.common.policies.NumpyActor` (the only policy
    it accepts: a closure cannot be shipped reproducibly). ``on_step`` is replayed on the driver after the workers
    answered, step by step with the same :class:`~sb3_metacpo.common.rollouts.VecStep` contents as the local
    sampler's; a callback that returns False then drops the collect (the workers' steps were already taken).

    Connects to the running Ray (``ray.init(address=...)`` done by the user, or ``RAY_ADDRESS``) when
    ``ray.is_initialized()``; otherwise calls ``ray.init(**ray_init_kwargs)`` (a local Ray by default, or the
    cluster ``RAY_ADDRESS`` names).

    :param distribution: the task family (pickled to the workers, which build their envs from it)
    :param n_envs: logical envs, as the local sampler's ``n_envs``
    :param num_workers: Ray actors (at most ``n_envs``)
    :param seed: seed of the per-episode start-state seeds (env ``j``'s stream is seeded with ``seed + j``)
    :param cost_names: the info keys of the constrained cost signals
    :param num_cpus_per_worker: CPUs Ray reserves for each actor
    :param max_restarts: how often Ray restarts a dead actor (``max_restarts`` of the actor)
    :param max_retries: how often a worker's share of one collect is re-run after its worker died before the
        collect fails
    :param ray_init_kwargs: arguments of ``ray.init`` when this sampler starts Ray (e.g. ``{"num_cpus": 2}``)
    :param measure_transfer: measure the bytes sent and received per collect (:attr:`last_collect`, :attr:`totals`;
        pickles the results once more in the workers)
    """

    def __init__(
        self,
        distribution: TaskDistribution,
        n_envs: int = 1,
        num_workers: int = 1,
        seed: int = 0,
        cost_names: Sequence[str] = (TOTAL_COST,),
        num_cpus_per_worker: float = 1,
        max_restarts: int = 3,
        max_retries: int = 3,
        ray_init_kwargs: dict[str, Any] | None = None,
        measure_transfer: bool = False,
    ) -> None:
        check_ray_sampler_options(
            n_envs,
            num_workers=num_workers,
            num_cpus_per_worker=num_cpus_per_worker,
            max_restarts=max_restarts,
            max_retries=max_retries,
            ray_init_kwargs=ray_init_kwargs,
            measure_transfer=measure_transfer,
        )
        if not isinstance(distribution, TaskDistribution):
            raise TypeError(f"distribution must be a TaskDistribution, got {type(distribution).__name__}")
        ray = import_ray()
        self._ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            ray.init(**(ray_init_kwargs or {}))
            self.started_ray = True
        self.distribution: TaskDistribution | None = distribution
        self.n_envs = int(n_envs)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.cost_names = tuple(cost_names)
        self.max_retries = int(max_retries)
        self.measure_transfer = bool(measure_transfer)
        self.switches = SimulatorSwitches.current()  # the workers' envs are built with the driver's simulator switches
        observation_space, action_space = distribution.spaces
        self.observation_space = box_space(observation_space, "observation")
        self.action_space = box_space(action_space, "action")
        sizes = [self.n_envs // self.num_workers + (w < self.n_envs % self.num_workers) for w in range(self.num_workers)]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        self.env_blocks = [np.arange(bounds[w], bounds[w + 1]) for w in range(self.num_workers)]
        self._actor_cls = ray.remote(num_cpus=float(num_cpus_per_worker), max_restarts=int(max_restarts), max_task_retries=0)(
            RolloutWorker
        )
        self.workers = [self._new_worker(w) for w in range(self.num_workers)]
        self._wait_for_workers(float(num_cpus_per_worker))  # fail here, not in the first collect
        self._streams = initial_episode_streams(self.seed, self.n_envs)
        self.last_collect = CollectStats()
        self.totals = CollectStats()  # of every collect so far
        self.n_worker_failures = 0
        self._crash_next: dict[int, int] = {}

    def _wait_for_workers(self, num_cpus_per_worker: float) -> None:
        """Wait until every worker answers. Ray starts an actor only when its CPUs are free and waits silently
        otherwise (e.g. while another model's workers, which live as long as their model, hold them): after
        :data:`START_WARNING_SECONDS` a warning says what is missing, and the wait goes on (a cluster may scale up)."""
        ray = self._ray
        gc.collect()  # a model dropped without close() but still in a reference cycle: its workers' CPUs come free
        pings = [worker.ping.remote() for worker in self.workers]
        try:
            ray.get(pings, timeout=START_WARNING_SECONDS)
            return
        except ray.exceptions.GetTimeoutError:
            pass
        need = self.num_workers * num_cpus_per_worker
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
        warnings.warn(
            f"Ray has not started this sampler's {self.num_workers} workers after {START_WARNING_SECONDS:g} s: they "
            f"need {need:g} CPUs and Ray has {free:g} of {total:g} free. If they wait for CPUs, another model's Ray "
            "workers may hold them (they live as long as their model: model.close() releases them), "
            "or lower num_workers or num_cpus_per_worker; else Ray is slow to start them. Waiting on.",
            stacklevel=4,
        )
        ray.get(pings)

    def _new_worker(self, index: int) -> Any:
        return self._actor_cls.remote(
            self.distribution, len(self.env_blocks[index]), self.cost_names, self.measure_transfer, self.switches
        )

    # --- episode streams (held by the driver) ------------------------------------------------------------------
    def episode_rng_states(self) -> list[dict[str, Any]]:
        return [dict(state) for state in self._streams]

    def set_episode_rng_states(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != self.n_envs:
            raise ValueError(f"{len(states)} episode-stream states for a sampler of {self.n_envs} envs")
        self._streams = [dict(state) for state in states]

    def reset_envs(self) -> None:
        """Advance every env's episode stream by the one seed a reset draws (the envs are reset at every collect
        anyway; this keeps the streams in step with the local sampler's, whose envs SB3 resets in ``learn``)."""
        for index, state in enumerate(self._streams):
            rng = np.random.default_rng()
            rng.bit_generator.state = state
            rng.integers(2**31 - 1)  # as TaskEnv.reset draws its episode seed
            self._streams[index] = dict(rng.bit_generator.state)

    def ensure_usable(self) -> None:
        """Nothing to repair between collects (a dead worker is replaced during the collect that met it); a closed
        sampler is an error naming the fix."""
        if not self.workers:
            raise RuntimeError(
                "this Ray sampler was closed (its workers are gone): close the model instead (model.close(): its next "
                "learn builds a new sampler that goes on with the episode streams)"
            )
        if not self._ray.is_initialized():
            raise RuntimeError(
                "Ray was shut down (ray.shutdown()) under this Ray sampler, whose workers are gone with it: call "
                "model.close(); its next learn starts Ray again (with ray_init_kwargs) and goes on with the episode "
                "streams"
            )

    # --- testing ---------------------------------------------------------------------------------------------
    def crash_worker_during_next_collect(self, worker: int, after_steps: int = 1) -> None:
        """Make worker ``worker``'s process exit (``os._exit``) after ``after_steps`` env steps of the next collect,
        once (fault-injection for tests; the re-run does not crash)."""
        self._crash_next[int(worker)] = int(after_steps)

    # --- collecting -------------------------------------------------------------------------------------------
    def collect(
        self, tasks: Sequence[Task | None], act: RolloutPolicy, n_steps: int, on_step: OnStep | None = None
    ) -> list[TaskBatch]:
        """Run ``act`` on every task for at least ``n_steps`` env steps each; return one batch per task, in order
        (see the class description for ``on_step``)."""
        if not tasks:
            raise ValueError("collect needs at least one task")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not isinstance(act, NumpyActor):
            raise TypeError(
                "the Ray sampler acts with a NumpyActor (CPOPolicy.numpy_actor_sets, one parameter set per task), "
                f"which it ships to its workers; got {type(act).__name__}"
            )
        if any(task is None for task in tasks):
            raise ValueError("the Ray sampler builds its envs from the task distribution: every task must be given")
        ray = self._ray
        plan = round_plan(len(tasks), self.n_envs, n_steps)
        actor_ref = ray.put(act)
        requests = []
        for worker, block in enumerate(self.env_blocks):
            rounds = [
                _RoundRequest(index, list(tasks[start : start + self.n_envs]), owners[block], start, horizon)
                for index, (start, owners, horizon) in enumerate(plan)
            ]
            streams = [self._streams[j] for j in block]
            crash = self._crash_next.pop(worker, None)
            requests.append(_WorkerRequest(block, self.n_envs, streams, rounds, on_step is not None, crash))
        stats = CollectStats(collects=1)
        if self.measure_transfer:
            actor_bytes = len(pickle.dumps(act, protocol=5))
            stats.sent = actor_bytes * self.num_workers + sum(len(pickle.dumps(r, protocol=5)) for r in requests)
        start = time.perf_counter()
        results = self._run(actor_ref, requests)
        stats.wait_seconds = time.perf_counter() - start
        stats.received = sum(result.nbytes for result in results)
        stats.worker_seconds = sum(result.seconds for result in results)
        stats.busiest_worker_seconds = max(result.seconds for result in results)
        self.last_collect = stats
        self.totals.add(stats)
        # While on_step replays the steps, the streams follow them (a reset at each round's start, one at each episode
        # end), as the local sampler's do: a callback that stops or saves at step t sees them at step t
        replay = _StreamReplay(self._streams) if on_step is not None else None
        batches: list[TaskBatch] = []
        for index, (start, owners, horizon) in enumerate(plan):
            round_tasks = list(tasks[start : start + self.n_envs])
            parts = [result.rounds[index] for result in results]
            if replay is not None:
                replay.reset(np.arange(self.n_envs), self._streams)
            batches.extend(self._assemble(round_tasks, owners, horizon, parts, on_step, start, replay))
        for block, result in zip(self.env_blocks, results, strict=True):  # the workers' own, after the whole collect
            for j, state in zip(block.tolist(), result.streams, strict=True):
                self._streams[j] = state
        return batches

    def _run(self, actor_ref: Any, requests: list[_WorkerRequest]) -> list[_WorkerResult]:
        """Every worker's share; a worker that died is restarted (by Ray) or re-created and its share re-run."""
        ray = self._ray
        failures = _ray_failures(ray)
        pending = {self.workers[w].run.remote(actor_ref, request): w for w, request in enumerate(requests)}
        attempts = [0] * len(requests)
        results: list[_WorkerResult | None] = [None] * len(requests)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                worker = pending.pop(ref)
                try:
                    results[worker] = ray.get(ref)
                    continue
                except failures as error:
                    attempts[worker] += 1
                    self.n_worker_failures += 1
                    block = self.env_blocks[worker]
                    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                    if attempts[worker] > self.max_retries:
                        self._wait_until_restarted(worker, failures)  # usable by the next collect: no new failure
                        raise RuntimeError(
                            f"Ray rollout worker {worker} (envs {block[0]}-{block[-1]}) failed {attempts[worker]} times "
                            f"in one collect; last cause: {cause}"
                        ) from error
                    recreate = attempts[worker] > 1  # the first time, Ray's own restart (max_restarts) is used
                    logger.warning(
                        "Ray rollout worker %d (envs %d-%d) died during a collect (%s); %s and re-running its share "
                        "(attempt %d of %d)",
                        worker,
                        block[0],
                        block[-1],
                        cause,
                        "re-creating it" if recreate else "waiting for Ray to restart it (else re-creating it)",
                        attempts[worker] + 1,
                        self.max_retries + 1,
                    )
                    if recreate:
                        ray.kill(self.workers[worker], no_restart=True)
                        self.workers[worker] = self._new_worker(worker)
                    else:  # a retry sent while Ray restarts the actor would fail again ("the actor is restarting")
                        self._wait_until_restarted(worker, failures)
                    retry = _WorkerRequest(**{**requests[worker].__dict__, "crash_after_steps": None})
                    pending[self.workers[worker].run.remote(actor_ref, retry)] = worker
                except ray.exceptions.RayTaskError as error:  # the env raised in the worker: not retried
                    self._drain(pending)
                    raised = getattr(error, "cause", None)
                    if isinstance(raised, Exception):  # the env's own exception, Ray's (with the worker's trace) as cause
                        raise raised from error
                    raise
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _drain(self, pending: dict[Any, int]) -> None:
        """Wait for the other workers' shares of a collect that has failed and drop them: a failed share left unread
        made Ray print it as an "Unhandled error" later; and the next collect starts with every worker idle."""
        for ref in pending:
            try:
                self._ray.get(ref)
            except Exception:  # the collect failed already: the other shares' outcomes are dropped
                logger.debug("dropped the outcome of a share of a failed collect", exc_info=True)
        pending.clear()

    def _wait_until_restarted(self, worker: int, failures: tuple[type[BaseException], ...]) -> None:
        """Wait until Ray has restarted worker ``worker`` (it answers a ping); re-create it if it does not come back
        within ``_RESTART_WAIT_S`` or cannot (no restart left, killed for good): one death costs one attempt."""
        ray = self._ray
        restarting = getattr(ray.exceptions, "ActorUnavailableError", ())  # Ray >= 2.24; older Rays wait on the get
        deadline = time.monotonic() + _RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.workers[worker].ping.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return
            except restarting:
                time.sleep(0.1)
            except (*failures, ray.exceptions.GetTimeoutError):  # dead for good, or not back in time
                break
        ray.kill(self.workers[worker], no_restart=True)
        self.workers[worker] = self._new_worker(worker)

    def _assemble(
        self,
        tasks: list[Task | None],
        owners: np.ndarray,
        horizon: int,
        parts: list[_RoundResult],
        on_step: OnStep | None,
        task_offset: int = 0,
        replay: _StreamReplay | None = None,
    ) -> list[TaskBatch]:
        """The batches of one round from the workers' parts (env blocks in order), replaying ``on_step`` (with task
        indices into the collect's list: ``owners`` plus the round's first task, ``task_offset``; ``replay`` advances
        the episode streams at every episode end before the callback sees the step)."""
        storage = RolloutStorage(horizon, self.n_envs, self.observation_space.shape, self.action_space.shape, self.cost_names)
        for name in _STORAGE_ARRAYS:
            setattr(storage, name, np.concatenate([part.arrays[name] for part in parts], axis=1))
        ended = sorted(
            (
                (t, int(block[index]), episode)
                for block, part in zip(self.env_blocks, parts, strict=True)
                for t, index, episode in part.ended
            ),
            key=lambda item: (item[0], item[1]),
        )
        if on_step is not None:
            final_obs = np.concatenate([part.final_obs for part in parts])
            for t in range(horizon):
                new_obs = storage.observations[t + 1] if t + 1 < horizon else final_obs
                infos = [info for part in parts for info in (part.infos or [[]] * horizon)[t]]
                dones = storage.terminated[t] | storage.truncated[t]
                if replay is not None:  # the VecEnv reset the envs that ended at step t, each drawing a seed
                    replay.reset(np.flatnonzero(dones), self._streams)
                step = VecStep(
                    storage.observations[t],
                    storage.actions[t],
                    new_obs,
                    storage.rewards[t],
                    dones,
                    infos,
                    t,
                    owners + task_offset,
                )
                if on_step(step) is False:
                    raise CollectionStopped(f"a callback stopped the collect at step {t}")
        return round_batches(storage, tasks, owners, ended)

    def close(self) -> None:
        """Stop the workers (Ray itself keeps running, also when this sampler started it)."""
        gone: tuple[type[BaseException], ...] = (ValueError, *_ray_failures(self._ray))
        if not self._ray.is_initialized():  # shut down: the workers are gone (killing them would start a new Ray)
            self.workers = []
            return
        for worker in self.workers:
            try:
                self._ray.kill(worker, no_restart=True)
            except gone:
                pass  # already gone (or Ray was shut down)
        self.workers = []


class _StreamReplay:
    """The episode-seed streams of a collect's envs, advanced as the envs reset while the steps are replayed."""

    def __init__(self, streams: Sequence[dict[str, Any]]) -> None:
        self.rngs = []
        for state in streams:
            rng = np.random.default_rng()
            rng.bit_generator.state = state
            self.rngs.append(rng)

    def reset(self, envs: np.ndarray, streams: list[dict[str, Any]]) -> None:
        """Each of ``envs`` resets, drawing its episode seed as ``TaskEnv.reset`` does; ``streams`` gets their state."""
        for j in envs.tolist():
            self.rngs[j].integers(2**31 - 1)
            streams[j] = dict(self.rngs[j].bit_generator.state)


class RemoteEnvs:
    """What ``model.env`` is with ``sampler="ray"``: the envs run in the Ray workers, so the driver has only their
    number and spaces (what SB3's ``learn`` set-up and callbacks such as ``EvalCallback`` read). ``reset`` and
    ``seed`` act on the episode-seed streams the driver holds, exactly as they act on a local VecEnv's envs; anything
    else raises an ``AttributeError`` saying there is no env here."""

    def __init__(self, sampler: RaySampler) -> None:
        self.sampler = sampler
        self.num_envs = sampler.n_envs
        self.observation_space = sampler.observation_space
        self.action_space = sampler.action_space

    def reset(self) -> None:
        """Each env draws the seed of a fresh episode (no observation comes back: the next collect resets anyway)."""
        self.sampler.reset_envs()

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Restart every env's episode stream from ``seed + index``, as ``VecEnv.seed`` does at the next reset."""
        if seed is None:
            return [None] * self.num_envs
        self.sampler.set_episode_rng_states(initial_episode_streams(int(seed), self.num_envs))
        return [int(seed) + index for index in range(self.num_envs)]

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"model.env has no {name!r}: with sampler='ray' the envs run in Ray workers and there is no env in the "
            "driver (use sampler='local' for a VecEnv, or a separate env for evaluation)"
        )


def check_ray_sampler_options(n_envs: int, **options: Any) -> None:
    """Validate the options of :class:`RaySampler` (``sampler_kwargs``) with a ``ValueError`` naming the bad one."""
    from sb3_metacpo.common.checks import check, is_int, is_real

    unknown = sorted(set(options) - set(RAY_SAMPLER_OPTIONS))
    check(not unknown, f"unknown Ray sampler options {unknown}; the options are {list(RAY_SAMPLER_OPTIONS)}")
    workers = options.get("num_workers", 1)
    check(is_int(workers) and workers >= 1, f"num_workers must be a positive integer, got {workers!r}")
    check(
        workers <= n_envs,
        f"num_workers={workers} is more than the {n_envs} envs to share among them: raise n_envs (default "
        "meta_batch_size) or lower num_workers",
    )
    cpus = options.get("num_cpus_per_worker", 1)
    check(is_real(cpus) and cpus >= 0, f"num_cpus_per_worker must be a number >= 0, got {cpus!r}")
    for name in ("max_restarts", "max_retries"):
        value = options.get(name, 0)
        check(is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
    init_kwargs = options.get("ray_init_kwargs")
    check(
        init_kwargs is None or (isinstance(init_kwargs, dict) and all(isinstance(key, str) for key in init_kwargs)),
        f"ray_init_kwargs must be a dict of ray.init arguments or None, got {init_kwargs!r}",
    )
    if init_kwargs:
        import inspect

        named = [
            name
            for name, parameter in inspect.signature(import_ray().init).parameters.items()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        unknown_init = sorted(key for key in init_kwargs if key not in named and not key.startswith("_"))  # _private
        check(not unknown_init, f"ray_init_kwargs: ray.init takes no {unknown_init}; it takes {named}")
    measure = options.get("measure_transfer", False)
    check(isinstance(measure, bool), f"measure_transfer must be a bool, got {measure!r}")
