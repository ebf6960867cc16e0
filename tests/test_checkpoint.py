"""Checkpoints and resume: a run killed with SIGKILL in the middle of a meta-iteration resumes from its last
checkpoint and reaches bit-identical parameters to the uninterrupted run; archives are written atomically and hold
everything training needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch as th
from archive_edits import rewrite_archive
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.callbacks import ResumableCheckpointCallback
from sb3_metacpo.common.serialization import METADATA, ArchiveError, read_archive

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from sb3_metacpo import MetaCPO, make_task_distribution
    from sb3_metacpo.common.callbacks import ResumableCheckpointCallback

    mode, folder, total = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class KillAt(BaseCallback):
        def __init__(self, step):
            super().__init__()
            self.step = step

        def _on_step(self):
            if self.step and self.model.num_timesteps >= self.step:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final save
            return True

    checkpoints = ResumableCheckpointCallback(1, os.path.join(folder, "checkpoints"))
    if mode == "resume":
        model = MetaCPO.load(ResumableCheckpointCallback.latest(os.path.join(folder, "checkpoints")))
        model.learn(total - model.num_timesteps, callback=checkpoints, reset_num_timesteps=False)
    else:
        dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
        model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, critic="mlp",
                        n_critic_updates=2, policy_kwargs=dict(net_arch=[16]))
        kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        model.learn(total, callback=CallbackList([checkpoints, KillAt(kill_at)]))
    model.save(os.path.join(folder, "final.zip"))
    """
)


def _run(script: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def test_a_run_killed_mid_iteration_resumes_bit_identically(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    total = 1600  # 4 meta-iterations of 400 env steps
    full = _run(script, "full", tmp_path / "full", total)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(script, "full", tmp_path / "killed", total, 1000)  # in the 3rd meta-iteration
    assert killed.returncode == -signal.SIGKILL
    latest = ResumableCheckpointCallback.latest(tmp_path / "killed" / "checkpoints")
    assert latest is not None and latest.name == "checkpoint_2_updates_800_steps.zip"  # lost < 1 interval
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))  # no temporary file left behind
    resumed = _run(script, "resume", tmp_path / "killed", total)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, expected = read_archive(tmp_path / "full" / "final.zip")
    _, actual = read_archive(tmp_path / "killed" / "final.zip")
    for key in ("policy", "optimizer"):  # θ, critics, observation statistics; the critic optimiser's state
        flat_expected, flat_actual = _flatten(expected[key]), _flatten(actual[key])
        assert flat_expected.keys() == flat_actual.keys()
        for name, value in flat_expected.items():
            assert th.equal(value, flat_actual[name]) if isinstance(value, th.Tensor) else value == flat_actual[name], name


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, item in tree.items() for k, v in _flatten(item, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for index, item in enumerate(tree) for k, v in _flatten(item, f"{prefix}{index}/").items()}
    return {prefix: tree}


def test_checkpoints_are_labelled_with_the_state_they_hold(tmp_path: Path) -> None:
    model = MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50), **SMALL)
    callback = ResumableCheckpointCallback(2, tmp_path, keep_last=2)
    model.learn(2000, callback=callback)  # 5 updates: checkpoints after 2, 4 and at the end (5)
    assert [path.name for path in sorted(tmp_path.glob("*.zip"))] == [
        "checkpoint_4_updates_1600_steps.zip",
        "checkpoint_5_updates_2000_steps.zip",
    ]
    metadata, tensors = read_archive(tmp_path / "checkpoint_4_updates_1600_steps.zip")
    assert metadata["counters"]["num_timesteps"] == 1600 and metadata["counters"]["n_updates"] == 4
    assert {"numpy", "python", "samplers"} <= set(metadata["rng"]) and "stream" in metadata["task_distribution"]
    assert set(tensors) == {"policy", "optimizer", "adapted_params", "torch_rng"}
    final = MetaCPO.load(ResumableCheckpointCallback.latest(tmp_path))
    assert all(th.equal(final.policy.state_dict()[k], v) for k, v in model.policy.state_dict().items())
    # The task stream continues where it was (not from its first draw).
    assert final.task_distribution.sample(1) == model.task_distribution.sample(1)


