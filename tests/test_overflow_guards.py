"""Bad learning-rate schedules, critic fits that overflow, NaN actions and NaN archives (a reliability audit,
2026-12-02): each is refused with a clear error and nothing changed, where each used to leave a NaN or inf in the
model's state silently (or was blamed on the env). Finite env values that overflow the statistics or the critics:
``tests/test_reliability.py``."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.serialization import TENSORS, ArchiveError

SMALL: dict[str, Any] = dict(meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
CPO_SMALL: dict[str, Any] = dict(n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]), n_critic_updates=1)


def toy() -> Any:
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def model_of(algo: str) -> Any:
    if algo == "MetaCPO":
        return MetaCPO("MlpPolicy", toy(), critic="mlp", n_critic_updates=1, **SMALL)
    return CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL)


def state_of(model: Any) -> tuple[dict[str, th.Tensor], dict[str, Any]]:
    """The policy's parameters and buffers (θ, critics, observation statistics) and the critics' optimiser state."""
    return {k: v.clone() for k, v in model.policy.state_dict().items()}, copy.deepcopy(model.policy.optimizer.state_dict())


def assert_same_state(a: tuple[dict[str, th.Tensor], dict[str, Any]], b: tuple[dict[str, th.Tensor], dict[str, Any]]) -> None:
    assert a[0].keys() == b[0].keys() and all(th.equal(a[0][k], b[0][k]) for k in a[0])
    states = [[v for entry in s[1]["state"].values() for v in entry.values()] for s in (a, b)]
    assert len(states[0]) == len(states[1])
    assert all(th.equal(x, y) if isinstance(x, th.Tensor) else x == y for x, y in zip(*states, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3])
def test_a_learning_rate_schedule_that_turns_bad_is_refused_before_any_change(bad: float) -> None:
    """NaN or inf made every critic parameter NaN (then blamed on the critic targets), a negative rate ascended the
    critics' loss, silently."""

    turned = {"bad": False}

    def schedule(progress: float) -> float:
        return bad if turned["bad"] and progress < 0.9 else 1e-3

    model = CPO("MlpPolicy", "Toy2DNav", learning_rate=schedule, **{**CPO_SMALL, "n_envs": 2})
    model.learn(400)
    turned["bad"] = True  # from now on, below progress 0.9
    before = state_of(model)
    with pytest.raises(ValueError, match=r"the learning-rate schedule gave .* at progress remaining"):
        model.learn(400, reset_num_timesteps=False)
    assert_same_state(before, state_of(model))


def test_a_schedule_bad_from_the_start_is_refused_at_construction_and_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the schedule gives nan at progress remaining 1"):
        CPO("MlpPolicy", "Toy2DNav", learning_rate=lambda _: float("nan"), **CPO_SMALL)
    path = CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL).save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"invalid arguments \['learning_rate'\]") as raised:
        CPO.load(path, learning_rate=lambda _: float("nan"))
    assert not isinstance(raised.value, ArchiveError)  # the argument is at fault, not the file


@pytest.mark.parametrize(
    ("lr", "error", "message"),
    [
        (1e30, FloatingPointError, "the critics and their optimiser were restored"),  # finite steps, inf parameters
        (1e38, RuntimeError, "cannot be converted to type float without overflow"),  # the optimiser's step raises
    ],
)
def test_a_critic_fit_that_ends_non_finite_or_fails_midway_is_undone(lr: float, error: type, message: str) -> None:
    """The last line of defence behind the checks: a fit that overflows the critics, or fails inside the optimiser's
    step after some minibatches, leaves the critics and their optimiser as they were."""
    model = CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL)
    model.learn(100)
    before = state_of(model)
    policy = model.policy
    n = 64
    observations = th.randn(n, policy.observation_space.shape[0])
    for group in policy.optimizer.param_groups:
        group["lr"] = lr
    with pytest.raises(error, match=message):
        policy.fit_critics(observations, th.full((n,), 1e10), th.zeros(n, 1), 3, 16, th.zeros(n))
    assert_same_state(before, state_of(model))
    model.learn(100, reset_num_timesteps=False)  # the optimiser works on (its learning rate: the schedule's again)
    assert all(th.isfinite(v).all() for v in model.policy.state_dict().values())


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_a_non_finite_action_is_the_policys_fault_not_the_envs(algo: str) -> None:
    """NaN actions reached the envs, and the NaN reward that came back was reported as the env's fault."""
    model = model_of(algo)
    with th.no_grad():
        model.policy.log_std.fill_(float("nan"))  # e.g. a custom policy whose acting code goes wrong
    with pytest.raises(ValueError, match="the policy returned a non-finite action for env 0 at step 0"):
        model.learn(400 if algo == "MetaCPO" else 100)
    with pytest.raises(ValueError, match="the stochastic action is not finite"):
        model.predict(np.zeros(model.observation_space.shape, np.float32))


def _rewritten(target: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return target


def test_an_archive_with_non_finite_parameters_or_a_repeated_member_is_refused(tmp_path: Path) -> None:
    """An archive with a NaN log-std loaded, and its stochastic predict gave NaN actions; a zip repeating a member
    loaded its last copy (a scanner reading the first would see another file)."""
    path = MetaCPO("MlpPolicy", toy(), **SMALL).save(tmp_path / "model")
    with zipfile.ZipFile(path) as archive:
        members = [(name, archive.read(name)) for name in archive.namelist()]
    tensors = th.load(io.BytesIO(dict(members)[TENSORS]), weights_only=True)
    tensors["policy"]["log_std"] = th.full_like(tensors["policy"]["log_std"], float("nan"))
    buffer = io.BytesIO()
    th.save(tensors, buffer)
    poisoned = [(name, buffer.getvalue() if name == TENSORS else data) for name, data in members]
    with pytest.raises(ArchiveError, match=r"non-finite values in 'policy/log_std'"):
        MetaCPO.load(_rewritten(tmp_path / "nan.zip", poisoned))
    with pytest.warns(UserWarning, match="Duplicate name"):
        repeated = _rewritten(tmp_path / "repeated.zip", [*members, (TENSORS, dict(members)[TENSORS])])
    with pytest.raises(ArchiveError, match="it repeats a member"):
        MetaCPO.load(repeated)
    MetaCPO.load(path)  # the original loads
