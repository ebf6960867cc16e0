"""Every bad input of :mod:`bad_inputs` gets its clear error; numpy scalars are accepted where Python ones are."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th

sys.path.insert(0, str(Path(__file__).parent))

from bad_inputs import CASES, CPO_SMALL, SMALL, Case, rst_table, toy

from sb3_metacpo import CPO, MetaCPO


@pytest.mark.parametrize("case", CASES, ids=[f"{case.where}: {case.bad_input}" for case in CASES])
def test_bad_input_gets_a_clear_error(case: Case) -> None:
    with pytest.raises(case.error, match=case.message):
        case.run()


def test_the_docs_table_is_generated_from_the_cases() -> None:
    assert len(CASES) >= 40
    table = Path(__file__).parent.parent / "docs" / "guide" / "bad_inputs_table.inc"
    assert table.read_text() == rst_table(), "regenerate: python tests/bad_inputs.py > docs/guide/bad_inputs_table.inc"


def test_numpy_scalars_are_accepted_where_python_ones_are(tmp_path: Path) -> None:
    model = MetaCPO(
        "MlpPolicy",
        toy(),
        meta_batch_size=np.int64(2),
        n_steps=np.int32(100),
        n_inner_updates=np.int64(1),
        inner_target_kl=np.float32(0.05),
        cost_limit=np.float64(5.0),
        line_search_max_iter=np.int64(5),
        seed=np.int64(0),
        n_envs=np.int64(2),
        stats_window_size=np.int32(10),
        policy_kwargs=SMALL["policy_kwargs"],
    )
    model.learn(np.int64(400), reset_num_timesteps=np.True_, progress_bar=np.False_)
    assert model.num_timesteps == 400 and type(model.n_steps) is int and type(model.inner_target_kl) is float
    assert type(model._stats_window_size) is int  # SB3's name of stats_window_size
    model.save(tmp_path / "model")  # the saved metadata is plain JSON
    assert MetaCPO.load(tmp_path / "model").n_steps == 100
    small = {**CPO_SMALL, "n_steps": np.int64(100), "n_envs": np.int64(1)}
    small["policy_kwargs"] = {**small["policy_kwargs"], "normalize_observations": np.True_, "clip_observations": np.inf}
    cpo = CPO("MlpPolicy", "Toy2DNav", **small)  # inf: no clipping
    cpo.learn(np.int64(100))
    assert cpo.num_timesteps == 100
    cpo.adapt("Toy2DNav", n_updates=np.int64(1), n_steps=np.int64(50))
    assert cpo.evaluate_params("Toy2DNav", cpo.policy.actor_params(), n_episodes=1, seed=2**40).n_episodes >= 1
    assert all(th.isfinite(v).all() for v in cpo.policy.state_dict().values())


def test_error_messages_name_the_value() -> None:
    # The message quotes the offending value, so a user sees what was passed.
    for case in CASES:
        if case.where.endswith("(...)") and "=" in case.bad_input and "with" not in case.bad_input:
            value = case.bad_input.split("=", 1)[1]
            if value.startswith(("'", "[", "2.0", "1.5", "True")):
                with pytest.raises(case.error) as info:
                    case.run()
                assert re.sub(r"\s", "", value) in re.sub(r"\s", "", str(info.value)), (case.bad_input, str(info.value))


def test_a_whole_number_written_as_a_float_is_a_budget() -> None:
    """learn(1e5) is SB3's idiom; it was refused as not an integer (2.5 still is)."""
    model = MetaCPO("MlpPolicy", toy(), **SMALL).learn(4e2)
    assert model.num_timesteps == 400
    cpo = CPO("MlpPolicy", "Toy2DNav", **CPO_SMALL).learn(np.float64(1e2))
    assert cpo.num_timesteps == 100


