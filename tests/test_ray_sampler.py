"""The Ray sampler: the same batches and meta-parameters as the local sampler, workers that die mid-iteration
restarted and their share re-run with the same result. One local Ray with 2 CPUs for the module (Ray is part of the
test set-up: ``pip install -e .[tests]``)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np
import pytest
import ray
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metacpo import MetaCPO, MetaTRPO
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.ray_sampler import RaySampler, RemoteEnvs, import_ray
from sb3_metacpo.common.rollouts import RolloutSampler, TaskBatch
from sb3_metacpo.tasks import make_task_distribution

SMALL: dict[str, Any] = dict(meta_batch_size=4, n_steps=100, seed=3, policy_kwargs=dict(net_arch=[16]))
#: 3 meta-iterations of SMALL (each: 4 tasks x 100 steps x 2 batches)
THREE_ITERATIONS = 3 * 4 * 100 * 2


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def toy():
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def flat_params(model: MetaCPO) -> th.Tensor:
    return th.cat([value.detach().flatten() for value in model.policy.state_dict().values()])


class StepRecorder(BaseCallback):
    """Records what SB3 callbacks see at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[Any, ...]] = []

    def _on_step(self) -> bool:
        seeds = tuple(info.get("episode_seed") for info in self.locals["infos"])
        self.steps.append(
            (
                self.num_timesteps,
                self.locals["obs"].copy(),
                self.locals["new_obs"].copy(),
                self.locals["rewards"].copy(),
                self.locals["dones"].copy(),
                seeds,
            )
        )
        return True


def train(**kwargs: Any) -> tuple[MetaCPO, StepRecorder]:
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, **kwargs})
    recorder = StepRecorder()
    model.learn(THREE_ITERATIONS, callback=recorder)
    return model, recorder


@pytest.fixture(scope="module")
def local_run() -> tuple[th.Tensor, MetaCPO, StepRecorder]:
    model, recorder = train()
    return flat_params(model), model, recorder


@pytest.mark.parametrize("num_workers", [1, 2])
def test_ray_training_gives_the_local_meta_parameters(local_run, num_workers):
    expected, local, local_steps = local_run
    model, recorder = train(sampler="ray", sampler_kwargs={"num_workers": num_workers})
    try:
        assert isinstance(model.sampler, RaySampler) and len(model.sampler.workers) == num_workers
        assert model._n_updates == local._n_updates == 3
        assert th.equal(flat_params(model), expected)
        assert model.num_timesteps == local.num_timesteps == THREE_ITERATIONS
        # callbacks see the same steps (replayed after the workers answered)
        assert len(recorder.steps) == len(local_steps.steps)
        for ours, theirs in zip(recorder.steps, local_steps.steps, strict=True):
            assert ours[0] == theirs[0] and ours[-1] == theirs[-1]
            for a, b in zip(ours[1:-1], theirs[1:-1], strict=True):
                np.testing.assert_array_equal(a, b)
        assert model.sampler.episode_rng_states() == local.sampler.episode_rng_states()  # type: ignore[union-attr]
        assert isinstance(model.env, RemoteEnvs) and model.env.num_envs == 4  # no env in the driver
        with pytest.raises(AttributeError, match="no env in the driver"):
            model.env.step_async(np.zeros((4, 2)))
    finally:
        model.sampler.close()  # type: ignore[union-attr]


def actor(distribution, n_sets: int, seed: int) -> Any:
    observation_space, action_space = distribution.spaces
    th.manual_seed(seed)
    policy = CPOPolicy(observation_space, action_space, lambda _: 1e-3, net_arch=[8])
    generator = th.Generator().manual_seed(seed)
    params = {
        k: v.detach() + 0.3 * th.randn((n_sets, *v.shape), generator=generator) for k, v in policy.actor_params().items()
    }
    return policy.numpy_actor_sets(params, noise_seed=seed)


