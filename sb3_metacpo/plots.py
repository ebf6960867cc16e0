"""Plots and GIFs: learning curves, adaptation curves and policies acting on a task.

matplotlib (curves) and Pillow (GIFs) are imported inside the functions; without them the functions
raise an ImportError naming the extra to install: ``pip install sb3-metacpo[plots]``.

**Learning curves** (:func:`plot_learning_curves`) read the ``progress.csv`` that SB3's CSV logger writes in a run
folder (``sb3-metacpo train`` writes one per run; in Python, ``model.set_logger(configure(folder, ["csv"]))``).
Columns used: ``time/total_timesteps`` (x), ``rollout/ep_rew_mean`` and ``rollout/ep_cost_mean`` (the mean over
the last episodes of every batch: for MetaCPO/MetaTRPO these mix pre- and post-adaptation batches), and, when
present (MetaCPO, MetaTRPO), ``meta/post_adapt_ep_{rew,cost}_mean`` (the training tasks' batches after the inner
updates) and ``meta/cost_limit``. Runs with the same label
(by default the algorithm and family of the run's ``config.yml``, else the folder name without its ``_<n>``
suffix) are different seeds: they are drawn as the mean with a ± one standard deviation band.

**Adaptation records** (:func:`plot_adaptation_curves`, :func:`load_records`) are a list of dicts, or a CSV file
with one row per dict, with the columns

==============  ====================================================================================================
``method``      the label of the curve (e.g. ``"MetaCPO"``)
``task``        the held-out task (an index or any identifier)
``seed``        the training seed
``update``      adaptation updates made before the evaluation: 0 is the policy as trained
``return``      mean undiscounted episode return of the evaluation episodes
``cost``        mean undiscounted episode cost of the evaluation episodes
``cost_limit``  optional: the limit to draw (else pass ``cost_limit=``)
==============  ====================================================================================================

which is what ``sb3-metacpo adapt`` and ``sb3-metacpo benchmark`` write (``adaptation.csv``) and what
:func:`records_from_history` makes of a model's ``adaptation_history`` (whose statistics are those of the
adaptation batches, not of separate evaluation episodes). Each curve is the mean over tasks and seeds after each
update, with a ± one standard deviation band.

**GIFs** (:func:`record_frames`, :func:`save_gif`, :func:`policy_gif`, :func:`side_by_side_gif`): an env made with
``render_mode="rgb_array"``, e.g. ``distribution.make_env(task, render_mode="rgb_array")``. Toy2DNav draws itself
in numpy; the safety-gymnasium families render with MuJoCo headless, for which ``MUJOCO_GL`` is set to ``egl`` unless
it is already set (``osmesa`` is the software fallback where EGL is missing).
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:
    import gymnasium as gym
    from matplotlib.figure import Figure

PLOTS_EXTRA = "pip install sb3-metacpo[plots]"
RECORD_COLUMNS = ("method", "task", "seed", "update", "return", "cost")

X_KEY = "time/total_timesteps"
REWARD_KEY = "rollout/ep_rew_mean"
COST_KEY = "rollout/ep_cost_mean"
POST_ADAPT_KEYS = ("meta/post_adapt_ep_rew_mean", "meta/post_adapt_ep_cost_mean")


class PlotInputError(ValueError):
    """A run folder or records file that cannot be plotted (missing columns, no records, not a CSV file); the
    command line reports it as a usage error."""


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header, or a :class:`PlotInputError` naming the file when it is not one."""
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (csv.Error, UnicodeDecodeError) as error:
        raise PlotInputError(f"{path}: not a CSV file ({error})") from error
    except OSError as error:  # a folder, a file without read permission
        raise PlotInputError(f"{path}: cannot be read ({error.strerror or error})") from error


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(f"plotting needs matplotlib: {PLOTS_EXTRA}") from error
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; a backend chosen by the user before is kept
    import matplotlib.pyplot as plt

    return plt


