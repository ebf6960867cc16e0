"""The command line: ``sb3-metacpo`` (or ``python -m sb3_metacpo``) with ``train``, ``evaluate``, ``adapt``,
``benchmark`` and ``plot``.

Built on argparse (standard library: no dependency, and subcommands with per-option help are all it needs), with
the RL Zoo's option names where they apply (``--algo``, ``--env``, ``-conf/--conf-file``, ``--hyperparams``,
``-n/--n-timesteps``, ``--seed``, ``-f/--log-folder``). It uses only the algorithms' public API (constructors,
``learn``, ``save``/``load``, ``predict``, ``adaptation_steps``, ``evaluate_params``, ``adapt``, ``set_logger``).

A run folder ``<log-folder>/<algo>_<family>_<n>`` holds ``config.yml`` (everything resolved: algorithm, family,
seed, budget, cost limit, hyperparameters, command), ``hyperparams.yml`` (the hyperparameters in the config-file
format, reusable with ``-conf``), ``progress.csv`` (SB3's CSV logger), TensorBoard event files (when tensorboard is
installed), ``model.zip`` and ``learning_curves.png``; ``evaluate`` and ``adapt`` add ``evaluation.csv``,
``adaptation.csv`` and ``adaptation.png`` (and GIFs with ``--gif``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import get_device
from tqdm.auto import tqdm

from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.policies import check_flat_action_space, check_flat_observation_space
from sb3_metacpo.common.rollouts import meta_iteration_steps
from sb3_metacpo.common.safe_algorithm import saved_env_id
from sb3_metacpo.common.serialization import POLICY_CONTENT, ArchiveError, decode_space, decode_value, read_archive
from sb3_metacpo.config import (
    ALGOS,
    ConfigError,
    check_algo,
    constructor_parameters,
    default_config_file,
    load_hyperparams,
    parse_overrides,
    to_constructor,
)
from sb3_metacpo.cpo import CPO
from sb3_metacpo.tasks.base import (
    Task,
    TaskDistribution,
    list_task_distributions,
    make_task_distribution,
    task_distribution_class,
)
from sb3_metacpo.tasks.monitor import TOTAL_COST

#: ``evaluate`` (and the GIFs) run held-out task i on episodes seeded from EVAL_SEED + i (as benchmarks/adaptation.py);
#: ``adapt`` and ``benchmark`` evaluate every stage on those episodes too (``evaluate_params`` with that seed), and
#: draw the adaptation batches from each model's own seeded stream.
EVAL_SEED = 10_000
MODEL_FILE = "model.zip"
META_ALGOS = ("MetaCPO", "MetaTRPO")
BENCHMARK_METHODS = ("MetaCPO", "MetaTRPO", "CPO", "CPO-scratch")


class CLIError(Exception):
    """An error the command line reports in one line (exit status 2)."""


# --- run folders -------------------------------------------------------------------------------------------------
def new_run_folder(log_folder: str | Path, algo: str, key: str) -> Path:
    """``<log_folder>/<algo>_<key>_<n>`` with n one more than the largest existing (from 1, as the RL Zoo)."""
    root = Path(log_folder)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{algo}_{re.sub(r'[^A-Za-z0-9_.-]', '-', key)}"  # a namespaced id (ns/Env-v0) names one folder
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name))]
    while True:  # mkdir without exist_ok: two runs started at once cannot share a folder
        folder = root / f"{name}_{max(numbers, default=0) + 1}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            numbers.append(max(numbers, default=0) + 1)


def output_folder(out: str | None, default: Path, option: str = "-o/--out") -> Path:
    """The folder ``out`` (default ``default``) that a command writes into, or a usage error, before any work, when it
    or a folder above it is a file (the write at the end failed with a traceback after the work was done)."""
    folder = Path(out) if out else default
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"{option}: {existing} is a file, not a folder")
    return folder


def make_env_id(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id, **kwargs)``, safety-gymnasium's ids registered first; gymnasium's errors (an unknown id)
    as usage errors."""
    from sb3_metacpo.tasks.compat import import_safety_gymnasium

    if env_id.startswith("Safety"):
        import_safety_gymnasium()
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as error:
        raise CLIError(f"--env {env_id}: {error}") from error


def check_env_id(env_id: str) -> None:
    """A usage error, before the model or the run folder is made, unless ``env_id``'s spaces fit the policy (flat
    Box observations and actions) and one step reports ``info["cost"]`` (the first training step raised, after the
    run folder and its logs were written)."""
    env = make_env_id(env_id)
    try:
        check_flat_observation_space(env.observation_space)
        check_flat_action_space(env.action_space)
        env.reset(seed=0)
        env.action_space.seed(0)
        info = env.step(env.action_space.sample())[-1]
    except TypeError as error:
        raise CLIError(f"--env {env_id}: {error}") from error
    finally:
        env.close()
    if TOTAL_COST not in info:
        raise CLIError(
            f"--env {env_id} reports no info[{TOTAL_COST!r}]: CPO trains on envs that put the per-step cost there "
            "(safety-gymnasium: the 'Safety...Gymnasium-v0' ids)"
        )


def logger_formats(verbose: int, tensorboard: bool) -> list[str]:
    """csv always; stdout when verbose; tensorboard when asked for and installed."""
    formats = ["csv"]
    if verbose >= 1:
        formats.append("stdout")
    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        formats.append("tensorboard")
    return formats


class StopOnInterrupt(BaseCallback):
    """Stops ``learn`` at the next env step once :func:`first_interrupt_stops` saw a Ctrl-C: the update in progress
    finishes, the batch being collected is dropped, and the model keeps its last completed update (what the command
    line then saves, as the RL Zoo saves an interrupted run); its ``num_timesteps`` counts the dropped batch's steps
    too, as after any callback that stops a collect."""

    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def _on_step(self) -> bool:
        return not self.requested