def assert_same_batches(ours: list[TaskBatch], theirs: list[TaskBatch]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.task == b.task
        for name in ("observations", "actions", "rewards", "costs", "terminated", "truncated", "next_observations"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.episode_steps, b.episode_steps)  # type: ignore[arg-type]
        assert a.episodes == b.episodes


def test_rounds_of_more_tasks_than_envs_match_the_local_sampler():
    """7 tasks on 3 envs (rounds of 3, 3 and 1 tasks), 2 workers of 2 and 1 envs, two collects in a row."""
    distribution = toy()
    tasks = distribution.sample(7)
    local = RolloutSampler(toy(), n_envs=3, seed=5)
    remote = RaySampler(toy(), n_envs=3, num_workers=2, seed=5, measure_transfer=True)
    try:
        for seed in (1, 2):
            assert_same_batches(
                remote.collect(tasks, actor(distribution, 7, seed), 60), local.collect(tasks, actor(distribution, 7, seed), 60)
            )
        assert remote.episode_rng_states() == local.episode_rng_states()
        stats = remote.last_collect
        assert stats.sent > 0 and stats.received > stats.sent and 0 < stats.busiest_worker_seconds <= stats.worker_seconds
        assert remote.totals.collects == 2 and remote.totals.received > stats.received
        with pytest.raises(TypeError, match="NumpyActor"):
            remote.collect(tasks, lambda obs, idx: np.zeros((len(obs), 2)), 10)
    finally:
        remote.close()
        local.close()


def test_an_env_of_a_round_acts_with_its_own_task_parameters():
    """Deterministic actors whose sets differ: in the second round the env of task 3 must act with set 3."""
    distribution = toy()
    tasks = distribution.sample(4)
    local = RolloutSampler(toy(), n_envs=2, seed=0)
    act = actor(distribution, 4, 0)
    act.deterministic = True
    batches = local.collect(tasks, act, 10)
    for index, batch in enumerate(batches):
        bound = act.bind(np.array([index]))
        np.testing.assert_allclose(batch.actions[:, 0], np.stack([bound.mean(o[None])[0] for o in batch.observations[:, 0]]))
    local.close()


class KillWorker(BaseCallback):
    """Kills Ray worker 0 (Ray restarts it) once, after the first collect of the given iteration."""

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration, self.rollouts, self.killed = iteration, 0, False

    def _on_rollout_start(self) -> None:
        self.rollouts += 1

    def _on_step(self) -> bool:
        sampler = self.model.sampler
        if not self.killed and self.rollouts == self.iteration and self.locals["n_steps"] == 0:
            ray.kill(sampler.workers[0], no_restart=False)
            self.killed = True
        return True


def test_a_killed_worker_is_restarted_and_the_iteration_completes_with_the_same_result(local_run, caplog):
    """Worker 1's process exits 30 steps into the first collect; worker 0 is killed by Ray between the two collects
    of the third meta-iteration. Both are restarted, their shares re-run, and training ends where the undisturbed
    local run ends."""
    expected = local_run[0]
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **SMALL)
    try:
        sampler = model._get_sampler()
        assert isinstance(sampler, RaySampler)
        pids = ray.get([worker.ping.remote() for worker in sampler.workers])
        sampler.crash_worker_during_next_collect(1, after_steps=30)
        callback = KillWorker(iteration=3)
        with caplog.at_level(logging.WARNING, logger="sb3_metacpo.common.ray_sampler"):
            model.learn(THREE_ITERATIONS, callback=callback)
        assert callback.killed
        messages = [record.getMessage() for record in caplog.records]
        assert any("worker 1 (envs 2-3) died during a collect" in message for message in messages), messages
        assert sampler.n_worker_failures == 2  # two deaths, one attempt each
        new_pids = ray.get([worker.ping.remote() for worker in sampler.workers])
        assert new_pids[0] != pids[0] and new_pids[1] != pids[1]  # both processes were replaced
        assert model._n_updates == 3
        assert th.equal(flat_params(model), expected)
    finally:
        model.sampler.close()  # type: ignore[union-attr]


def test_one_death_costs_one_attempt():
    """The retry went out while Ray was still restarting the dead actor, failed with "the actor is restarting" and
    counted as a second failure: with max_retries=1 one death could fail the collect (an audit saw it 5 times in 5).
    The sampler now waits for the restart."""
    distribution = toy()
    sampler = RaySampler(toy(), n_envs=2, num_workers=2, max_retries=1)  # max_restarts=3
    try:
        for attempt in range(3):
            sampler.crash_worker_during_next_collect(attempt % 2, after_steps=5)
            failures = sampler.n_worker_failures
            sampler.collect(distribution.sample(2), actor(distribution, 2, attempt), 10)
            assert sampler.n_worker_failures == failures + 1
    finally:
        sampler.close()


def test_a_closed_sampler_says_so():
    """learn() after sampler.close() failed with a bare IndexError."""
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **SMALL)
    model.learn(SMALL["meta_batch_size"] * SMALL["n_steps"] * 2)
    model.sampler.close()  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match=r"this Ray sampler was closed .*: close the model instead \(model.close\(\)"):
        model.learn(SMALL["meta_batch_size"] * SMALL["n_steps"] * 2)
    model.sampler = None  # a new one is built
    model.learn(SMALL["meta_batch_size"] * SMALL["n_steps"] * 2)
    model.sampler.close()  # type: ignore[union-attr]


