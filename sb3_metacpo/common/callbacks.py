"""Callbacks: periodic checkpoints that a killed run resumes from exactly, and a cost-aware evaluation on held-out
tasks that keeps the best model under the cost limit."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, EventCallback

from sb3_metacpo.common.checks import (
    check,
    check_meta_evaluation_arguments,
    check_verbose,
    is_bool,
    is_int,
    is_real,
)
from sb3_metacpo.common.constraints import within_limits
from sb3_metacpo.common.evaluation import (
    AdaptationRecord,
    adaptable_model,
    check_tasks_of_model,
    mean_costs,
    meta_evaluate,
)
from sb3_metacpo.tasks.base import Task
from sb3_metacpo.tasks.monitor import TOTAL_COST


class ResumableCheckpointCallback(BaseCallback):
    """Save the model every ``save_freq`` updates (meta-iterations for MetaCPO and MetaTRPO, rollouts for CPO), at
    the boundary between two updates, and at the end of training (unless a callback stopped it inside a rollout: the
    envs and random streams have then moved past the last update, so the last checkpoint stays the latest).

    Unlike SB3's ``CheckpointCallback`` (which saves every n env steps, in the middle of a rollout, so a file
    labelled 2400 steps holds the parameters of step 2000), a checkpoint here is taken where the model's state is
    complete: the file named ``<prefix>_<updates>_updates_<steps>_steps.zip`` holds the model after exactly that
    many updates and env steps, with everything training needs to continue (see ``save``): a run killed at any
    point resumes from its last checkpoint, losing at most ``save_freq`` updates, with

    .. code-block:: python

        model = MetaCPO.load(ResumableCheckpointCallback.latest(folder))
        model.learn(total_timesteps - model.num_timesteps, callback=..., reset_num_timesteps=False)

    and MetaCPO and MetaTRPO then reach bit-identical parameters to the uninterrupted run (CPO on a task family too
    when its envs were at episode boundaries; its episodes run across rollouts, and those in flight restart on
    resuming). Files are written atomically.

    Beside an evaluation callback (:class:`SafeEvalCallback`,
    :class:`~sb3_metacpo.common.evaluation.MetaEvalCallback`), list this one after it:
    both act at the same boundary, and a checkpoint taken after the evaluation holds the adaptations' episode stream
    as the evaluation left it, so the resumed run's later evaluations are the uninterrupted run's (taken before, the
    first evaluation after resuming replays the episodes of the one at the checkpoint). The evaluation callback's
    own record (best reward so far) is not part of the model's archive: :class:`SafeEvalCallback` takes it up from
    its ``evaluations.npz`` when given a ``log_path``.

    :param save_freq: updates between checkpoints
    :param save_path: the folder of the checkpoints
    :param name_prefix: the files' prefix
    :param keep_last: keep only this many most recent checkpoints (None: all); a resumed run (a model that has
        trained) counts those of ``name_prefix`` already in ``save_path`` and prunes the run's earlier ones, oldest
        first in the order of their update and step numbers; a fresh run deletes only files it wrote. A resumed run
        moves the folder's checkpoints beyond its own update count (an abandoned continuation) into
        ``<name_prefix>_superseded_at_<updates>_updates/``, with a warning, so that :meth:`latest` does not pick them
    :param verbose: 1 prints each save
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str | os.PathLike[str],
        name_prefix: str = "checkpoint",
        keep_last: int | None = None,
        verbose: int = 0,
    ) -> None:
        check_verbose(verbose)
        super().__init__(verbose)
        check(is_int(save_freq) and save_freq >= 1, f"save_freq must be a positive integer (updates), got {save_freq!r}")
        check(
            keep_last is None or (is_int(keep_last) and keep_last >= 1),
            f"keep_last must be None or a positive integer, got {keep_last!r}",
        )
        check(
            isinstance(name_prefix, str) and re.fullmatch(r"[\w.-]+", name_prefix) is not None,
            f"name_prefix must be a plain file-name prefix, got {name_prefix!r}",
        )
        self.save_freq, self.save_path = int(save_freq), Path(save_path)
        self.name_prefix, self.keep_last = name_prefix, keep_last
        self.last_saved_update = -1
        self.saved: list[Path] = []
        self._in_rollout = False  # between a rollout's start and its end: the state is not an update boundary

    def _init_callback(self) -> None:
        self.save_path.mkdir(parents=True, exist_ok=True)
        self.last_saved_update = self.model._n_updates  # a resumed run does not save its starting point again
        # keep_last counts the checkpoints already there in a resumed run (its earlier ones), oldest first; a fresh run
        # (a model that has not trained) never deletes files it did not write
        resumed = self.model.num_timesteps > 0
        if resumed:
            self._set_aside_later_checkpoints()
        self.saved = [path for _, path in self.checkpoints(self.save_path, self.name_prefix)] if resumed else []

    def _set_aside_later_checkpoints(self) -> None:
        """A resumed run whose folder holds checkpoints beyond its own update count (of a continuation from an
        earlier checkpoint that was abandoned, e.g. after it diverged) moves them into a subfolder, with a warning:
        :meth:`latest` would pick them if this run were killed before overwriting them, and resume the other branch.
        They are kept, not deleted."""
        current = self.model._n_updates
        later = [path for (updates, _), path in self.checkpoints(self.save_path, self.name_prefix) if updates > current]
        if not later:
            return
        folder = self.save_path / f"{self.name_prefix}_superseded_at_{current}_updates"
        index = 1
        while folder.exists():
            index += 1
            folder = self.save_path / f"{self.name_prefix}_superseded_at_{current}_updates_{index}"
        folder.mkdir()
        for path in later:
            path.replace(folder / path.name)
        warnings.warn(
            f"{len(later)} checkpoint(s) of {self.save_path} lie beyond this run's {current} updates (an earlier "
            f"continuation that this run replaces): moved to {folder}, so that latest() cannot resume them",
            stacklevel=2,
        )

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        # A rollout starts after an update (or at the start of training): the model's state is complete here.
        if self.model._n_updates - self.last_saved_update >= self.save_freq:
            self._save()
        self._in_rollout = True

    def _on_rollout_end(self) -> None:
        self._in_rollout = False  # the update follows; training ends only after it, or at the next rollout's start

    def _on_training_end(self) -> None:
        if self.model._n_updates > self.last_saved_update and not self._in_rollout:
            self._save()

    def _save(self) -> None:
        updates, steps = self.model._n_updates, self.model.num_timesteps
        path = self.save_path / f"{self.name_prefix}_{updates}_updates_{steps}_steps.zip"
        self.model.save(path)
        self.last_saved_update = updates
        if path in self.saved:  # written again (a run resumed from an earlier checkpoint): now the most recent
            self.saved.remove(path)
        self.saved.append(path)
        if self.verbose >= 1:
            print(f"Saving checkpoint to {path}")
        if self.keep_last is not None:
            while len(self.saved) > self.keep_last:
                self.saved.pop(0).unlink(missing_ok=True)

    @staticmethod
    def checkpoints(save_path: str | os.PathLike[str], name_prefix: str = "checkpoint") -> list[tuple[tuple[int, int], Path]]:
        """The checkpoints of ``save_path`` named with ``name_prefix``, as ((updates, steps), path), in the order of
        their update and step numbers (none when the folder does not exist)."""
        pattern = re.compile(rf"{re.escape(name_prefix)}_(\d+)_updates_(\d+)_steps\.zip")
        return sorted(
            ((int(match.group(1)), int(match.group(2))), path)
            for path in Path(save_path).glob(f"{glob.escape(name_prefix)}_*_updates_*_steps.zip")
            if (match := pattern.fullmatch(path.name))
        )

    @staticmethod
    def latest(save_path: str | os.PathLike[str], name_prefix: str = "checkpoint") -> Path | None:
        """The checkpoint of ``save_path`` with the most updates (None when there is none)."""
        found = ResumableCheckpointCallback.checkpoints(save_path, name_prefix)
        return found[-1][1] if found else None