@contextmanager
def first_interrupt_stops(stopper: StopOnInterrupt) -> Iterator[None]:
    """While in the block, a first SIGINT (Ctrl-C) asks ``stopper`` to stop training and a second one raises
    ``KeyboardInterrupt`` as usual (a no-op outside the main thread, where signal handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stopper.requested:
            raise KeyboardInterrupt
        stopper.requested = True
        print(
            "\ninterrupted: training stops at the next env step and the model of the last completed update is saved "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:  # a handler installed outside Python reads as None: Python's own then
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def train_run(
    algo: str,
    family: str | None = None,
    env_id: str | None = None,
    conf_file: str | Path | None = None,
    hyperparams: Sequence[str] | None = None,
    n_timesteps: int | None = None,
    seed: int | None = None,
    log_folder: str | Path = "logs",
    verbose: int = 1,
    progress: bool = True,
    tensorboard: bool = True,
    plots: bool = True,
    device: str | None = None,
    interruptible: bool = False,
) -> Path:
    """Train one model into a new run folder and return the folder (what ``sb3-metacpo train`` does).

    Every configuration error is raised (as :class:`~sb3_metacpo.config.ConfigError` or :class:`CLIError`) before
    anything is trained. ``interruptible``: a first Ctrl-C stops training at the next env step and the run is saved
    as if its budget had ended there (:class:`StopOnInterrupt`); a second one aborts.
    """
    algo_cls = check_algo(algo)
    if (family is None) == (env_id is None):
        raise CLIError("give exactly one of --family (a task family) and --env (a gymnasium env id, CPO only)")
    if env_id is not None and algo != "CPO":
        raise CLIError(f"--env {env_id} trains on one env, which only CPO does; {algo} needs --family")
    if env_id is not None and env_id in list_task_distributions():  # the run could not be evaluated (no such env id)
        raise CLIError(f"{env_id} is a task family, not an env id: use --family {env_id}")
    if family is not None and family not in list_task_distributions():
        raise CLIError(f"unknown family {family!r}; valid choices: {', '.join(list_task_distributions())}")
    key = family if family is not None else str(env_id)
    overrides = parse_overrides(hyperparams)
    # the shipped file has no section for an arbitrary env id (the constructor's defaults); a file of the user's must
    # have one, as for a family: a misspelled section trained silently on the defaults
    resolved = load_hyperparams(algo, key, conf_file, overrides, allow_missing=env_id is not None and conf_file is None)
    policy, budget, env_kwargs, kwargs = to_constructor(resolved)
    if device is not None:
        try:
            get_device(device)  # SB3's: "auto" too
        except RuntimeError as error:  # torch's message lists the device types it knows
            raise CLIError(f"--device {device}: {error}") from error
        kwargs["device"] = device
    if Path(log_folder).exists() and not Path(log_folder).is_dir():
        raise CLIError(f"--log-folder {log_folder} is a file: give a folder for the run folders")
    n_timesteps = n_timesteps if n_timesteps is not None else budget
    if n_timesteps is None or n_timesteps < 1:
        raise CLIError(f"no training budget for {key}: give -n/--n-timesteps (or n_timesteps in the config file)")
    if env_kwargs and env_id is not None:
        raise CLIError("env_kwargs apply to task families only (make_task_distribution arguments)")
    resolved["n_timesteps"] = int(n_timesteps)  # so that hyperparams.yml (-conf) reproduces the run
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)  # recorded in config.yml

    if env_id is not None:
        check_env_id(env_id)
    env: Any = env_id
    if family is not None:
        try:
            env = make_task_distribution(family, seed=seed, **env_kwargs)
        except (TypeError, ValueError) as error:
            raise CLIError(f"env_kwargs of {family}: {error}") from error
    try:
        model = algo_cls(policy, env, seed=seed, verbose=verbose, **kwargs)
    except (TypeError, ValueError, gym.error.Error) as error:  # gymnasium's: e.g. an env id it does not know
        source = conf_file or default_config_file(algo)
        raise CLIError(f"invalid hyperparameters for {algo} on {key} (from {source} and --hyperparams): {error}") from error

    folder = new_run_folder(log_folder, algo, key)
    config = {
        "algo": algo,
        "family": family,
        "env": env_id,
        "seed": seed,
        "n_timesteps": int(n_timesteps),
        "cost_limit": _cost_limit(model, env if isinstance(env, TaskDistribution) else None),
        "cost_limits": model.constraints.as_mapping(),  # type: ignore[attr-defined]  # every constraint, by cost name ("cost": the total)
        "conf_file": str(Path(conf_file).resolve()) if conf_file is not None else str(default_config_file(algo)),
        "overrides": overrides,
        "hyperparams": resolved,
        "command": _command_line(),
        "sb3_metacpo_version": _version(),
    }
    (folder / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "hyperparams.yml").write_text(yaml.safe_dump({key: resolved}, sort_keys=False))
    model.set_logger(configure(str(folder), logger_formats(verbose, tensorboard)))
    print(f"training {algo} on {key} for {n_timesteps} env steps (seed {seed}) into {folder}", flush=True)
    start = time.perf_counter()
    stopper = StopOnInterrupt()
    with first_interrupt_stops(stopper) if interruptible else nullcontext():
        model.learn(int(n_timesteps), callback=stopper, progress_bar=progress)
    seconds = time.perf_counter() - start
    model.save(folder / MODEL_FILE)
    model.logger.close()
    stopped = ""
    if stopper.requested:  # num_timesteps counts the dropped batch's steps too, as after any callback that stops a collect
        stopped = f" (stopped by Ctrl-C after {_count(model._n_updates, 'update')}; the count includes the dropped batch)"
    print(f"trained {model.num_timesteps} env steps{stopped} in {seconds:.1f} s; model: {folder / MODEL_FILE}", flush=True)
    if plots:
        _try_plot(lambda: _plot_learning(folder, f"{algo} on {key}, seed {seed}"), "learning curves")
    return folder


def _plot_learning(folder: Path, title: str) -> None:
    from sb3_metacpo.plots import plot_learning_curves

    plot_learning_curves(folder, folder / "learning_curves.png", title=title)
    print(f"learning curves: {folder / 'learning_curves.png'}")


def _try_plot(function: Any, what: str) -> None:
    """Draw a figure after the work it shows is saved: matplotlib missing, or nothing to draw (a run stopped before
    its first log line), is a note, not a failure of the command."""
    from sb3_metacpo.plots import PlotInputError

    try:
        function()
    except (ImportError, PlotInputError) as error:
        print(f"no {what}: {error}", file=sys.stderr)


def _cost_limit(model: Any, distribution: TaskDistribution | None) -> float | None:
    """The limit the records' total cost is compared with: the model's limit on ``info["cost"]``; None when it limits
    only named costs (each has its own limit, which the total cost cannot be judged against)."""
    if hasattr(model, "total_cost_limit"):
        limit = model.total_cost_limit
        return None if limit is None else float(limit)
    if isinstance(getattr(model, "cost_limit", None), (int, float)):
        return float(model.cost_limit)
    return float(distribution.default_cost_limit) if distribution is not None else None


def _command_line() -> str:
    program = "python -m sb3_metacpo" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def _version() -> str:
    from sb3_metacpo import __version__

    return __version__


# --- loading -----------------------------------------------------------------------------------------------------
class LoadedRun:
    """A model and what is known of its run: the algorithm, the family (or env id), the config, the folder."""

    def __init__(self, target: str | Path, algo: str | None = None, family: str | None = None) -> None:
        path = Path(target)
        if path.is_dir():
            model_path = path / MODEL_FILE
            config_folder = path
        else:
            model_path = path if path.suffix == ".zip" or not path.with_suffix(".zip").exists() else path.with_suffix(".zip")
            config_folder = model_path.parent
        if not model_path.exists():
            raise CLIError(f"no model at {model_path}: give a run folder of `sb3-metacpo train` or a saved model (.zip)")
        config_path = config_folder / "config.yml"
        self._metadata: dict[str, Any] | None = None
        self.config: dict[str, Any] = {}
        if config_path.exists():
            loaded = yaml.safe_load(config_path.read_text())
            self.config = loaded if isinstance(loaded, dict) else {}
        name = algo or self.config.get("algo")
        if name is None:  # a model file alone: its archive records the algorithm
            metadata = self._archive_metadata(model_path)
            if metadata.get("content") == POLICY_CONTENT:
                raise CLIError(
                    f"{model_path} holds a policy saved alone (policy.save), not a model: evaluate and adapt take a "
                    "model saved with model.save (or a run folder); load this file with CPOPolicy.load"
                )
            name = metadata.get("algorithm")
            if name not in ALGOS:
                raise CLIError(
                    f"{model_path} holds a {name} model and has no config.yml beside it: give --algo ({', '.join(ALGOS)})"
                )
        check_algo(str(name))
        self.algo = str(name)
        self.family: str | None = family or self.config.get("family")
        self.env_id: str | None = None if family else self.config.get("env")
        if self.env_id is None and family is None and not self.config:  # a model file alone: the id it saved
            self.env_id = saved_env_id(self._archive_metadata(model_path).get("env_source"))
        self.seed = int(self.config.get("seed") or 0)
        self.model_path = model_path
        self.folder = config_folder
        self.distribution = self._distribution_of(family) if self.family is not None else None
        if family is not None and self.distribution is not None:
            self._check_family_fits(self.distribution)

    def _distribution_of(self, family: str | None) -> TaskDistribution:
        """The run's own task distribution (its config's ``env_kwargs``, or the parameters saved in the archive) when
        ``family`` is the one it trained on or None: a ``--family`` naming it on a model file alone built the family's
        defaults, whose held-out tasks can be the model's training tasks (tasks audit); another family: its defaults."""
        assert self.family is not None
        if family is None or family == self.config.get("family"):
            env_kwargs = (self.config.get("hyperparams") or {}).get("env_kwargs") or {}
            return make_task_distribution(self.family, seed=self.seed, **env_kwargs)
        if not self.config.get("family"):
            saved = self._archive_metadata(self.model_path).get("task_distribution") or {}
            if saved.get("name") == family and isinstance(saved.get("params"), dict):
                try:
                    return make_task_distribution(family, **decode_value(saved["params"]))
                except (TypeError, ValueError) as error:
                    raise CLIError(
                        f"{self.model_path}: its saved {family} task distribution does not load: {error}"
                    ) from error
        return make_task_distribution(self.family, seed=self.seed)

    def _archive_metadata(self, model_path: Path) -> dict[str, Any]:
        """The archive's metadata, read once (a usage error for a file that is not an archive)."""
        if self._metadata is None:
            try:
                self._metadata = read_archive(model_path)[0]
            except ArchiveError as error:
                raise CLIError(f"{model_path}: {error}") from error
        return self._metadata

    def _check_family_fits(self, distribution: TaskDistribution) -> None:
        """A usage error, before anything loads, when ``--family`` has other observation or action shapes than the
        archive's model (it would fail inside the load, or inside SB3's ``predict`` for CPO)."""
        metadata = self._archive_metadata(self.model_path)
        try:
            saved = decode_space(metadata["observation_space"]), decode_space(metadata["action_space"])
        except KeyError as error:
            raise CLIError(f"{self.model_path}: the archive describes no {error} (not a saved model)") from error
        wanted = distribution.spaces
        if tuple(space.shape for space in saved) != tuple(space.shape for space in wanted):
            trained_on = self.config.get("family") or self.config.get("env")
            raise CLIError(
                f"--family {distribution.name} has observation/action shapes {wanted[0].shape}/{wanted[1].shape}, "
                f"but {self.model_path} was trained on {saved[0].shape}/{saved[1].shape}"
                + (f" ({trained_on})" if trained_on else "")
                + ": give a family with the model's shapes, or leave --family out to use the run's own"
            )

    def load(self, env: Any = None, **kwargs: Any) -> Any:
        """The model, loaded with ``env`` (default: the run's task distribution, for MetaCPO and MetaTRPO)."""
        if env is None and self.algo in META_ALGOS:
            env = self.distribution
        try:
            return ALGOS[self.algo].load(str(self.model_path), env=env, **kwargs)
        except ArchiveError as error:  # e.g. --algo names another algorithm than the archive's
            raise CLIError(f"{self.model_path}: {error}") from error

    def require_distribution(self, what: str) -> TaskDistribution:
        if self.distribution is None:
            model = self.load()
            distribution = getattr(model, "task_distribution", None)
            if not isinstance(distribution, TaskDistribution):
                raise CLIError(f"{what} needs a model trained on a task family (give --family); {self.model_path} has none")
            self.distribution = distribution
        return self.distribution


