"""Constructor-argument validation shared by the algorithms: a clear ``ValueError`` before any work starts."""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import os
from typing import Any

import numpy as np
import torch as th

from sb3_metacpo.common.constraints import CostConstraints
from sb3_metacpo.common.cpo_update import RECOVERY_RULES

#: ``dual_solver`` values: ``"auto"`` is the exact ``"analytic"`` solver up to 8 constraints, the convex program above.
DUAL_SOLVER_CHOICES = ("auto", "analytic", "cvxpylayers")


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
    """A Python or numpy bool."""
    return isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A finite Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_seed(seed: Any) -> None:
    """``seed`` is None or an integer in [0, 2**32) (checked before anything uses it)."""
    check(
        seed is None or (is_int(seed) and 0 <= seed < 2**32),  # numpy's legacy seeding (SB3's set_random_seed)
        f"seed must be None or an integer in [0, 2**32), got {seed!r}",
    )


def check_adaptation_arguments(n_updates: Any, n_steps: Any, target_kl: Any = None) -> None:
    """Adaptation's ``n_updates`` (None or an integer >= 0), ``n_steps`` (None or an integer >= 2) and ``target_kl``
    (None or a finite number > 0); None means the model's own."""
    check(
        n_updates is None or (is_int(n_updates) and n_updates >= 0),
        f"n_updates must be None or an integer >= 0, got {n_updates!r}",
    )
    check(n_steps is None or (is_int(n_steps) and n_steps >= 2), f"n_steps must be None or an integer >= 2, got {n_steps!r}")
    check(
        target_kl is None or (is_real(target_kl) and target_kl > 0),
        f"target_kl must be None or a finite number > 0, got {target_kl!r}",
    )


def meta_evaluation_tasks(tasks: Any) -> list[Any]:
    """``tasks`` (what :func:`~sb3_metacpo.common.evaluation.meta_evaluate` and the evaluation callbacks take) as a
    list, with a clear ``ValueError`` for a single task, a distribution or an env passed instead of a list of tasks
    (SB3's ``EvalCallback(eval_env)`` habit); :func:`check_meta_evaluation_arguments` calls it and checks the items."""
    from collections.abc import Iterable

    from sb3_metacpo.tasks.base import Task, TaskDistribution

    if isinstance(tasks, Task):
        raise ValueError(f"meta-evaluation takes a list of tasks, got one {type(tasks).__name__}: pass [task]")
    if isinstance(tasks, str):
        raise ValueError(
            f"meta-evaluation takes tasks of the model's family, got the name {tasks!r}: pass held-out tasks, e.g. "
            f"make_task_distribution({tasks!r}).test_tasks(5)"
        )
    if isinstance(tasks, TaskDistribution):
        raise ValueError(
            f"meta-evaluation takes tasks of the model's family, got the distribution {tasks.name!r}: pass its "
            "held-out tasks, e.g. distribution.test_tasks(5)"
        )
    check(
        isinstance(tasks, Iterable),
        "meta-evaluation takes tasks of the model's family (e.g. distribution.test_tasks(5)), got "
        f"{type(tasks).__name__}: an env object would be evaluated on its adaptation batches' own start states",
    )
    return list(tasks)


def check_meta_evaluation_arguments(tasks: Any, n_updates: Any, n_steps: Any, n_eval_episodes: Any) -> list[Any]:
    """What :func:`~sb3_metacpo.common.evaluation.meta_evaluate` and the evaluation callbacks take: tasks of the
    model's family (at least one), the adaptation's arguments and ``n_eval_episodes`` (an integer >= 1); returns the
    tasks as a list (:func:`meta_evaluation_tasks`)."""
    from sb3_metacpo.tasks.base import Task

    tasks = meta_evaluation_tasks(tasks)

    check(len(tasks) >= 1, "meta-evaluation needs at least one held-out task")
    check(
        all(isinstance(task, Task) for task in tasks),
        "meta-evaluation takes tasks of the model's family (e.g. distribution.test_tasks(5)), got "
        f"{sorted({type(task).__name__ for task in tasks if not isinstance(task, Task)})}: an env object would be "
        "evaluated on its adaptation batches' own start states",
    )
    check_adaptation_arguments(n_updates, n_steps)
    check(
        is_int(n_eval_episodes) and n_eval_episodes >= 1,
        f"n_eval_episodes must be a positive integer, got {n_eval_episodes!r}",
    )
    return tasks