def test_a_worker_that_keeps_dying_fails_the_collect_with_its_cause():
    distribution = toy()
    sampler = RaySampler(toy(), n_envs=2, num_workers=2, max_retries=0)
    try:
        sampler.crash_worker_during_next_collect(0, after_steps=1)
        with pytest.raises(RuntimeError, match=r"worker 0 \(envs 0-0\) failed 1 times"):
            sampler.collect(distribution.sample(2), actor(distribution, 2, 0), 10)
        # the failed worker is back before the error is raised: the next collect does not meet it restarting (it
        # failed again, a second failure counted for the one death; Ray audit)
        sampler.collect(distribution.sample(2), actor(distribution, 2, 1), 10)
        assert sampler.n_worker_failures == 1
    finally:
        sampler.close()


def test_numpy_options_are_stored_as_python_numbers_and_ray_init_kwargs_are_checked():
    """Ray's options refuse numpy numbers (a TypeError at the first learn), and a misspelt ray.init argument failed
    only when the sampler started Ray (Ray audit)."""
    from sb3_metacpo.common.ray_sampler import check_ray_sampler_options

    options = {"num_workers": np.int64(2), "num_cpus_per_worker": np.float32(0.5), "max_retries": np.int64(1)}
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs=options, **{**SMALL, "meta_batch_size": 2})
    assert model.sampler_kwargs == {"num_workers": 2, "num_cpus_per_worker": 0.5, "max_retries": 1}
    assert all(type(value) in (int, float) for value in model.sampler_kwargs.values())
    model.learn(400)
    model.close()
    with pytest.raises(ValueError, match=r"ray_init_kwargs: ray.init takes no \['num_cpu'\]"):
        check_ray_sampler_options(2, ray_init_kwargs={"num_cpu": 2})
    check_ray_sampler_options(2, ray_init_kwargs={"num_cpus": 2, "_system_config": {}})  # Ray's private ones pass


def test_meta_trpo_runs_on_ray_and_saves_its_sampler_choice(tmp_path):
    local = MetaTRPO("MlpPolicy", toy(), **SMALL).learn(800)  # the seed is torch's global one: one model at a time
    model = MetaTRPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **SMALL)
    distribution = toy()
    evaluation = EvalCallback(
        Monitor(distribution.make_env(distribution.test_tasks(1)[0])), eval_freq=100, n_eval_episodes=1, verbose=0
    )
    try:
        with pytest.warns(UserWarning, match="not of the same type"):  # SB3's: the training env is not a VecEnv here
            model.learn(800, callback=evaluation)
        assert evaluation.n_calls == 200 and np.isfinite(evaluation.last_mean_reward)  # it evaluated
        assert th.equal(flat_params(model), flat_params(local))
        path = model.save(tmp_path / "model")
    finally:
        model.sampler.close()  # type: ignore[union-attr]
    loaded = MetaTRPO.load(path, env=toy())
    assert loaded.sampler_type == "ray" and loaded.sampler_kwargs == {"num_workers": 2}
    without_ray = MetaTRPO.load(path, env=toy(), sampler="local", sampler_kwargs=None)
    assert without_ray.sampler_type == "local" and th.equal(flat_params(without_ray), flat_params(model))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="dask"), "sampler must be 'local' or 'ray'"),
        (dict(sampler_kwargs={"num_workers": 2}), "options of sampler='ray'"),
        (dict(sampler="ray", sampler_kwargs={"num_workers": 5}), "num_workers=5 is more than the 4 envs"),
        (dict(sampler="ray", sampler_kwargs={"num_workers": 0}), "num_workers must be a positive integer"),
        (dict(sampler="ray", sampler_kwargs={"workers": 2}), r"unknown Ray sampler options \['workers'\]"),
        (dict(sampler="ray", sampler_kwargs={"max_restarts": -1}), "max_restarts must be an integer >= 0"),
        (dict(sampler="ray", sampler_kwargs=[("num_workers", 2)]), "sampler_kwargs must be a dict"),
        (dict(sampler="ray", vec_env_cls=SubprocVecEnv), "leave vec_env_cls=None"),
    ],
)
def test_bad_sampler_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaCPO("MlpPolicy", toy(), **{**SMALL, **kwargs})


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install sb3-metacpo\[ray\]"):
        import_ray()
    with pytest.raises(ImportError, match=r"sb3-metacpo\[ray\]"):
        MetaCPO("MlpPolicy", toy(), sampler="ray", **SMALL)


