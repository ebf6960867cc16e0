"""Loading runs no code from the file: crafted archives are refused with a clear error and nothing runs; another
algorithm's file and SB3's pickling format are refused; save/load round trips for MetaCPO, MetaTRPO and CPO."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from archive_edits import rewrite_archive
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_metacpo import CPO, MetaCPO, MetaTRPO, make_task_distribution
from sb3_metacpo.common.serialization import METADATA, TENSORS, ArchiveError, convert_sb3_archive, register_class

SMALL: dict[str, Any] = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
CPO_SMALL: dict[str, Any] = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))


class Payload:
    """Unpickling this creates the file ``path``: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def toy() -> Any:
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saved")
    return {
        "MetaCPO": MetaCPO("MlpPolicy", toy(), **SMALL).save(folder / "metacpo"),
        "MetaTRPO": MetaTRPO("MlpPolicy", toy(), **SMALL).save(folder / "metatrpo"),
        "CPO": CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL).save(folder / "cpo"),
    }


def _tampered(saved: Path, tmp_path: Path, kind: str, marker: Path) -> Path:
    target = tmp_path / f"{kind}.zip"
    if kind == "pickle payload in the tensors":
        buffer = io.BytesIO()
        th.save({"policy": Payload(marker)}, buffer)
        return rewrite_archive(saved, target, {TENSORS: buffer.getvalue()})
    if kind == "raw pickle as the tensors":
        return rewrite_archive(saved, target, {TENSORS: pickle.dumps(Payload(marker))})
    if kind == "SB3 cloudpickle 'data' member":
        data = {"policy_class": {":serialized:": pickle.dumps(Payload(marker)).hex()}}
        return rewrite_archive(saved, target, {}, {"data": json.dumps(data).encode()})
    metadata = json.loads(zipfile.ZipFile(saved).read(METADATA))
    if kind == "unregistered policy class":
        metadata["policy_class"] = "os.system"
    elif kind == "unregistered class in the arguments":
        metadata["hyperparameters"]["policy_kwargs"]["activation_fn"] = {"__class__": "subprocess.Popen"}
    elif kind == "unknown constructor argument":
        metadata["hyperparameters"]["__reduce__"] = 1
    elif kind == "bad hyperparameter value":
        metadata["hyperparameters"]["n_steps"] = -3
    elif kind == "other format version":
        metadata["format_version"] = 99
    return rewrite_archive(saved, target, {METADATA: json.dumps(metadata).encode()})


TAMPERINGS = {
    "pickle payload in the tensors": "holds something other than plain tensors",
    "raw pickle as the tensors": "holds something other than plain tensors",
    "SB3 cloudpickle 'data' member": "is not a valid archive: it holds",
    "unregistered policy class": "'os.system', which is not in the registry of allowed classes",
    "unregistered class in the arguments": "'subprocess.Popen', which is not in the registry",
    "unknown constructor argument": "names constructor arguments",
    "bad hyperparameter value": "n_steps must be an integer >= 2",
    "other format version": "has format version 99",
}


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_a_tampered_archive_is_refused_and_runs_nothing(algo: str, kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _tampered(saved[algo], tmp_path, kind, marker)
    cls = {"MetaCPO": MetaCPO, "CPO": CPO}[algo]
    with pytest.raises(ArchiveError, match=TAMPERINGS[kind]):
        cls.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_sb3_format_is_refused_with_a_conversion_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_optimizer: bool
) -> None:
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    legacy = tmp_path / "legacy.zip"
    if not with_optimizer:  # MetaCPO's earlier versions named only the policy as a torch object
        monkeypatch.setattr(MetaCPO, "_get_torch_save_params", lambda self: (["policy"], []))
    BaseAlgorithm.save(model, legacy)  # what earlier versions wrote: SB3's format, with cloudpickled entries
    monkeypatch.undo()
    with pytest.raises(ArchiveError, match=r"Stable-Baselines3.s format.*convert_sb3_archive"):
        MetaCPO.load(legacy)
    converted = convert_sb3_archive(legacy, tmp_path / "converted", MetaCPO)  # trusted: SB3's loader runs
    loaded = MetaCPO.load(converted)
    obs = np.zeros((3, 2), np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize(("source", "target"), [("CPO", "MetaCPO"), ("MetaCPO", "CPO"), ("MetaTRPO", "MetaCPO")])
def test_another_algorithms_file_is_refused_naming_both(source: str, target: str, saved: dict[str, Path]) -> None:
    cls = {"MetaCPO": MetaCPO, "CPO": CPO}[target]
    with pytest.raises(ArchiveError, match=f"holds a {source} model, which {target}.load does not load"):
        cls.load(saved[source])


def test_not_a_zip_and_missing_files_are_clear(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="is not a zip archive"):
        MetaCPO.load(tmp_path / "junk.zip")
    with pytest.raises(FileNotFoundError, match="no saved model"):
        MetaCPO.load(tmp_path / "nothing")


@pytest.mark.parametrize("algo", ["MetaCPO", "MetaTRPO", "CPO"])
def test_round_trip_keeps_everything(algo: str, tmp_path: Path) -> None:
    if algo == "CPO":
        model: Any = CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL)
        model.learn(100)
    else:
        model = {"MetaCPO": MetaCPO, "MetaTRPO": MetaTRPO}[algo]("MlpPolicy", toy(), critic="mlp", **SMALL)
        model.learn(400)
    model.adapt("Toy2DNav", n_updates=1, n_steps=100)
    path = model.save(tmp_path / "model")
    assert path == tmp_path / "model.zip"
    loaded = type(model).load(tmp_path / "model")
    state, loaded_state = model.policy.state_dict(), loaded.policy.state_dict()
    assert all(th.equal(state[k], loaded_state[k]) for k in state)
    assert str(model.policy.optimizer.state_dict()) == str(loaded.policy.optimizer.state_dict())
    assert (loaded.num_timesteps, loaded._n_updates) == (model.num_timesteps, model._n_updates)
    assert loaded.adaptation_history == model.adaptation_history
    obs = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    assert loaded._constructor_arguments() == model._constructor_arguments()