# --- learning curves ---------------------------------------------------------------------------------------------
def read_progress(run: str | Path) -> dict[str, np.ndarray]:
    """The columns of a run's ``progress.csv`` (``run`` is the folder or the file) as float arrays, NaN where empty.

    Non-numeric columns (e.g. ``train/cpo_case``) are left out.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "progress.csv"
    if not path.exists():
        raise FileNotFoundError(f"no progress.csv at {path}: is this a run folder written with the csv logger?")
    rows = _csv_rows(path)
    columns: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else ():
        try:
            columns[key] = np.array([float(row[key]) if row.get(key) not in (None, "") else math.nan for row in rows])
        except ValueError:
            continue
    return columns


def run_config(run: str | Path) -> dict[str, Any]:
    """The ``config.yml`` of a run folder written by ``sb3-metacpo train`` ({} when there is none)."""
    path = Path(run) / "config.yml"
    if not path.exists():
        return {}
    with open(path) as handle:
        data = yaml.safe_load(handle)
    return data if isinstance(data, dict) else {}


def _run_label(run: Path, config: Mapping[str, Any]) -> str:
    if "algo" in config:
        return f"{config['algo']} {config.get('family') or config.get('env') or ''}".strip()
    return re.sub(r"_\d+$", "", run.name)


def _mean_band(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of several curves on a common grid (where they all have data); one curve is returned as is."""
    pairs = []
    for x, y in zip(xs, ys, strict=True):
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.any():
            pairs.append((x[keep], y[keep]))
    if not pairs:
        return np.array([]), np.array([]), np.array([])
    if len(pairs) == 1:
        x, y = pairs[0]
        return x, y, np.zeros_like(y)
    low, high = max(x[0] for x, _ in pairs), min(x[-1] for x, _ in pairs)
    n_points = max(len(x) for x, _ in pairs)
    grid = np.linspace(low, high, n_points) if high > low else np.array([low])
    values = np.stack([np.interp(grid, x, y) for x, y in pairs])
    return grid, values.mean(axis=0), values.std(axis=0)


