"""The policy saved alone (``CPOPolicy.save`` / ``CPOPolicy.load``, SB3's policy-level API): round trips predict bit
for bit, with and without an adaptation (the actor override travels with the file), with custom ``policy_kwargs``;
SB3's pickled policy files and crafted files are refused and run nothing."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from archive_edits import rewrite_archive
from stable_baselines3.common.policies import BaseModel
from torch import nn

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.flat_adam import FlatAdam
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.serialization import METADATA, TENSORS, ArchiveError

OBS = np.array([[0.3, -0.2], [1.0, 1.0], [-2.5, 0.7], [0.0, 0.0]], np.float32)


class Payload:
    """Unpickling this creates the file ``path``: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def model() -> MetaCPO:
    """A MetaCPO model on Toy2DNav with non-trivial observation statistics, before any adaptation."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.policy.update_obs_stats(np.random.default_rng(0).normal(1.0, 2.0, size=(64, 2)).astype(np.float32))
    return model


def _predictions(policy: CPOPolicy, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic actions and, with torch seeded, stochastic ones."""
    deterministic = policy.predict(OBS, deterministic=True)[0]
    th.manual_seed(seed)
    stochastic = policy.predict(OBS, deterministic=False)[0]
    return deterministic, stochastic


def _assert_same_predictions(policy: CPOPolicy, loaded: CPOPolicy) -> None:
    for seed in (0, 1):
        for expected, actual in zip(_predictions(policy, seed), _predictions(loaded, seed), strict=True):
            np.testing.assert_array_equal(actual, expected)


def test_round_trip_predicts_bit_for_bit(model: MetaCPO, tmp_path: Path) -> None:
    model.reset_adaptation()
    path = model.policy.save(tmp_path / "policy")
    assert path == tmp_path / "policy.zip" and zipfile.ZipFile(path).namelist() == [METADATA, TENSORS]
    loaded = CPOPolicy.load(tmp_path / "policy", device="cpu")
    assert type(loaded) is CPOPolicy and loaded._actor_override is None
    saved_state, loaded_state = model.policy.state_dict(), loaded.state_dict()
    assert list(saved_state) == list(loaded_state)
    for name, value in saved_state.items():
        assert th.equal(loaded_state[name], value), name
    _assert_same_predictions(model.policy, loaded)
    values = model.policy.critic_values(OBS, np.full(len(OBS), 0.5))
    for expected, actual in zip(values, loaded.critic_values(OBS, np.full(len(OBS), 0.5)), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_adapted_policy_round_trips_with_its_adapted_parameters(model: MetaCPO, tmp_path: Path) -> None:
    model.reset_adaptation()
    theta_actions = model.predict(OBS, deterministic=True)[0]
    model.adapt(model.task_distribution.test_tasks(1)[0], n_updates=1, n_steps=100)
    try:
        adapted_actions = model.predict(OBS, deterministic=True)[0]
        assert not np.array_equal(adapted_actions, theta_actions)  # the adaptation changes what the policy does
        loaded = CPOPolicy.load(model.policy.save(tmp_path / "adapted.pth"))
        assert loaded._actor_override is not None and model.policy._actor_override is not None
        assert list(loaded._actor_override) == list(model.policy._actor_override)
        for name, value in model.policy._actor_override.items():
            assert th.equal(loaded._actor_override[name], value), name
        np.testing.assert_array_equal(loaded.predict(OBS, deterministic=True)[0], adapted_actions)
        _assert_same_predictions(model.policy, loaded)
        loaded.set_actor_override(None)  # the meta-parameters θ are there too
        np.testing.assert_array_equal(loaded.predict(OBS, deterministic=True)[0], theta_actions)
    finally:
        model.reset_adaptation()


def test_custom_policy_kwargs_round_trip(tmp_path: Path) -> None:
    space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    kwargs: dict[str, Any] = dict(
        net_arch=dict(pi=[8, 6], vf=[12]),
        activation_fn=nn.ReLU,
        log_std_init=-0.5,
        ortho_init=False,
        optimizer_class=th.optim.SGD,
        optimizer_kwargs=dict(momentum=0.9),
        clip_observations=5.0,
        n_costs=2,
    )
    policy = CPOPolicy(gym.spaces.Box(-5.0, 5.0, (4,), np.float32), space, lambda _: 3e-4, **kwargs)
    loaded = CPOPolicy.load(policy.save(tmp_path / "custom.pth"))
    assert loaded.net_arch == dict(pi=[8, 6], vf=[12]) and loaded.activation_fn is nn.ReLU and loaded.n_costs == 2
    assert isinstance(loaded.optimizer, th.optim.SGD) and loaded.optimizer.param_groups[0]["lr"] == 3e-4
    assert loaded.optimizer.param_groups[0]["momentum"] == 0.9
    expected = {key: value for key, value in policy._get_constructor_parameters().items() if key != "lr_schedule"}
    actual = {key: value for key, value in loaded._get_constructor_parameters().items() if key != "lr_schedule"}
    assert actual == expected
    obs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], policy.predict(obs, deterministic=True)[0])
    costs = (policy.critic_values(obs, np.zeros(5))[1], loaded.critic_values(obs, np.zeros(5))[1])
    np.testing.assert_array_equal(costs[1], costs[0])