def test_custom_classes_must_be_registered(tmp_path: Path) -> None:
    class Softsign(th.nn.Softsign):
        pass

    # told at construction, not at the first checkpoint after hours of training
    with pytest.warns(UserWarning, match="cannot be saved .*Softsign is not in the registry of allowed classes"):
        model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": dict(net_arch=[8], activation_fn=Softsign)})
    with pytest.raises(TypeError, match="is not in the registry of allowed classes"):
        model.save(tmp_path / "model")
    register_class(Softsign)
    model.save(tmp_path / "model")
    assert MetaCPO.load(tmp_path / "model").policy_kwargs["activation_fn"] is Softsign
    assert os.path.exists(tmp_path / "model.zip")


@pytest.mark.parametrize("activation", ["Softplus", "Mish", "SELU", "Hardswish", "Identity"])
def test_torchs_parameter_free_activations_save_and_load(activation: str, tmp_path: Path) -> None:
    """The policy accepts any element-wise activation; these were refused by the first save (a checkpoint)."""
    activation_fn = getattr(th.nn, activation)
    model = CPO("MlpPolicy", "Toy2DNav", n_steps=50, seed=0, policy_kwargs=dict(net_arch=[8], activation_fn=activation_fn))
    loaded = CPO.load(model.save(tmp_path / "model"))
    assert loaded.policy_kwargs["activation_fn"] is activation_fn
    obs = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_ray_connection_settings_never_travel_in_an_archive(tmp_path: Path) -> None:
    """ray_init_kwargs went into the archive and to ray.init when training resumed: a file could run a shell command
    then (runtime_env's py_executable) or point the driver at another cluster. They are not saved, and an archive
    holding them is refused before anything runs; load(..., sampler_kwargs=...) gives them again."""
    options = {"num_workers": 2, "ray_init_kwargs": {"num_cpus": 2, "include_dashboard": False}}
    model = MetaCPO("MlpPolicy", toy(), sampler="ray", sampler_kwargs=options, **SMALL)
    path = model.save(tmp_path / "ray")
    assert json.loads(zipfile.ZipFile(path).read(METADATA))["hyperparameters"]["sampler_kwargs"] == {"num_workers": 2}
    assert MetaCPO.load(path).sampler_kwargs == {"num_workers": 2}
    assert MetaCPO.load(path, sampler_kwargs=options).sampler_kwargs == options
    marker = tmp_path / "pwned"
    metadata = json.loads(zipfile.ZipFile(path).read(METADATA))
    metadata["hyperparameters"]["sampler_kwargs"]["ray_init_kwargs"] = {"runtime_env": {"py_executable": f"touch {marker}"}}
    tampered = rewrite_archive(path, tmp_path / "tampered.zip", {METADATA: json.dumps(metadata).encode()})
    with pytest.raises(ArchiveError, match=r"holds sampler_kwargs \['ray_init_kwargs'\], which archives never hold"):
        MetaCPO.load(tampered)
    assert not marker.exists()


