"""The command line: run folders, YAML hyperparameters and their errors, evaluate/adapt, help, TensorBoard logs.

Training runs in-process through ``main(argv)`` at a tiny budget (a fresh interpreter costs seconds of imports); one
test runs ``python -m sb3_metacpo`` in a subprocess.
"""

import argparse
import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import yaml
from archive_edits import rewrite_archive
from bandits import Bandit

from sb3_metacpo import CPO, MetaCPO
from sb3_metacpo.cli import build_parser, main
from sb3_metacpo.common.adaptation import AdaptationMixin

ROOT = Path(__file__).resolve().parents[1]
TINY = ["meta_batch_size:2", "n_steps:100", "policy_kwargs:{net_arch: [16]}", "env_kwargs:{max_episode_steps: 50}"]


def train(log_folder, *extra, algo="MetaCPO", hyperparams=TINY, n=400):
    argv = ["train", "--algo", algo, "--family", "Toy2DNav", "-n", str(n), "--seed", "0", "-f", str(log_folder)]
    argv += ["--verbose", "0", "--no-progress", *extra]
    if hyperparams:
        argv += ["--hyperparams", *hyperparams]
    return main(argv)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    log_folder = tmp_path_factory.mktemp("runs")
    assert train(log_folder) == 0
    return log_folder / "MetaCPO_Toy2DNav_1"