@pytest.mark.parametrize(
    ("policy_kwargs", "message"),
    [
        ("x", r"policy_kwargs must be None or a dict of the policy's arguments by name .*got 'x'"),
        ({1: 2}, r"policy_kwargs must be None or a dict"),
        ({"net_arch": "x"}, r"policy_kwargs\['net_arch'\] must be the hidden-layer sizes.*\[64, 64\].*got 'x'"),
        ({"net_arch": [-3]}, r"policy_kwargs\['net_arch'\] must be .*positive integers.*got \[-3\]"),
        ({"net_arch": [16, 2.5]}, r"policy_kwargs\['net_arch'\] must be"),
        ({"net_arch": {"pi": [16], "vp": [16]}}, r"dict\(pi=\[64, 64\], vf=\[64, 64\]\)\), got \{'pi': \[16\], 'vp'"),
        ({"activation_fn": "tanh"}, r"activation_fn'\] must be a torch.nn.Module class such as torch.nn.Tanh .*got 'tanh'"),
        ({"activation_fn": th.nn.Tanh()}, r"not its name or an instance\), got Tanh\(\)"),
        ({"optimizer_class": "Adam"}, r"optimizer_class'\] must be a torch.optim.Optimizer class .*got 'Adam'"),
        ({"optimizer_kwargs": "x"}, r"optimizer_kwargs'\] must be None or a dict"),
        ({"optimizer_kwargs": {"lr": 1e-4}}, r"cannot set 'lr'.*critic_learning_rate for MetaCPO.*learning_rate for CPO"),
        ({"ortho_init": "False"}, r"policy_kwargs\['ortho_init'\] must be True or False, got 'False'"),
    ],
)
def test_policy_kwargs_are_checked_by_name(policy_kwargs: Any, message: str) -> None:
    """Each failed deep inside SB3 or torch ("'str' object is not callable", "Trying to create tensor with negative
    dimension", FlatAdam "got multiple values for keyword argument 'lr'") or was misread ("False" is truthy)."""
    from sb3_metacpo.common.checks import check_policy_kwargs

    with pytest.raises(ValueError, match=message):
        check_policy_kwargs(policy_kwargs)


def test_policy_kwargs_that_sb3_takes_pass_the_check() -> None:
    from sb3_metacpo.common.checks import check_policy_kwargs
    from sb3_metacpo.common.flat_adam import FlatAdam

    for policy_kwargs in (
        None,
        {},
        {"net_arch": [64, 64]},
        {"net_arch": []},  # no hidden layer
        {"net_arch": (np.int64(8),)},
        {"net_arch": {"pi": [8], "vf": [16, 16]}},
        {"net_arch": [{"pi": [8], "vf": [8]}]},  # SB3's deprecated form, which it still takes
        {"activation_fn": th.nn.ReLU, "optimizer_class": FlatAdam, "optimizer_kwargs": {"eps": 1e-5}},
        {"optimizer_class": th.optim.SGD, "optimizer_kwargs": None, "ortho_init": np.False_},
        {"n_costs": 2, "log_std_init": -0.5},  # names it does not know are left to the policy
    ):
        check_policy_kwargs(policy_kwargs)
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": {"net_arch": {"pi": [8], "vf": [16, 16]}}})
    check_policy_kwargs(model.policy_kwargs)  # as _setup_model left it (with n_costs), e.g. when loading


@pytest.mark.parametrize("verbose", ["x", None, True, -1, 1.0])
def test_verbose_is_one_of_sb3s_levels(verbose: Any) -> None:
    """verbose="x" and None failed inside SB3's constructor ("'>=' not supported between instances of 'str' and
    'int'"). Levels above 2 are SB3's debug too (an archive saved with verbose=3 must load)."""
    from sb3_metacpo.common.checks import check_verbose

    with pytest.raises(ValueError, match=r"verbose must be an integer >= 0 \(0 silent, 1 info, 2 debug\), got "):
        check_verbose(verbose)


def test_verbose_levels_and_callbacks_that_sb3_takes_pass() -> None:
    from stable_baselines3.common.callbacks import CallbackList

    from sb3_metacpo.common.checks import check_callback, check_verbose

    for verbose in (0, 1, 2, 3, np.int64(1)):
        check_verbose(verbose)
    for callback in (None, CallbackList([]), [], [CallbackList([])], lambda _locals, _globals: True):
        check_callback(callback)
    for callback in ("x", [lambda _locals, _globals: True], 3):  # SB3's CallbackList takes BaseCallbacks only
        with pytest.raises(ValueError, match=r"callback must be None, a BaseCallback, a list of them or a function"):
            check_callback(callback)