def test_default_optimizer_round_trips(model: MetaCPO, tmp_path: Path) -> None:
    loaded = CPOPolicy.load(model.policy.save(tmp_path / "policy.pth"))
    assert isinstance(loaded.optimizer, FlatAdam) and loaded.optimizer_kwargs == {"eps": 1e-5}
    assert loaded.optimizer.param_groups[0]["lr"] == model.policy.optimizer.param_groups[0]["lr"]


def test_sb3_pickled_policy_file_is_refused_with_the_way_out(model: MetaCPO, tmp_path: Path) -> None:
    model.reset_adaptation()
    legacy = tmp_path / "legacy.pth"
    BaseModel.save(model.policy, str(legacy))  # SB3's format: a torch pickle
    with pytest.raises(ArchiveError, match=r"BaseModel\.save.*pickled objects.*Re-save.*algorithm's load"):
        CPOPolicy.load(legacy)
    trusted = CPOPolicy.load_sb3_file(str(legacy))  # unpickles: for a file one trusts, to re-save it
    np.testing.assert_array_equal(
        trusted.predict(OBS, deterministic=True)[0], model.policy.predict(OBS, deterministic=True)[0]
    )


@pytest.mark.parametrize(
    "kind",
    ["SB3-shaped torch pickle", "torch legacy pickle", "raw pickle", "pickle payload in the tensors", "bare payload"],
)
def test_a_crafted_pickle_is_refused_and_runs_nothing(kind: str, model: MetaCPO, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()  # the payload does run when unpickled
    path = tmp_path / "evil.pth"
    if kind == "SB3-shaped torch pickle":
        th.save({"state_dict": {}, "data": Payload(marker)}, path)
    elif kind == "torch legacy pickle":
        th.save({"state_dict": {}, "data": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}, "data": Payload(marker)}))
    elif kind == "bare payload":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        buffer = io.BytesIO()
        th.save({"policy": Payload(marker), "actor_override": {}}, buffer)
        rewrite_archive(model.policy.save(tmp_path / "good.zip"), path, {TENSORS: buffer.getvalue()})
    with pytest.raises(ArchiveError):
        CPOPolicy.load(path)
    assert not marker.exists()


