"""Every bad input of :mod:`bad_inputs` gets its clear error; numpy scalars are accepted where Python ones are."""

from __future__ import annotations

import re
import sys
from pathlib import Path

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