# --- evaluation and adaptation -----------------------------------------------------------------------------------
def run_episodes(
    model: Any, env: gym.Env, n_episodes: int, seed: int, deterministic: bool, cost_names: Sequence[str] = ()
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Returns and costs (``info["cost"]`` summed) of ``n_episodes`` episodes of ``model.predict`` on ``env``, and the
    episode sums of each cost in ``cost_names`` (e.g. the model's named constraints), by name."""
    returns, costs = [], []
    named: dict[str, list[float]] = {name: [] for name in cost_names}
    observation, _ = env.reset(seed=seed)
    for episode in range(n_episodes):
        if episode > 0:
            observation, _ = env.reset()
        episode_return, episode_cost, done = 0.0, 0.0, False
        sums = dict.fromkeys(named, 0.0)
        while not done:
            action, _ = model.predict(observation, deterministic=deterministic)
            observation, reward, terminated, truncated, info = env.step(action)
            for name in ("cost", *sums):
                if name not in info:
                    raise CLIError(f"the env reports no info[{name!r}]: evaluation needs a safety env that reports it")
            episode_return += float(reward)
            episode_cost += float(info["cost"])
            for name in sums:
                sums[name] += float(info[name])
            done = bool(terminated or truncated)
        returns.append(episode_return)
        costs.append(episode_cost)
        for name, total in sums.items():
            named[name].append(total)
    return returns, costs, named


def _named_constraints(model: Any) -> dict[str, float]:
    """The model's limits on named costs (``cost_limit={"cost_hazards": 5, ...}``), by name; {} when it limits the
    total cost only."""
    constraints = getattr(model, "constraints", None)
    if constraints is None:
        return {}
    return {name: limit for name, limit in constraints.as_mapping().items() if name != TOTAL_COST}


def _constraint_fields(model: Any, total_cost: float, named_costs: dict[str, float]) -> dict[str, Any]:
    """A record's columns for a model that limits named costs: each named cost's mean episode sum (column ``<name>``),
    its limit (``limit_<name>``) and ``within_limits``, whether every constraint (the total's too, where limited)
    holds; {} for a model that limits the total cost only (its ``cost`` and ``cost_limit`` say it all)."""
    named = _named_constraints(model)
    if not named:
        return {}
    fields: dict[str, Any] = {}
    for name, limit in named.items():
        fields[name] = float(named_costs[name])
        fields[f"limit_{name}"] = limit
    costs = {TOTAL_COST: float(total_cost), **{name: fields[name] for name in named}}
    fields["within_limits"] = bool(model.constraints.satisfied_by(costs))
    return fields


def adaptation_records(
    method: str,
    run: LoadedRun | None,
    distribution: TaskDistribution,
    tasks: Sequence[Task],
    seed: int,
    n_updates: int,
    n_steps: int | None,
    n_eval_episodes: int,
    deterministic: bool,
    target_kl: float | None = None,
    progress: bool = True,
    cpo_settings: dict[str, Any] | None = None,
    scratch_cost_limit: float | dict[str, float] | None = None,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """Yield ``(record, model)`` after 0 .. n_updates adaptation updates on each task (records: see
    :mod:`sb3_metacpo.plots`); after the last update (k = ``n_updates`` > 0), ``model`` acts with the evaluated parameters.

    Every method adapts through the same protocol (``adaptation_steps``: CPO updates from the model's parameters,
    the meta-parameters for MetaCPO/MetaTRPO, CPO's own parameters for CPO) with ``n_steps`` env steps per update and
    the trust region ``target_kl`` (None: each model's own) and is evaluated with ``evaluate_params`` on fresh
    episodes; with ``run=None`` a randomly initialised CPO adapts (CPO-scratch) under ``scratch_cost_limit`` (None:
    the family's default limit). ``cpo_settings`` (e.g. MetaCPO's ``cost_confidence`` and ``cg_max_steps``) are given
    to CPO models before they adapt. A model that limits named costs adds each one's mean episode sum, its limit and
    whether every constraint holds (:func:`_constraint_fields`).
    """
    bar = tqdm(total=len(tasks) * (n_updates + 1), desc=f"adapting {method}", disable=not progress)
    for index, task in enumerate(tasks):
        if run is None:  # CPO-scratch
            steps = n_steps or int(load_hyperparams("CPO", distribution.name, allow_missing=True).get("n_steps", 1000))
            scratch_kl: dict[str, Any] = {} if target_kl is None else {"target_kl": target_kl}
            model: Any = CPO("MlpPolicy", distribution, n_steps=steps, seed=seed, cost_limit=scratch_cost_limit, **scratch_kl)
        else:
            model = run.load()
        if isinstance(model, CPO):
            for key, value in (cpo_settings or {}).items():
                setattr(model, key, value)
        for k, params in model.adaptation_steps(task, n_updates, n_steps, target_kl=target_kl):
            # every stage and method on the same start states (the episodes of EVAL_SEED + index), apart from the
            # adaptation batches' stream, as benchmarks/adaptation.py
            evaluation = model.evaluate_params(task, params, n_eval_episodes, deterministic, seed=EVAL_SEED + index)
            bar.update(1)
            record = {
                "method": method,
                "task": index,
                "seed": seed,
                "update": k,
                "return": evaluation.ep_rew_mean,
                "cost": evaluation.ep_cost_mean,
                "cost_limit": _cost_limit(model, distribution),
                "n_episodes": evaluation.n_episodes,
                "task_params": task.short(),
                **_constraint_fields(model, evaluation.ep_cost_mean, evaluation.ep_costs),
            }
            if k == n_updates and k > 0:
                model.adapted_params = params
                model.policy.set_actor_override(params)
            yield record, model
    bar.close()


def _mean_spread(values: np.ndarray) -> str:
    """``mean ± sd`` of the values with one (sample standard deviation); ``(1 pair)`` where one value has no spread;
    ``n/a`` without a value; values missing (NaN: no completed episode) are left out and counted."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        text = f"{'n/a':>16}"
    elif len(finite) == 1:
        text = f"{finite[0]:7.2f} (1 pair)"
    else:
        text = f"{finite.mean():7.2f} ± {finite.std(ddof=1):6.2f}"
    missing = len(values) - len(finite)
    return text + (f" ({missing} without a value)" if missing else "")


def _table(records: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd over the task-seed pairs per method and update (the pairs' spread, not a standard error: the
    footer says so, and where the intervals are), and the count of pairs at or under the limit (of the pairs with a
    value; with named costs limited, the pairs under every limit)."""
    lines = ["method        updates  return (mean ± sd)  cost (mean ± sd)  under the limit"]
    for method in dict.fromkeys(r["method"] for r in records):
        for k in sorted({r["update"] for r in records if r["method"] == method}):
            cell = [r for r in records if r["method"] == method and r["update"] == k]
            returns = np.array([r["return"] for r in cell], dtype=float)
            costs = np.array([r["cost"] for r in cell], dtype=float)
            limit = cell[0].get("cost_limit")
            line = f"{method:13} {k:7d}  {_mean_spread(returns)}  {_mean_spread(costs)}"
            if "within_limits" in cell[0]:  # named costs limited: a pair is under when every constraint holds
                limits = {name[len("limit_") :]: value for name, value in cell[0].items() if name.startswith("limit_")}
                if limit is not None:
                    limits = {TOTAL_COST: limit, **limits}
                valued_cells = [r for r in cell if all(math.isfinite(float(r[name])) for name in limits)]
                under = sum(bool(r["within_limits"]) for r in valued_cells)
                described = ", ".join(f"{name} {value:g}" for name, value in limits.items())
                line += f"  {under}/{len(valued_cells)} (limits {described})"
            elif limit is not None:
                valued = costs[np.isfinite(costs)]
                line += f"  {int(np.sum(valued <= limit))}/{len(valued)} (limit {limit:g})"
            lines.append(line)
    pairs = len({(r["task"], r["seed"]) for r in records})
    lines.append(
        f"± sd: the spread (sample standard deviation) over the {pairs} task-seed pairs, not a standard error; "
        "confidence intervals over seeds and tasks: benchmarks/adaptation.py (and at least 50 evaluation episodes per "
        "stage before drawing a verdict)"
    )
    return "\n".join(lines)


# --- subcommands -------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    train_run(
        args.algo,
        args.family,
        args.env,
        args.conf_file,
        args.hyperparams,
        args.n_timesteps,
        args.seed,
        args.log_folder,
        args.verbose,
        args.progress,
        args.tensorboard,
        args.plots,
        args.device,
        interruptible=True,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = LoadedRun(args.target, args.algo, args.family)
    out = output_folder(args.out, run.folder)
    model = run.load()
    records = []
    if run.env_id is not None and run.family is None:  # CPO on one env id
        targets: list[tuple[Any, str, gym.Env]] = [(run.env_id, run.env_id, make_env_id(run.env_id))]
        limit = _cost_limit(model, None)
    else:
        distribution = run.require_distribution("evaluate")
        tasks = distribution.test_tasks(args.n_tasks)
        targets = [(i, t.short(), distribution.make_env(t)) for i, t in enumerate(tasks)]
        limit = _cost_limit(model, distribution)
    for index, (task_id, description, env) in enumerate(tqdm(targets, desc="evaluating", disable=not args.progress)):
        named = _named_constraints(model)
        returns, costs, named_costs = run_episodes(
            model, env, args.n_eval_episodes, EVAL_SEED + index, args.deterministic, cost_names=list(named)
        )
        env.close()
        records.append(
            {
                "method": run.algo,
                "task": task_id,
                "seed": run.seed,
                "update": 0,
                "return": float(np.mean(returns)),
                "cost": float(np.mean(costs)),
                "cost_limit": limit,
                "return_std": float(np.std(returns)),
                "cost_std": float(np.std(costs)),
                "n_episodes": len(returns),
                "task_params": description,
                **_constraint_fields(
                    model, float(np.mean(costs)), {name: float(np.mean(sums)) for name, sums in named_costs.items()}
                ),
            }
        )
    print(
        f"{run.algo} from {run.model_path}, {args.n_eval_episodes} episodes per task, "
        f"{'mean action' if args.deterministic else 'stochastic policy'}:"
    )
    for r in records:
        per_name = "".join(f"   {name} {r[name]:.2f} (limit {r[f'limit_{name}']:g})" for name in _named_constraints(model))
        print(
            f"  task {r['task']}: return {r['return']:8.2f} (sd {r['return_std']:.2f})   cost {r['cost']:7.2f} (sd "
            f"{r['cost_std']:.2f}){per_name} over {r['n_episodes']} episodes   ({r['task_params']})"
        )
    print(_table(records))
    from sb3_metacpo.plots import write_records

    print(f"records: {write_records(records, out / 'evaluation.csv')}")
    if args.gif:
        _try_plot(lambda: _evaluation_gif(run, model, out, args), "GIF")
    return 0


def _evaluation_gif(run: LoadedRun, model: Any, out: Path, args: argparse.Namespace) -> None:
    from sb3_metacpo.plots import policy_gif

    if run.family is None and run.distribution is None:
        env = make_env_id(str(run.env_id), render_mode="rgb_array")
    else:
        distribution = run.require_distribution("a GIF")
        env = distribution.make_env(distribution.test_tasks(1)[0], render_mode="rgb_array")
    path = policy_gif(
        model,
        env,
        out / "evaluation.gif",
        seed=EVAL_SEED,
        max_steps=args.gif_steps,
        every=args.gif_every,
        label=run.algo,
        deterministic=args.deterministic,
    )
    env.close()
    print(f"GIF: {path}")


def cmd_adapt(args: argparse.Namespace) -> int:
    run = LoadedRun(args.target, args.algo, args.family)
    out = output_folder(args.out, run.folder)
    distribution = run.require_distribution("adapt")
    tasks = distribution.test_tasks(args.n_tasks)
    records = []
    final_model = None
    for record, model in adaptation_records(
        run.algo,
        run,
        distribution,
        tasks,
        run.seed,
        args.n_updates,
        args.n_steps,
        args.n_eval_episodes,
        args.deterministic,
        progress=args.progress,
    ):
        records.append(record)
        if record["task"] == 0 and record["update"] == args.n_updates:
            final_model = model
    _report_adaptation(
        records,
        out,
        f"{run.algo} from {run.model_path}: adaptation to {len(tasks)} held-out tasks of "
        f"{distribution.name}, {_count(args.n_updates, 'update')}",
    )
    if args.gif:
        _try_plot(lambda: _adaptation_gif(run, final_model, distribution, tasks[0], out, args), "GIF")
    return 0


def _report_adaptation(records: list[dict[str, Any]], out: Path, title: str) -> None:
    from sb3_metacpo.plots import plot_adaptation_curves, write_records

    print(title)
    for task in dict.fromkeys((r["method"], r["task"]) for r in records):
        mine = [r for r in records if (r["method"], r["task"]) == task]
        curve = ", ".join(f"{r['return']:.1f}/{r['cost']:.2f}" for r in mine)
        print(f"  {task[0]} task {task[1]} (return/cost after 0..{mine[-1]['update']} updates): {curve}")
    print(_table(records))
    print(f"records: {write_records(records, out / 'adaptation.csv')}")

    def plot() -> None:
        plot_adaptation_curves(records, out / "adaptation.png", title=title)
        print(f"adaptation curves: {out / 'adaptation.png'}")

    _try_plot(plot, "adaptation curves")


def _adaptation_gif(
    run: LoadedRun, model: Any, distribution: TaskDistribution, task: Task, out: Path, args: argparse.Namespace
) -> None:
    from sb3_metacpo.plots import policy_gif

    # ``model`` acts with the parameters the records evaluated after the last update (adapting again would draw
    # other batches and give another policy)
    env = distribution.make_env(task, render_mode="rgb_array")
    path = policy_gif(
        model,
        env,
        out / "adaptation.gif",
        seed=EVAL_SEED,
        max_steps=args.gif_steps,
        every=args.gif_every,
        label=f"{run.algo} after {_count(args.n_updates, 'update')}",
        deterministic=args.deterministic,
    )
    env.close()
    print(f"GIF: {path}")


def steps_per_update(algo: str, hyperparams: dict[str, Any]) -> int:
    """Env steps of one update of ``algo`` with ``hyperparams`` (a :func:`load_hyperparams` section; the
    constructor's defaults for the rest), the unit ``learn`` rounds a budget up to: CPO's rollout (``n_steps`` x
    ``n_envs``), MetaCPO's and MetaTRPO's meta-iteration."""
    values = {name: p.default for name, p in constructor_parameters(algo).items()} | hyperparams
    if algo == "CPO":
        return int(values["n_steps"]) * int(values["n_envs"])
    meta_batch_size = int(values["meta_batch_size"])
    n_envs = int(values["n_envs"] or meta_batch_size)
    return meta_iteration_steps(meta_batch_size, n_envs, int(values["n_steps"]), int(values["n_inner_updates"]))


def cmd_benchmark(args: argparse.Namespace) -> int:
    methods = list(args.methods)
    requested, update_steps = {}, {}
    env_kwargs_of: dict[str, dict[str, Any]] = {}  # each trained method's task-distribution arguments
    cost_limit_of: dict[str, Any] = {}  # and its cost_limit (None: the family's default)
    for method in methods:
        if method != "CPO-scratch":
            hyperparams = load_hyperparams(method, args.family, None, parse_overrides(args.hyperparams))
            requested[method] = args.n_timesteps or hyperparams["n_timesteps"]
            update_steps[method] = steps_per_update(method, hyperparams)
            env_kwargs_of[method] = dict(hyperparams.get("env_kwargs") or {})
            cost_limit_of[method] = hyperparams.get("cost_limit")
    # Every trained method gets the same env steps: each learn() rounds its budget up to whole updates, so the budget
    # is the least multiple of every method's update at or above -n (or the largest of the configs' budgets)
    unit = math.lcm(*update_steps.values()) if update_steps else 1
    budget = math.ceil(max(requested.values(), default=0) / unit) * unit
    if args.hyperparams and not env_kwargs_of:
        raise CLIError("--hyperparams sets the trained methods' options, and --methods trains none (CPO-scratch only)")
    # One task distribution (held-out tasks, episode length) for every method, CPO-scratch included
    distribution_kwargs = next(iter(env_kwargs_of.values()), {})
    if any(kwargs != distribution_kwargs for kwargs in env_kwargs_of.values()):
        raise CLIError(
            f"the methods' configs give different env_kwargs {env_kwargs_of}: the benchmark compares them on one task "
            "distribution; set it for all with --hyperparams env_kwargs:..."
        )
    # One set of constraints too: every method adapts, and is judged, under the same limits (CPO-scratch included)
    scratch_cost_limit = _shared_cost_limit(args.family, cost_limit_of)
    from sb3_metacpo.metacpo import MetaCPO

    # One adaptation protocol for every method: MetaCPO's batch and inner trust region for the family (or the options)
    overrides = parse_overrides(args.hyperparams) if "MetaCPO" in methods else None  # they are checked per method
    reference = load_hyperparams("MetaCPO", args.family, None, overrides)
    adapt_steps = args.n_steps or int(reference["n_steps"])
    adapt_kl = args.adapt_target_kl or float(
        reference.get("inner_target_kl", inspect.signature(MetaCPO.__init__).parameters["inner_target_kl"].default)
    )
    # CPO adapts with MetaCPO's cost margin and conjugate-gradient iterations too (benchmarks/adaptation.py's protocol)
    cpo_settings = {
        key: reference.get(key, inspect.signature(MetaCPO.__init__).parameters[key].default)
        for key in ("cost_confidence", "cg_max_steps")
    }
    plan = [
        f"benchmark on {args.family}: seeds {args.seeds}, {args.n_tasks} held-out tasks, {args.n_updates} adaptation "
        f"updates of {adapt_steps} env steps with trust region {adapt_kl} for every method (CPO with MetaCPO's "
        f"{cpo_settings}), {args.n_eval_episodes} "
        f"evaluation episodes per stage ({'mean action' if args.deterministic else 'stochastic policy'})"
    ]
    for method in methods:
        if method == "CPO-scratch":
            plan.append("  CPO-scratch: no training; CPO from a random policy, adapted like the others")
        else:
            plan.append(
                f"  {method}: train {budget} env steps ({_count(budget // update_steps[method], 'update')} of "
                f"{update_steps[method]}) with {default_config_file(method).name}, then adapt"
            )
    plan.append(
        "The adaptation protocol of benchmarks/adaptation.py (the published results): the same batch, trust region, "
        "tasks and seeded episode stream (so the same start states) for every method; training follows each method's "
        "shipped config (the published results also train CPO with the adaptation trust region, at larger budgets)."
    )
    print("\n".join(plan))
    if args.dry_run:
        return 0
    folder = new_run_folder(args.log_folder, "benchmark", args.family)
    records: list[dict[str, Any]] = []
    runs = []
    for seed in args.seeds:
        for method in methods:
            run: LoadedRun | None = None
            if method != "CPO-scratch":
                path = train_run(
                    method,
                    args.family,
                    None,
                    None,
                    args.hyperparams,
                    budget,
                    seed,
                    folder,
                    args.verbose,
                    args.progress,
                    True,
                    True,
                )
                runs.append(path)
                run = LoadedRun(path)
            distribution = make_task_distribution(args.family, seed=seed, **distribution_kwargs)
            tasks = distribution.test_tasks(args.n_tasks)
            for record, _ in adaptation_records(
                method,
                run,
                distribution,
                tasks,
                seed,
                args.n_updates,
                adapt_steps,
                args.n_eval_episodes,
                args.deterministic,
                target_kl=adapt_kl,
                progress=args.progress,
                cpo_settings=cpo_settings,
                scratch_cost_limit=scratch_cost_limit,
            ):
                records.append(record)
    (folder / "plan.txt").write_text("\n".join(plan) + "\n")
    _report_adaptation(records, folder, plan[0])
    from sb3_metacpo.plots import plot_learning_curves

    if runs:
        _try_plot(lambda: plot_learning_curves(runs, folder / "learning_curves.png", title=args.family), "learning curves")
    print(f"benchmark folder: {folder}")
    return 0


def _shared_cost_limit(family: str, cost_limit_of: dict[str, Any]) -> Any:
    """The ``cost_limit`` every trained method of a benchmark has (None: the family's default, also when no method is
    trained), for CPO-scratch; a ``CLIError`` when their configs give different constraints."""
    default = float(task_distribution_class(family).default_cost_limit)
    constraints_of = {}
    for method, cost_limit in cost_limit_of.items():
        try:
            constraints_of[method] = CostConstraints.from_cost_limit(default if cost_limit is None else cost_limit)
        except ValueError as error:
            raise CLIError(f"cost_limit of {method}: {error}") from error
    described = {method: constraints.as_mapping() for method, constraints in constraints_of.items()}
    if any(limits != next(iter(described.values())) for limits in described.values()):
        raise CLIError(
            f"the methods' configs give different cost limits {described}: the benchmark compares them under one set "
            "of constraints; set it for all with --hyperparams cost_limit:..."
        )
    return next(iter(cost_limit_of.values()), None)


def cmd_plot(args: argparse.Namespace) -> int:
    from sb3_metacpo.plots import PlotInputError

    try:
        return _plot_runs(args)
    except (ImportError, PlotInputError) as error:  # matplotlib missing (the message names the extra), or a bad file
        raise CLIError(str(error)) from error


def _plot_runs(args: argparse.Namespace) -> int:
    from sb3_metacpo.plots import plot_adaptation_curves, plot_learning_curves

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.exists()]
    if missing:  # a misspelled run folder was skipped, and the plot showed fewer runs than asked for
        raise CLIError(f"no such run folder or file: {', '.join(missing)}")
    with_progress = [r for r in runs if (r / "progress.csv").exists() or r.name == "progress.csv"]
    if args.out and not with_progress:  # it was ignored: the adaptation curves went to their default file
        raise CLIError(
            "-o/--out names the learning-curves figure, and none of the runs given has a progress.csv (a benchmark "
            "folder holds adaptation records only): name the adaptation-curves figure with --adaptation-out"
        )
    adaptation_out = _figure_file(args.adaptation_out, "--adaptation-out") if args.adaptation_out else None
    written = []
    if with_progress:
        first = with_progress[0]
        default = (first.parent if first.name == "progress.csv" else first) / "learning_curves.png"
        out = _figure_file(args.out, "-o/--out") if args.out else default
        plot_learning_curves(with_progress, out, cost_limit=args.cost_limit, title=args.title)
        written.append(out)
    records = [r for r in runs if r.suffix == ".csv" and r.name != "progress.csv"]
    records += [r / "adaptation.csv" for r in runs if (r / "adaptation.csv").exists()]
    for index, source in enumerate(records):
        out = source.with_suffix(".png") if adaptation_out is None else adaptation_out
        if adaptation_out is not None and len(records) > 1:
            out = out.with_name(f"{out.stem}_{index}{out.suffix}")
        plot_adaptation_curves(source, out, cost_limit=args.cost_limit, title=args.title)
        written.append(out)
    if not written:
        raise CLIError("nothing to plot: give run folders (with progress.csv) or adaptation records (.csv)")
    for path in written:
        print(path)
    return 0


def _figure_file(text: str, option: str) -> Path:
    """The file matplotlib writes for the figure path ``text``: a name without a suffix gets ``.png`` (matplotlib
    adds it, so the path printed was not the file written); a suffix matplotlib cannot write is a usage error
    before anything is read."""
    path = Path(text)
    if not path.name.rstrip("."):
        raise CLIError(f"{option} {text}: give a file name, e.g. curves.png")
    output_folder(str(path.parent), path.parent, option)
    if not path.suffix:
        return path.with_name(path.name.rstrip(".") + ".png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # the plot reports the missing extra
        return path
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise CLIError(f"{option} {text}: matplotlib cannot write {path.suffix} files; use one of .{', .'.join(formats)}")
    return path


# --- the parser --------------------------------------------------------------------------------------------------
def _int_in(low: int, high: float, requirement: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high), else ``must be <requirement>``."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value: 'x'" for a non-integer
    return parse


_positive_int = _int_in(1, math.inf, "a positive integer")
_non_negative_int = _int_in(0, math.inf, "an integer >= 0")
_batch_steps = _int_in(2, math.inf, "an integer >= 2 (env steps per adaptation update)")
_seed = _int_in(0, 2**32, "an integer in [0, 2**32)")  # what the task families and safety-gymnasium's worlds take


def _float_from(low: float, requirement: str, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or equal to it if ``inclusive``), else ``must be <requirement>``."""

    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = "float"  # argparse's "invalid float value: 'x'" for a non-number
    return parse


_positive_float = _float_from(0.0, "a finite number > 0", inclusive=False)
_cost_limit_value = _float_from(0.0, "a finite number >= 0 (a cost limit)", inclusive=True)


def _count(n: int, noun: str) -> str:
    """``"1 update"``, ``"3 updates"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a run folder of `sb3-metacpo train`, or a saved model file (.zip)")
    parser.add_argument(
        "--algo", choices=list(ALGOS), help="the model's algorithm (default: from the run's config.yml, else the archive)"
    )
    parser.add_argument("--family", choices=list_task_distributions(), help="task family to use (default: the one trained on)")
    parser.add_argument("--n-tasks", type=_positive_int, default=5, help="held-out tasks of the family (default: 5)")
    parser.add_argument(
        "--n-eval-episodes",
        type=_positive_int,
        default=10,
        help="evaluation episodes per task (adapt: per task and update; default: 10)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="act with the mean action (default: the stochastic policy, whose cost is what CPO constrains)",
    )
    parser.add_argument("-o", "--out", help="folder for the outputs (default: the run folder, or the model's folder)")
    parser.add_argument("--gif", action="store_true", help="also write a GIF of one episode on the first held-out task")
    parser.add_argument("--gif-steps", type=_positive_int, help="GIF: at most this many env steps (default: the episode)")
    parser.add_argument("--gif-every", type=_positive_int, default=4, help="GIF: keep every n-th frame (default: 4)")
    _add_common(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``sb3-metacpo`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="sb3-metacpo",
        description="Safe meta-RL (Meta-CPO) from the command line: train, evaluate, adapt, benchmark, plot.",
        epilog="Run `sb3-metacpo <command> --help` for the options of a command. Hyperparameter files: "
        f"{default_config_file('MetaCPO').parent}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1, fastest for these small networks and fair to the env stepping)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    train = commands.add_parser(
        "train",
        help="train a model into a new run folder",
        description="Train MetaCPO, MetaTRPO or CPO with the hyperparameters of a YAML file (default: the one shipped "
        "for the algorithm) into <log-folder>/<algo>_<family>_<n>: config.yml, hyperparams.yml, progress.csv, "
        "TensorBoard events (when installed), model.zip and learning_curves.png.",
    )
    train.add_argument("--algo", required=True, choices=list(ALGOS), help="the algorithm")
    where = train.add_mutually_exclusive_group(required=True)
    where.add_argument("--family", choices=list_task_distributions(), help="the task family to (meta-)train on")
    where.add_argument("--env", help="a gymnasium env id reporting info['cost'] (CPO only), e.g. SafetyPointGoal1Gymnasium-v0")
    train.add_argument("-conf", "--conf-file", help="YAML hyperparameter file (default: sb3_metacpo/hyperparams/<algo>.yml)")
    train.add_argument(
        "--hyperparams",
        nargs="+",
        metavar="KEY:VALUE",
        help="override hyperparameters; values are YAML (n_steps:200 policy_kwargs:'{net_arch: [16]}')",
    )
    train.add_argument(
        "-n", "--n-timesteps", type=_positive_int, help="env steps of training (default: n_timesteps of the config)"
    )
    train.add_argument("--seed", type=_seed, help="random seed (default: a random one, recorded in config.yml)")
    train.add_argument("-f", "--log-folder", default="logs", help="where run folders are created (default: logs)")
    train.add_argument("--device", help="torch device (default: the config's, else auto)")
    train.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="0: quiet, 1: log tables (default), 2: also debug messages"
    )
    train.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard logs")
    train.add_argument("--no-plots", dest="plots", action="store_false", help="no learning_curves.png")
    _add_common(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a model (no adaptation) on held-out tasks",
        description="Evaluate a trained model as it is (MetaCPO/MetaTRPO: the meta-policy) on the held-out tasks of "
        "its family (CPO on an env id: on that env): mean episode return and cost per task; writes evaluation.csv.",
    )
    _add_evaluation_options(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    adapt = commands.add_parser(
        "adapt",
        help="adapt a model to held-out tasks and evaluate it after every update",
        description="Adapt a trained model to each held-out task of its family (MetaCPO/MetaTRPO: their inner CPO/TRPO "
        "updates from the meta-parameters; CPO: the same CPO updates from its trained parameters, with its own target_kl) "
        "and evaluate it before and after every update; writes "
        "adaptation.csv (the records of sb3_metacpo.plots) and adaptation.png.",
    )
    _add_evaluation_options(adapt)
    adapt.add_argument("--n-updates", type=_non_negative_int, default=3, help="adaptation updates per task (default: 3)")
    adapt.add_argument(
        "--n-steps",
        type=_batch_steps,
        help="env steps per update (default: the model's: MetaCPO/MetaTRPO's n_steps, CPO's n_steps x n_envs)",
    )
    adapt.set_defaults(handler=cmd_adapt)

    benchmark = commands.add_parser(
        "benchmark",
        help="train and adapt several methods with the same budget and compare them",
        description="A small-budget run of the adaptation benchmark's protocol (benchmarks/adaptation.py, which made "
        "the published results): train each method with the shipped config and the same budget, adapt each to the "
        "same held-out tasks, evaluate before and after every update. Writes a folder benchmark_<family>_<n> with the "
        "run folders, adaptation.csv, adaptation.png and learning_curves.png. --dry-run lists what it would run.",
    )
    benchmark.add_argument("--family", default="Toy2DNav", choices=list_task_distributions(), help="the task family")
    benchmark.add_argument(
        "--methods", nargs="+", default=list(BENCHMARK_METHODS), choices=BENCHMARK_METHODS, help="methods to compare"
    )
    benchmark.add_argument("--seeds", type=_seed, nargs="+", default=[0], help="training seeds (default: 0)")
    benchmark.add_argument(
        "-n",
        "--n-timesteps",
        type=_positive_int,
        help="training budget of every method (default: the largest of the configs'), rounded up to whole updates of "
        "each, so that every method trains the same env steps",
    )
    benchmark.add_argument("--hyperparams", nargs="+", metavar="KEY:VALUE", help="overrides for every trained method")
    benchmark.add_argument("--n-tasks", type=_positive_int, default=3, help="held-out tasks (default: 3)")
    benchmark.add_argument("--n-updates", type=_non_negative_int, default=3, help="adaptation updates (default: 3)")
    benchmark.add_argument("--n-eval-episodes", type=_positive_int, default=5, help="episodes per stage (default: 5)")
    benchmark.add_argument(
        "--n-steps", type=_batch_steps, help="env steps per adaptation update, every method (default: MetaCPO's n_steps)"
    )
    benchmark.add_argument(
        "--adapt-target-kl",
        type=_positive_float,
        help="trust region of the adaptation updates, every method (default: MetaCPO's inner_target_kl)",
    )
    benchmark.add_argument("--deterministic", action="store_true", help="evaluate the mean action")
    benchmark.add_argument("-f", "--log-folder", default="logs", help="where the benchmark folder goes (default: logs)")
    benchmark.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="training log tables (default: 0)")
    benchmark.add_argument("--dry-run", action="store_true", help="only print what would run")
    _add_common(benchmark)
    benchmark.set_defaults(handler=cmd_benchmark)

    plot = commands.add_parser(
        "plot",
        help="plot learning curves of run folders and adaptation curves of records",
        description="Learning curves (return and cost against env steps, with the cost limit) of one or several run "
        "folders (same algorithm and family: mean ± std over seeds), and adaptation curves of adaptation.csv files.",
    )
    plot.add_argument("runs", nargs="+", help="run folders, progress.csv files or adaptation records (.csv)")
    plot.add_argument(
        "-o",
        "--out",
        help="learning-curve image (default: learning_curves.png in the first run folder; .png is added to a name "
        "without a suffix, another suffix such as .pdf or .svg picks the format)",
    )
    plot.add_argument(
        "--adaptation-out",
        help="adaptation-curve image (default: beside each records file; .png is added to a name without a suffix)",
    )
    plot.add_argument("--cost-limit", type=_cost_limit_value, help="the limit to draw (default: from the logs or config)")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(handler=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sb3-metacpo`` and ``python -m sb3_metacpo``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    try:
        return int(args.handler(args))
    except (ConfigError, CLIError) as error:
        print(f"sb3-metacpo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