def plot_learning_curves(
    runs: str | Path | Sequence[str | Path],
    path: str | Path | None = None,
    cost_limit: float | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Episode return and cost against env steps for one or several run folders, with the cost limit.

    :param runs: run folders (or ``progress.csv`` files); runs with the same label are averaged (seeds), unless
        their cost limits differ: then each limit's runs are a curve of their own, and every limit is drawn
    :param path: where to save the figure (PNG); None: only return it
    :param cost_limit: the limit to draw (default: each run's ``meta/cost_limit`` from the logs or ``cost_limit`` from
        its ``config.yml``; none drawn if neither has it); given, it is the only one drawn and runs are not split by
        limit
    :param labels: one label per run (default: from ``config.yml`` or the folder name)
    :param title: the figure title
    :return: the matplotlib figure (closed when saved to ``path``)
    """
    plt = _pyplot()
    run_paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not run_paths:
        raise ValueError("plot_learning_curves needs at least one run folder")
    if labels is not None and len(labels) != len(run_paths):
        raise ValueError(f"got {len(labels)} labels for {len(run_paths)} runs")
    runs_read: list[tuple[str, dict[str, np.ndarray], float | None]] = []  # label, progress, the run's cost limit
    for index, run in enumerate(run_paths):
        folder = run.parent if run.name == "progress.csv" else run
        config = run_config(folder)
        progress = read_progress(run)
        if not progress:
            raise PlotInputError(f"{run}: progress.csv holds no logged values yet (no rows, or no numeric column)")
        if X_KEY not in progress:
            raise PlotInputError(f"{run}: progress.csv has no numeric {X_KEY!r} column")
        label = labels[index] if labels is not None else _run_label(folder, config)
        run_limit = None
        if "meta/cost_limit" in progress and np.isfinite(progress["meta/cost_limit"]).any():
            run_limit = float(np.nanmax(progress["meta/cost_limit"]))
        elif isinstance(config.get("cost_limit"), (int, float)):
            run_limit = float(config["cost_limit"])
        runs_read.append((label, progress, run_limit))
    # Runs of one label are averaged as seeds, but runs under different limits are not seeds of one experiment:
    # such a label is split by limit, and every limit is drawn
    limits_of: dict[str, set[float | None]] = {}
    for label, _, run_limit in runs_read:
        limits_of.setdefault(label, set()).add(run_limit)
    groups: dict[str, list[dict[str, np.ndarray]]] = {}
    for label, progress, run_limit in runs_read:
        split = len(limits_of[label]) > 1 and cost_limit is None
        name = f"{label}, limit {'unknown' if run_limit is None else f'{run_limit:g}'}" if split else label
        groups.setdefault(name, []).append(progress)
    drawn = [cost_limit] if cost_limit is not None else sorted({limit for _, _, limit in runs_read if limit is not None})

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color_index, (label, progresses) in enumerate(groups.items()):
        color = f"C{color_index % 10}"
        for axis, key, post_key in zip(axes, (REWARD_KEY, COST_KEY), POST_ADAPT_KEYS, strict=True):
            has = [p for p in progresses if key in p and np.isfinite(p[key]).any()]
            has_post = [p for p in progresses if post_key in p and np.isfinite(p[post_key]).any()]
            curves = [(p[X_KEY], p[key], "-", "all batches" if has_post else "") for p in has]
            post = [(p[X_KEY], p[post_key], "--", "after adaptation") for p in has_post]
            for group, linestyle in ((curves, "-"), (post, "--")):
                if not group:
                    continue
                grid, mean, std = _mean_band([g[0] for g in group], [g[1] for g in group])
                what = group[0][3]
                seeds = f" ({len(group)} runs)" if len(group) > 1 else ""  # the runs this curve averages
                name = f"{label}{seeds}" + (f", {what}" if what else "")
                marker = "o" if len(grid) < 3 else None  # a curve of one or two points stays visible
                axis.plot(grid, mean, linestyle, color=color, marker=marker, label=name)
                if len(group) > 1:
                    axis.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)
    for index, limit in enumerate(drawn):
        axes[1].axhline(limit, color="red", linestyle=(":", "-.", "--")[index % 3], label=f"cost limit {limit:g}")
    for axis, name in zip(axes, ("episode return", "episode cost"), strict=True):
        axis.set_xlabel("env steps")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:  # no curve when no episode ended yet
            axis.legend(fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig: Figure, path: str | Path | None, plt: Any) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# --- adaptation curves -------------------------------------------------------------------------------------------
def load_records(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Adaptation records (see the module docstring) from a CSV file or an iterable of dicts, checked and typed.

    :param source: a CSV file written by :func:`write_records` (or the CLI), or the records as dicts
    :return: the records, with ``update`` an int and ``return``, ``cost`` (and ``cost_limit``) floats
    """
    if isinstance(source, (str, Path)):
        rows = _csv_rows(Path(source))
        where = str(source)
    else:
        rows = [dict(row) for row in source]
        where = "records"
    records = []
    for index, row in enumerate(rows):
        missing = [column for column in RECORD_COLUMNS if column not in row]
        if missing:
            raise PlotInputError(f"{where}: record {index} lacks {missing}; records need the columns {list(RECORD_COLUMNS)}")
        record = dict(row)
        try:
            record["update"] = int(row["update"])
            record["return"] = float(row["return"])
            record["cost"] = float(row["cost"])
            if row.get("cost_limit") not in (None, ""):
                record["cost_limit"] = float(row["cost_limit"])
        except (TypeError, ValueError) as error:
            message = f"{where}: record {index}: update, return, cost and cost_limit must be numbers ({error})"
            raise PlotInputError(message) from error
        record["method"] = str(row["method"])
        records.append(record)
    if not records:
        raise PlotInputError(f"{where}: no adaptation records")
    return records


def write_records(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write adaptation records as CSV (the columns of the first record, the record columns first).

    :param records: adaptation records (dicts with at least :data:`RECORD_COLUMNS`)
    :param path: the CSV file to write (its folder is created)
    :return: ``path``
    """
    rows = [dict(r) for r in records]
    columns = list(RECORD_COLUMNS) + [c for c in rows[0] if c not in RECORD_COLUMNS] if rows else list(RECORD_COLUMNS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def records_from_history(
    history: Sequence[Mapping[str, Any]], method: str, task: Any = 0, seed: Any = 0
) -> list[dict[str, Any]]:
    """Records from a MetaCPO/MetaTRPO ``adaptation_history`` (one entry per update k, whose ``ep_rew_mean`` and
    ``ep_cost_mean`` are those of the batch collected *before* update k, i.e. by the policy after k - 1 updates).

    :param history: a model's ``adaptation_history``
    :param method: the records' ``method`` label
    :param task: the records' ``task`` label
    :param seed: the records' ``seed`` label
    """
    return [
        {
            "method": method,
            "task": task,
            "seed": seed,
            "update": int(entry["update"]) - 1,
            "return": float(entry["ep_rew_mean"]),
            "cost": float(entry["ep_cost_mean"]),
            **({"cost_limit": float(entry["cost_limit"])} if entry.get("cost_limit") is not None else {}),
        }
        for entry in history
    ]


def plot_adaptation_curves(
    records: str | Path | Iterable[Mapping[str, Any]],
    path: str | Path | None = None,
    cost_limit: float | None = None,
    title: str | None = None,
) -> Figure:
    """Return and cost after each adaptation update, per method: mean over tasks and seeds, ± one std.

    :param records: adaptation records (list of dicts or a CSV file, see the module docstring)
    :param path: where to save the figure (PNG); None: only return it
    :param cost_limit: the limit to draw (default: the records' ``cost_limit``)
    :param title: the figure's title (None: none)
    """
    plt = _pyplot()
    rows = load_records(records)
    if cost_limit is None:
        limits = [r["cost_limit"] for r in rows if "cost_limit" in r]
        cost_limit = limits[0] if limits else None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        updates = sorted({r["update"] for r in mine})
        n_curves = len({(r["task"], r["seed"]) for r in mine})
        for axis, key in zip(axes, ("return", "cost"), strict=True):
            values = [np.array([r[key] for r in mine if r["update"] == k]) for k in updates]
            mean, std = np.array([v.mean() for v in values]), np.array([v.std() for v in values])
            axis.plot(updates, mean, "-o", label=f"{method} ({n_curves} task-seed pairs)")
            axis.fill_between(updates, mean - std, mean + std, alpha=0.15)
    if cost_limit is not None:
        axes[1].axhline(cost_limit, color="red", linestyle=":", label=f"cost limit {cost_limit:g}")
    all_updates = sorted({r["update"] for r in rows})
    for axis, name in zip(axes, ("episode return", "episode cost"), strict=True):
        axis.set_xlabel("adaptation updates")
        axis.set_ylabel(name)
        axis.set_xticks(all_updates)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


# --- GIFs --------------------------------------------------------------------------------------------------------
def _imaging() -> tuple[Any, Any]:
    try:
        from PIL import Image, ImageDraw
    except ImportError as error:
        raise ImportError(f"GIFs need Pillow: {PLOTS_EXTRA}") from error
    return Image, ImageDraw


def record_frames(
    model: Any,
    env: gym.Env,
    seed: int | None = 0,
    max_steps: int | None = None,
    every: int = 1,
    size: int = 128,
    label: str | None = None,
    deterministic: bool = False,
) -> list[np.ndarray]:
    """Frames of one episode of ``model`` (anything with SB3's ``predict``) on ``env``, resized and labelled.

    :param model: what acts (its ``predict``; an adapted model acts with its adapted parameters)
    :param env: an env made with ``render_mode="rgb_array"``
    :param seed: the episode's reset seed (None: continue the env's stream)
    :param max_steps: stop after this many steps (default: the end of the episode)
    :param every: keep every ``every``-th frame
    :param size: frame size in pixels (square)
    :param label: text drawn on a band at the top of each frame
    :param deterministic: act with the policy's mean action (default: the stochastic policy, whose cost CPO
        constrains and the package evaluates, so that the GIF shows the behaviour the cost figures describe)
    """
    Image, ImageDraw = _imaging()
    if getattr(env, "render_mode", None) != "rgb_array":
        raise ValueError(
            "record_frames needs an env made with render_mode='rgb_array', e.g. "
            "distribution.make_env(task, render_mode='rgb_array')"
        )
    if every < 1 or size < 16:
        raise ValueError(f"every must be >= 1 and size >= 16, got {every} and {size}")
    os.environ.setdefault("MUJOCO_GL", "egl")  # read by gymnasium's MuJoCo renderer when it is first used
    observation, _ = env.reset(seed=seed)
    frames: list[np.ndarray] = []
    step, done = 0, False
    while not done and (max_steps is None or step < max_steps):
        if step % every == 0:
            frames.append(_frame(env.render(), size, label, Image, ImageDraw))
        action, _ = model.predict(observation, deterministic=deterministic)
        observation, _, terminated, truncated, _ = env.step(action)
        done, step = bool(terminated or truncated), step + 1
    frames.append(_frame(env.render(), size, label, Image, ImageDraw))  # the last state
    return frames


def _frame(image: Any, size: int, label: str | None, Image: Any, ImageDraw: Any) -> np.ndarray:
    if image is None:
        raise ValueError("env.render() returned None: make the env with render_mode='rgb_array'")
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(0, 0, 0))
    if label:
        draw.rectangle((0, 0, size - 1, 13), fill=(0, 0, 0))  # a band readable on any background
        draw.text((4, 1), label, fill=(255, 255, 255))
    return np.asarray(picture)


def save_gif(frames: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]], path: str | Path, fps: float = 10.0) -> Path:
    """Write frames as a looping GIF at ``fps`` frames per second; a mapping of frame lists is drawn side by side
    (shorter ones hold their last frame).

    :param frames: a list of frames (RGB arrays of one size), or label -> list of frames for side-by-side panels
    :param path: the GIF file to write (its folder is created)
    :param fps: frames per second
    :return: ``path``
    """
    Image, _ = _imaging()
    panels = list(frames.values()) if isinstance(frames, Mapping) else [frames]
    if not panels or any(len(panel) == 0 for panel in panels):
        raise ValueError("save_gif needs at least one frame per panel")
    length = max(len(panel) for panel in panels)
    padded = [list(panel) + [panel[-1]] * (length - len(panel)) for panel in panels]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.hstack(step)) for step in zip(*padded, strict=True)]
    # Pillow's GIF writer takes the frame duration in milliseconds
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def policy_gif(model: Any, env: gym.Env, path: str | Path, fps: float = 10.0, **kwargs: Any) -> Path:
    """One episode of ``model`` on ``env`` as a GIF.

    :param model: what acts (its ``predict``)
    :param env: an env made with ``render_mode="rgb_array"``
    :param path: the GIF file to write
    :param fps: frames per second
    :param kwargs: arguments of :func:`record_frames` (``seed``, ``max_steps``, ``every``, ``size``, ...)
    :return: ``path``
    """
    return save_gif(record_frames(model, env, **kwargs), path, fps)


def side_by_side_gif(
    models: Mapping[str, Any],
    env: gym.Env | Callable[[], gym.Env],
    path: str | Path,
    fps: float = 10.0,
    **kwargs: Any,
) -> Path:
    """One episode per model on the same env and reset seed, side by side, labelled with the mapping's keys.

    :param models: label -> model (e.g. ``{"MetaCPO": adapted_meta_cpo, "CPO": cpo}``)
    :param env: an env made with ``render_mode="rgb_array"``, or a function making one (called once per model; the
        envs it makes are closed)
    :param path: the GIF file to write
    :param fps: frames per second
    :param kwargs: arguments of :func:`record_frames` (``seed``, ``max_steps``, ``every``, ``size``, ...); with
        ``seed=None`` one seed is drawn for all the panels
    """
    if "seed" in kwargs and kwargs["seed"] is None:  # every panel from the same start state all the same
        kwargs["seed"] = int(np.random.default_rng().integers(2**31 - 1))
    frames = {}
    for label, model in models.items():
        made = callable(env) and not hasattr(env, "step")
        episode_env = env() if made else env  # type: ignore[operator]
        try:
            frames[label] = record_frames(model, episode_env, label=label, **kwargs)  # type: ignore[arg-type]
        finally:
            if made:
                episode_env.close()  # type: ignore[union-attr]
    return save_gif(frames, path, fps)