def _with_metadata(saved: Path, target: Path, edit: Callable[[str], str]) -> Path:
    text = zipfile.ZipFile(saved).read(METADATA).decode()
    return rewrite_archive(saved, target, {METADATA: edit(text).encode()})


def _edited(key_path: tuple[str, ...], value: Any) -> Callable[[str], str]:
    def edit(text: str) -> str:
        metadata = json.loads(text)
        node = metadata
        for key in key_path[:-1]:
            node = node[key]
        node[key_path[-1]] = value
        return json.dumps(metadata)

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[str], str], str]] = {
    "JSON nested 3000 deep": (lambda text: text[:-1] + ', "deep": ' + "[" * 3000 + "]" * 3000 + "}", "is not valid JSON"),
    "duplicated key": (lambda text: text[:-1] + ', "format": "sb3_metacpo"}', "duplicated keys"),
    "integer of 5000 digits": (lambda text: text[:-1] + ', "huge": ' + "9" * 5000 + "}", "is not valid JSON"),
    "negative num_timesteps": (_edited(("counters", "num_timesteps"), -5), "counters.num_timesteps must be"),
    "fractional num_timesteps": (_edited(("counters", "num_timesteps"), 3.7), "counters.num_timesteps must be"),
    "bool n_updates": (_edited(("counters", "n_updates"), True), "counters.n_updates must be"),
    "zero n_envs": (_edited(("counters", "n_envs"), 0), "counters.n_envs must be"),
    "NaN progress": (_edited(("counters", "progress_remaining"), float("nan")), "progress_remaining must be"),
    "history not a list of records": (_edited(("adaptation_history",), "abc"), "adaptation_history must be a list"),
    "junk numpy random state": (_edited(("rng", "numpy"), "junk"), "random states are not valid"),
    "invalid seed": (_edited(("hyperparameters", "seed"), -1), "constructor arguments .* are invalid"),
    "two adaptation streams": (_edited(("rng", "samplers", "adaptation"), [{}, {}]), "the adaptations' episode stream"),
    "junk adaptation stream": (_edited(("rng", "samplers", "adaptation"), ["junk"]), "state must be a dict"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_or_tampered_archive_is_an_archive_error(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    """Each gave another exception (RecursionError, a plain ValueError, OverflowError...) or was silently accepted
    (the last of duplicated keys; a negative, fractional or boolean counter; a string as the adaptation history,
    split into letters; a random state that failed only when training resumed)."""
    edit, message = CORRUPTIONS[kind]
    path = _with_metadata(saved["MetaCPO"], tmp_path / "corrupt.zip", edit)
    with pytest.raises(ArchiveError, match=message):
        MetaCPO.load(path)


def test_unusual_files_and_values_save_and_load(tmp_path: Path) -> None:
    """A directory or a member with a bad checksum is an ArchiveError; archives get a plain file's permissions (mkstemp
    gave 0600); an np.bool_ constructor argument saves; a Box of integers saves and loads (load refused it)."""
    (tmp_path / "folder.zip").mkdir()
    with pytest.raises(ArchiveError, match="is not a file"):
        MetaCPO.load(tmp_path / "folder.zip")
    umask = os.umask(0o022)
    try:
        path = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": dict(net_arch=[8], ortho_init=np.bool_(False))}).save(
            tmp_path / "model"
        )
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert MetaCPO.load(path).policy_kwargs["ortho_init"] is False
    corrupt = bytearray(path.read_bytes())
    corrupt[zipfile.ZipFile(path).getinfo(TENSORS).header_offset + 200] ^= 0xFF  # inside the tensors' data
    (tmp_path / "crc.zip").write_bytes(bytes(corrupt))
    with pytest.raises(ArchiveError):
        MetaCPO.load(tmp_path / "crc.zip")
    integers = CPO("MlpPolicy", IntegerObservations(), **CPO_SMALL)
    loaded = CPO.load(integers.save(tmp_path / "integers"), env=IntegerObservations())
    assert loaded.observation_space == integers.observation_space and loaded.observation_space.dtype == np.int64


class IntegerObservations(gym.Env):
    """A safe env whose observations are a Box of int64."""

    observation_space = gym.spaces.Box(0, 10, (2,), np.int64)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.int64), {}

    def step(self, action):
        return np.ones(2, np.int64), 0.0, False, False, {"cost": 0.0}


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_set_parameters_reads_the_archive_refuses_nan_and_forgets_an_adaptation(algo, tmp_path):
    """SB3's set_parameters could not read the package's own archive, kept a stale adaptation (predict acted with the
    old adapted parameters) and accepted NaN (blamed on the env at the next learn)."""

    def build(seed):
        distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
        if algo == "MetaCPO":
            return MetaCPO("MlpPolicy", distribution, meta_batch_size=2, n_steps=40, seed=seed)
        return CPO("MlpPolicy", distribution, n_steps=40, seed=seed)

    source, target = build(0).learn(80), build(1)
    obs = np.zeros((3, 2), np.float32)
    target.adapt(make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20).test_tasks(1)[0], n_updates=1, n_steps=40)
    target.set_parameters(source.get_parameters())
    assert target.adapted_params is None
    np.testing.assert_array_equal(target.predict(obs, deterministic=True)[0], source.predict(obs, deterministic=True)[0])
    fresh = build(1)
    fresh.set_parameters(str(source.save(tmp_path / "source")))
    np.testing.assert_array_equal(fresh.predict(obs, deterministic=True)[0], source.predict(obs, deterministic=True)[0])
    poisoned = source.get_parameters()
    poisoned["policy"]["action_net.weight"] = th.full_like(poisoned["policy"]["action_net.weight"], float("nan"))
    before = fresh.predict(obs, deterministic=True)[0]
    with pytest.raises(ValueError, match=r"policy\[action_net.weight\] has non-finite values"):
        fresh.set_parameters(poisoned)
    np.testing.assert_array_equal(fresh.predict(obs, deterministic=True)[0], before)


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_set_parameters_of_another_architecture_changes_nothing(algo):
    """torch's load_state_dict copies the tensors that fit, then raises: parameters of a model of another net_arch
    left this one half loaded (its log_std replaced by the other's, its networks its own)."""
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    cls, options = (MetaCPO, {"meta_batch_size": 2}) if algo == "MetaCPO" else (CPO, {})
    target = cls("MlpPolicy", distribution, n_steps=40, seed=0, **options)
    other = cls(
        "MlpPolicy", distribution, n_steps=40, seed=1, policy_kwargs={"net_arch": [32, 32], "log_std_init": -2.0}, **options
    )
    before = {key: value.clone() for key, value in target.policy.state_dict().items()}
    with pytest.raises(ValueError, match=r"policy\[.*\] has shape .* where the model's is .*nothing was changed"):
        target.set_parameters(other.get_parameters())
    given = other.get_parameters()
    del given["policy"]["log_std"]
    given["policy"] = {
        key: value for key, value in given["policy"].items() if key in before and value.shape == before[key].shape
    }
    with pytest.raises(ValueError, match=r"policy lacks \[.*\] .*exact_match=False.*nothing was changed"):
        target.set_parameters(given)
    given = target.get_parameters()  # the policy fits; the optimiser's state is of one parameter: torch raised after
    given["policy"] = {key: value + 1.0 for key, value in given["policy"].items()}
    given["policy.optimizer"]["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match=r"policy.optimizer's parameter groups do not match.*nothing was changed"):
        target.set_parameters(given)
    after = target.policy.state_dict()
    assert all(th.equal(after[key], value) for key, value in before.items())


def test_a_bad_argument_of_load_is_named_as_such_not_as_a_bad_archive(tmp_path):
    from sb3_metacpo.common.safe_algorithm import LoadArgumentError

    path = CPO("MlpPolicy", "Toy2DNav", n_steps=40, seed=0).save(tmp_path / "model")
    for bad, message in [
        (dict(n_steps=1), r"CPO\.load: invalid arguments \['n_steps'\]"),
        (dict(target_kl=-1.0), r"CPO\.load: invalid arguments \['target_kl'\]"),
        (dict(cost_limit={"cost": 5.0, "cost_hazards": 3.0}), "cost_limit names 2 costs, the saved model 1"),
    ]:
        with pytest.raises(LoadArgumentError, match=message):
            CPO.load(path, **bad)
    CPO.load(path, n_steps=20)  # a valid one


def test_load_takes_sb3_and_rl_zoo_arguments_as_sb3_does(tmp_path, capsys):
    """The RL Zoo's custom_objects (lr_schedule, clip_range) were refused, print_system_info printed nothing, and a
    file object got pathlib's TypeError."""
    model = CPO("MlpPolicy", "Toy2DNav", n_steps=40, seed=0)
    path = model.save(tmp_path / "model")
    zoo = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    with pytest.warns(UserWarning, match=r"custom_objects \['clip_range', 'lr_schedule'\] are not arguments of CPO"):
        loaded = CPO.load(path, custom_objects=zoo)
    assert loaded.learning_rate == 0.0
    with pytest.raises(ValueError, match=r"unknown arguments \['clip_range'\]"):  # **kwargs stay strict
        CPO.load(path, clip_range=0.2)
    with pytest.raises(TypeError, match="custom_objects must be a dict"):
        CPO.load(path, custom_objects=["learning_rate"])
    capsys.readouterr()
    CPO.load(path, print_system_info=True)
    printed = capsys.readouterr().out
    assert "== CURRENT SYSTEM INFO ==" in printed and "== SAVED MODEL SYSTEM INFO ==" in printed
    assert f"- PyTorch: {th.__version__!r}" in printed and "- sb3-metacpo: " in printed
    for call in (lambda: model.save(io.BytesIO()), lambda: CPO.load(io.BytesIO(path.read_bytes()))):
        with pytest.raises(TypeError, match=r"save and load take a path \(str or os.PathLike\), got BytesIO"):
            call()


def test_load_refuses_policy_kwargs_other_than_the_saved_ones(tmp_path):
    """Another net_arch was reported as a corrupt archive; another activation (same shapes) was accepted, and the
    loaded model acted differently from the saved one."""
    from sb3_metacpo.common.safe_algorithm import LoadArgumentError

    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": dict(net_arch=[8])})
    path = model.save(tmp_path / "model")
    for other in (dict(net_arch=[16]), dict(net_arch=[8], activation_fn=th.nn.ReLU)):
        with pytest.raises(LoadArgumentError, match="differ from the saved model's"):
            MetaCPO.load(path, policy_kwargs=other)
    MetaCPO.load(path, policy_kwargs=dict(net_arch=(8,)))  # the same (a tuple is saved as a list)


def test_episode_infos_a_monitor_recorded_are_saved_as_data_or_left_out_with_a_word(tmp_path):
    """An SB3 Monitor's info_keywords put the env's info values in ep_info_buffer: a numpy array there made save
    raise a TypeError (and every checkpoint and best-model callback with it)."""
    from stable_baselines3.common.monitor import Monitor

    dist = make_task_distribution("Toy2DNav", seed=0)

    class Recorded(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {**info, "where": np.asarray(obs), "what": object()}

    env = Monitor(Recorded(dist.make_env(dist.test_tasks(1)[0])), info_keywords=("where", "what"))
    model = CPO("MlpPolicy", env, n_steps=200, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(200)
    assert model.ep_info_buffer
    with pytest.warns(UserWarning, match=r"\['what'\] cannot be saved as data"):
        path = model.save(tmp_path / "model")
    loaded = CPO.load(path, env=env)
    for saved, restored in zip(model.ep_info_buffer, loaded.ep_info_buffer, strict=True):
        assert "what" not in restored and restored["where"] == saved["where"].tolist()
        assert (restored["r"], restored["l"], restored["c"]) == (saved["r"], saved["l"], saved["c"])


@pytest.mark.parametrize("algorithm", [MetaCPO, CPO])
def test_a_loaded_model_adapts_on_the_episodes_the_saved_one_would_have(algorithm, tmp_path):
    """Adaptations on tasks of the model's family share one episode stream, which goes on from one adaptation to the
    next; the archive did not hold it, so after a load the next adaptation replayed the first one's episodes (other
    start states than the saved model's next adaptation, the same torch seed notwithstanding)."""
    kwargs = dict(n_steps=200, seed=0, policy_kwargs=dict(net_arch=[16]))
    if algorithm is MetaCPO:
        kwargs.update(meta_batch_size=2, meta_gradient="first_order")
    model = algorithm("MlpPolicy", "Toy2DNav", **kwargs)
    model.learn(800)
    task = model.task_distribution.test_tasks(1)[0]
    model.adapt(task, n_steps=200)
    path = model.save(tmp_path / "model")
    loaded = algorithm.load(path)
    again = algorithm.load(loaded.save(tmp_path / "resaved"))  # loaded, not adapted yet: the stream is kept as it was
    histories = []
    for candidate in (model, loaded, again):
        th.manual_seed(7)
        candidate.adapt(task, n_steps=200)
        histories.append([(record["ep_rew_mean"], record["ep_cost_mean"]) for record in candidate.adaptation_history])
        assert all(th.equal(candidate.adapted_params[name], model.adapted_params[name]) for name in model.adapted_params)
    assert histories[0] == histories[1] == histories[2]
    fresh = algorithm.load(path)
    fresh._saved_adaptation_streams = None  # as before: the stream starts from the seed again
    th.manual_seed(7)
    fresh.adapt(task, n_steps=200)
    assert not all(th.equal(fresh.adapted_params[name], model.adapted_params[name]) for name in model.adapted_params)


@pytest.mark.parametrize("algorithm", [MetaCPO, CPO])
@pytest.mark.parametrize("given", ["distribution", "name"])
def test_load_given_the_saved_env_goes_on_as_without_it(algorithm, given, tmp_path):
    """SB3's habit, load(path, env=env) then learn(reset_num_timesteps=False): an equal task distribution (or the
    family's name) restarted the task stream and the episode streams, so the resumed run repeated the first tasks
    and was not the uninterrupted run's continuation. Another distribution keeps its own stream."""
    kwargs = dict(n_steps=200, seed=0, policy_kwargs=dict(net_arch=[16]))
    if algorithm is MetaCPO:
        kwargs.update(meta_batch_size=2, meta_gradient="first_order")
    steps = 800 if algorithm is MetaCPO else 400
    whole = algorithm("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), **kwargs)
    whole.learn(2 * steps)
    first = algorithm("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), **kwargs)
    first.learn(steps)
    path = first.save(tmp_path / "model")
    env = make_task_distribution("Toy2DNav", seed=0) if given == "distribution" else "Toy2DNav"
    resumed = algorithm.load(path, env=env)
    resumed.learn(steps, reset_num_timesteps=False)
    for name, value in whole.policy.state_dict().items():
        assert th.equal(value, resumed.policy.state_dict()[name]), name
    other = make_task_distribution("Toy2DNav", seed=1)
    state = dict(other._rng.bit_generator.state)
    algorithm.load(path, env=other)
    assert other._rng.bit_generator.state == state


@pytest.mark.parametrize("algorithm", [MetaCPO, CPO])
def test_load_given_another_env_starts_its_own_episode_streams(algorithm, tmp_path):
    """The docstring said so, but MetaCPO kept the archive's training streams, and both the adaptations' stream."""
    kwargs = dict(n_steps=200, seed=0, policy_kwargs=dict(net_arch=[16]))
    if algorithm is MetaCPO:
        kwargs.update(meta_batch_size=2, meta_gradient="first_order")
    model = algorithm("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), **kwargs)
    model.learn(800 if algorithm is MetaCPO else 400)
    model.adapt(model.task_distribution.test_tasks(1)[0], n_steps=200)
    path = model.save(tmp_path / "model")
    same = algorithm.load(path, env=make_task_distribution("Toy2DNav", seed=0))
    assert same._saved_adaptation_streams is not None and same._resume_rng[0]["samplers"]
    other = algorithm.load(path, env=make_task_distribution("Toy2DNav", seed=3))
    assert other._saved_adaptation_streams is None and other._resume_rng[0]["samplers"] == {}
    other.learn(400, reset_num_timesteps=False)


@pytest.mark.parametrize(
    "tamper",
    ["a bias cut to shape (1,)", "float64 weights", "a parameter missing"],
)
def test_adapted_parameters_that_do_not_fit_the_actor_are_refused(tamper, tmp_path):
    """The model loader checked the adapted parameters for finite values only (the policy file's loader checked them
    against the actor): biases cut to shape (1,) broadcast and acted silently, other dtypes or a missing entry failed
    at the first predict."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL)
    model.adapt(toy().test_tasks(1)[0], n_updates=1, n_steps=50)
    saved = model.save(tmp_path / "adapted")
    tensors = th.load(io.BytesIO(zipfile.ZipFile(saved).read(TENSORS)), weights_only=True)
    adapted = tensors["adapted_params"]
    name = next(key for key in adapted if key.endswith("bias"))
    if tamper == "a bias cut to shape (1,)":
        adapted[name] = adapted[name][:1].clone()
    elif tamper == "float64 weights":
        adapted[name] = adapted[name].double()
    else:
        del adapted[name]
    buffer = io.BytesIO()
    th.save(tensors, buffer)
    tampered = rewrite_archive(saved, tmp_path / "tampered.zip", {TENSORS: buffer.getvalue()})
    with pytest.raises(ArchiveError, match="the actor override"):
        MetaCPO.load(tampered)


def test_a_tensor_of_more_elements_than_its_storage_is_refused_before_it_is_expanded(saved, tmp_path):
    """A tensor written with stride 0 (``expand``) declares any number of elements over a few bytes: the finiteness
    check materialised it (a 17.6 kB archive took 7.5 GB and 26 s before the shape check refused it)."""
    tensors = th.load(io.BytesIO(zipfile.ZipFile(saved["CPO"]).read(TENSORS)), weights_only=True)
    tensors["policy"]["obs_mean"] = th.zeros(1).expand(4096, 4096)
    buffer = io.BytesIO()
    th.save(tensors, buffer)
    assert len(buffer.getvalue()) < 100_000
    tampered = rewrite_archive(saved["CPO"], tmp_path / "expanded.zip", {TENSORS: buffer.getvalue()})
    with pytest.raises(ArchiveError, match=r"'policy/obs_mean', a tensor with more elements than its storage"):
        CPO.load(tampered)


def _edit_metadata(edit: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    return lambda metadata, tensors: edit(metadata)


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    return lambda metadata, tensors: edit(tensors)


TAMPERED_VALUES = {
    "a NaN action bound": (
        _edit_metadata(lambda m: m["action_space"]["low"].__setitem__(0, float("nan"))),
        "bounds are NaN or low > high",
    ),
    "a space without its dtype": (_edit_metadata(lambda m: m["observation_space"].pop("dtype")), "a Box without its dtype"),
    "a negative observation variance": (
        _edit_tensors(lambda t: t["policy"].__setitem__("obs_var", -th.ones_like(t["policy"]["obs_var"]))),
        "a negative policy/obs_var",
    ),
    "a NaN Adam eps": (
        _edit_tensors(lambda t: t["optimizer"]["param_groups"][0].__setitem__("eps", float("nan"))),
        r"the optimiser's eps \(nan, group 0\) is not finite",
    ),
    "Adam moments of another shape": (
        _edit_tensors(lambda t: next(iter(t["optimizer"]["state"].values())).__setitem__("exp_avg", th.zeros(1))),
        r"the optimiser's exp_avg of parameter \d+ has shape \(1,\) where the parameter's is",
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERED_VALUES))
def test_values_no_saved_model_has_are_refused_at_load(tamper, tmp_path):
    """Each loaded and failed later, far from its cause: a NaN action bound made predict NaN, a missing dtype became
    float64, a negative variance made the actions NaN blamed on the env's observations, a NaN eps failed learn with an
    error naming the learning rate, moments of another shape failed learn on a broadcast inside torch."""
    model = CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL)
    model.learn(CPO_SMALL["n_steps"])  # an optimiser state to edit
    saved = model.save(tmp_path / "model")
    with zipfile.ZipFile(saved) as archive:
        metadata = json.loads(archive.read(METADATA))
        tensors = th.load(io.BytesIO(archive.read(TENSORS)), weights_only=True)
    edit, message = TAMPERED_VALUES[tamper]
    edit(metadata, tensors)
    buffer = io.BytesIO()
    th.save(tensors, buffer)
    replaced = {METADATA: json.dumps(metadata).encode(), TENSORS: buffer.getvalue()}
    with pytest.raises(ArchiveError, match=message):
        CPO.load(rewrite_archive(saved, tmp_path / "tampered.zip", replaced))
