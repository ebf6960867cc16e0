"""sb3_metacpo.plots: learning curves, adaptation curves, GIFs, and the ImportError naming the extra."""

import csv
import importlib.util
import sys

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest
import yaml

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.plots import (
    load_records,
    plot_adaptation_curves,
    plot_learning_curves,
    policy_gif,
    read_progress,
    record_frames,
    records_from_history,
    save_gif,
    side_by_side_gif,
    write_records,
)

KEYS = ["time/total_timesteps", "rollout/ep_rew_mean", "rollout/ep_cost_mean", "meta/post_adapt_ep_cost_mean"]


def fake_run(folder, seed, n_rows=6, cost_limit=5.0, post=False):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "progress.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*KEYS, "train/cpo_case"])
        for i in range(n_rows):
            after = 7 - i if post else ""
            writer.writerow([(i + 1) * 1000, -100 + 10 * i + rng.normal(), 8 - i + rng.normal(), after, "dual"])
    config = {"algo": "MetaCPO", "family": "Toy2DNav", "cost_limit": cost_limit}
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    return folder


def records():
    return [
        {"method": method, "task": task, "seed": 0, "update": k, "return": -50 + 10 * k + task, "cost": 6 - k, "cost_limit": 5}
        for method in ("MetaCPO", "CPO")
        for task in range(2)
        for k in range(3)
    ]


def test_learning_curves_of_several_seeds(tmp_path):
    runs = [fake_run(tmp_path / f"MetaCPO_Toy2DNav_{i}", seed=i, n_rows=5 + i) for i in (1, 2)]
    progress = read_progress(runs[0])
    assert "train/cpo_case" not in progress and np.isnan(progress["meta/post_adapt_ep_cost_mean"]).all()
    out = tmp_path / "curves.png"
    figure = plot_learning_curves(runs, out, title="two seeds")
    assert out.stat().st_size > 10_000
    cost_axis = figure.axes[1]
    assert any(line.get_label() == "cost limit 5" for line in cost_axis.get_lines())  # from config.yml
    assert any("(2 runs)" in line.get_label() for line in cost_axis.get_lines())  # the seeds are averaged


def test_runs_under_different_limits_are_not_averaged_as_seeds(tmp_path):
    """Two runs of one algorithm and family under limits 5 and 3 were averaged as "(2 runs)" and only the first
    run's limit was drawn."""
    runs = [fake_run(tmp_path / f"MetaCPO_Toy2DNav_{i}", seed=i, cost_limit=limit) for i, limit in ((1, 5.0), (2, 3.0))]
    labels = [line.get_label() for line in plot_learning_curves(runs).axes[1].get_lines()]
    assert "cost limit 5" in labels and "cost limit 3" in labels
    assert "MetaCPO Toy2DNav, limit 5" in labels and "MetaCPO Toy2DNav, limit 3" in labels
    assert not any("(2 runs)" in label for label in labels)
    # a limit given is the one drawn, and the runs are averaged under it
    labels = [line.get_label() for line in plot_learning_curves(runs, cost_limit=4.0).axes[1].get_lines()]
    assert [label for label in labels if label.startswith("cost limit")] == ["cost limit 4"]
    assert any("(2 runs)" in label for label in labels)


def test_the_after_adaptation_curve_counts_the_runs_it_averages(tmp_path):
    """The legend of the dashed after-adaptation curve said "(2 runs)" where one run of the two had such values."""
    runs = [fake_run(tmp_path / "a", seed=0, post=True), fake_run(tmp_path / "b", seed=1, post=False)]
    labels = [line.get_label() for line in plot_learning_curves(runs, labels=["X", "X"]).axes[1].get_lines()]
    assert "X, after adaptation" in labels and "X (2 runs), all batches" in labels


def test_adaptation_curves_from_dicts_and_csv(tmp_path):
    path = write_records(records(), tmp_path / "adaptation.csv")
    loaded = load_records(path)
    assert loaded[0]["update"] == 0 and isinstance(loaded[0]["return"], float) and loaded[0]["cost_limit"] == 5.0
    for source, out in ((records(), tmp_path / "a.png"), (path, tmp_path / "b.png")):
        figure = plot_adaptation_curves(source, out)
        assert out.stat().st_size > 10_000
        assert any(line.get_label() == "cost limit 5" for line in figure.axes[1].get_lines())
    with pytest.raises(ValueError, match=r"lacks \['cost'\]"):
        load_records([{"method": "m", "task": 0, "seed": 0, "update": 0, "return": 1.0}])


