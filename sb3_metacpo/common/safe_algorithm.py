"""What every CPO-step algorithm of the package shares (CPO, MetaCPO, MetaTRPO): its cost constraints, its task
distribution, the settings of its CPO updates, writing an update back into the policy and the ``train/*`` and
``rollout/*`` safety logs."""

from __future__ import annotations

import inspect
import math
import operator
import os
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.utils import get_system_info, safe_mean

from sb3_metacpo.common.checks import check_seed, is_real
from sb3_metacpo.common.constrained_step import StepConfig, StepResult
from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.cpo_subproblem import CVXPYLAYERS_EXTRA, MAX_ACTIVE_SET_CONSTRAINTS, cvxpylayers_available
from sb3_metacpo.common.cpo_update import CPOConfig, Params
from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.common.serialization import (
    POLICY_CONTENT,
    ArchiveError,
    check_actor_override,
    check_finite_tensors,
    check_optimizer_settings,
    check_optimizer_state_shapes,
    check_policy_state,
    check_rng_state,
    decode_space,
    decode_value,
    encode_space,
    encode_value,
    global_rng_state,
    lookup_class,
    read_archive,
    set_global_rng_state,
    write_archive,
)
from sb3_metacpo.tasks.base import Task, TaskDistribution, make_task_distribution
from sb3_metacpo.tasks.monitor import SAFETY_GYMNASIUM_TOTAL, TOTAL_COST

SelfSafeAlgorithm = TypeVar("SelfSafeAlgorithm", bound="SafeAlgorithmMixin")
#: True while SB3's loader reads an archive in SB3's format (``load_sb3_archive``): MetaCPO's held no optimiser state
_READING_SB3_ARCHIVE: ContextVar[bool] = ContextVar("_READING_SB3_ARCHIVE", default=False)
#: Constructor arguments kept under another attribute name.
_ATTRIBUTE_OF_ARGUMENT = {
    "n_envs": "n_envs_requested",
    "stats_window_size": "_stats_window_size",
    "sampler": "sampler_type",
}
#: Constructor arguments that are not saved (given again when loading).
_NOT_SAVED = ("self", "policy", "env", "device", "_init_setup_model")
#: ``sampler_kwargs`` entries that are not saved either: how to reach or start Ray (``ray.init``'s ``address``,
#: ``runtime_env``...) is the machine's, not the model's, and would let a file run code (e.g. a runtime environment's
#: ``py_executable``) when training resumes. Give them again to ``load``.
_NOT_SAVED_SAMPLER_OPTIONS = ("ray_init_kwargs",)


def saved_env_id(source: Any) -> str | None:
    """The env id of an archive's ``env_source`` (``{"id": ...}``: a model trained on an env id), else None. Only a
    plain id: an ``entry:point`` id would make gymnasium import a module that the file names."""
    if isinstance(source, dict) and set(source) == {"id"}:
        env_id = source["id"]
        if isinstance(env_id, str) and ":" not in env_id:
            return env_id
    return None


def _check_counters(counters: Any) -> None:
    """Raise a ``ValueError`` unless the archive's counters are what ``save`` writes: non-negative integers (``n_envs``
    positive or None) and a finite progress."""
    if not isinstance(counters, dict):
        raise ValueError("counters must be a mapping")
    for name in ("num_timesteps", "n_updates", "episode_num"):
        value = counters[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"counters.{name} must be an integer >= 0, got {value!r}")
    n_envs = counters.get("n_envs")
    if n_envs is not None and (isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1):
        raise ValueError(f"counters.n_envs must be None or an integer >= 1, got {n_envs!r}")
    progress = counters["progress_remaining"]
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not math.isfinite(progress):
        raise ValueError(f"counters.progress_remaining must be a finite number, got {progress!r}")


def _package_version() -> str:
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "version.txt")) as file:
        return file.read().strip()


def _system_info() -> dict[str, str]:
    """SB3's system description (OS, Python, SB3, PyTorch, GPU, numpy, gymnasium versions) and this package's."""
    info, _ = get_system_info(print_info=False)
    return {**{str(key): str(value) for key, value in info.items()}, "sb3-metacpo": _package_version()}


def _print_system_info(saved: Any) -> None:
    """SB3's ``load(print_system_info=True)`` printout: this system's description and the saved model's."""
    print("== CURRENT SYSTEM INFO ==")
    print("".join(f"- {key}: {value}\n" for key, value in _system_info().items()), end="")
    print("== SAVED MODEL SYSTEM INFO ==")
    if isinstance(saved, dict) and all(isinstance(key, str) and isinstance(value, str) for key, value in saved.items()):
        print("".join(f"- {key}: {value!r}\n" for key, value in saved.items()), end="")
    else:
        print("- not in the archive (saved by an earlier version)")


#: ``train/cpo_case_code``: the CPO case as a number, for TensorBoard (which shows the ``train/cpo_case`` string as
#: text, not as a curve) and other numeric-only readers. "skipped": a fault stopped the step before the subproblem.
CPO_CASE_CODES: dict[str, int] = {"trpo": 0, "dual": 1, "recovery": 2, "skipped": -1}

#: Cost limit of plain envs (the safety-gymnasium benchmark's standard limit), when ``cost_limit`` is not given.
DEFAULT_COST_LIMIT = 25.0