def test_other_files_are_refused_naming_the_problem(model: MetaCPO, tmp_path: Path) -> None:
    model_archive = model.save(tmp_path / "model")
    with pytest.raises(ArchiveError, match=r"holds a MetaCPO model, not a policy.*MetaCPO\.load"):
        CPOPolicy.load(model_archive)
    policy_file = model.policy.save(tmp_path / "policy.zip")
    with pytest.raises(ArchiveError, match=r"holds a policy saved alone.*CPOPolicy\.load"):
        MetaCPO.load(policy_file)
    metadata = json.loads(zipfile.ZipFile(policy_file).read(METADATA))
    metadata["constructor_arguments"]["activation_fn"] = {"__class__": "subprocess.Popen"}
    unregistered = rewrite_archive(policy_file, tmp_path / "popen.zip", {METADATA: json.dumps(metadata).encode()})
    with pytest.raises(ArchiveError, match=r"'subprocess\.Popen', which is not in the registry"):
        CPOPolicy.load(unregistered)
    buffer = io.BytesIO()
    th.save({"policy": model.policy.state_dict(), "actor_override": {"log_std": th.zeros(5)}}, buffer)
    mismatched = rewrite_archive(policy_file, tmp_path / "override.zip", {TENSORS: buffer.getvalue()})
    with pytest.raises(ArchiveError, match="actor override has parameters"):
        CPOPolicy.load(mismatched)


@pytest.mark.parametrize("algorithm", ["MetaCPO", "CPO"])
def test_set_parameters_takes_a_policy_saved_alone(algorithm: str, tmp_path: Path) -> None:
    """It raised a bare KeyError ('optimizer'): a policy file holds no optimiser state, which exact_match refuses where
    the model's parameters include it (CPO's), as SB3 refuses a missing object; otherwise the policy's tensors are set."""
    from sb3_metacpo import CPO

    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    kwargs: dict[str, Any] = dict(n_steps=100, policy_kwargs=dict(net_arch=[16]))
    if algorithm == "MetaCPO":
        kwargs["meta_batch_size"] = 2
    cls = MetaCPO if algorithm == "MetaCPO" else CPO
    model = cls("MlpPolicy", dist, seed=0, **kwargs)
    path = model.policy.save(tmp_path / "policy")
    other = cls("MlpPolicy", dist, seed=1, **kwargs)
    before = {name: value.clone() for name, value in other.policy.state_dict().items()}
    with pytest.raises(ValueError, match=r"are not the model's.* pass exact_match=False\); nothing was changed"):
        other.set_parameters(str(path))
    for name, value in other.policy.state_dict().items():  # SB3 had set the policy before refusing
        assert th.equal(value, before[name]), name
    other.set_parameters(str(path), exact_match=False)
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, other.policy.state_dict()[name]), name


def _optimizer_tensors(model: Any) -> list[th.Tensor]:
    state = model.policy.optimizer.state_dict()["state"]
    return [value for key in sorted(state) for value in state[key].values() if isinstance(value, th.Tensor)]


@pytest.mark.parametrize("algorithm", ["MetaCPO", "MetaTRPO", "CPO"])
def test_get_and_set_parameters_carry_the_critics_optimiser(algorithm: str, tmp_path: Path) -> None:
    """SB3's on-policy algorithms name ``policy`` and ``policy.optimizer``; MetaCPO and MetaTRPO named only the policy,
    so ``set_parameters`` (a dict or an archive's path) silently left the trained Adam state behind."""
    from sb3_metacpo import CPO, MetaTRPO

    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    kwargs: dict[str, Any] = dict(n_steps=100, policy_kwargs=dict(net_arch=[16]))
    if algorithm != "CPO":
        kwargs.update(meta_batch_size=2, critic="mlp")  # the linear baselines (default) keep no optimiser state
    cls = {"MetaCPO": MetaCPO, "MetaTRPO": MetaTRPO, "CPO": CPO}[algorithm]
    trained = cls("MlpPolicy", dist, seed=0, **kwargs).learn(400)
    source = _optimizer_tensors(trained)
    assert source and any(bool(value.abs().sum() > 0) for value in source)  # Adam has moments to carry
    assert list(trained.get_parameters()) == ["policy", "policy.optimizer"]
    path = trained.save(tmp_path / "trained")
    for given in (trained.get_parameters(), str(path)):
        fresh = cls("MlpPolicy", dist, seed=1, **kwargs)
        assert not _optimizer_tensors(fresh)
        fresh.set_parameters(given)
        copied = _optimizer_tensors(fresh)
        assert len(copied) == len(source) and all(th.equal(a, b) for a, b in zip(copied, source, strict=True))