def test_workers_waiting_for_cpus_another_model_holds_are_explained(monkeypatch):
    """A second Ray-sampler model in a process whose first model still held Ray's CPUs waited forever, silently."""
    import threading

    from sb3_metacpo.common import ray_sampler

    first = RaySampler(toy(), n_envs=2, num_workers=2)  # Ray's 2 CPUs, held until closed
    monkeypatch.setattr(ray_sampler, "START_WARNING_SECONDS", 1.0)
    releases = threading.Timer(3.0, first.close)
    releases.start()
    with pytest.warns(UserWarning, match=r"need 2 CPUs and Ray has 0 of 2 free\. If they wait for CPUs, another model"):
        second = RaySampler(toy(), n_envs=2, num_workers=2)  # starts once the first's workers are gone
    releases.join()
    assert len(second.collect(toy().sample(2), second_policy(second), 20)) == 2
    second.close()


def second_policy(sampler: RaySampler):
    policy = CPOPolicy(sampler.observation_space, sampler.action_space, lambda _: 1e-3, net_arch=[8])
    params = {
        name: value.detach().unsqueeze(0).repeat(2, *([1] * value.dim())) for name, value in policy.actor_params().items()
    }
    return policy.numpy_actor_sets(params)


def test_close_releases_the_ray_workers_and_training_goes_on_as_without_it(local_run):
    """Workers lived until their model was collected: a second Ray model in the process waited for their CPUs."""
    expected, _, _ = local_run
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **SMALL)
    model.learn(THREE_ITERATIONS // 3)
    model.close()
    assert model.sampler is None
    deadline = time.monotonic() + 60  # Ray frees a killed actor's CPUs in its own time (about 2 s here)
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2  # without close they stayed held: a new model waited forever
    model.learn(2 * THREE_ITERATIONS // 3, reset_num_timesteps=False)  # fresh workers, the same episode streams
    try:
        assert th.equal(flat_params(model), expected)
    finally:
        model.close()


class StreamRecorder(BaseCallback):
    """Records the training envs' episode streams (what a save writes) at every step; stops at ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at, self.streams = stop_at, []

    def _on_step(self) -> bool:
        self.streams.append(self.model._sampler_rng_states()["training"])
        return self.stop_at is None or self.num_timesteps < self.stop_at


def test_callbacks_see_the_episode_streams_of_the_step_and_a_stop_goes_on_as_locally():
    """The Ray sampler set the streams of the collect's end before replaying the steps to the callbacks: a save at
    step t wrote them, and a stop at step t left them there, so the run parted from the local sampler's (Ray audit).
    The oracle is the local sampler, whose envs reset (drawing a seed) as the steps happen."""
    runs = {}
    for kind in ("local", "ray"):
        extra = dict(sampler="ray", sampler_kwargs={"num_workers": 2}) if kind == "ray" else {}
        model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "meta_batch_size": 2}, **extra)
        every_step = StreamRecorder()
        model.learn(400, callback=every_step)  # one meta-iteration: 2 collects of 2 envs x 100 steps (episodes of 50)
        stopped = StreamRecorder(stop_at=model.num_timesteps + 60)
        model.learn(400, callback=stopped, reset_num_timesteps=False)  # stops mid-collect, at its 30th step
        model.learn(400, reset_num_timesteps=False)  # and goes on
        runs[kind] = (every_step.streams, stopped.streams, flat_params(model))
        model.close()
    (local_steps, local_stop, local_params), (ray_steps, ray_stop, ray_params) = runs["local"], runs["ray"]
    assert len(ray_steps) == len(local_steps) == 200 and ray_steps == local_steps
    assert ray_stop == local_stop
    assert th.equal(ray_params, local_params)


def test_a_model_dropped_without_close_frees_its_workers_cpus_for_the_next_sampler(monkeypatch):
    """A model that has trained is held in a reference cycle (its callbacks' locals): ``del model`` freed its workers'
    CPUs only when the cycle collector ran, so the next sampler's workers waited for them (Ray audit).

    Checked without timing: the collector is off from ``del`` on, and the model must be gone when the new sampler
    first waits on Ray (Ray runs the collector itself once workers have waited for CPUs for some 15 s, which the
    earlier form of this test told from the fix by a 15 s start warning that a loaded machine's slow worker start
    also gave)."""
    import gc
    import warnings
    import weakref

    first = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **{**SMALL, "meta_batch_size": 2})
    first.learn(400)
    dropped = weakref.ref(first)
    alive_at_first_wait: list[bool] = []
    ray_get = ray.get

    def get(*args: Any, **kwargs: Any) -> Any:
        if not alive_at_first_wait:
            alive_at_first_wait.append(dropped() is not None)
        return ray_get(*args, **kwargs)

    gc.disable()
    try:
        del first
        assert dropped() is not None  # held in a cycle: without a collection its workers keep their CPUs
        monkeypatch.setattr(ray, "get", get)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a slow start's warning on a loaded machine
            second = RaySampler(toy(), n_envs=2, num_workers=2)  # needs the 2 CPUs the first model's workers held
    finally:
        gc.enable()
        monkeypatch.undo()
    assert alive_at_first_wait == [False]
    second.close()


def test_after_ray_shutdown_learn_names_the_fix_and_close_starts_no_ray():
    """After ray.shutdown() under a model, learn failed with a raw Ray error and close() started a new Ray with every
    CPU of the machine (killing the workers does). It restarts the module's Ray as the fixture did for the tests after it."""
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2}, **{**SMALL, "meta_batch_size": 2})
    model.learn(400)
    ray.shutdown()
    try:
        with pytest.raises(RuntimeError, match=r"Ray was shut down .* call model.close\(\)"):
            model.learn(400, reset_num_timesteps=False)
        model.close()
        assert not ray.is_initialized()
    finally:
        if not ray.is_initialized():
            ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    model.learn(400, reset_num_timesteps=False)  # a new sampler on the running Ray, going on with the streams
    model.close()


def test_load_warns_when_the_sampler_kwargs_given_leave_saved_options_out(tmp_path):
    """ray.rst says to pass ray_init_kwargs again to load(path, sampler_kwargs=...), which replaced the saved options
    silently: a 4-worker model came back with 1 worker (Ray audit)."""
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs={"num_workers": 2, "max_retries": 5}, **SMALL)
    path = model.save(tmp_path / "ray_model")
    model.close()
    with pytest.warns(UserWarning, match=r"whose \{'max_retries': 5, 'num_workers': 2\} are not among them"):
        loaded = MetaCPO.load(path, sampler_kwargs={"ray_init_kwargs": {"num_cpus": 2}})
    assert loaded.sampler_kwargs == {"ray_init_kwargs": {"num_cpus": 2}}
    kept = MetaCPO.load(path, sampler_kwargs={"num_workers": 2, "max_retries": 5, "ray_init_kwargs": {"num_cpus": 2}})
    assert kept.sampler_kwargs["num_workers"] == 2