def test_keep_last_holds_across_a_resume(tmp_path: Path) -> None:
    """keep_last counted only the checkpoints a callback saved itself: a resumed run never pruned those of the run
    before it (keep_last=2 left four files). It counts the folder's checkpoints of its prefix now, oldest first by
    their numbers; one written again (a resume from an earlier checkpoint) is the most recent, not pruned at once."""

    def make() -> MetaCPO:
        return MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50), **SMALL)

    def names() -> list[str]:
        return sorted(path.name for path in tmp_path.iterdir())

    (tmp_path / "other_1_updates_400_steps.zip").write_bytes(b"")  # another prefix: left alone
    (tmp_path / "notes.txt").write_text("")
    make().learn(1200, callback=ResumableCheckpointCallback(1, tmp_path, keep_last=2))  # 3 updates
    assert names() == [
        "checkpoint_2_updates_800_steps.zip",
        "checkpoint_3_updates_1200_steps.zip",
        "notes.txt",
        "other_1_updates_400_steps.zip",
    ]
    latest = ResumableCheckpointCallback.latest(tmp_path)
    assert latest is not None
    resumed = MetaCPO.load(latest)
    resumed.learn(800, callback=ResumableCheckpointCallback(1, tmp_path, keep_last=2), reset_num_timesteps=False)
    assert names() == [
        "checkpoint_4_updates_1600_steps.zip",
        "checkpoint_5_updates_2000_steps.zip",
        "notes.txt",
        "other_1_updates_400_steps.zip",
    ]
    # resumed from the older of the two: the later one (5) is set aside, 5 is written again, then 6 prunes 4
    earlier = MetaCPO.load(tmp_path / "checkpoint_4_updates_1600_steps.zip")
    with pytest.warns(UserWarning, match="1 checkpoint"):
        earlier.learn(800, callback=ResumableCheckpointCallback(1, tmp_path, keep_last=2), reset_num_timesteps=False)
    assert names()[:2] == ["checkpoint_5_updates_2000_steps.zip", "checkpoint_6_updates_2400_steps.zip"]
    assert [path.name for path in (tmp_path / "checkpoint_superseded_at_4_updates").iterdir()] == [
        "checkpoint_5_updates_2000_steps.zip"
    ]
    assert MetaCPO.load(tmp_path / "checkpoint_5_updates_2000_steps.zip").num_timesteps == 2000
    # a fresh run in the same folder deletes only what it wrote: the resumed run's files stay
    make().learn(1200, callback=ResumableCheckpointCallback(1, tmp_path, keep_last=1))
    assert names()[:5] == [
        "checkpoint_3_updates_1200_steps.zip",
        "checkpoint_5_updates_2000_steps.zip",
        "checkpoint_6_updates_2400_steps.zip",
        "checkpoint_superseded_at_4_updates",
        "notes.txt",
    ]


def test_a_resume_from_an_earlier_checkpoint_sets_the_abandoned_continuation_aside(tmp_path: Path) -> None:
    """Resumed from checkpoint 1 of a run that reached 3 and killed after its own checkpoint 2, latest() picked the
    abandoned continuation's checkpoint 3 and resumed the other branch. Its later checkpoints are now moved aside."""

    def make() -> MetaCPO:
        return MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50), **SMALL)

    make().learn(1200, callback=ResumableCheckpointCallback(1, tmp_path))  # checkpoints 1, 2, 3
    branch = MetaCPO.load(tmp_path / "checkpoint_1_updates_400_steps.zip", inner_target_kl=0.02)  # other settings
    with pytest.warns(UserWarning, match=r"2 checkpoint\(s\) of .* lie beyond this run's 1 updates"):
        branch.learn(400, callback=ResumableCheckpointCallback(1, tmp_path), reset_num_timesteps=False)  # writes 2
    aside = tmp_path / "checkpoint_superseded_at_1_updates"
    assert sorted(path.name for path in aside.iterdir()) == [
        "checkpoint_2_updates_800_steps.zip",
        "checkpoint_3_updates_1200_steps.zip",
    ]
    latest = ResumableCheckpointCallback.latest(tmp_path)
    assert latest is not None and latest.name == "checkpoint_2_updates_800_steps.zip"
    resumed = MetaCPO.load(latest)
    assert resumed.inner_target_kl == 0.02  # this branch's checkpoint, not the abandoned one's
    assert MetaCPO.load(aside / "checkpoint_2_updates_800_steps.zip").inner_target_kl != 0.02  # the first branch's