def episode_infos_as_data(infos: Sequence[Mapping[Any, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """Episode infos (SB3's ``ep_info_buffer`` entries) as JSON, and the keys left out: numpy arrays become lists;
    a value that is not data even then, or a key that is not a string, is left out."""
    entries, dropped = [], set()
    for info in infos:
        entry = {}
        for key, value in info.items():
            if not isinstance(key, str):
                dropped.add(repr(key))
                continue
            try:
                entry[key] = encode_value(value.tolist() if isinstance(value, np.ndarray) else value, key)
            except TypeError:
                dropped.add(key)
        entries.append(entry)
    return entries, dropped


class LoadArgumentError(ValueError):
    """An argument given to ``load`` does not fit the saved model (the archive itself is sound)."""


def _tensors_in(state: Any, prefix: str = "") -> list[tuple[str, th.Tensor]]:
    """Every floating-point tensor in a (nested) state dict, with its key path."""
    if isinstance(state, th.Tensor):
        return [(prefix, state)] if state.is_floating_point() else []
    if isinstance(state, Mapping):
        return [item for key, value in state.items() for item in _tensors_in(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(state, (list, tuple)):
        return [item for index, value in enumerate(state) for item in _tensors_in(value, f"{prefix}[{index}]")]
    return []


class SafeAlgorithmMixin(ABC):
    """Mixed into SB3 algorithms that update their actor by CPO steps; expects the hyperparameters as attributes."""

    cost_limit: float | Mapping[str, float] | None
    dual_solver: str
    cg_max_steps: int
    cg_damping: float
    fvp_sample_freq: int
    line_search_max_iter: int
    line_search_shrinking_factor: float
    recovery: str
    task_distribution: TaskDistribution | None
    task_distribution_name: str | None
    #: a loaded model's random streams (JSON states, torch's generator), applied when training resumes
    _resume_rng: tuple[Mapping[str, Any], th.Tensor] | None
    task_distribution_params: dict[str, Any] | None
    ep_info_buffer: Any
    ep_success_buffer: deque[Any] | None
    _stats_window_size: int
    observation_space: gym.spaces.Space
    action_space: gym.spaces.Space
    logger: Any
    _constrained: ClassVar[bool] = True

    # --- task distribution ----------------------------------------------------------------------------------
    def _remember_task_distribution(self, distribution: TaskDistribution) -> None:
        """Keep ``distribution`` and what rebuilds it after loading (its name and parameters)."""
        self.task_distribution = distribution
        self.task_distribution_name = distribution.name
        self.task_distribution_params = distribution.get_params()

    def _get_task_distribution(self) -> TaskDistribution | None:
        if self.task_distribution is None and self.task_distribution_name is not None:
            assert self.task_distribution_params is not None
            self.task_distribution = make_task_distribution(self.task_distribution_name, **self.task_distribution_params)
        return self.task_distribution

    def _check_policy_class(self, policy: Any = None) -> None:
        """A ``TypeError`` unless the policy is a :class:`CPOPolicy`. Without ``policy``: the policy class (an alias
        such as ``"MlpPolicy"`` is already its class here), before the model seeds anything or builds its networks,
        since another class fails inside its constructor on the arguments the algorithm gives it (``n_costs``) with an
        error that names neither; a factory that is not a class (e.g. a ``functools.partial`` of one) cannot be told
        before it builds: ``policy``, what it built, is checked then."""
        kind = self.policy_class if policy is None else type(policy)  # type: ignore[attr-defined]
        if not callable(kind):  # 3, None, object(): "'int' object is not callable" from inside _setup_model
            raise TypeError(f"{type(self).__name__}'s policy must be 'MlpPolicy' or a CPOPolicy class, got {kind!r}")
        if isinstance(kind, type) and not issubclass(kind, CPOPolicy):
            raise TypeError(f"{type(self).__name__} needs a CPOPolicy (e.g. 'MlpPolicy'), got {kind.__name__}")

    # --- constraints ------------------------------------------------------------------------------------------
    @property
    def constraints(self) -> CostConstraints:
        """The cost constraints, from ``cost_limit`` (a float on ``info["cost"]`` or a mapping of cost names to limits),
        by default the task family's suggested limit (25 for plain envs) on ``info["cost"]``."""
        if self.cost_limit is not None:
            return CostConstraints.from_cost_limit(self.cost_limit)
        distribution = self._get_task_distribution()
        default = distribution.default_cost_limit if distribution is not None else DEFAULT_COST_LIMIT
        return CostConstraints.from_cost_limit(float(default))

    @property
    def effective_cost_limit(self) -> float:
        """The limit of the first constraint (the only one unless ``cost_limit`` is a mapping)."""
        return self.constraints.limits[0]

    @property
    def total_cost_limit(self) -> float | None:
        """The limit of the total cost ``info["cost"]`` if it is constrained (a float ``cost_limit``, or a mapping
        naming ``"cost"``), else None: what a total episode cost may be compared with."""
        return self.constraints.limit_of(TOTAL_COST)

    def _check_constraints(self) -> None:
        """Validate ``cost_limit`` (and, for a task family, that it reports every named cost), before any env step."""
        constraints = self.constraints
        distribution = self._get_task_distribution()
        if distribution is not None:
            constraints.check_reported(distribution.cost_names, f"the task family {distribution.name}")
        if self._constrained:  # MetaTRPO solves no dual: its dual_solver has no effect, and needs nothing installed
            self._check_dual_solver(len(constraints), f"cost_limit names {len(constraints)} costs")

    def _check_dual_solver(self, n_constraints: int, what: str) -> None:
        """That ``dual_solver`` can solve steps with ``n_constraints`` constraints (``what`` says where they come
        from), and that cvxpylayers is installed where it is needed."""
        many = n_constraints > MAX_ACTIVE_SET_CONSTRAINTS
        if self.dual_solver == "analytic" and many:
            raise ValueError(
                f"dual_solver='analytic' solves at most {MAX_ACTIVE_SET_CONSTRAINTS} constraints exactly; {what}: use "
                "dual_solver='cvxpylayers' or 'auto'"
            )
        layers = self.dual_solver == "cvxpylayers" or (self.dual_solver == "auto" and many)
        if layers and not cvxpylayers_available():
            reason = what if many else "dual_solver='cvxpylayers'"
            raise ImportError(f"{reason}, which needs cvxpy and cvxpylayers (not installed): {CVXPYLAYERS_EXTRA}")

    # --- the CPO updates --------------------------------------------------------------------------------------
    def _cpo_config(self, target_kl: float, n_constraints: int | None = None) -> CPOConfig:
        """The settings of a CPO update with ``n_constraints`` constraints (default: one per cost constraint), which
        decides what ``dual_solver="auto"`` picks."""
        solver = self.dual_solver
        if solver == "auto":
            count = len(self.constraints) if n_constraints is None else n_constraints
            solver = "analytic" if count <= MAX_ACTIVE_SET_CONSTRAINTS else "cvxpylayers"
        step = StepConfig(
            target_kl=target_kl,
            cg_max_steps=self.cg_max_steps,
            dual_solver=solver,
            line_search_max_iter=self.line_search_max_iter,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
        )
        return CPOConfig(step, self._constrained, self.cg_damping, self.fvp_sample_freq)

    def _check_learning_rate_now(self) -> None:
        """Raise a ``ValueError`` (before any update) where the critics' learning-rate schedule gives, at the current
        progress, anything but a finite number >= 0: NaN or inf would make every critic parameter NaN, a negative
        rate ascend the critics' loss."""
        progress = float(self._current_progress_remaining)  # type: ignore[attr-defined]
        value = self.lr_schedule(progress)  # type: ignore[attr-defined]
        if not (is_real(value) and value >= 0):
            raise ValueError(
                f"the learning-rate schedule gave {value!r} at progress remaining {progress:.4g}: the critics' learning "
                "rate must be a finite number >= 0 at every progress in [0, 1]; nothing was updated"
            )

    @staticmethod
    def _write_back(params: Params, new_params: Params) -> None:
        """Copy an update into the module's parameters, refusing anything non-finite (no state changes then)."""
        if not all(bool(th.isfinite(value).all()) for value in new_params.values()):
            raise FloatingPointError("an update produced non-finite parameters; the policy was left unchanged")
        with th.no_grad():
            for name, value in new_params.items():
                params[name].copy_(value)

    # --- logs ---------------------------------------------------------------------------------------------------
    def _record_step(self, result: StepResult, names: Sequence[str] | None = None, prefix: str = "train/") -> None:
        """``train/cpo_case`` (and its number ``train/cpo_case_code``, see :data:`CPO_CASE_CODES`), ``train/lambda``,
        ``train/nu`` (``train/nu_<name>`` per constraint other than the total cost; ``names`` default to the cost
        constraints'), ``train/kl``, ``train/line_search_fraction``, ``train/n_backtracks`` (how often the line search
        shrank the step) and the cause of a rejected step (``train/step_rejection``, ``"none"`` when accepted)."""
        record = self.logger.record
        names = list(self.constraints.names if names is None else names)
        record(f"{prefix}cpo_case", result.case)
        record(f"{prefix}cpo_case_code", CPO_CASE_CODES[result.case])
        record(f"{prefix}lambda", result.lam)
        for name, nu in zip(names, result.nu, strict=False):
            record(f"{prefix}nu" if name == "cost" else f"{prefix}nu_{name}", nu)
        record(f"{prefix}kl", 0.0 if not result.accepted else result.kl)
        record(f"{prefix}line_search_fraction", result.fraction)
        record(f"{prefix}n_backtracks", result.n_backtracks)
        record(f"{prefix}step_rejection", result.rejection or "none", exclude=("tensorboard",))

    def _record_rollout_costs(self) -> None:
        """``rollout/ep_cost_mean`` (the total cost) and ``rollout/ep_<name>_mean`` for every other cost signal the
        episodes reported (each ``cost_<type>``, constrained or not; safety-gymnasium's ``cost_sum``, the total cost
        again, only when constrained), each the mean over the episodes of the window that reported it."""
        if not self.ep_info_buffer:
            return
        self.logger.record("rollout/ep_cost_mean", safe_mean([info["c"] for info in self.ep_info_buffer]))
        sums: dict[str, list[float]] = {}
        for info in self.ep_info_buffer:
            for name, value in info.get("episode_costs", {}).items():
                sums.setdefault(name, []).append(value)
        for name in sorted(sums):
            if name != TOTAL_COST and (name != SAFETY_GYMNASIUM_TOTAL or name in self.constraints.names):
                self.logger.record(f"rollout/ep_{name}_mean", float(np.mean(sums[name])))

    # --- saving and loading (data only; see sb3_metacpo.common.serialization) ----------------------------------
    def _constructor_arguments(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model, as JSON."""
        arguments: dict[str, Any] = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name in _NOT_SAVED:
                continue
            value = getattr(self, _ATTRIBUTE_OF_ARGUMENT.get(name, name))
            if name == "learning_rate" and callable(value):  # a schedule is saved as its current value (SB3's
                # progress overshoots below 0 at the end of training, where a linear schedule would go negative)
                progress = max(float(self._current_progress_remaining), 0.0)  # type: ignore[attr-defined]
                value = float(self.lr_schedule(progress))  # type: ignore[attr-defined]
            if name == "policy_kwargs":
                value = {key: item for key, item in (value or {}).items() if key != "n_costs"}  # set by _setup_model
            if name == "sampler_kwargs" and value is not None:
                value = {key: item for key, item in value.items() if key not in _NOT_SAVED_SAMPLER_OPTIONS}
            arguments[name] = encode_value(value, name)
        return arguments

    def _warn_if_not_savable(self) -> None:
        """Warn at construction, not at the first checkpoint after hours of training, when an argument (e.g. an
        unregistered activation or policy class) cannot be written to an archive."""
        try:
            self._constructor_arguments()
        except TypeError as error:
            warnings.warn(f"this model cannot be saved (save, checkpoints, best-model callbacks): {error}", stacklevel=3)

    def _sampler_rng_states(self) -> dict[str, Any]:
        """The episode-seed streams of the algorithm's samplers (none by default)."""
        return {}

    def _set_sampler_rng_states(self, states: Mapping[str, Any]) -> None:
        """Restore :meth:`_sampler_rng_states` (the samplers exist by then); by default there is none to restore."""
        del states

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's ``set_random_seed``; a loaded model then trains on from ``seed``'s streams, not from the archive's
        (which ``learn(reset_num_timesteps=False)`` would otherwise restore over them)."""
        if seed is not None:
            check_seed(seed)
            self._resume_rng = None
        super().set_random_seed(seed)  # type: ignore[misc]

    def _saved_adaptation_history(self) -> list[dict[str, Any]]:
        """The adaptation history ``save`` writes: while ``adapt`` runs (a callback saving), the one from before the
        call, which goes with the adapted parameters from before it (the running adaptation's are not set yet)."""
        before = getattr(self, "_history_before_adapt", None)
        return self.adaptation_history if before is None else before  # type: ignore[attr-defined,no-any-return]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        """SB3's names of the model's torch objects (``get_parameters``, ``set_parameters``): the policy and the
        critics' optimiser, as SB3's on-policy algorithms."""
        return ["policy", "policy.optimizer"], []

    def set_parameters(
        self, load_path_or_dict: str | os.PathLike[str] | dict[str, Any], exact_match: bool = True, device: Any = "auto"
    ) -> None:
        """SB3's ``set_parameters`` (e.g. ``model.set_parameters(other.get_parameters())``): a path is read as this
        package's archive (its policy and optimiser tensors, running no code from the file) or a policy saved alone
        (``policy.save``: its tensors; the optimiser's state is then missing, which ``exact_match`` refuses, as
        SB3's does). Objects that are not the model's (with ``exact_match``) and non-finite tensors are refused before
        anything changes (SB3 set the objects it was given, then refused); an adaptation is forgotten (``predict``
        acts with the new parameters)."""
        expected = set(self.get_parameters())  # type: ignore[attr-defined]  # the names of the model's objects
        if isinstance(load_path_or_dict, (str, os.PathLike)):
            metadata, tensors = read_archive(load_path_or_dict, "cpu")
            if metadata.get("content") == POLICY_CONTENT:  # a policy saved alone holds no optimiser state
                stored = {"policy": tensors["policy"]}
            else:
                stored = {"policy": tensors["policy"], "policy.optimizer": tensors["optimizer"]}
            params = {name: value for name, value in stored.items() if name in expected}
        else:
            params = load_path_or_dict
        if exact_match and _READING_SB3_ARCHIVE.get() and set(params) == expected - {"policy.optimizer"}:
            exact_match = False  # MetaCPO's SB3-format archives held no optimiser state: a fresh one, as when built
        for name, state in params.items():
            for key, value in _tensors_in(state):
                if not bool(th.isfinite(value).all()):
                    raise ValueError(f"set_parameters: {name}[{key}] has non-finite values; nothing was changed")
        if exact_match and set(params) != expected:  # SB3 raises only after setting the objects it was given
            raise ValueError(
                f"set_parameters: the objects given, {sorted(params)}, are not the model's, {sorted(expected)} (a policy "
                "saved alone has no optimiser state: pass exact_match=False); nothing was changed"
            )
        self._check_module_states(params, exact_match)
        super().set_parameters(params, exact_match, device)  # type: ignore[misc]
        if self.adapted_params is not None:  # type: ignore[attr-defined]
            self.reset_adaptation()  # type: ignore[attr-defined]

    def _check_module_states(self, params: dict[str, Any], exact_match: bool) -> None:
        """A ``ValueError`` before anything changes where a module's state (e.g. ``policy``) does not fit the model's:
        torch's ``load_state_dict`` copies the tensors that fit and raises after, so a model of another ``net_arch``
        left this one half loaded (its ``log_std`` replaced, its networks not)."""
        for name, state in params.items():
            target = operator.attrgetter(name)(self)
            if isinstance(target, th.optim.Optimizer) and isinstance(state, Mapping):  # its load raises after the policy's
                own_groups, groups = target.state_dict()["param_groups"], state.get("param_groups")
                sizes = [len(group.get("params", ())) for group in groups] if isinstance(groups, list) else None
                if sizes != [len(group["params"]) for group in own_groups]:
                    raise ValueError(
                        f"set_parameters: {name}'s parameter groups do not match the model's (sizes {sizes}, the model's "
                        f"{[len(group['params']) for group in own_groups]}); nothing was changed"
                    )
            if not isinstance(target, th.nn.Module) or not isinstance(state, Mapping):
                continue
            own = target.state_dict()
            for key, value in state.items():
                shape = tuple(getattr(value, "shape", ()))
                if key in own and shape != tuple(own[key].shape):
                    raise ValueError(
                        f"set_parameters: {name}[{key}] has shape {shape} where the model's is "
                        f"{tuple(own[key].shape)} (a model of another net_arch or spaces?); nothing was changed"
                    )
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            if exact_match and (missing or unexpected):
                raise ValueError(
                    f"set_parameters: {name} lacks {missing} and has {unexpected} beside the model's tensors (pass "
                    "exact_match=False to load the ones it has); nothing was changed"
                )

    def save(self, path: str | os.PathLike[str], exclude: Any = None, include: Any = None) -> Path:  # type: ignore[override]
        """Save everything needed to use the model and to continue training it exactly: constructor arguments,
        policy parameters and buffers (critics, observation statistics), the critic optimiser's state, counters,
        the adaptation, the task distribution with its stream's state and every random stream. Written atomically;
        ``.zip`` is added when ``path`` has no suffix. Returns the path written.

        The archive holds JSON and tensors only (see :mod:`sb3_metacpo.common.serialization`); ``exclude`` and
        ``include`` (SB3's) are not supported.
        """
        if exclude is not None or include is not None:
            raise ValueError("save(exclude=..., include=...) is not supported: the archive holds the whole model")
        distribution = self._get_task_distribution()
        pending = getattr(self, "_resume_rng", None)
        if pending is None:
            json_rng, torch_rng = global_rng_state()
            rng = {**json_rng, "samplers": self._sampler_rng_states()}
        else:  # loaded and not resumed yet: the streams to continue are still the archive's, not this process's
            rng, torch_rng = dict(pending[0]), pending[1]
        # the adaptations' episodes go on whatever learn does: always this model's own stream
        samplers = {key: value for key, value in rng.get("samplers", {}).items() if key != "adaptation"}
        adaptation = self._adaptation_rng_states()  # type: ignore[attr-defined]
        rng = {**rng, "samplers": samplers if adaptation is None else {**samplers, "adaptation": adaptation}}
        policy = self.policy  # type: ignore[attr-defined]
        hyperparameters = self._constructor_arguments()
        schedule = callable(getattr(self, "learning_rate", None))
        if schedule and not getattr(self, "_warned_schedule_not_saved", False):
            self._warned_schedule_not_saved = True  # once per model: checkpoints save often
            warnings.warn(
                "learning_rate is a schedule (a function), which an archive does not hold (data, not code): it saves "
                f"the schedule's current value, {hyperparameters['learning_rate']}, which a loaded model "
                "uses as a constant; give the schedule again to load (load(path, learning_rate=schedule)) to continue it",
                stacklevel=2,
            )
        metadata = {
            "algorithm": type(self).__name__,
            "package_version": _package_version(),
            "system_info": _system_info(),
            "hyperparameters": hyperparameters,
            "policy_class": encode_value(self.policy_class, "policy_class")["__class__"],  # type: ignore[attr-defined]
            "observation_space": encode_space(self.observation_space),
            "action_space": encode_space(self.action_space),
            "task_distribution": None
            if distribution is None
            else {
                "name": distribution.name,
                "params": encode_value(distribution.get_params(), "task distribution parameters"),
                "stream": distribution._rng.bit_generator.state,
            },
            "counters": {
                "num_timesteps": int(self.num_timesteps),  # type: ignore[attr-defined]
                "n_updates": int(self._n_updates),  # type: ignore[attr-defined]
                "episode_num": int(self._episode_num),  # type: ignore[attr-defined]
                "progress_remaining": float(self._current_progress_remaining),  # type: ignore[attr-defined]
                "n_envs": None if getattr(self, "n_envs", None) is None else int(self.n_envs),  # type: ignore[attr-defined]
            },
            "env_source": getattr(self, "env_source", None),
            "adaptation_history": encode_value(self._saved_adaptation_history(), "adaptation_history"),
            "ep_info_buffer": self._episode_infos_as_data(),
            "rng": rng,
            "learning_rate_schedule": schedule,
        }
        adapted = self.adapted_params  # type: ignore[attr-defined]
        tensors = {
            "policy": policy.state_dict(),
            "optimizer": policy.optimizer.state_dict(),
            "adapted_params": {} if adapted is None else {name: value.detach() for name, value in adapted.items()},
            "torch_rng": torch_rng,
        }
        return write_archive(path, metadata, tensors)

    def _episode_infos_as_data(self) -> list[dict[str, Any]]:
        """The episode-info window (what ``rollout/ep_rew_mean`` and the like average) as JSON: numpy arrays as
        lists; what cannot be saved as data (e.g. an object a Monitor's ``info_keywords`` recorded) is left out,
        said once per model."""
        entries, dropped = episode_infos_as_data(list(self.ep_info_buffer or []))  # type: ignore[attr-defined]
        if dropped and not getattr(self, "_warned_episode_infos", False):
            self._warned_episode_infos = True
            warnings.warn(
                f"the episode infos' {sorted(dropped)} cannot be saved as data (numbers, strings, lists of them): the "
                "archive leaves them out (a resumed run's ep_info_buffer lacks them for the episodes before the save)",
                stacklevel=3,
            )
        return entries

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfSafeAlgorithm],
        path: str | os.PathLike[str],
        env: Any = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfSafeAlgorithm:
        """Load a model saved by :meth:`save`, running no code from the file: metadata as JSON, tensors with
        ``torch.load(weights_only=True)``, classes from the registry of allowed classes. An archive of another
        algorithm, of SB3's pickling format, or holding anything else is refused with an ``ArchiveError``.

        :param path: the archive (``.zip`` is added when the path has no suffix and the file without it is absent)
        :param env: what to train or adapt on from now on (MetaCPO: a task distribution; CPO: any env it accepts; a
            VecEnv or env object brings its own number of envs, which may differ from the saved model's, an env
            the model builds, from an id, a task or a distribution, has ``n_envs`` envs, the saved number unless
            given here). The env the archive describes (the same id, an equal task distribution, the family's
            name, the same task) goes on with the saved task and episode streams, as without ``env``; another env
            starts its own (its task stream, and episode streams from the model's seed, the adaptations' too)
        :param device: torch device
        :param custom_objects: constructor arguments to replace (as SB3's; names that are not constructor
            arguments, e.g. the RL Zoo's ``lr_schedule``, are ignored with a warning, as SB3 ignores names the
            archive does not hold)
        :param print_system_info: print this system's and the saved model's OS, Python and package versions (as SB3)
        :param force_reset: SB3's: reset the given env before training (CPO; a MetaCPO batch always starts fresh
            episodes, so MetaCPO ignores it)
        :param kwargs: constructor arguments to replace, e.g. ``n_steps=100``
        """
        metadata, tensors = read_archive(path, "cpu")
        if print_system_info:
            _print_system_info(metadata.get("system_info"))
        algorithm = metadata.get("algorithm")
        if metadata.get("content") == POLICY_CONTENT:
            raise ArchiveError(
                f"{path} holds a policy saved alone (policy.save), not a {cls.__name__} model: load it with "
                "CPOPolicy.load (save the whole model with model.save to load it here)"
            )
        if algorithm != cls.__name__:
            raise ArchiveError(
                f"{path} holds a {algorithm} model, which {cls.__name__}.load does not load: use {algorithm}.load"
            )
        try:
            arguments = decode_value(metadata["hyperparameters"])
            policy_class = lookup_class(metadata["policy_class"])
        except KeyError as error:
            raise ArchiveError(f"{path}: the metadata has no {error}") from error
        except ArchiveError:
            raise
        except ValueError as error:  # e.g. an unregistered class name
            raise ArchiveError(f"{path}: {error}") from error
        refused = [key for key in _NOT_SAVED_SAMPLER_OPTIONS if ((arguments or {}).get("sampler_kwargs") or {}).get(key)]
        if refused:
            raise ArchiveError(
                f"{path} holds sampler_kwargs {refused}, which archives never hold (they could run code when training "
                "resumes): pass them to load, e.g. load(path, sampler_kwargs={...})"
            )
        accepted = set(inspect.signature(cls.__init__).parameters) - set(_NOT_SAVED)
        if not isinstance(arguments, dict) or not set(arguments) <= accepted:
            raise ArchiveError(f"{path}: the metadata names constructor arguments {cls.__name__} does not have")
        if custom_objects is not None and not isinstance(custom_objects, Mapping):
            raise TypeError(f"custom_objects must be a dict of constructor arguments, got {type(custom_objects).__name__}")
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(f"{cls.__name__}.load: unknown arguments {unknown}; it accepts {sorted(accepted)}")
        # custom_objects replace saved values and, as in SB3, names the archive does not hold are ignored (e.g. the
        # RL Zoo's lr_schedule and clip_range)
        ignored = sorted(set(custom_objects or {}) - accepted)
        if ignored:
            warnings.warn(
                f"{cls.__name__}.load: custom_objects {ignored} are not arguments of {cls.__name__}: ignored", stacklevel=2
            )
        custom = {key: value for key, value in (custom_objects or {}).items() if key in accepted}
        overrides = {**custom, **kwargs}
        if "policy_kwargs" in overrides:  # as SB3: the saved parameters are those of the saved network
            try:
                given = encode_value(overrides["policy_kwargs"] or {}, "policy_kwargs")
            except TypeError as error:
                raise LoadArgumentError(f"{cls.__name__}.load: invalid arguments ['policy_kwargs']: {error}") from error
            stored = metadata["hyperparameters"].get("policy_kwargs") or {}
            if given != stored:
                raise LoadArgumentError(
                    f"{cls.__name__}.load: policy_kwargs {given} differ from the saved model's {stored}: its parameters "
                    "belong to that network (leave policy_kwargs out)"
                )
        saved_options = arguments.get("sampler_kwargs") or {}
        given_options = overrides.get("sampler_kwargs")
        if isinstance(given_options, dict) and set(saved_options) - set(given_options):
            warnings.warn(
                f"{cls.__name__}.load: the sampler_kwargs given replace the saved ones, whose "
                f"{ {key: saved_options[key] for key in sorted(set(saved_options) - set(given_options))} } are not among "
                "them: the model runs with their defaults (give them again to keep them)",
                stacklevel=2,
            )
        try:
            model = cls(policy_class, None, device=device, _init_setup_model=False, **{**arguments, **overrides})  # type: ignore[call-arg]
        except (TypeError, ValueError, OverflowError) as error:
            if overrides:
                raise LoadArgumentError(f"{cls.__name__}.load: invalid arguments {sorted(overrides)}: {error}") from error
            raise ArchiveError(f"{path}: the constructor arguments it holds are invalid: {error}") from error
        model._load_overrides = sorted(overrides)  # type: ignore[attr-defined]  # for _restore's errors: a bad argument of load is not a bad archive
        model._restore(metadata, tensors)
        if metadata.get("learning_rate_schedule") is True and "learning_rate" not in overrides:
            value = arguments.get("learning_rate")
            stopped = " (0: the critics no longer learn)" if value == 0 else ""
            warnings.warn(
                f"{path} was saved with a learning-rate schedule, which archives do not hold: its value when saved, "
                f"{value}{stopped}, is now the constant learning rate; give the schedule or a rate to load "
                "(load(path, learning_rate=...)) to train on with another",
                stacklevel=2,
            )
        saved = env is None
        restored = model._get_task_distribution()
        stream = None if restored is None else restored._rng.bit_generator.state
        if saved:
            env = model._saved_env(metadata.get("env_source"), path)
        elif model._describes_saved_env(env, metadata.get("env_source")):
            saved = True  # SB3's habit, load(path, env=<the same env>): the run goes on as without env=
        else:  # another env: its episodes are its own (the task stream is the given distribution's)
            model._forget_saved_episode_streams()
        if env is not None:
            adaptation_streams = model._saved_adaptation_streams  # type: ignore[attr-defined]
            model._use_env_after_load(env, force_reset, set(overrides), saved)
            if saved:  # the archive's env: its adaptations go on (a change of family would start them afresh)
                model._saved_adaptation_streams = adaptation_streams  # type: ignore[attr-defined]
        distribution = model._get_task_distribution()
        if saved and distribution is not None and distribution is not restored and stream is not None:
            distribution._rng.bit_generator.state = stream  # an equal distribution given to load: the saved task stream
        return model

    def _forget_saved_episode_streams(self) -> None:
        """Start the envs' and the adaptations' episode streams from the model's seed, not where the archive left
        them (``load`` given another env than the archive's)."""
        pending = getattr(self, "_resume_rng", None)
        if pending is not None:
            json_state, torch_state = pending
            self._resume_rng = ({**json_state, "samplers": {}}, torch_state)
        self._saved_adaptation_streams = None

    def _describes_saved_env(self, env: Any, source: Any) -> bool:
        """Whether ``env`` given to ``load`` is the env the archive describes (``source``: its ``env_source``): the
        same env id, a task distribution of the saved one's family and parameters (or that family's name, which builds
        one from the model's seed), or the saved task. Then the saved random streams (tasks, episodes) go on."""
        restored = self._get_task_distribution()
        if isinstance(env, str) and restored is not None and env == restored.name:
            env = make_task_distribution(env, seed=0 if self.seed is None else self.seed)  # type: ignore[attr-defined]
        if isinstance(env, str):
            return source == {"id": env}
        if isinstance(env, TaskDistribution):
            same = restored is not None and (env.name, env.get_params()) == (restored.name, restored.get_params())
            return same and source in (None, {"task_distribution": True})
        if isinstance(env, Task):
            return source == {"task": env.to_dict()}
        return False

    def _saved_env(self, source: Any, path: str | os.PathLike[str]) -> Any:
        """What a loaded model trains on when ``load`` is given no env, from the archive's ``env_source`` (None:
        nothing; MetaCPO's task distribution is restored as its own, and CPO overrides this)."""
        del source, path
        return None

    @classmethod
    def load_sb3_archive(cls: type[SelfSafeAlgorithm], path: str | os.PathLike[str], **kwargs: Any) -> SelfSafeAlgorithm:
        """Load a model saved in Stable-Baselines3's format with SB3's loader, which unpickles (runs) the archive's
        ``data``: only for files you trust, to convert them (:func:`~sb3_metacpo.common.serialization.convert_sb3_archive`)."""
        sb3_load = super().load  # type: ignore[misc]
        reading = _READING_SB3_ARCHIVE.set(True)
        try:
            model = sb3_load(path, None, **kwargs)
        finally:
            _READING_SB3_ARCHIVE.reset(reading)
        distribution = model._get_task_distribution()
        if distribution is not None:
            model._remember_task_distribution(distribution)
        return model

    @abstractmethod
    def _use_env_after_load(self, env: Any, force_reset: bool, overridden: set[str], saved: bool = False) -> None:
        """Train and adapt on ``env`` after loading (``overridden``: the constructor arguments given to ``load``;
        ``saved``: the env is the one the archive describes, rebuilt)."""

    def _check_cost_critic_names(self, n_outputs: int, saved_arguments: Mapping[str, Any]) -> None:
        """A ``cost_limit`` given to ``load`` must name the costs the saved cost critic predicts (one output per cost,
        in the saved order): its limits may change, the costs may not. The same names in another order are put back in
        the saved order (the mappings are equal), so that each name keeps its critic output."""
        names = self.constraints.names
        saved_limit = saved_arguments.get("cost_limit")
        saved = tuple(saved_limit) if isinstance(saved_limit, Mapping) else ("cost",)
        if n_outputs != len(names):
            raise LoadArgumentError(
                f"{type(self).__name__}.load: cost_limit names {len(names)} costs, the saved model {n_outputs} (its "
                f"cost critic has one output per cost, for {list(saved)}): give as many"
            )
        if len(saved) == n_outputs and names != saved:
            if set(names) != set(saved):
                raise LoadArgumentError(
                    f"{type(self).__name__}.load: cost_limit names {list(names)}, but the saved model's cost critic "
                    f"predicts {list(saved)} (one output each, in that order): give those names (their limits may "
                    "change), or train a new model for other costs"
                )
            assert isinstance(self.cost_limit, Mapping)
            self.cost_limit = {name: self.cost_limit[name] for name in saved}

    def _restore(self, metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
        """Rebuild the model of an archive: spaces, task distribution (and its stream), networks, optimiser,
        counters, adaptation; the random streams are applied when training resumes (``learn`` with
        ``reset_num_timesteps=False``)."""
        try:
            self.observation_space = decode_space(metadata["observation_space"])
            self.action_space = decode_space(metadata["action_space"])
            described = metadata["task_distribution"]
            if described is not None:
                distribution = make_task_distribution(described["name"], **decode_value(described["params"]))
                distribution._rng.bit_generator.state = described["stream"]
                self._remember_task_distribution(distribution)
            counters = metadata["counters"]
            _check_counters(counters)
            if counters.get("n_envs") is not None:
                self.n_envs = int(counters["n_envs"])
            overrides = getattr(self, "_load_overrides", [])
            try:
                self._validate_hyperparameters()  # type: ignore[attr-defined]
            except ValueError as error:
                if overrides:  # the archive's own arguments were valid when it was saved
                    raise LoadArgumentError(f"{type(self).__name__}.load: invalid arguments {overrides}: {error}") from error
                raise
            saved_costs = tensors["policy"].get("cost_value_net.weight")
            if "cost_limit" in overrides and saved_costs is not None:  # before anything is built on the names' order
                self._check_cost_critic_names(saved_costs.shape[0], decode_value(metadata["hyperparameters"]))
            self._setup_model()  # type: ignore[attr-defined]
            policy = self.policy  # type: ignore[attr-defined]
            source = f"{type(self).__name__}.load"
            check_policy_state(source, policy, tensors["policy"])
            check_finite_tensors(source, tensors["optimizer"].get("state", {}), "optimizer/state")
            check_optimizer_settings(source, tensors["optimizer"].get("param_groups"))
            check_optimizer_state_shapes(source, policy.optimizer, tensors["optimizer"].get("state", {}))
            check_finite_tensors(source, tensors["adapted_params"] or {}, "adapted_params")
            policy.load_state_dict(tensors["policy"])
            policy.optimizer.load_state_dict(tensors["optimizer"])
            self.num_timesteps = int(counters["num_timesteps"])
            self._n_updates = int(counters["n_updates"])
            self._episode_num = int(counters["episode_num"])
            self._current_progress_remaining = float(counters["progress_remaining"])
            adapted = tensors["adapted_params"]
            if adapted:
                check_actor_override(policy.actor_params(), adapted)
            device = policy.device
            self.adapted_params = {name: value.to(device) for name, value in adapted.items()} if adapted else None
            policy.set_actor_override(self.adapted_params)
            history, episodes = decode_value(metadata["adaptation_history"]), decode_value(metadata["ep_info_buffer"])
            for name, records in (("adaptation_history", history), ("ep_info_buffer", episodes)):
                if not (isinstance(records, list) and all(isinstance(record, dict) for record in records)):
                    raise ValueError(f"{name} must be a list of records (dicts)")
            self.adaptation_history = history
            self.ep_info_buffer = deque(episodes, maxlen=self._stats_window_size)
            self.ep_success_buffer = deque(maxlen=self._stats_window_size)
            check_rng_state(metadata["rng"], tensors["torch_rng"])
            self._resume_rng = (metadata["rng"], tensors["torch_rng"])
            # the adaptations' episode stream goes on from the load (an adapt needs no learn first)
            adaptation = metadata["rng"].get("samplers", {}).get("adaptation")
            if adaptation is not None:  # one env's stream, a valid generator state (else refused now, not at adapt)
                if not (isinstance(adaptation, list) and len(adaptation) == 1):
                    raise ValueError("the adaptations' episode stream must be that of one env")
                np.random.default_rng().bit_generator.state = adaptation[0]
            self._saved_adaptation_streams = adaptation
        except (ArchiveError, LoadArgumentError):
            raise
        except (KeyError, TypeError, RuntimeError, ValueError, OverflowError, AttributeError) as error:
            raise ArchiveError(f"the archive does not describe a consistent {type(self).__name__} model: {error}") from error

    def _resume_random_streams(self, reset_num_timesteps: bool) -> None:
        """At the start of ``learn``: continue the saved random streams if training resumes a loaded model
        (``reset_num_timesteps=False``); a fresh run (``True``) keeps the streams seeded from ``seed``."""
        state = getattr(self, "_resume_rng", None)
        self._resume_rng = None
        if state is None or reset_num_timesteps:
            return
        json_state, torch_state = state
        set_global_rng_state(json_state, torch_state)
        self._set_sampler_rng_states(json_state.get("samplers", {}))
