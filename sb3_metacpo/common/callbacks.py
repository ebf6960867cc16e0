"""Periodic checkpoints that a killed run resumes from exactly."""

from __future__ import annotations

import os
import re
from pathlib import Path

from stable_baselines3.common.callbacks import BaseCallback

from sb3_metacpo.common.checks import check, is_int


class ResumableCheckpointCallback(BaseCallback):
    """Save the model every ``save_freq`` updates (meta-iterations for MetaCPO and MetaTRPO, rollouts for CPO), at
    the boundary between two updates, and at the end of training.

    Unlike SB3's ``CheckpointCallback`` (which saves every n env steps, in the middle of a rollout, so a file
    labelled 2400 steps holds the parameters of step 2000), a checkpoint here is taken where the model's state is
    complete: the file named ``<prefix>_<updates>_updates_<steps>_steps.zip`` holds the model after exactly that
    many updates and env steps, with everything training needs to continue (see ``save``): a run killed at any
    point resumes from its last checkpoint, losing at most ``save_freq`` updates, with

    .. code-block:: python

        model = MetaCPO.load(ResumableCheckpointCallback.latest(folder))
        model.learn(total_timesteps - model.num_timesteps, callback=..., reset_num_timesteps=False)

    and MetaCPO and MetaTRPO then reach bit-identical parameters to the uninterrupted run (CPO's episodes run across
    rollouts, so its envs restart their episodes on resuming). Files are written atomically.

    :param save_freq: updates between checkpoints
    :param save_path: the folder of the checkpoints
    :param name_prefix: the files' prefix
    :param keep_last: keep only this many most recent checkpoints (None: all)
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

    def _init_callback(self) -> None:
        self.save_path.mkdir(parents=True, exist_ok=True)
        self.last_saved_update = self.model._n_updates  # a resumed run does not save its starting point again

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        # A rollout starts after an update (or at the start of training): the model's state is complete here.
        if self.model._n_updates - self.last_saved_update >= self.save_freq:
            self._save()

    def _on_training_end(self) -> None:
        if self.model._n_updates > self.last_saved_update:
            self._save()

    def _save(self) -> None:
        updates, steps = self.model._n_updates, self.model.num_timesteps
        path = self.save_path / f"{self.name_prefix}_{updates}_updates_{steps}_steps.zip"
        self.model.save(path)
        self.last_saved_update = updates
        self.saved.append(path)
        if self.verbose >= 1:
            print(f"Saving checkpoint to {path}")
        if self.keep_last is not None:
            while len(self.saved) > self.keep_last:
                self.saved.pop(0).unlink(missing_ok=True)

    @staticmethod
    def latest(save_path: str | os.PathLike[str], name_prefix: str = "checkpoint") -> Path | None:
        """The checkpoint of ``save_path`` with the most updates (None when there is none)."""
        pattern = re.compile(rf"{re.escape(name_prefix)}_(\d+)_updates_(\d+)_steps\.zip")
        found = [
            (int(match.group(1)), path)
            for path in Path(save_path).glob(f"{name_prefix}_*_updates_*_steps.zip")
            if (match := pattern.fullmatch(path.name))
        ]
        return max(found)[1] if found else None