def test_checkpoints_are_ordered_by_their_numbers(tmp_path: Path) -> None:
    for name in ("checkpoint_10_updates_1000_steps.zip", "checkpoint_9_updates_900_steps.zip", "ck_11_updates_1_steps.zip"):
        (tmp_path / name).write_bytes(b"")
    found = ResumableCheckpointCallback.checkpoints(tmp_path)
    assert [(numbers, path.name) for numbers, path in found] == [
        ((9, 900), "checkpoint_9_updates_900_steps.zip"),
        ((10, 1000), "checkpoint_10_updates_1000_steps.zip"),
    ]
    latest = ResumableCheckpointCallback.latest(tmp_path)
    assert latest is not None and latest.name == "checkpoint_10_updates_1000_steps.zip"
    assert ResumableCheckpointCallback.checkpoints(tmp_path / "missing") == []
    assert ResumableCheckpointCallback.latest(tmp_path, "nothing") is None


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = CPO("MlpPolicy", "Toy2DNav", n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
    path = model.save(tmp_path / "model")
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    model.learn(100)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.zip"]


class StopAt(BaseCallback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        return self.model.num_timesteps < self.step


def test_a_stopped_run_resumes_from_its_last_update_and_a_loaded_model_saves_its_streams(tmp_path: Path) -> None:
    """A callback stop inside the 4th meta-iteration left a final checkpoint labelled 3 updates and 1400 steps whose
    envs and streams had moved past the 3rd update (a resume ended off the straight run, 200 steps late); none is
    written now, and the latest is the one at the last boundary saved. MetaCPO.load(p).save(q) wrote this process's
    streams instead of the archive's held-back ones, so a resume from q differed from one from p; both resume the
    straight run bit for bit now."""

    def make() -> MetaCPO:
        return MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50), **SMALL)

    straight = make()
    straight.learn(1600)
    stopped = make()
    stopped.learn(1600, callback=CallbackList([ResumableCheckpointCallback(2, tmp_path), StopAt(1400)]))
    assert [path.name for path in tmp_path.glob("*.zip")] == ["checkpoint_2_updates_800_steps.zip"]
    latest = ResumableCheckpointCallback.latest(tmp_path)
    assert latest is not None and latest.name == "checkpoint_2_updates_800_steps.zip"
    resaved = MetaCPO.load(latest).save(tmp_path / "resaved.zip")
    for archive in (latest, resaved):
        resumed = MetaCPO.load(archive)
        resumed.learn(1600 - resumed.num_timesteps, reset_num_timesteps=False)
        assert resumed.num_timesteps == 1600
        for name, value in straight.policy.state_dict().items():
            assert th.equal(resumed.policy.state_dict()[name], value), (archive.name, name)


def _cpo(max_episode_steps: int, n_steps: int) -> CPO:
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=max_episode_steps)
    return CPO(
        "MlpPolicy", distribution, n_envs=2, n_steps=n_steps, seed=0, n_critic_updates=2, policy_kwargs=dict(net_arch=[8])
    )


def _episode_seeds(model: CPO) -> list[int]:
    """Records the seeds of the episodes each rollout completes."""
    seeds: list[int] = []
    train = model.train

    def recording_train() -> None:
        assert model._rollout is not None
        seeds.extend(int(episode.seed) for episode in model._rollout.episodes if episode.seed is not None)
        train()

    model.train = recording_train  # type: ignore[method-assign]
    return seeds


def _resumed_half(path: Path, n_steps: int, half: int) -> tuple[list[int], list[int], CPO]:
    """Train ``half`` steps, save to ``path``, load and train ``half`` more: the episode seeds of each half and the
    resumed model."""
    model = _cpo(50, n_steps)
    first_seeds = _episode_seeds(model)
    model.learn(half)
    resumed = CPO.load(model.save(path))
    resumed_seeds = _episode_seeds(resumed)
    resumed.learn(half, reset_num_timesteps=False)
    return first_seeds, resumed_seeds, resumed


def test_cpo_resumes_its_envs_streams(tmp_path: Path) -> None:
    """CPO.load without an env could not train (SB3's bare AssertionError), and a resumed CPO re-seeded its envs from
    ``seed``, so its first episodes were the run's first ones again. It rebuilds its envs now and continues their
    episode and task streams, restarting the episodes in flight: with episodes that end at the rollout boundary the
    resumed run is the straight run's twin, bit for bit; otherwise no episode of the first half comes back."""
    straight = _cpo(50, 100)
    straight_seeds = _episode_seeds(straight)
    straight.learn(800)
    first_seeds, resumed_seeds, resumed = _resumed_half(tmp_path / "half", 100, 400)
    assert first_seeds + resumed_seeds == straight_seeds
    for name, value in straight.policy.state_dict().items():
        assert th.equal(resumed.policy.state_dict()[name], value), name
    # episodes in flight at the checkpoint (30-step rollouts of 50-step episodes): restarted, then new ones
    first_seeds, resumed_seeds, _ = _resumed_half(tmp_path / "mid", 30, 300)
    assert resumed_seeds and not set(first_seeds) & set(resumed_seeds)