class SafeEvalCallback(EventCallback):
    """Every ``eval_freq`` updates (and at the end of training), evaluate reward *and* cost on held-out tasks and
    keep the best model that is under the cost limit: SB3's ``EvalCallback`` for constrained (meta-)RL.

    MetaCPO and MetaTRPO are evaluated after adapting to each task (their inner updates, from the meta-parameters,
    which are left unchanged), CPO as it is; both through
    :func:`~sb3_metacpo.common.evaluation.meta_evaluate`. An evaluation's reward and cost are the means over the tasks
    of the mean episode return and cost after the last adaptation update. The best model is the one of highest
    reward among the evaluations under the limits (each of the model's constrained costs, by name, at most its own
    limit); an evaluation over a limit is never the best, however high its reward (SB3's ``EvalCallback`` would
    keep it).

    Logged (and dumped at once, as SB3's ``EvalCallback``): ``eval/mean_reward``, ``eval/mean_cost`` (the total
    cost), ``eval/cost_limit`` (the total cost's limit; NaN when only named costs are constrained), for every other
    constrained cost ``eval/mean_cost_<name>`` and ``eval/cost_limit_<name>``, ``eval/under_limit`` (1 or 0),
    ``eval/best_safe_reward`` (NaN until an evaluation is under the limits) and, with adaptation,
    ``eval/pre_adapt_mean_reward`` and ``eval/pre_adapt_mean_cost``.

    :param tasks: the held-out tasks (e.g. ``distribution.test_tasks(5)``)
    :param eval_freq: updates between evaluations (meta-iterations for MetaCPO and MetaTRPO, rollouts for CPO)
    :param n_updates: adaptation updates per task; None: MetaCPO's and MetaTRPO's own (``n_inner_updates``), none
        for CPO
    :param n_steps: env steps per adaptation update (None: the algorithm's)
    :param n_eval_episodes: evaluation episodes per task (after adaptation; separate from the adaptation batches).
        The default, SB3's, makes a model-selection signal during training, not a verdict: "under the limit" from 5
        episodes per task can be chance either way, so evaluate the selected model on at least 50 episodes per task
        (:func:`~sb3_metacpo.common.evaluation.meta_evaluate`) before saying it is under the limit
    :param deterministic: evaluate the mean action (default: the stochastic policy, whose cost CPO constrains)
    :param cost_limit: a limit on the total cost (``info["cost"]``) an evaluation must not exceed, instead of the
        model's constraints (None: the model's, every constrained cost under its own limit)
    :param best_model_save_path: where to save ``best_model.zip`` (None: not saved)
    :param log_path: where to write ``evaluations.npz`` (None: not written): ``timesteps`` (n_evals,), ``results``
        and ``costs`` (n_evals, n_tasks) after adaptation, ``pre_adapt_results`` and ``pre_adapt_costs`` before it
        (the same as ``results`` and ``costs`` without adaptation), ``under_limit`` (n_evals,), ``cost_limit`` (the
        total cost's limit, NaN if it has none), ``constraint_names`` and ``constraint_limits`` (m,),
        ``constraint_costs`` (n_evals, m), each constrained cost's mean over the tasks, and ``settings`` (JSON: the
        tasks, adaptation, episodes and limits). Written atomically. A resumed run (a loaded model that trains on)
        takes up the file's evaluations up to its step count when they had the same settings: the file keeps them,
        and the best model is judged against the best of them (without ``log_path`` the record starts afresh, and the
        first evaluation under the limits after resuming replaces ``best_model.zip``)
    :param verbose: 1 prints each evaluation and each new best model
    :param callback_on_new_best: called (as SB3's ``EvalCallback`` calls it) when an evaluation is a new best under
        the limits, e.g. SB3's ``StopTrainingOnRewardThreshold``, which then reads ``best_mean_reward``: the best
        reward *under the limits*
    :param callback_after_eval: called after every evaluation, e.g. SB3's ``StopTrainingOnNoModelImprovement`` (an
        improvement is a new best under the limits)

    Evaluations run when a rollout starts (the model complete after its update), where training cannot stop: a
    callback's ``False`` stops training at the next env step, before any update on it.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        eval_freq: int = 10,
        n_updates: int | None = None,
        n_steps: int | None = None,
        n_eval_episodes: int = 5,
        deterministic: bool = False,
        cost_limit: float | None = None,
        best_model_save_path: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        verbose: int = 0,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
    ) -> None:
        check_verbose(verbose)
        for name, hook in (("callback_on_new_best", callback_on_new_best), ("callback_after_eval", callback_after_eval)):
            check(
                hook is None or isinstance(hook, BaseCallback),
                f"{name} must be None or an SB3 BaseCallback, got {type(hook).__name__}",
            )
        super().__init__(callback_after_eval, verbose)
        self.callback_on_new_best = callback_on_new_best
        if callback_on_new_best is not None:
            callback_on_new_best.parent = self
        self._continue_training = True
        tasks = check_meta_evaluation_arguments(tasks, n_updates, n_steps, n_eval_episodes)
        check(is_int(eval_freq) and eval_freq >= 1, f"eval_freq must be a positive integer (updates), got {eval_freq!r}")
        check(
            cost_limit is None or (is_real(cost_limit) and cost_limit >= 0),
            f"cost_limit must be None or a finite number >= 0 (a limit on the total cost), got {cost_limit!r}",
        )
        check(is_bool(deterministic), f"deterministic must be True or False, got {deterministic!r}")
        self.tasks = tasks
        self.eval_freq = int(eval_freq)
        self.n_updates = n_updates
        self.n_steps = n_steps
        self.n_eval_episodes = int(n_eval_episodes)
        self.deterministic = bool(deterministic)
        self.cost_limit = None if cost_limit is None else float(cost_limit)
        self.best_model_save_path = None if best_model_save_path is None else Path(best_model_save_path)
        self.log_path = None if log_path is None else Path(log_path)
        self.best_mean_reward = -math.inf
        self.best_timestep: int | None = None
        self.last_mean_reward = math.nan
        self.last_mean_cost = math.nan
        self.evaluations_timesteps: list[int] = []
        self.evaluations_results: list[list[float]] = []
        self.evaluations_costs: list[list[float]] = []
        self.evaluations_pre_adapt_results: list[list[float]] = []
        self.evaluations_pre_adapt_costs: list[list[float]] = []
        self.evaluations_under_limit: list[bool] = []
        self.evaluations_constraint_costs: list[list[float]] = []
        self._last_evaluated = -1
        self._limits: dict[str, float] = {}  # cost name -> limit

    @property
    def best_model_path(self) -> Path | None:
        """The file of the best model under the limit (None without ``best_model_save_path``)."""
        return None if self.best_model_save_path is None else self.best_model_save_path / "best_model.zip"

    def _init_callback(self) -> None:
        from sb3_metacpo.metacpo import MetaCPO

        _, constraints = adaptable_model(self.model)  # a TypeError for a model of another library
        check_tasks_of_model(self.model, self.tasks)
        if self.cost_limit is None:
            self._limits = constraints.as_mapping()
        else:
            self._limits = {TOTAL_COST: float(self.cost_limit)}
        if self.n_updates is None and not isinstance(self.model, MetaCPO):
            self.n_updates = 0  # CPO is evaluated as trained; pass n_updates to evaluate it fine-tuned
        for folder in (self.best_model_save_path, self.log_path):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        self._last_evaluated = self.model._n_updates  # a resumed run does not evaluate its starting point again
        self._continue_training = True
        if self.callback_on_new_best is not None:
            self.callback_on_new_best.init_callback(self.model)
        self._take_up_earlier_evaluations()

    def _take_up_earlier_evaluations(self) -> None:
        """A resumed run (a model that has trained before) takes up the evaluations in ``log_path``'s
        ``evaluations.npz`` up to the model's step count: the file keeps them, and a new best model must beat the
        best of them (else the first evaluation under the limits after resuming replaced a better best model).
        A file that cannot be read, or holds evaluations of other settings (:meth:`_settings`), is not taken up (said
        in a warning) and is rewritten with this run's evaluations."""
        path = None if self.log_path is None else self.log_path / "evaluations.npz"
        if path is None or self.model.num_timesteps == 0 or not path.is_file():
            return
        try:
            with np.load(path, allow_pickle=False) as saved:
                records = {key: saved[key] for key in saved.files}
            settings = json.loads(str(records.get("settings", "null")))
            fields = (
                "timesteps",
                "results",
                "costs",
                "pre_adapt_results",
                "pre_adapt_costs",
                "under_limit",
                "constraint_costs",
            )
            missing = set(fields) - set(records)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # e.g. a file cut short by a killed run
            warnings.warn(
                f"{path} cannot be read ({error}): not taken up, rewritten with this run's evaluations", stacklevel=2
            )
            return
        if missing or settings != json.loads(json.dumps(self._settings())):
            warnings.warn(
                f"{path} holds evaluations of other settings (tasks, adaptation, episodes, limits): not taken up (the "
                "file is rewritten with this run's)",
                stacklevel=2,
            )
            return
        keep = records["timesteps"] <= self.model.num_timesteps
        self.evaluations_timesteps = [int(step) for step in records["timesteps"][keep]]
        for attribute, key in (
            ("evaluations_results", "results"),
            ("evaluations_costs", "costs"),
            ("evaluations_pre_adapt_results", "pre_adapt_results"),
            ("evaluations_pre_adapt_costs", "pre_adapt_costs"),
            ("evaluations_constraint_costs", "constraint_costs"),
        ):
            setattr(self, attribute, records[key][keep].tolist())
        self.evaluations_under_limit = [bool(under) for under in records["under_limit"][keep]]
        for step, rewards, under in zip(
            self.evaluations_timesteps, self.evaluations_results, self.evaluations_under_limit, strict=True
        ):
            if under and float(np.mean(rewards)) > self.best_mean_reward:
                self.best_mean_reward, self.best_timestep = float(np.mean(rewards)), step

    def _on_step(self) -> bool:
        return self._continue_training  # what the hooks said after the last evaluation

    def _on_rollout_start(self) -> None:
        # A rollout starts after each update: the model is complete here.
        n_updates = self.model._n_updates
        if n_updates > self._last_evaluated and n_updates % self.eval_freq == 0:
            self.evaluate()

    def _on_training_end(self) -> None:
        if self.model._n_updates > self._last_evaluated:
            self.evaluate()

    def evaluate(self) -> list[AdaptationRecord]:
        """Evaluate now: log, append to ``evaluations.npz`` and save the model if it is the best under the limit."""
        model, _ = adaptable_model(self.model)
        self._last_evaluated = self.model._n_updates
        with th.random.fork_rng(devices=[]):  # the actors' noise seeds: training's torch stream stays as it was
            records = meta_evaluate(
                model, self.tasks, self.n_updates, self.n_steps, self.n_eval_episodes, deterministic=self.deterministic
            )
        last = max(record.n_updates for record in records)
        after = [record for record in records if record.n_updates == last]
        before = [record for record in records if record.n_updates == 0]
        rewards, costs = [r.ep_rew_mean for r in after], [r.ep_cost_mean for r in after]
        self.last_mean_reward, self.last_mean_cost = float(np.mean(rewards)), float(np.mean(costs))
        constrained = mean_costs(after, list(self._limits))  # each constrained cost's mean over the tasks
        under_limit = within_limits(constrained, self._limits)
        self.evaluations_timesteps.append(self.num_timesteps)
        self.evaluations_results.append(rewards)
        self.evaluations_costs.append(costs)
        self.evaluations_pre_adapt_results.append([r.ep_rew_mean for r in before])
        self.evaluations_pre_adapt_costs.append([r.ep_cost_mean for r in before])
        self.evaluations_under_limit.append(under_limit)
        self.evaluations_constraint_costs.append(list(constrained.values()))
        if self.log_path is not None:
            self._write_npz()

        new_best = under_limit and self.last_mean_reward > self.best_mean_reward
        if new_best:
            self.best_mean_reward, self.best_timestep = self.last_mean_reward, self.num_timesteps
            if self.best_model_path is not None:
                self.model.save(self.best_model_path)
        if self.verbose >= 1:
            limits = ", ".join(
                f"{name}={constrained[name]:.2f} (limit {limit:g}{'' if constrained[name] <= limit else ', over'})"
                for name, limit in self._limits.items()
            )
            print(f"Eval num_timesteps={self.num_timesteps}, reward={self.last_mean_reward:.2f}, {limits}")
            if new_best:
                print("New best mean reward under the cost limit!")

        record = self.logger.record
        record("eval/mean_reward", self.last_mean_reward)
        record("eval/mean_cost", self.last_mean_cost)
        record("eval/cost_limit", self._limits.get(TOTAL_COST, math.nan))
        for name, limit in self._limits.items():
            if name != TOTAL_COST:
                record(f"eval/mean_cost_{name}", constrained[name])
                record(f"eval/cost_limit_{name}", limit)
        record("eval/under_limit", float(under_limit))
        record("eval/best_safe_reward", self.best_mean_reward if self.best_timestep is not None else math.nan)
        if last > 0:
            record("eval/pre_adapt_mean_reward", float(np.mean(self.evaluations_pre_adapt_results[-1])))
            record("eval/pre_adapt_mean_cost", float(np.mean(self.evaluations_pre_adapt_costs[-1])))
        record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(self.num_timesteps)
        continue_training = True
        if new_best and self.callback_on_new_best is not None:
            continue_training = self.callback_on_new_best.on_step()
        if self.callback is not None:  # callback_after_eval
            continue_training = self._on_event() and continue_training
        self._continue_training = continue_training
        return records

    def _settings(self) -> dict[str, object]:
        """What makes two evaluations comparable (written to ``evaluations.npz`` as ``settings``, JSON): the tasks, the
        adaptation (its updates, steps per update and trust region as the model resolves them: a resumed model loaded
        with other ``n_inner_updates``, ``n_steps`` or trust region adapts otherwise), the episodes and the limits."""
        model, _ = adaptable_model(self.model)
        n_updates, n_steps, target_kl = model.adaptation_settings(self.n_updates, self.n_steps)
        return {
            "tasks": [task.to_dict() for task in self.tasks],
            "n_updates": n_updates,
            "n_steps": n_steps,
            "target_kl": target_kl,
            "n_eval_episodes": self.n_eval_episodes,
            "deterministic": self.deterministic,
            "limits": self._limits,
        }

    def _write_npz(self) -> None:
        """Write ``evaluations.npz`` atomically (a temporary file, then renamed over it): a run killed while writing
        leaves the previous file, which a resumed run takes up."""
        assert self.log_path is not None
        temporary = self.log_path / ".evaluations.npz.tmp.npz"
        np.savez(
            temporary,
            timesteps=np.array(self.evaluations_timesteps),
            results=np.array(self.evaluations_results),
            costs=np.array(self.evaluations_costs),
            pre_adapt_results=np.array(self.evaluations_pre_adapt_results),
            pre_adapt_costs=np.array(self.evaluations_pre_adapt_costs),
            under_limit=np.array(self.evaluations_under_limit),
            cost_limit=np.array(self._limits.get(TOTAL_COST, math.nan)),
            constraint_names=np.array(list(self._limits)),
            constraint_limits=np.array(list(self._limits.values())),
            constraint_costs=np.array(self.evaluations_constraint_costs),
            settings=np.array(json.dumps(self._settings())),
        )
        os.replace(temporary, self.log_path / "evaluations.npz")