def test_train_writes_a_run_folder(run_folder):
    for name in ("config.yml", "hyperparams.yml", "model.zip", "progress.csv", "learning_curves.png"):
        assert (run_folder / name).stat().st_size > 0, name
    config = yaml.safe_load((run_folder / "config.yml").read_text())
    assert config["algo"] == "MetaCPO" and config["family"] == "Toy2DNav" and config["seed"] == 0
    assert config["n_timesteps"] == 400 and config["cost_limit"] == 5.0
    with open(run_folder / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {"rollout/ep_rew_mean", "rollout/ep_cost_mean", "time/total_timesteps"} <= set(rows[0])


def test_hyperparams_override_reaches_the_model(run_folder):
    model = MetaCPO.load(str(run_folder / "model.zip"))
    assert model.n_steps == 100 and model.meta_batch_size == 2 and model.inner_target_kl == 0.05  # override, file
    assert model.policy_kwargs["net_arch"] == [16]
    assert model.task_distribution.max_episode_steps == 50  # env_kwargs
    # hyperparams.yml reproduces the run with -conf
    saved = yaml.safe_load((run_folder / "hyperparams.yml").read_text())
    assert saved["Toy2DNav"]["n_steps"] == 100 and saved["Toy2DNav"]["n_timesteps"] == 400


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_events_hold_cost_and_kl(run_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(run_folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(run_folder))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert "rollout/ep_cost_mean" in scalars and "train/kl" in scalars
    assert len(accumulator.Scalars("rollout/ep_cost_mean")) >= 1


def test_evaluate_and_adapt_on_the_run_folder(run_folder, tmp_path):
    common = ["--n-tasks", "2", "--n-eval-episodes", "1", "--no-progress", "-o", str(tmp_path)]
    assert main(["evaluate", str(run_folder), *common]) == 0
    with open(tmp_path / "evaluation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["task"] for row in rows] == ["0", "1"] and all(row["method"] == "MetaCPO" for row in rows)

    assert main(["adapt", str(run_folder / "model.zip"), "--n-updates", "1", "--n-steps", "100", *common]) == 0
    with open(tmp_path / "adaptation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["task"], row["update"]) for row in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert (tmp_path / "adaptation.png").stat().st_size > 0


def test_cpo_train_and_adapt(tmp_path):
    assert train(tmp_path, "--no-tensorboard", algo="CPO", hyperparams=["n_envs:2", "n_steps:100"], n=200) == 0
    folder = tmp_path / "CPO_Toy2DNav_1"
    assert CPO.load(str(folder / "model.zip")).n_envs == 2
    argv = ["adapt", str(folder), "--n-tasks", "1", "--n-updates", "1", "--n-eval-episodes", "1", "--no-progress"]
    assert main(argv) == 0
    with open(folder / "adaptation.csv", newline="") as handle:
        assert [row["update"] for row in csv.DictReader(handle)] == ["0", "1"]


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        ("Toy2DNav: [unclosed\n", [], r"bad\.yml is not valid YAML"),
        (
            "Toy2DNav:\n  n_stepz: 100\n",
            [],
            r"bad\.yml \[Toy2DNav\]: unknown key 'n_stepz'.*did you mean 'n_steps'.*valid keys:",
        ),
        ("Toy2DNav:\n  n_steps: many\n", [], r"bad\.yml \[Toy2DNav\]: n_steps = 'many' has the wrong type; expected int"),
        ("Toy2DNav:\n  n_steps: 100\n", ["dual_solver:exact"], r"dual_solver = 'exact'.*'analytic', 'cvxpylayers'"),
        ("Toy2DNav:\n  seed: 3\n", [], r"'seed' cannot be set.*--seed"),
        ("PointGoalHazard: {}\n", [], r"bad\.yml has no section 'Toy2DNav'; its sections: PointGoalHazard"),
        # each was a traceback and exit 1
        ("Toy2DNav:\n  n_timesteps: .inf\n", [], r"n_timesteps = inf must be a positive integer"),
        ("Toy2DNav:\n  n_timesteps: .nan\n", [], r"n_timesteps = nan must be a positive integer"),
        ("Toy2DNav:\n  1: 3\n", [], r"key 1 is not a name"),
        ("Toy2DNav:\n  policy_kwargs: {log_std_init: .nan}\n", [], r"log_std_init must be a number in"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, capsys, content, overrides, expected):
    bad = tmp_path / "bad.yml"
    bad.write_text(content)
    assert train(tmp_path / "runs", "-conf", str(bad), hyperparams=overrides) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_usage_errors(tmp_path, capsys):
    assert main(["train", "--algo", "MetaCPO", "--env", "Pendulum-v1", "-f", str(tmp_path)]) == 2
    assert "only CPO" in capsys.readouterr().err
    assert train(tmp_path, hyperparams=["n_steps=100"]) == 2
    assert "expected key:value" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_benchmark_dry_run_lists_the_plan(capsys):
    assert main(["benchmark", "--family", "Toy2DNav", "-n", "1000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # metacpo.yml: 8 tasks x 400 steps x 2 collects per meta-iteration; cpo.yml: 8 envs x 400 steps per rollout
    for method in (
        "MetaCPO: train 6400 env steps (1 update of 6400)",
        "MetaTRPO: train 6400 env steps (1 update of 6400)",
        "CPO: train 6400 env steps (2 updates of 3200)",
        "CPO-scratch: no training",
    ):
        assert method in out
    assert "benchmarks/adaptation.py" in out
    assert "adaptation updates of 400 env steps with trust region 0.05 for every method" in out  # metacpo.yml's


def test_benchmark_adapts_every_method_with_the_same_batch_and_trust_region(tmp_path, monkeypatch):
    """CPO's own adaptation batch is a rollout of all its envs (n_steps x n_envs) and its trust region its target_kl:
    the benchmark gave it 3200 steps and 0.01 where MetaCPO got 400 and 0.05. Every method gets the same now."""
    calls = []
    original = AdaptationMixin.adaptation_steps

    def recording(self, env, n_updates=None, n_steps=None, on_step=None, target_kl=None):
        calls.append((type(self).__name__, n_steps, target_kl, self.cost_confidence, self.cg_max_steps))
        return original(self, env, n_updates, n_steps, on_step, target_kl)

    monkeypatch.setattr(AdaptationMixin, "adaptation_steps", recording)
    argv = ["benchmark", "--methods", "MetaCPO", "CPO", "CPO-scratch", "-n", "800", "--n-tasks", "1", "--n-updates", "1"]
    argv += ["--n-eval-episodes", "1", "--n-steps", "200", "--adapt-target-kl", "0.03", "-f", str(tmp_path)]
    assert main(argv) == 0
    # CPO adapts with MetaCPO's cost margin and CG iterations too (it had CPO's own 0.0 and 15)
    assert calls == [("MetaCPO", 200, 0.03, 1.0, 10), ("CPO", 200, 0.03, 1.0, 10), ("CPO", 200, 0.03, 1.0, 10)]
    # and every method trained the same env steps: MetaCPO rounded -n 800 up to one meta-iteration (6400) where CPO
    # rounded it to one rollout (3200), half of MetaCPO's steps, against the plan's "same budget"
    (bench,) = tmp_path.iterdir()
    steps = {
        algo: algo_cls.load(str(bench / f"{algo}_Toy2DNav_1" / "model.zip")).num_timesteps
        for algo, algo_cls in (("MetaCPO", MetaCPO), ("CPO", CPO))
    }
    assert steps == {"MetaCPO": 6400, "CPO": 6400}


def test_benchmark_evaluates_every_stage_and_method_on_the_same_start_states(tmp_path, monkeypatch, capsys):
    """The evaluations drew from the model's adaptation stream (seed None): every stage got other start states than
    the one before (no paired comparison) and the methods could drift apart, against the plan the command prints."""
    seeds = []
    original = AdaptationMixin.evaluate_params

    def recording(self, env, params, n_episodes=5, deterministic=False, seed=None):
        seeds.append((type(self).__name__, seed))
        return original(self, env, params, n_episodes, deterministic, seed)

    monkeypatch.setattr(AdaptationMixin, "evaluate_params", recording)
    argv = ["benchmark", "--methods", "MetaCPO", "CPO-scratch", "-n", "800", "--n-tasks", "2", "--n-updates", "1"]
    argv += ["--n-eval-episodes", "1", "--n-steps", "200", "-f", str(tmp_path)]
    assert main(argv) == 0
    from sb3_metacpo.cli import EVAL_SEED

    expected = [(EVAL_SEED + task) for task in (0, 1) for _ in range(2)]  # two stages per task
    assert [seed for _, seed in seeds] == expected * 2  # both methods
    assert "± sd: the spread (sample standard deviation) over the 2 task-seed pairs, not a standard error" in (
        capsys.readouterr().out
    )


def test_benchmark_gives_every_method_one_task_distribution(tmp_path, monkeypatch, capsys):
    """The env_kwargs came from the last trained run: a CPO-scratch listed first ran the first seed on the family's
    defaults (100-step episodes) while MetaCPO ran on --hyperparams' (20)."""
    lengths = []
    original = AdaptationMixin.adaptation_steps

    def recording(self, env, n_updates=None, n_steps=None, on_step=None, target_kl=None):
        lengths.append((type(self).__name__, self.task_distribution.max_episode_steps))
        return original(self, env, n_updates, n_steps, on_step, target_kl)

    monkeypatch.setattr(AdaptationMixin, "adaptation_steps", recording)
    argv = ["benchmark", "--methods", "CPO-scratch", "MetaCPO", "-n", "160", "--n-tasks", "1", "--n-updates", "1"]
    argv += ["--n-eval-episodes", "1", "--n-steps", "40", "-f", str(tmp_path), "--hyperparams"]
    assert main([*argv, "env_kwargs:{max_episode_steps: 20}", "n_steps:40"]) == 0
    assert lengths == [("CPO", 20), ("MetaCPO", 20)]
    assert main(["benchmark", "--methods", "CPO-scratch", "--hyperparams", "n_steps:40", "-f", str(tmp_path)]) == 2
    assert "--methods trains none" in capsys.readouterr().err


def test_benchmark_adapts_cpo_scratch_under_the_trained_methods_limits(tmp_path, monkeypatch, capsys):
    """CPO-scratch was built without the --hyperparams cost_limit: it adapted under the family's default (5 on the
    total) while the trained methods adapted under the given limits, and its rows were judged against another
    limit."""
    limits = []
    original = AdaptationMixin.adaptation_steps

    def recording(self, env, n_updates=None, n_steps=None, on_step=None, target_kl=None):
        limits.append((type(self).__name__, self.constraints.as_mapping()))
        return original(self, env, n_updates, n_steps, on_step, target_kl)

    monkeypatch.setattr(AdaptationMixin, "adaptation_steps", recording)
    argv = ["benchmark", "--methods", "MetaCPO", "CPO-scratch", "-n", "160", "--n-tasks", "1", "--n-updates", "1"]
    argv += ["--n-eval-episodes", "1", "--n-steps", "40", "-f", str(tmp_path), "--hyperparams", "n_steps:40"]
    assert main([*argv, "cost_limit:40"]) == 0
    assert limits == [("MetaCPO", {"cost": 40.0}), ("CPO", {"cost": 40.0})]
    limits.clear()
    assert main([*argv, "cost_limit:{cost_hazards: 5, cost_speed: 10}", "env_kwargs:{speed_limit: 1.0}"]) == 0
    expected = {"cost_hazards": 5.0, "cost_speed": 10.0}
    assert limits == [("MetaCPO", expected), ("CPO", expected)]
    rows = list(csv.DictReader(open(sorted(tmp_path.glob("benchmark_*"))[-1] / "adaptation.csv", newline="")))
    assert {(r["method"], r["limit_cost_hazards"], r["limit_cost_speed"]) for r in rows} == {
        ("MetaCPO", "5.0", "10.0"),
        ("CPO-scratch", "5.0", "10.0"),
    }
    capsys.readouterr()
    # methods whose configs disagree on the limits are refused before anything trains
    config = tmp_path / "cpo.yml"
    config.write_text("Toy2DNav:\n  n_timesteps: 160\n  n_steps: 40\n  cost_limit: 7.0\n")
    import sb3_metacpo.config

    shipped = sb3_metacpo.config.default_config_file
    monkeypatch.setattr(sb3_metacpo.config, "default_config_file", lambda algo: config if algo == "CPO" else shipped(algo))
    argv = ["benchmark", "--methods", "MetaCPO", "CPO", "-n", "160", "--n-tasks", "1", "-f", str(tmp_path / "refused")]
    assert main(argv) == 2
    assert "different cost limits" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def _named_cost_run(log_folder):
    """CPO trained on Toy2DNav with the total and two named costs limited."""
    hyperparams = ["n_envs:2", "n_steps:100", "cost_limit:{cost: 100, cost_hazards: 5, cost_speed: 10}"]
    assert train(log_folder, algo="CPO", hyperparams=[*hyperparams, "env_kwargs:{speed_limit: 1.0}"], n=200) == 0
    return log_folder / "CPO_Toy2DNav_1"


@pytest.mark.parametrize("command", ["evaluate", "adapt"])
def test_evaluate_and_adapt_judge_every_constraint(tmp_path, command, capsys):
    """With named costs limited, "under the limit" judged the total cost alone and the named costs were written
    nowhere: a pair over its cost_speed limit counted as under."""
    folder = _named_cost_run(tmp_path)
    config = yaml.safe_load((folder / "config.yml").read_text())
    assert config["cost_limits"] == {"cost": 100.0, "cost_hazards": 5.0, "cost_speed": 10.0}
    extra = ["--n-updates", "1"] if command == "adapt" else []
    assert main([command, str(folder), "--n-tasks", "2", "--n-eval-episodes", "2", "--no-progress", *extra]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(folder / f"{'adaptation' if command == 'adapt' else 'evaluation'}.csv", newline="")))
    limits = {"cost": 100.0, "cost_hazards": 5.0, "cost_speed": 10.0}
    for row in rows:  # the oracle: each cost against its own limit
        assert row["limit_cost_hazards"] == "5.0" and row["limit_cost_speed"] == "10.0"
        assert row["within_limits"] == str(all(float(row[name]) <= limit for name, limit in limits.items()))
    # the policy drives fast: over the speed limit, the total far under its own, so a total-only verdict says under
    assert any(float(row["cost_speed"]) > 10 and float(row["cost"]) <= 100 for row in rows)
    for k in sorted({row["update"] for row in rows}):
        under = sum(row["within_limits"] == "True" for row in rows if row["update"] == k)
        assert f"  {under}/2 (limits cost 100, cost_hazards 5, cost_speed 10)" in out


def test_every_option_has_help():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(subparsers.choices) == {"train", "evaluate", "adapt", "benchmark", "plot"}
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    train_options = {o for a in subparsers.choices["train"]._actions for o in a.option_strings}
    assert {"--algo", "--family", "--env", "-conf", "--conf-file", "--hyperparams", "-n", "--n-timesteps", "--seed"} <= (
        train_options
    )
    assert {"-f", "--log-folder"} <= train_options


def test_module_entry_point_and_console_script():
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_metacpo", "train", "--help"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--hyperparams KEY:VALUE" in result.stdout and "--log-folder" in result.stdout
    assert '"sb3-metacpo=sb3_metacpo.cli:main"' in (ROOT / "setup.py").read_text()


def test_plot_command(run_folder, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["plot", str(run_folder), str(run_folder), "-o", str(out), "--title", "twice"]) == 0
    assert out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2  # nothing to plot there
    assert main(["plot", str(run_folder), str(tmp_path / "RUN_99"), "-o", str(out)]) == 2  # was skipped: one run plotted


def test_plot_prints_the_file_it_writes(run_folder, tmp_path, capsys):
    """-o plot_out printed plot_out, but matplotlib wrote plot_out.png; an unknown suffix was a traceback after the
    runs were read."""
    from sb3_metacpo.plots import write_records

    assert main(["plot", str(run_folder), "-o", str(tmp_path / "plot_out")]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "plot_out.png")]
    assert (tmp_path / "plot_out.png").stat().st_size > 0 and not (tmp_path / "plot_out").exists()
    assert main(["plot", str(run_folder), "-o", str(tmp_path / "curves.svg")]) == 0  # the suffix picks the format
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    records = [{"method": "MetaCPO", "task": 0, "seed": 0, "update": k, "return": float(k), "cost": 1.0} for k in range(2)]
    sources = [write_records(records, tmp_path / f"records_{i}.csv") for i in range(2)]
    capsys.readouterr()
    assert main(["plot", *map(str, sources), "--adaptation-out", str(tmp_path / "adapt")]) == 0
    written = [tmp_path / "adapt_0.png", tmp_path / "adapt_1.png"]
    assert capsys.readouterr().out.splitlines() == list(map(str, written))
    assert all(path.stat().st_size > 0 for path in written)
    for option in ("-o", "--adaptation-out"):
        assert main(["plot", str(run_folder), option, str(tmp_path / "curves.v2")]) == 2
        error = capsys.readouterr().err
        assert "curves.v2: matplotlib cannot write .v2 files; use one of" in error and ".png" in error
    assert not (tmp_path / "curves.v2").exists()


def test_optimizer_class_names_are_resolved_as_activation_names_are(tmp_path, capsys):
    """policy_kwargs: {optimizer_class: Adam} in a file reached the policy as the string ("'str' object is not
    callable"); the name is kept in hyperparams.yml, the class given to the constructor."""
    from sb3_metacpo.common.flat_adam import FlatAdam
    from sb3_metacpo.config import load_hyperparams, parse_overrides, to_constructor

    for name, cls in (("Adam", th.optim.Adam), ("torch.optim.SGD", th.optim.SGD), ("FlatAdam", FlatAdam)):
        overrides = parse_overrides([*TINY, f"policy_kwargs:{{net_arch: [16], optimizer_class: {name}, activation_fn: ReLU}}"])
        hyperparams = load_hyperparams("MetaCPO", "Toy2DNav", overrides=overrides)
        assert hyperparams["policy_kwargs"]["optimizer_class"] == name  # as written, for hyperparams.yml
        policy, _, _, kwargs = to_constructor(hyperparams)
        assert kwargs["policy_kwargs"]["optimizer_class"] is cls and kwargs["policy_kwargs"]["activation_fn"] is th.nn.ReLU
        model = MetaCPO(policy, "Toy2DNav", seed=0, **kwargs)
        assert type(model.policy.optimizer) is cls
    bad = tmp_path / "bad.yml"
    for name, expected in (
        ("Adamm", "optimizer_class = 'Adamm' is not an optimiser of torch.optim or the package's FlatAdam"),
        ("Adagrad", "optimizer_class = 'Adagrad' cannot be saved in a model archive"),
    ):
        bad.write_text(f"Toy2DNav:\n  policy_kwargs: {{optimizer_class: {name}}}\n")
        assert train(tmp_path / "runs", "-conf", str(bad), hyperparams=None) == 2
        error = capsys.readouterr().err
        assert f"bad.yml [Toy2DNav]: policy_kwargs.{expected}" in error
        assert "valid choices: FlatAdam, Adam, AdamW" in error
    assert not (tmp_path / "runs").exists()


def test_evaluating_a_run_with_another_algo_is_a_usage_error(run_folder, capsys):
    assert main(["evaluate", str(run_folder), "--algo", "CPO", "--n-eval-episodes", "1"]) == 2  # was a traceback
    assert "model.zip" in capsys.readouterr().err


def test_plot_out_without_learning_curves_is_a_usage_error(tmp_path, capsys):
    """-o names the learning-curves figure; given only adaptation records (a benchmark folder), it was ignored without
    a word and the adaptation curves went to their default file."""
    from sb3_metacpo.plots import write_records

    write_records(
        [{"method": "m", "task": 0, "seed": 0, "update": k, "return": 1.0, "cost": 2.0} for k in range(2)],
        tmp_path / "bench" / "adaptation.csv",
    )
    assert main(["plot", str(tmp_path / "bench"), "-o", str(tmp_path / "b.png")]) == 2
    assert "--adaptation-out" in capsys.readouterr().err and not (tmp_path / "bench" / "adaptation.png").exists()


def test_plot_of_a_progress_file_writes_beside_it(run_folder, tmp_path):
    """plot logs/<run>/progress.csv made its default output a path under the file itself (FileExistsError)."""
    progress = tmp_path / "run" / "progress.csv"
    progress.parent.mkdir()
    progress.write_bytes((run_folder / "progress.csv").read_bytes())
    assert main(["plot", str(progress)]) == 0
    assert (progress.parent / "learning_curves.png").stat().st_size > 0


def test_env_kwargs_take_the_familys_own_arguments(tmp_path, capsys):
    """env_kwargs were checked against TaskDistribution's arguments only: Toy2DNav's speed_limit was refused, and
    seed passed the check and failed later without naming the file and key."""
    family_options = ["meta_batch_size:2", "n_steps:100", "policy_kwargs:{net_arch: [16]}"]
    speed = [*family_options, "env_kwargs:{max_episode_steps: 50, speed_limit: 1.0}"]
    assert train(tmp_path / "speed", hyperparams=speed) == 0
    assert MetaCPO.load(str(tmp_path / "speed" / "MetaCPO_Toy2DNav_1" / "model.zip")).task_distribution.speed_limit == 1.0
    assert train(tmp_path / "seed", hyperparams=[*family_options, "env_kwargs:{seed: 3}"]) == 2
    assert "env_kwargs.seed cannot be set in a hyperparameter file; it is set by --seed" in capsys.readouterr().err


def test_a_namespaced_env_id_trains_into_one_run_folder(tmp_path):
    """ns/Env-v0 (as gymnasium's phys2d/... ids): the run folder's name held a '/', and the run failed after building
    the model."""
    line = lambda: Bandit(lambda a: -abs(a[0]), lambda a: {"cost": float(a[0] > 0.5)})  # noqa: E731
    gym.register("sb3metacpotest/SafeLine-v0", entry_point=line, max_episode_steps=20)
    argv = ["train", "--algo", "CPO", "--env", "sb3metacpotest/SafeLine-v0", "-n", "64", "-f", str(tmp_path)]
    assert main([*argv, "--no-progress", "--hyperparams", "n_steps:32", "n_critic_updates:1"]) == 0
    (folder,) = tmp_path.iterdir()
    assert folder.name == "CPO_sb3metacpotest-SafeLine-v0_1" and (folder / "model.zip").exists()


def test_usage_errors_exit_2_before_training(tmp_path, capsys):
    """A negative --n-updates or --adapt-target-kl and an unknown env id gave tracebacks and exit 1 (the benchmark
    after training every method); --hyperparams of a benchmark without MetaCPO were checked against MetaCPO."""
    for argv in (
        ["adapt", str(tmp_path), "--n-updates", "-1"],
        ["benchmark", "--adapt-target-kl", "-1", "--dry-run"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert main(["train", "--algo", "CPO", "--env", "Foo-v0", "-f", str(tmp_path), "--no-progress"]) == 2
    assert "Foo" in capsys.readouterr().err
    # a family given as --env trained, then its run could not be evaluated; n_steps 1 failed after training
    assert main(["train", "--algo", "CPO", "--env", "Toy2DNav", "-f", str(tmp_path), "--no-progress"]) == 2
    assert "Toy2DNav is a task family, not an env id: use --family Toy2DNav" in capsys.readouterr().err
    for argv in (
        ["adapt", str(tmp_path), "--n-steps", "1"],
        ["benchmark", "--n-steps", "1", "--dry-run"],
        ["train", "--family", "Toy2DNav", "--seed", str(2**32)],  # was blamed on env_kwargs
        ["benchmark", "--seeds", "-1", "--dry-run"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    # tracebacks after the model was built: an unknown device, a file as the log folder
    assert train(tmp_path / "device", "--device", "foo") == 2
    assert "--device foo" in capsys.readouterr().err
    assert train(tmp_path / "auto", "--device", "auto") == 0  # SB3's "auto" stays valid
    (tmp_path / "a_file").write_text("")
    assert train(tmp_path / "a_file") == 2
    assert "is a file" in capsys.readouterr().err
    argv = ["benchmark", "--methods", "CPO", "--hyperparams", "target_kl:0.02", "--dry-run"]
    assert main(argv) == 0


def test_plot_without_matplotlib_and_with_a_bad_limit_is_a_one_line_error(run_folder, tmp_path, capsys, monkeypatch):
    """Without matplotlib the plot command ended in a traceback; --cost-limit took NaN and negative numbers."""
    import builtins

    for bad in ("nan", "-1", "inf"):
        with pytest.raises(SystemExit) as stopped:
            main(["plot", str(run_folder), "--cost-limit", bad])
        assert stopped.value.code == 2 and "must be a finite number >= 0 (a cost limit)" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(run_folder), "-o", str(tmp_path / "curves.png")]) == 2
    assert "plotting needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "adapt"])
def test_a_family_with_other_shapes_is_a_usage_error(run_folder, capsys, command):
    """--family PointGoalHazard on a Toy2DNav model failed inside the load with a 20-line traceback (exit 1)."""
    assert main([command, str(run_folder), "--family", "PointGoalHazard", "--n-eval-episodes", "1", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"sb3-metacpo {command}: error: --family PointGoalHazard has observation/action shapes (44,)/(2,)" in error
    assert "was trained on (2,)/(2,) (Toy2DNav)" in error


def test_plot_of_files_it_cannot_read_is_a_usage_error(tmp_path, capsys):
    """An empty records file, a progress.csv without the steps column, records lacking columns and a binary file
    ended in tracebacks (exit 1), where a missing path was already a one-line error."""
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "progress.csv").write_text("rollout/ep_rew_mean\n1.0\n")
    (tmp_path / "columns.csv").write_text("method,task\nMetaCPO,0\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 8)
    (tmp_path / "header_only").mkdir()
    (tmp_path / "header_only" / "progress.csv").write_text("time/total_timesteps,rollout/ep_rew_mean\n")
    (tmp_path / "a_folder.csv").mkdir()
    expected = {
        "empty.csv": "no adaptation records",
        "run": "progress.csv has no numeric 'time/total_timesteps' column",
        "header_only": "progress.csv holds no logged values yet",
        "a_folder.csv": "cannot be read",
        "columns.csv": "record 0 lacks",
        "binary.csv": "not a CSV file",
    }
    for name, message in expected.items():
        assert main(["plot", str(tmp_path / name)]) == 2, name
        error = capsys.readouterr().err
        assert error.startswith("sb3-metacpo plot: error: ") and message in error, (name, error)


def test_first_interrupt_stops_training_and_a_second_aborts():
    """A first SIGINT only asks the callback to stop (the run is then saved); a second one raises."""
    import signal

    from sb3_metacpo.cli import StopOnInterrupt, first_interrupt_stops

    stopper = StopOnInterrupt()
    before = signal.getsignal(signal.SIGINT)
    with first_interrupt_stops(stopper):
        assert not stopper.requested and stopper._on_step()
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.requested and not stopper._on_step()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("algo", ["MetaCPO", "CPO"])
def test_train_interrupted_saves_the_last_completed_update(tmp_path, monkeypatch, capsys, algo):
    """Ctrl-C during `train` lost the whole run (no model.zip); now the run stops at the next env step and is saved."""
    import signal

    from stable_baselines3.common.callbacks import BaseCallback

    from sb3_metacpo import cli

    class InterruptAfterAnUpdate(BaseCallback):
        def _on_step(self):
            if self.model._n_updates >= 1 and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return True

    real_learn = {"MetaCPO": MetaCPO.learn, "CPO": CPO.learn}[algo]

    def learn_with_an_interrupt(self, total_timesteps, callback=None, **kwargs):
        return real_learn(self, total_timesteps, callback=[InterruptAfterAnUpdate(), callback], **kwargs)

    monkeypatch.setattr({"MetaCPO": MetaCPO, "CPO": CPO}[algo], "learn", learn_with_an_interrupt)
    hyperparams = TINY if algo == "MetaCPO" else ["n_steps:100", "policy_kwargs:{net_arch: [16]}"]
    assert train(tmp_path, algo=algo, hyperparams=hyperparams, n=100_000) == 0
    folder = tmp_path / f"{algo}_Toy2DNav_1"
    model = cli.ALGOS[algo].load(str(folder / "model.zip"))
    assert 1 <= model._n_updates <= 2 and model.num_timesteps < 100_000
    assert "(stopped by Ctrl-C after" in capsys.readouterr().out
    assert (folder / "learning_curves.png").exists()


def test_a_model_file_alone_is_evaluated_with_the_algorithm_of_its_archive(run_folder, tmp_path, capsys):
    """A .zip without config.yml needed --algo, although the archive records its algorithm."""
    import shutil

    shutil.copy(run_folder / "model.zip", tmp_path / "alone.zip")
    assert main(["evaluate", str(tmp_path / "alone.zip"), "--n-tasks", "1", "--n-eval-episodes", "1", "--no-progress"]) == 0
    assert "MetaCPO from" in capsys.readouterr().out
    MetaCPO.load(str(run_folder / "model.zip")).policy.save(tmp_path / "policy_alone.zip")
    assert main(["evaluate", str(tmp_path / "policy_alone.zip"), "--no-progress"]) == 2
    assert "holds a policy saved alone (policy.save), not a model" in capsys.readouterr().err
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    assert main(["evaluate", str(tmp_path / "broken.zip"), "--no-progress"]) == 2
    assert "is not a zip archive of a saved model" in capsys.readouterr().err


def test_family_named_on_a_model_file_alone_keeps_the_models_held_out_tasks(tmp_path):
    """``--family Toy2DNav`` on a bare archive built the family's defaults: a model trained with test_seed 7 and 1-5
    hazards was evaluated on 4-5-hazard "held-out" tasks, training tasks of that model (tasks audit). A config's
    env_kwargs no longer go to another family either."""
    from sb3_metacpo.cli import LoadedRun
    from sb3_metacpo.tasks import make_task_distribution

    dist = make_task_distribution(
        "Toy2DNav", seed=3, test_seed=7, train_ranges={"n_hazards": (1, 5)}, test_ranges={"n_hazards": (6, 8)}
    )
    MetaCPO("MlpPolicy", dist, n_steps=100, meta_batch_size=2, policy_kwargs=dict(net_arch=[8])).save(tmp_path / "alone")
    for family in (None, "Toy2DNav"):
        run = LoadedRun(tmp_path / "alone.zip", family=family)
        tasks = run.require_distribution("evaluate").test_tasks(3)
        assert tasks == dist.test_tasks(3) and not any(dist.is_training_task(task) for task in tasks), family
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "model.zip").write_bytes((tmp_path / "alone.zip").read_bytes())
    (run_folder / "config.yml").write_text(
        yaml.safe_dump({"algo": "MetaCPO", "family": "PointGoalHazard", "hyperparams": {"env_kwargs": {"n_vases": 1}}})
    )
    assert (
        LoadedRun(run_folder, family="Toy2DNav").distribution.get_params()
        == make_task_distribution("Toy2DNav", seed=0).get_params()
    )  # PointGoalHazard's env_kwargs are not Toy2DNav's arguments
    (run_folder / "config.yml").write_text(yaml.safe_dump({"algo": "MetaCPO", "seed": 3}))  # a config without a family
    assert LoadedRun(run_folder, family="Toy2DNav").distribution.test_tasks(3) == dist.test_tasks(3)
    # saved arguments the family does not take: a usage error, not a traceback
    import json
    import zipfile

    from sb3_metacpo.cli import CLIError
    from sb3_metacpo.common.serialization import METADATA

    metadata = json.loads(zipfile.ZipFile(tmp_path / "alone.zip").read(METADATA))
    metadata["task_distribution"]["params"]["old_key"] = 1
    rewrite_archive(tmp_path / "alone.zip", tmp_path / "edited.zip", {METADATA: json.dumps(metadata).encode()})
    with pytest.raises(CLIError, match=r"its saved Toy2DNav task distribution does not load: .*old_key"):
        LoadedRun(tmp_path / "edited.zip", family="Toy2DNav")


def test_a_run_stopped_before_its_first_log_line_is_saved_without_curves(tmp_path, capsys):
    """A run interrupted in its first iteration has an empty progress.csv: the plot after saving raised a traceback."""
    from sb3_metacpo.cli import _plot_learning, _try_plot

    (tmp_path / "progress.csv").write_text("")
    _try_plot(lambda: _plot_learning(tmp_path, "run"), "learning curves")
    assert "no learning curves: " in capsys.readouterr().err and not (tmp_path / "learning_curves.png").exists()


def test_the_table_gives_no_spread_for_one_pair_and_leaves_missing_values_out():
    """One pair printed ``± 0.00`` (the spread of one value is undefined, not 0), the sd was the population one, and
    a NaN cost printed ``nan ± nan`` and counted as over the limit (statistics audit)."""
    from sb3_metacpo.cli import _table

    def record(method, task, ret, cost):
        return {"method": method, "update": 0, "task": task, "seed": 0, "return": ret, "cost": cost, "cost_limit": 5.0}

    text = _table(
        [
            record("one", 0, -3.0, 4.0),
            record("three", 0, 1.0, 2.0),
            record("three", 1, 2.0, 9.0),
            record("three", 2, 6.0, float("nan")),
        ]
    )
    one, three = (line for line in text.splitlines() if line.startswith(("one ", "three ")))
    assert "-3.00 (1 pair)" in one and "4.00 (1 pair)" in one and "1/1 (limit 5)" in one and "±" not in one
    # returns 1, 2, 6: mean 3, sample sd sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7); costs 2 and 9 (one missing)
    assert f"3.00 ± {7**0.5:6.2f}" in three
    assert f"5.50 ± {((2 - 5.5) ** 2 * 2) ** 0.5:6.2f} (1 without a value)" in three
    assert "1/2 (limit 5)" in three and "nan" not in text


def register_line_env(env_id: str, info_of=lambda a: {"cost": float(a[0] > 0.5)}, **kwargs) -> str:
    if env_id not in gym.registry:
        line = lambda: Bandit(lambda a: -abs(a[0]), info_of, **kwargs)  # noqa: E731
        gym.register(env_id, entry_point=line, max_episode_steps=20)
    return env_id


def test_a_conf_file_without_the_env_ids_section_is_a_usage_error(tmp_path, capsys):
    """The shipped file has no section for an arbitrary env id, and training goes on with the constructor's defaults;
    a file of the user's without it (a misspelled section) trained silently on the defaults too."""
    env_id = register_line_env("sb3metacpotest/ConfLine-v0")
    conf = tmp_path / "mine.yml"
    conf.write_text("sb3metacpotest/ConfLine-v1: {n_steps: 32, cost_limit: 1.0}\n")
    argv = ["train", "--algo", "CPO", "--env", env_id, "-n", "64", "-f", str(tmp_path / "runs"), "--no-progress"]
    assert main([*argv, "-conf", str(conf)]) == 2
    assert "mine.yml has no section 'sb3metacpotest/ConfLine-v0'; its sections: sb3metacpotest/ConfLine-v1" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "runs").exists()
    conf.write_text("sb3metacpotest/ConfLine-v0: {n_steps: 32, cost_limit: 1.0, n_critic_updates: 1}\n")
    assert main([*argv, "-conf", str(conf), "--verbose", "0"]) == 0
    assert CPO.load(str(tmp_path / "runs" / "CPO_sb3metacpotest-ConfLine-v0_1" / "model.zip")).n_steps == 32


class _GridActions(gym.ActionWrapper):
    """A 2x2 Box action space (the policy takes flat ones), its first entry acting."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Box(-1, 1, (2, 2), np.float32)

    def action(self, action):
        return np.asarray(action).reshape(-1)[:1]


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        ("sb3metacpotest/CostlessLine-v0", r"reports no info\['cost'\]"),  # a KeyError traceback from inside learn
        ("sb3metacpotest/GridLine-v0", r"needs a flat Box action space, got shape \(2, 2\)"),
        ("CartPole-v1", r"needs a Box \(continuous\) action space, got Discrete\(2\)"),  # SB3's AssertionError
    ],
)
def test_an_env_id_the_policy_cannot_train_on_is_a_usage_error_before_the_run_folder(tmp_path, capsys, env_id, expected):
    register_line_env("sb3metacpotest/CostlessLine-v0", info_of=lambda a: {})
    if "sb3metacpotest/GridLine-v0" not in gym.registry:
        grid = lambda: _GridActions(Bandit(lambda a: 0.0, lambda a: {"cost": 0.0}))  # noqa: E731
        gym.register("sb3metacpotest/GridLine-v0", entry_point=grid, max_episode_steps=20)
    argv = ["train", "--algo", "CPO", "--env", env_id, "-n", "64", "-f", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"sb3-metacpo train: error: --env {env_id}.*{expected}", err) and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_output_paths_below_a_file_are_usage_errors_before_any_work(run_folder, tmp_path, capsys, monkeypatch):
    """-o naming a file (evaluate, adapt) or a figure below one (plot) failed with a FileExistsError traceback after
    all the evaluations or adaptations were done."""
    import sb3_metacpo.cli as cli

    monkeypatch.setattr(cli, "run_episodes", lambda *args: pytest.fail("evaluated before checking -o"))
    monkeypatch.setattr(cli, "adaptation_records", lambda *args, **kwargs: pytest.fail("adapted before checking -o"))
    (tmp_path / "a_file").write_text("")
    for argv in (
        ["evaluate", str(run_folder), "-o", str(tmp_path / "a_file")],
        ["adapt", str(run_folder), "-o", str(tmp_path / "a_file" / "sub")],
        ["plot", str(run_folder), "-o", str(tmp_path / "a_file" / "curves.png")],
        ["plot", str(run_folder), "--adaptation-out", str(tmp_path / "a_file" / "adaptation.png")],
    ):
        assert main([*argv, "--no-progress"] if argv[0] != "plot" else argv) == 2
        assert f"-out: {tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == ""


def test_a_cpo_model_file_alone_is_evaluated_on_the_env_id_it_saved(tmp_path, capsys):
    """Without config.yml beside it, a CPO trained on an env id asked for --family, which it cannot take; the archive
    records the id. An entry-point id (``module:Env``) is not taken from a file: gymnasium would import the module."""
    import json
    import shutil
    import zipfile

    from sb3_metacpo.common.serialization import METADATA

    env_id = register_line_env("sb3metacpotest/AloneLine-v0")
    argv = ["train", "--algo", "CPO", "--env", env_id, "-n", "64", "-f", str(tmp_path), "--no-progress", "--verbose", "0"]
    assert main([*argv, "--hyperparams", "n_steps:32", "n_critic_updates:1"]) == 0
    alone = tmp_path / "alone" / "model.zip"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "CPO_sb3metacpotest-AloneLine-v0_1" / "model.zip", alone)
    assert main(["evaluate", str(alone), "--n-eval-episodes", "2", "--no-progress"]) == 0
    assert f"task {env_id}: return" in capsys.readouterr().out
    assert (alone.parent / "evaluation.csv").exists()
    metadata = json.loads(zipfile.ZipFile(alone).read(METADATA))
    metadata["env_source"] = {"id": "antigravity:Env-v0"}
    rewrite_archive(alone, tmp_path / "entry_point.zip", {METADATA: json.dumps(metadata).encode()})
    assert main(["evaluate", str(tmp_path / "entry_point.zip"), "--no-progress"]) == 2
    assert "env_source {'id': 'antigravity:Env-v0'} does not name an env id" in capsys.readouterr().err


def test_the_rl_zoos_dict_strings_are_read_without_running_them(tmp_path, capsys):
    """RL Zoo files write ``policy_kwargs: "dict(net_arch=[64, 64], activation_fn=nn.ReLU)"``; it was refused as a
    string. It is read as a mapping of literals and names (never evaluated), recorded as the mapping in
    hyperparams.yml; code is refused with a message naming both forms."""
    from sb3_metacpo.config import ConfigError, load_hyperparams, to_constructor

    zoo = "dict(net_arch=dict(pi=[16], vf=[8]), activation_fn=nn.ReLU, log_std_init=-0.5, ortho_init=False)"
    resolved = load_hyperparams("CPO", "Toy2DNav", None, {"policy_kwargs": zoo})
    assert resolved["policy_kwargs"] == {
        "net_arch": {"pi": [16], "vf": [8]},
        "activation_fn": "nn.ReLU",
        "log_std_init": -0.5,
        "ortho_init": False,
    }
    assert to_constructor(resolved)[3]["policy_kwargs"]["activation_fn"] is th.nn.ReLU
    marker = tmp_path / "ran"
    for code in (f"__import__('pathlib').Path({str(marker)!r}).touch()", f"dict(a=open({str(marker)!r}, 'w'))", "dict(**x)"):
        with pytest.raises(ConfigError, match=r"policy_kwargs = .* is not a mapping: write it as a YAML mapping"):
            load_hyperparams("CPO", "Toy2DNav", None, {"policy_kwargs": code})
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"learning_rate = 'lin_0.001' .*the RL Zoo's schedules \(lin_<value>\) are not"):
        load_hyperparams("CPO", "Toy2DNav", None, {"learning_rate": "lin_0.001"})
    assert train(tmp_path, hyperparams=[*TINY[:2], "policy_kwargs:dict(net_arch=[16], activation_fn=nn.ReLU)", TINY[3]]) == 0
    folder = tmp_path / "MetaCPO_Toy2DNav_1"
    assert yaml.safe_load((folder / "hyperparams.yml").read_text())["Toy2DNav"]["policy_kwargs"] == {
        "net_arch": [16],
        "activation_fn": "nn.ReLU",
    }
    assert MetaCPO.load(str(folder / "model.zip")).policy.activation_fn is th.nn.ReLU