@pytest.mark.parametrize("env", ["Toy2DNav", "task", "SafetyPointGoal1Gymnasium-v0"])
def test_cpo_load_rebuilds_the_envs_it_was_built_on(env: str, tmp_path: Path) -> None:
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    task = distribution.test_tasks(1)[0]
    model = CPO("MlpPolicy", distribution if env == "task" else env, n_steps=64, seed=0, policy_kwargs=dict(net_arch=[8]))
    if env == "task":
        model.set_env(task)
    loaded = CPO.load(model.save(tmp_path / "model"))
    assert loaded.env is not None and loaded.env_source == model.env_source
    if env == "task":
        assert loaded.env.get_attr("task") == [task]
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 64


def test_a_saved_env_id_that_names_a_module_is_refused(tmp_path: Path) -> None:
    """An id "module:Env" would make gymnasium import the module: an archive's env id must be a plain one."""
    path = CPO("MlpPolicy", "SafetyPointGoal1Gymnasium-v0", n_steps=64, seed=0).save(tmp_path / "model")
    metadata = json.loads(zipfile.ZipFile(path).read(METADATA))
    metadata["env_source"] = {"id": "antigravity:Env-v0"}
    rewrite_archive(path, tmp_path / "tampered.zip", {METADATA: json.dumps(metadata).encode()})
    with pytest.raises(ArchiveError, match="does not name an env id"):
        CPO.load(tmp_path / "tampered.zip")


def _parameters(model) -> dict[str, th.Tensor]:
    return {name: value.detach().clone() for name, value in model.policy.state_dict().items()}


def test_training_continued_in_the_process_is_the_resumed_runs_twin(tmp_path):
    """learn(); learn(reset_num_timesteps=False) reset the envs again at the second call (each drew an episode seed),
    so it was not the continuation that save/load/learn gives."""
    distribution = lambda: make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)  # noqa: E731
    straight = MetaCPO("MlpPolicy", distribution(), **SMALL).learn(800)
    in_process = MetaCPO("MlpPolicy", distribution(), **SMALL).learn(400)
    in_process.learn(400, reset_num_timesteps=False)
    first = MetaCPO("MlpPolicy", distribution(), **SMALL).learn(400)
    path = first.save(tmp_path / "first")
    resumed = MetaCPO.load(path).learn(400, reset_num_timesteps=False)  # the archive's distribution and streams
    for other in (resumed, straight):
        assert all(th.equal(a, b) for a, b in zip(_parameters(other).values(), _parameters(in_process).values(), strict=True))


@pytest.mark.parametrize("which", ["MetaEvalCallback", "SafeEvalCallback"])
def test_evaluation_callbacks_do_not_change_training(which):
    """Their adaptations drew the actors' noise seeds from training's torch stream: training with an evaluation
    callback ended elsewhere than without, and a checkpoint written before an evaluation did not resume bit for bit."""
    from sb3_metacpo.common.callbacks import SafeEvalCallback
    from sb3_metacpo.common.evaluation import MetaEvalCallback

    distribution = lambda: make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)  # noqa: E731
    plain = MetaCPO("MlpPolicy", distribution(), **SMALL).learn(1200)
    tasks = distribution().test_tasks(1)
    callback = {"MetaEvalCallback": MetaEvalCallback, "SafeEvalCallback": SafeEvalCallback}[which](
        tasks, eval_freq=1, n_updates=1, n_steps=50, n_eval_episodes=1
    )
    watched = MetaCPO("MlpPolicy", distribution(), **SMALL).learn(1200, callback=callback)
    assert all(th.equal(a, b) for a, b in zip(_parameters(plain).values(), _parameters(watched).values(), strict=True))


@pytest.mark.parametrize("algorithm", ["CPO", "MetaCPO"])
def test_set_random_seed_after_load_wins_over_the_archives_streams(algorithm: str, tmp_path: Path) -> None:
    """A loaded model keeps the archive's random streams for learn(reset_num_timesteps=False), which restored them
    over a set_random_seed called in between. SB3's set_random_seed seeds torch with th.manual_seed: the oracle."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    if algorithm == "CPO":
        model: CPO | MetaCPO = CPO("MlpPolicy", dist, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))
    else:
        model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))
    path = model.learn(400).save(tmp_path / "model")
    states: list[th.Tensor] = []

    class TorchState(BaseCallback):
        def _on_training_start(self) -> None:
            states.append(th.random.get_rng_state())

        def _on_step(self) -> bool:
            return True

    for reseed in (None, 5):
        loaded = type(model).load(path, env=dist if algorithm == "MetaCPO" else None)
        if reseed is not None:
            loaded.set_random_seed(reseed)
        loaded.learn(100, callback=TorchState(), reset_num_timesteps=False)
    th.manual_seed(5)
    assert not th.equal(states[0], th.random.get_rng_state())  # the archive's stream
    assert th.equal(states[1], th.random.get_rng_state())  # seed 5's