def test_a_misspelt_policy_argument_is_an_error_before_anything_is_seeded() -> None:
    """policy_kwargs=dict(net_archh=...) failed in SB3's policy constructor, after the model had seeded torch's,
    numpy's and Python's global generators."""
    import random

    states = (th.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for build in (
        lambda: MetaCPO("MlpPolicy", toy(), **{**SMALL, "seed": 5, "policy_kwargs": {"activation_fnn": th.nn.ReLU}}),
        lambda: CPO("MlpPolicy", "Toy2DNav", **{**CPO_SMALL, "seed": 5, "policy_kwargs": {"activation_fnn": th.nn.ReLU}}),
    ):
        with pytest.raises(ValueError, match="did you mean 'activation_fn'"):
            build()
    assert th.equal(states[0], th.random.get_rng_state()) and (states[1] == np.random.get_state()[1]).all()
    assert states[2] == random.getstate()


def test_policy_argument_names_follow_kwargs_to_the_bases() -> None:
    from sb3_metacpo.common.checks import check_policy_kwargs, policy_argument_names
    from sb3_metacpo.common.policies import CPOPolicy

    class AllNamed(CPOPolicy):  # no **kwargs: its own names are all it takes
        def __init__(self, observation_space: Any, action_space: Any, lr_schedule: Any, scale: float = 1.0) -> None:
            super().__init__(observation_space, action_space, lr_schedule)

    class WithOwnOption(CPOPolicy):  # passes **kwargs on, but another package's code may take some out first
        def __init__(self, *args: Any, scale: float = 1.0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    class PopsItsOwn(CPOPolicy):  # takes its option out of **kwargs: its names cannot be told from its signature
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.scale = kwargs.pop("scale", 1.0)
            super().__init__(*args, **kwargs)

    class OwnModule(th.nn.Module):  # passes everything to torch: any name may be meant
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()

    names = policy_argument_names(CPOPolicy)  # the library's and SB3's pass **kwargs on unchanged: followed
    assert names is not None and {"normalize_observations", "n_costs", "net_arch", "optimizer_kwargs"} <= names
    assert policy_argument_names(AllNamed) == {"observation_space", "action_space", "lr_schedule", "scale"}
    for unknown in (WithOwnOption, PopsItsOwn, OwnModule, functools.partial(CPOPolicy, log_std_init=-0.5)):
        assert policy_argument_names(unknown) is None  # cannot be told: left to the policy's constructor
    check_policy_kwargs({"scale": 2.0, "anything": 1}, PopsItsOwn)
    with pytest.raises(ValueError, match="AllNamed takes no argument 'scal'; did you mean 'scale'"):
        check_policy_kwargs({"scal": 2.0}, AllNamed)
    model = MetaCPO(PopsItsOwn, toy(), **{**SMALL, "policy_kwargs": {"net_arch": [8], "scale": 2.0}})
    assert model.policy.scale == 2.0
    MetaCPO(functools.partial(CPOPolicy, log_std_init=-0.5), toy(), **SMALL)
    model = MetaCPO("MlpPolicy", toy(), **{**SMALL, "policy_kwargs": {"net_arch": [8], "log_std_init": -0.5}})
    check_policy_kwargs(model.policy_kwargs, model.policy_class)  # as _setup_model left it (with n_costs)


@pytest.mark.parametrize("algo", [MetaCPO, CPO])
def test_tensorboard_log_without_tensorboard_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, algo: Any
) -> None:
    """SB3's own ImportError names no install command; the README promises that a missing extra is named."""
    from stable_baselines3.common import utils as sb3_utils

    model = algo("MlpPolicy", toy(), tensorboard_log=str(tmp_path), **(SMALL if algo is MetaCPO else CPO_SMALL))
    monkeypatch.setattr(sb3_utils, "SummaryWriter", None)
    with pytest.raises(ImportError, match=r"needs TensorBoard: pip install sb3-metacpo\[tensorboard\]"):
        model.learn(200)
    assert model.num_timesteps == 0 and not list(tmp_path.iterdir())
    model.tensorboard_log = None
    model.learn(200)  # without it, training goes on


@pytest.mark.parametrize("algo", [MetaCPO, CPO])
def test_tensorboard_log_set_after_construction_is_checked_before_learn_changes_anything(algo: Any) -> None:
    """The constructor checks ``tensorboard_log`` (a case of :mod:`bad_inputs`); an attribute set afterwards failed in
    SB3's logger set-up, after ``_setup_learn`` had reset the counters and the envs, with a TypeError naming nothing."""
    model = algo("MlpPolicy", toy(), **(SMALL if algo is MetaCPO else CPO_SMALL))
    model.learn(200)
    steps, total = model.num_timesteps, model._total_timesteps
    parameters = [p.detach().clone() for p in model.policy.parameters()]
    model.tensorboard_log = 5
    for reset in (True, False):
        with pytest.raises(ValueError, match="tensorboard_log must be None or a folder path"):
            model.learn(200, reset_num_timesteps=reset)
        assert (model.num_timesteps, model._total_timesteps) == (steps, total)
        assert all(th.equal(p, q) for p, q in zip(model.policy.parameters(), parameters, strict=True))