def test_records_from_adaptation_history():
    history = [
        {"update": 1, "ep_rew_mean": -80.0, "ep_cost_mean": 4.0, "cost_limit": 5.0, "cpo_case": "dual"},
        {"update": 2, "ep_rew_mean": -60.0, "ep_cost_mean": 3.0, "cost_limit": 5.0, "cpo_case": "trpo"},
    ]
    rows = records_from_history(history, "MetaCPO", task=3, seed=1)
    assert [(r["update"], r["return"], r["cost"]) for r in rows] == [(0, -80.0, 4.0), (1, -60.0, 3.0)]
    assert load_records(rows)[1]["task"] == 3


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install sb3-metacpo\[plots\]"):
        plot_adaptation_curves(records())


def test_toy_gif_single_and_side_by_side(tmp_path):
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    task = distribution.test_tasks(1)[0]
    models = {
        name: MetaCPO("MlpPolicy", distribution, meta_batch_size=2, n_steps=20, seed=seed)
        for seed, name in ((0, "a"), (1, "b"))
    }
    env = distribution.make_env(task, render_mode="rgb_array")
    frames = record_frames(models["a"], env, max_steps=5, size=64, label="a")
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8  # 5 steps + the last state
    assert len(record_frames(models["a"], env, every=4, size=64)) == 6  # 20 steps, every 4th frame, plus the last
    # Pillow merges identical consecutive frames, so a GIF may hold fewer frames than were recorded.
    path = policy_gif(models["a"], env, tmp_path / "one.gif", max_steps=5, size=64, label="a", deterministic=False)
    assert path.stat().st_size > 0 and imageio.mimread(path)[0].shape[:2] == (64, 64)
    path = side_by_side_gif(
        models,
        lambda: distribution.make_env(task, render_mode="rgb_array"),
        tmp_path / "two.gif",
        every=4,
        size=64,
        deterministic=False,
    )
    assert imageio.mimread(path)[0].shape[:2] == (64, 128)  # two panels
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        policy_gif(models["a"], distribution.make_env(task), tmp_path / "no.gif")


def test_gifs_show_the_stochastic_policy_by_default():
    """record_frames acted with the mean action by default, while every cost figure beside a GIF (the command line's,
    adaptation.png) is the stochastic policy's."""
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    env = distribution.make_env(distribution.test_tasks(1)[0], render_mode="rgb_array")
    asked = []

    class Recorder(RandomPolicy):
        def predict(self, observation, deterministic=False):
            asked.append(deterministic)
            return super().predict(observation, deterministic)

    record_frames(Recorder(env.action_space), env, max_steps=3, size=32)
    record_frames(Recorder(env.action_space), env, max_steps=2, size=32, deterministic=True)
    assert asked == [False, False, False, True, True]


def test_gifs_play_at_their_fps_and_side_by_side_panels_share_a_start(tmp_path):
    """imageio's mimsave took duration= in milliseconds, so 1/fps seconds became a delay of 0 ms; side_by_side_gif
    left the envs it made open, and with seed=None its panels started from different states."""
    from PIL import Image

    frames = [np.full((8, 8, 3), value, np.uint8) for value in (0, 80, 160, 240)]
    with Image.open(save_gif(frames, tmp_path / "slow.gif", fps=2)) as gif:
        assert gif.info["duration"] == 500
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=20)
    task = distribution.test_tasks(1)[0]
    made, starts = [], []

    class Closing(gym.Wrapper):
        closed = False

        def close(self):
            self.closed = True
            super().close()

    def make_env():
        env = Closing(distribution.make_env(task, render_mode="rgb_array"))
        made.append(env)
        return env

    class StartRecorder(RandomPolicy):
        def predict(self, observation, deterministic=False):
            if len(starts) < len(made):
                starts.append(np.array(observation))
            return super().predict(observation, deterministic)

    models = {"a": StartRecorder(distribution.spaces[1]), "b": StartRecorder(distribution.spaces[1])}
    side_by_side_gif(models, make_env, tmp_path / "pair.gif", seed=None, max_steps=3, size=32)
    assert len(made) == 2 and all(env.closed for env in made)
    np.testing.assert_array_equal(starts[0], starts[1])


class RandomPolicy:
    def __init__(self, action_space):
        self.action_space = action_space

    def predict(self, observation, deterministic=False):
        return self.action_space.sample(), None


@pytest.mark.skipif(importlib.util.find_spec("safety_gymnasium") is None, reason="needs safety-gymnasium")
def test_navigation_gif_renders_headless(tmp_path):
    distribution = make_task_distribution("PointGoalHazard", seed=0)
    env = distribution.make_env(distribution.test_tasks(1)[0], render_mode="rgb_array")
    env.action_space.seed(0)
    frames = record_frames(RandomPolicy(env.action_space), env, max_steps=3, size=64)
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    assert frames[0].std() > 5  # a rendered scene, not a blank image
    path = policy_gif(RandomPolicy(env.action_space), env, tmp_path / "goal.gif", max_steps=3, size=64)
    assert imageio.mimread(path)[0].shape[:2] == (64, 64)
    env.close()