def check_vec_env_cls(vec_env_cls: Any) -> None:
    """``vec_env_cls`` is None, ``DummyVecEnv`` or ``SubprocVecEnv`` (or a subclass)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    check(
        vec_env_cls is None or (isinstance(vec_env_cls, type) and issubclass(vec_env_cls, (DummyVecEnv, SubprocVecEnv))),
        f"vec_env_cls must be DummyVecEnv, SubprocVecEnv or None, got {vec_env_cls!r}",
    )


def check_callback(callback: Any) -> None:
    """``callback`` is what SB3's ``learn`` takes (``learn``'s and ``adapt``'s): None, a ``BaseCallback``, a list of
    them or a function ``(locals, globals) -> bool``."""
    from stable_baselines3.common.callbacks import BaseCallback

    if isinstance(callback, type):  # callable, so SB3 took it for a function: it ran as a callback that did nothing
        raise ValueError(
            f"callback is the class {callback.__name__}, not a callback: pass an instance, {callback.__name__}(...)"
        )
    check(
        callback is None
        or isinstance(callback, BaseCallback)
        or callable(callback)
        or (isinstance(callback, list) and all(isinstance(item, BaseCallback) for item in callback)),
        f"callback must be None, a BaseCallback, a list of them or a function (locals, globals) -> bool, got {callback!r}",
    )


def check_learn_arguments(
    total_timesteps: Any,
    log_interval: Any,
    callback: Any = None,
    reset_num_timesteps: Any = True,
    progress_bar: Any = False,
    tb_log_name: Any = "run",
) -> None:
    """``learn``'s arguments, before it changes anything (a model's adaptation, its counters, the envs)."""
    check_callback(callback)
    check(  # SB3 joins it to the TensorBoard folder's path after learn has reset the counters
        isinstance(tb_log_name, str) and tb_log_name != "",
        f"tb_log_name must be a non-empty string (the TensorBoard run's name), got {tb_log_name!r}",
    )
    for name, flag in (("reset_num_timesteps", reset_num_timesteps), ("progress_bar", progress_bar)):
        check(is_bool(flag), f"{name} must be True or False, got {flag!r}")
    whole_float = isinstance(total_timesteps, (float, np.floating)) and float(total_timesteps).is_integer()
    check(  # 1e5, SB3's idiom, is a whole number written as a float
        (is_int(total_timesteps) or whole_float) and total_timesteps >= 1,
        f"total_timesteps must be a positive integer (or a float of one, e.g. 1e5), got {total_timesteps!r}",
    )
    check(
        log_interval is None or (is_int(log_interval) and log_interval >= 1),
        f"log_interval must be a positive integer or None, got {log_interval!r}",
    )


TENSORBOARD_EXTRA = "pip install sb3-metacpo[tensorboard]"


def check_tensorboard_log(tensorboard_log: Any) -> None:
    """``tensorboard_log`` is None or a folder path (a string or an ``os.PathLike``): anything else failed in SB3's
    logger set-up, after ``learn`` had reset the counters and the envs, with a ``TypeError`` that did not name it."""
    check(
        tensorboard_log is None or isinstance(tensorboard_log, (str, os.PathLike)),
        f"tensorboard_log must be None or a folder path (a string or a pathlib.Path), got {tensorboard_log!r}",
    )


def check_tensorboard(model: Any) -> None:
    """A model whose ``learn`` is about to configure SB3's logger has a valid ``tensorboard_log``
    (:func:`check_tensorboard_log`; the attribute may have been set after construction), and one with a folder needs
    TensorBoard: an ``ImportError`` naming the extra to install (SB3's own names none), before ``learn`` changes
    anything."""
    from stable_baselines3.common import utils as sb3_utils

    tensorboard_log = getattr(model, "tensorboard_log", None)
    check_tensorboard_log(tensorboard_log)
    if tensorboard_log is not None and not getattr(model, "_custom_logger", False) and sb3_utils.SummaryWriter is None:
        raise ImportError(
            f"tensorboard_log={str(tensorboard_log)!r} needs TensorBoard: {TENSORBOARD_EXTRA} (or tensorboard_log=None)"
        )


def check_verbose(verbose: Any) -> None:
    """``verbose`` is an integer >= 0, SB3's levels (0 silent, 1 info, 2 and above debug; the algorithms' and the
    callbacks'): SB3 compares it with 1 and 2, so a string or None failed inside SB3's constructor with a
    ``TypeError`` that did not name it."""
    check(
        is_int(verbose) and verbose >= 0,
        f"verbose must be an integer >= 0 (0 silent, 1 info, 2 debug), got {verbose!r}",
    )


#: ``policy_kwargs`` entries that are flags of SB3's ``ActorCriticPolicy``: SB3 reads them with ``if``, so a string
#: such as ``"False"`` counted as True (``CPOPolicy`` checks its own, ``normalize_observations``).
POLICY_FLAGS = (
    "ortho_init",
    "use_sde",
    "full_std",
    "use_expln",
    "squash_output",
    "share_features_extractor",
    "normalize_images",
)


def _layer_sizes(value: Any) -> bool:
    """A list (or tuple) of positive integers: hidden-layer sizes (empty: no hidden layer)."""
    return isinstance(value, (list, tuple)) and all(is_int(size) and size >= 1 for size in value)


#: Policy constructor arguments that the algorithm gives itself: not for ``policy_kwargs``.
POLICY_ARGUMENTS_OF_THE_ALGORITHM = ("observation_space", "action_space", "lr_schedule")


#: Packages whose policies pass every ``**kwargs`` on to their base class unchanged.
_KNOWN_POLICY_PACKAGES = ("sb3_metacpo.", "stable_baselines3.")


def policy_argument_names(policy_class: Any) -> set[str] | None:
    """The keyword arguments ``policy_class(...)`` takes: the named parameters of its ``__init__`` and, while an
    ``__init__`` of this package's or SB3's passes ``**kwargs`` on, of its bases'. None when that cannot be told: a
    callable that is not a class (``functools.partial``), an ``__init__`` of another package that takes ``**kwargs``
    (it may take options out of them before calling its base), or one that passes them to ``torch.nn.Module``."""
    if not isinstance(policy_class, type):
        return None
    names: set[str] = set()
    for cls in policy_class.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        if cls in (th.nn.Module, object):
            return None
        parameters = inspect.signature(cls.__dict__["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
        if not cls.__module__.startswith(_KNOWN_POLICY_PACKAGES):
            return None
    return None


def check_policy_kwargs(policy_kwargs: Any, policy_class: Any = None) -> None:
    """``policy_kwargs`` is None or a dict of the policy's arguments by name, and the entries that SB3 and torch
    would only fail on deep inside the network's construction (or silently misread) have their types:
    ``net_arch`` hidden-layer sizes (a list of positive integers, or a dict of them for ``pi`` and ``vf``),
    ``activation_fn`` a ``torch.nn.Module`` class and ``optimizer_class`` a ``torch.optim.Optimizer`` class (the
    classes, not their names), ``optimizer_kwargs`` None or a dict without ``lr`` (the algorithm sets the critics'
    learning rate) and the flags of :data:`POLICY_FLAGS` True or False. The policy checks the rest (``CPOPolicy``:
    ``log_std_init``, ``clip_observations``, an element-wise activation...). Given ``policy_class``, a name it does
    not take (:func:`policy_argument_names`), or one the algorithm gives it itself, is an error here, before the
    model seeds anything or builds its networks."""
    if policy_kwargs is None:
        return
    check(
        isinstance(policy_kwargs, dict) and all(isinstance(key, str) for key in policy_kwargs),
        "policy_kwargs must be None or a dict of the policy's arguments by name (e.g. dict(net_arch=[64, 64])), "
        f"got {policy_kwargs!r}",
    )
    own = sorted(set(policy_kwargs) & set(POLICY_ARGUMENTS_OF_THE_ALGORITHM))
    check(
        not own,
        f"policy_kwargs cannot set {', '.join(map(repr, own))}: the algorithm gives the policy its spaces and schedule",
    )
    known = None if policy_class is None else policy_argument_names(policy_class)
    if known is not None:
        for name in policy_kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"policy_kwargs[{name!r}]: {policy_class.__name__} takes no argument {name!r}{hint} (it takes "
                    f"{', '.join(sorted(known - set(POLICY_ARGUMENTS_OF_THE_ALGORITHM)))})"
                )
    net_arch = policy_kwargs.get("net_arch")
    if isinstance(net_arch, (list, tuple)) and len(net_arch) == 1 and isinstance(net_arch[0], dict):
        net_arch = net_arch[0]  # SB3's deprecated [dict(pi=..., vf=...)], which it still takes (with a warning)
    check(
        net_arch is None
        or _layer_sizes(net_arch)
        or (
            isinstance(net_arch, dict)
            and set(net_arch) <= {"pi", "vf"}
            and all(_layer_sizes(sizes) for sizes in net_arch.values())
        ),
        "policy_kwargs['net_arch'] must be the hidden-layer sizes, a list of positive integers (e.g. [64, 64]; [] for "
        "none), or a dict of them for the actor and the critics (dict(pi=[64, 64], vf=[64, 64])), "
        f"got {policy_kwargs.get('net_arch')!r}",
    )
    for key, base, kind in (
        ("activation_fn", th.nn.Module, "torch.nn.Module class such as torch.nn.Tanh or torch.nn.ReLU"),
        ("optimizer_class", th.optim.Optimizer, "torch.optim.Optimizer class such as torch.optim.Adam"),
    ):
        if key in policy_kwargs:
            given = policy_kwargs[key]
            check(
                isinstance(given, type) and issubclass(given, base),
                f"policy_kwargs[{key!r}] must be a {kind} (the class itself, not its name or an instance), got {given!r}",
            )
    optimizer_kwargs = policy_kwargs.get("optimizer_kwargs")
    check(
        optimizer_kwargs is None
        or (isinstance(optimizer_kwargs, dict) and all(isinstance(key, str) for key in optimizer_kwargs)),
        "policy_kwargs['optimizer_kwargs'] must be None or a dict of the optimiser's arguments by name "
        f"(e.g. dict(eps=1e-5)), got {optimizer_kwargs!r}",
    )
    reserved = sorted({"lr", "params"} & set(optimizer_kwargs or ()))
    check(
        not reserved,
        f"policy_kwargs['optimizer_kwargs'] cannot set {', '.join(map(repr, reserved))}: the algorithm gives the "
        "critics' optimiser its parameters and learning rate (set critic_learning_rate for MetaCPO and MetaTRPO, "
        "learning_rate for CPO)",
    )
    for name in POLICY_FLAGS:
        if name in policy_kwargs:
            check(is_bool(policy_kwargs[name]), f"policy_kwargs[{name!r}] must be True or False, got {policy_kwargs[name]!r}")


def as_python_scalars(model: Any, *names: str) -> None:
    """Replace numpy scalars among the attributes ``names`` by Python ints and floats (after validation), so that
    they behave like the Python numbers everywhere (e.g. in JSON metadata and ``isinstance(x, int)`` checks)."""
    for name in names:
        value = getattr(model, name, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            setattr(model, name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            setattr(model, name, float(value))
        elif isinstance(value, dict) and name == "cost_limit":
            setattr(model, name, {key: float(limit) for key, limit in value.items()})


def check_positive_ints(model: Any, *names: str) -> None:
    for name in names:
        value = getattr(model, name)
        check(is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")


def check_positive_reals(model: Any, *names: str) -> None:
    for name in names:
        value = getattr(model, name)
        check(is_real(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")


def check_cpo_step_hyperparameters(model: Any) -> None:
    """The arguments every CPO-step algorithm has: conjugate gradient, line search, discounting, dual, cost limit,
    and the logs' episode window."""
    check_positive_ints(model, "cg_max_steps", "fvp_sample_freq")
    window = model._stats_window_size  # SB3 keeps stats_window_size under this name
    check(
        is_int(window) and window >= 1,
        f"stats_window_size must be a positive integer (episodes averaged for the rollout logs), got {window!r}",
    )
    value = model.line_search_max_iter
    check(is_int(value) and value >= 0, f"line_search_max_iter must be an integer >= 0, got {value!r}")
    # The steps are computed in the policy's float32: larger values overflow it and every update is skipped
    check(
        is_real(model.cg_damping) and 0 <= model.cg_damping <= 1e6,
        f"cg_damping must be a number in [0, 1e6] (larger ones overflow float32 Fisher products), got {model.cg_damping!r}",
    )
    confidence = model.cost_confidence
    check(
        is_real(confidence) and 0 <= confidence <= 1e6,
        f"cost_confidence must be a number in [0, 1e6] (standard errors of margin), got {confidence!r}",
    )
    check(is_real(model.gamma) and 0 < model.gamma <= 1, f"gamma must be in (0, 1], got {model.gamma!r}")
    check(is_real(model.cost_gamma) and 0 < model.cost_gamma <= 1, f"cost_gamma must be in (0, 1], got {model.cost_gamma!r}")
    check(is_real(model.gae_lambda) and 0 <= model.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {model.gae_lambda!r}")
    factor = model.line_search_shrinking_factor
    check(is_real(factor) and 0 < factor < 1, f"line_search_shrinking_factor must be in (0, 1), got {factor!r}")
    check(
        model.dual_solver in DUAL_SOLVER_CHOICES,
        f"dual_solver must be one of {DUAL_SOLVER_CHOICES}, got {model.dual_solver!r}",
    )
    check(
        model.recovery in RECOVERY_RULES,
        f"recovery must be one of {RECOVERY_RULES}, got {model.recovery!r}",
    )
    if model.cost_limit is not None:
        CostConstraints.from_cost_limit(model.cost_limit)  # raises naming the bad entry
    check_seed(model.seed)
    check_vec_env_cls(getattr(model, "vec_env_cls", None))
