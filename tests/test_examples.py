"""Every example of ``examples/`` runs to its end at a tiny budget, in its own process, and writes what it says."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY_META = ["--timesteps", "2000", "--n-steps", "100", "--meta-batch-size", "2"]

# example -> (tiny-budget arguments, lines its output must contain, files it must write under --out)
CASES = {
    "quickstart.py": (
        [*TINY_META, "--eval-episodes", "2"],
        ["after 0 update(s): return", "after 1 update(s): return", "loaded back after 2000 env steps"],
        ["metacpo_toy2dnav.zip"],
    ),
    "custom_task_distribution.py": (
        [*TINY_META, "--eval-episodes", "2"],
        ["training tasks:", "held-out tasks:", "held-out layout_seed="],
        ["metacpo_corridor.zip"],
    ),
    "several_costs.py": (
        TINY_META,
        ["CPO: cost_hazards", "MetaCPO: cost_hazards", "train/nu_cost_speed", "train/nu_stage0_cost_speed"],
        ["CPO/progress.csv", "MetaCPO/progress.csv"],
    ),
    "adapt_and_render.py": (
        ["--timesteps", "2000", "--n-steps", "100", "--eval-episodes", "2"],
        ["held-out task of Toy2DNav", "after 2 update(s): return", "adapted.gif"],
        ["adapted.gif", "adaptation.png", "metacpo_toy2dnav.zip"],
    ),
    "compare_methods.py": (
        [*TINY_META, "--n-tasks", "1", "--eval-episodes", "2"],
        [
            "Meta-CPO ",
            "Meta-TRPO ",
            "CPO-pretrain ",
            "CPO-scratch ",
            "adaptation.csv",
            "the CPO baselines adapt with Meta-CPO's cost margin 1 and 10 conjugate-gradient steps",
        ],
        ["adaptation.csv", "adaptation.png"],
    ),
    "demo.py": (  # `make demo`, the README's main job, at a tiny budget (2 meta-iterations of 8 one-episode batches)
        ["--timesteps", "2000", "--episodes-per-batch", "1", "--n-updates", "1", "--n-test", "1", "--eval-episodes", "2"],
        [
            "Meta-training MetaCPO on Toy2DNav",
            "Adapting to 1 unseen tasks",
            "after 1 updates: MetaCPO return",
            "adaptation.png",
        ],
        ["metacpo_Toy2DNav.zip", "adaptation.png"],
    ),
    "callbacks_tensorboard.py": (
        ["--timesteps", "1600", "--n-steps", "100", "--meta-batch-size", "2", "--eval-episodes", "1"],
        ["resuming from", "trained 3200 env steps in all", "rollout/ep_cost_mean", "meta_test/ep_cost_mean_1", "eval/"],
        ["evals/evaluations.npz", "checkpoints/checkpoint_8_updates_3200_steps.zip"],
    ),
}


def test_every_example_is_tested():
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_at_a_tiny_budget(name, tmp_path):
    arguments, expected_lines, expected_files = CASES[name]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    for line in expected_lines:
        assert line in result.stdout, f"{name}: {line!r} not in its output:\n{result.stdout}"
    for file in expected_files:
        assert (out / file).is_file() and (out / file).stat().st_size > 0, f"{name} did not write {file}"