def test_an_env_that_raises_in_the_workers_reaches_the_caller_as_its_own_exception():
    """It reached learn as Ray's RayTaskError (a subclass of the env's exception whose message began with Ray's actor
    header), and the other workers' failed shares were left unread, which Ray later printed as "Unhandled error"."""
    from sb3_metacpo.tasks.toy import Toy2DNavTask

    distribution = toy()
    sampler = RaySampler(toy(), n_envs=2, num_workers=2)
    try:
        bad = Toy2DNavTask(goal_distance=99.0)  # the workers' task distribution refuses it
        with pytest.raises(ValueError, match=r"^Toy2DNav: goal_distance=99.0") as info:
            sampler.collect([bad, bad], actor(distribution, 2, 0), 10)
        assert type(info.value) is ValueError and isinstance(info.value.__cause__, ray.exceptions.RayTaskError)
        sampler.collect(distribution.sample(2), actor(distribution, 2, 1), 10)  # both workers answer the next one
    finally:
        sampler.close()


def test_the_workers_build_their_envs_with_the_drivers_simulator_switches(monkeypatch):
    """A Ray worker imports the modules afresh, with their defaults: FAST_STEP = False in the driver did not reach
    the workers' envs. Observed through a task without hazards, whose reset only upstream's pseudo-lidar refuses."""
    import dataclasses

    from sb3_metacpo.tasks import safety_gym

    for fast in (False, True):
        monkeypatch.setattr(safety_gym, "FAST_STEP", fast)
        monkeypatch.setattr(safety_gym, "FAST_RESET", fast)
        distribution = make_task_distribution("PointGoalHazard", seed=0, max_episode_steps=20)
        task = dataclasses.replace(distribution.sample(1)[0], n_hazards=0)
        sampler = RaySampler(distribution, n_envs=1, num_workers=1)
        try:
            if fast:
                sampler.collect([task], actor(distribution, 1, 0), 20)
            else:
                with pytest.raises(AssertionError, match="Bad pos"):
                    sampler.collect([task], actor(distribution, 1, 0), 20)
        finally:
            sampler.close()
