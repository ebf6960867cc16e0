"""Hyperparameters from YAML files, in the RL Zoo's format, checked against the algorithm's constructor.

A file maps a task family name (or, for CPO, a gymnasium env id) to a section of constructor arguments plus
``n_timesteps``, the training budget::

    Toy2DNav:
      n_timesteps: 150_000
      meta_batch_size: 8
      n_steps: 400
      policy_kwargs: {net_arch: [64, 64], activation_fn: Tanh, optimizer_class: Adam}
      env_kwargs: {max_episode_steps: 100}   # arguments of make_task_distribution

The package ships one file per algorithm (``sb3_metacpo/hyperparams/{metacpo,metatrpo,cpo}.yml``, see
:func:`default_config_file`). Values given as ``key:value`` strings (``--hyperparams n_steps:200``) are parsed as
YAML scalars and override the file. Everything is checked before anything is built: YAML syntax, the section,
unknown keys (against the constructor's signature, with the valid choices in the message) and value types (against
its type hints); every error is a :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import torch as th
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metacpo.common.flat_adam import FlatAdam
from sb3_metacpo.cpo import CPO
from sb3_metacpo.meta_trpo import MetaTRPO
from sb3_metacpo.metacpo import MetaCPO
from sb3_metacpo.tasks.base import TaskDistribution, list_task_distributions, task_distribution_class

#: The algorithms of the command line, by name.
ALGOS: dict[str, type[BaseAlgorithm]] = {"MetaCPO": MetaCPO, "MetaTRPO": MetaTRPO, "CPO": CPO}

#: Keys of a section that are not constructor arguments.
EXTRA_KEYS = ("n_timesteps", "policy", "env_kwargs")

#: Constructor arguments that a section may not set, and what sets them instead.
RESERVED_KEYS = {
    "env": "--family / --env",
    "seed": "--seed",
    "verbose": "--verbose",
    "tensorboard_log": "the run folder (-f/--log-folder)",
    "_init_setup_model": "nothing (internal)",
}

_VEC_ENV_CLASSES: dict[str, type] = {"DummyVecEnv": DummyVecEnv, "SubprocVecEnv": SubprocVecEnv}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the file and the key."""


def default_config_file(algo: str) -> Path:
    """The hyperparameter file shipped with the package for ``algo`` (``sb3_metacpo/hyperparams/<algo>.yml``)."""
    check_algo(algo)
    return Path(str(resources.files("sb3_metacpo").joinpath("hyperparams", f"{algo.lower()}.yml")))


def check_algo(algo: str) -> type[BaseAlgorithm]:
    """The class of ``algo``, or a ConfigError listing the valid names."""
    if algo not in ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r}; valid choices: {', '.join(ALGOS)}")
    return ALGOS[algo]


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["n_steps:200", "policy_kwargs:{net_arch: [16]}"]`` -> ``{"n_steps": 200, "policy_kwargs": {...}}``.

    Each item is split at its first colon; the value is parsed as YAML (``200`` int, ``0.05`` float, ``true`` bool,
    ``null`` None, ``[16, 16]`` list, anything else a string).
    """
    overrides: dict[str, Any] = {}
    for item in items or ():
        key, colon, text = item.partition(":")
        key = key.strip()
        if not colon or not key:
            raise ConfigError(f"--hyperparams {item!r}: expected key:value, e.g. n_steps:200")
        try:
            overrides[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--hyperparams {item!r}: the value of {key!r} is not valid YAML: {error}") from error
    return overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a hyperparameter file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read the hyperparameter file {path}: {error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping from family names (or env ids) to sections, got {type(data).__name__}")
    return data


def load_hyperparams(
    algo: str,
    key: str,
    conf_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """The checked hyperparameters of ``algo`` for the family or env id ``key``: the file's section, then overrides.

    :param algo: ``"MetaCPO"``, ``"MetaTRPO"`` or ``"CPO"``
    :param key: the section: a task family name, or a gymnasium env id (CPO)
    :param conf_file: a YAML file (default: the one shipped for ``algo``)
    :param overrides: values that replace the file's (e.g. from :func:`parse_overrides`)
    :param allow_missing: a file without a section ``key`` gives the constructor's defaults instead of an error
    :return: the section with ``n_timesteps`` and ``policy`` filled in; other keys are constructor arguments
        (the names of ``policy_kwargs.activation_fn``, ``policy_kwargs.optimizer_class`` and ``vec_env_cls`` are
        resolved to classes by :func:`to_constructor`)
    """
    check_algo(algo)
    path = Path(conf_file) if conf_file is not None else default_config_file(algo)
    sections = read_config_file(path)
    if key in sections:
        section = sections[key] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of hyperparameters, got {type(section).__name__}")
    elif allow_missing:
        section = {}  # constructor defaults plus the overrides
    else:
        valid = ", ".join(map(str, sections)) or "none"
        raise ConfigError(f"{path} has no section {key!r}; its sections: {valid}")
    family = key if key in list_task_distributions() else None
    hyperparams = validate_hyperparams(algo, {**section, **(overrides or {})}, f"{path} [{key}]", family)
    hyperparams.setdefault("policy", "MlpPolicy")
    return hyperparams


def constructor_parameters(algo: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments a section may set (without ``self``, ``policy`` and the reserved ones)."""
    signature = inspect.signature(check_algo(algo).__init__)
    skip = {"self", "policy", *RESERVED_KEYS}
    return {
        name: p
        for name, p in signature.parameters.items()
        if name not in skip and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def validate_hyperparams(algo: str, hyperparams: Mapping[str, Any], source: str, family: str | None = None) -> dict[str, Any]:
    """Raise a ConfigError naming ``source`` and the key for an unknown key or a value of the wrong type
    (``env_kwargs`` against the arguments of ``family``'s constructor, or of every family's when None).

    :return: the hyperparameters with numbers written as strings (``1e6``, ``3e-4``: YAML 1.1 reads a number
        without a dot as a string) converted where a number is expected
    """
    checked: dict[str, Any] = {}
    parameters = constructor_parameters(algo)
    valid = sorted([*parameters, *EXTRA_KEYS])
    hints = _type_hints(check_algo(algo).__init__)
    for key, value in hyperparams.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{source}: key {key!r} is not a name (YAML reads unquoted 1, on, null as a number, a boolean, None)"
            )
        if key in RESERVED_KEYS:
            raise ConfigError(f"{source}: {key!r} cannot be set in a hyperparameter file; it is set by {RESERVED_KEYS[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r} for {algo}{hint}; valid keys: {', '.join(valid)}")
        hint_type = hints.get(key, Any) if key in parameters else (int if key == "n_timesteps" else Any)
        value = _coerce_number(value, hint_type)
        checked[key] = value
        if key == "n_timesteps":
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and 1 <= value < math.inf and int(value) == value):
                raise ConfigError(f"{source}: n_timesteps = {value!r} must be a positive integer (e.g. 100_000)")
        elif key == "policy":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: policy = {value!r} must be a policy alias string such as 'MlpPolicy'")
        elif key == "env_kwargs":
            _check_env_kwargs(value, source, family)
        else:
            if key == "policy_kwargs" and isinstance(value, str):  # the RL Zoo's "dict(net_arch=[64, 64], ...)"
                value = checked[key] = zoo_dict(value, f"{source}: policy_kwargs")
            converted = _convert(key, value, source)
            if not _matches(converted, hint_type):
                schedule = isinstance(value, str) and value.startswith("lin_")
                raise ConfigError(
                    f"{source}: {key} = {value!r} has the wrong type; expected {_describe(hint_type)}"
                    f" (default: {parameters[key].default!r})"
                    + (
                        ": the RL Zoo's schedules (lin_<value>) are not read from files, as archives do not hold "
                        "schedules; give a number, or a schedule in Python"
                        if schedule
                        else ""
                    )
                )
    return checked


def to_constructor(hyperparams: Mapping[str, Any]) -> tuple[str, int | None, dict[str, Any], dict[str, Any]]:
    """Split checked hyperparameters into (policy, n_timesteps, env_kwargs, constructor kwargs); names of classes
    (``vec_env_cls: SubprocVecEnv``, ``policy_kwargs: {activation_fn: Tanh, optimizer_class: Adam}``) become the
    classes."""
    kwargs = {k: _convert(k, v, "") for k, v in hyperparams.items() if k not in EXTRA_KEYS}
    n_timesteps = hyperparams.get("n_timesteps")
    return (
        str(hyperparams.get("policy", "MlpPolicy")),
        None if n_timesteps is None else int(n_timesteps),
        dict(hyperparams.get("env_kwargs") or {}),
        kwargs,
    )


def zoo_dict(text: str, what: str) -> dict[str, Any]:
    """The RL Zoo's ``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"`` as a mapping, read without running it: a
    call of ``dict`` with keyword arguments whose values are literals, nested ``dict(...)`` calls or dotted names
    (``nn.ReLU``, kept as the text that :func:`to_constructor` resolves to the class); anything else is a
    :class:`ConfigError` naming ``what``."""

    def read(node: ast.expr) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            if any(keyword.arg is None for keyword in node.keywords):
                raise ValueError("**unpacking")
            return {keyword.arg: read(keyword.value) for keyword in node.keywords}
        if isinstance(node, (ast.Name, ast.Attribute)):
            return ast.unparse(node)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [read(element) for element in node.elts]
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {ast.literal_eval(key): read(value) for key, value in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
        return ast.literal_eval(node)

    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "dict"):
            raise ValueError("not a dict(...) call")
        value = read(tree)
    except (SyntaxError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{what} = {text!r} is not a mapping: write it as a YAML mapping ({{net_arch: [64, 64], activation_fn: "
            f"Tanh}}) or as the RL Zoo's dict(net_arch=[64, 64], activation_fn=nn.Tanh) of literals and names ({error})"
        ) from None
    return value


# --- helpers -----------------------------------------------------------------------------------------------------
def _type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except (NameError, TypeError):  # a hint that cannot be evaluated: check nothing rather than fail
        return {}


def _coerce_number(value: Any, hint: Any) -> Any:
    """``"1e6"`` -> 1000000 where an int is expected, ``"3e-4"`` -> 0.0003 where a float is; else ``value``."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value.replace("_", ""))
    except ValueError:
        return value
    if _matches(1.5, hint):
        return number
    if _matches(1, hint) and number.is_integer():
        return int(number)
    return value


def _check_env_kwargs(value: Any, source: str, family: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: env_kwargs = {value!r} must be a mapping of make_task_distribution arguments")
    cls = TaskDistribution if family is None else task_distribution_class(family)
    # the family's own arguments and those it passes on to TaskDistribution's (through **kwargs)
    constructors = [
        klass.__init__ for klass in cls.__mro__ if issubclass(klass, TaskDistribution) and "__init__" in vars(klass)
    ]
    skip = ("self", "seed", "args", "kwargs")
    valid = list(dict.fromkeys(n for init in constructors for n in inspect.signature(init).parameters if n not in skip))
    for key in value:
        if key == "seed":
            raise ConfigError(f"{source}: env_kwargs.seed cannot be set in a hyperparameter file; it is set by --seed")
        if key not in valid:
            raise ConfigError(f"{source}: unknown key env_kwargs.{key}; valid keys: {', '.join(valid)}")


def _convert(key: str, value: Any, source: str) -> Any:
    """Names of classes in a YAML file to the classes: ``vec_env_cls``, ``policy_kwargs.activation_fn`` and
    ``policy_kwargs.optimizer_class``."""
    if key == "vec_env_cls" and isinstance(value, str):
        if value not in _VEC_ENV_CLASSES:
            raise ConfigError(f"{source}: vec_env_cls = {value!r}; valid choices: {', '.join(_VEC_ENV_CLASSES)}")
        return _VEC_ENV_CLASSES[value]
    if key == "policy_kwargs" and isinstance(value, dict):
        value = dict(value)
        if isinstance(value.get("activation_fn"), str):
            value["activation_fn"] = _activation_class(value["activation_fn"], source)
        if isinstance(value.get("optimizer_class"), str):
            value["optimizer_class"] = _optimizer_class(value["optimizer_class"], source)
    return value


def _activation_class(text: str, source: str) -> type[th.nn.Module]:
    """``policy_kwargs.activation_fn``'s name (``Tanh``, ``nn.Tanh``, ``torch.nn.Tanh``) to the torch.nn class."""
    name = text.removeprefix("torch.").removeprefix("th.").removeprefix("nn.")
    activation = getattr(th.nn, name, None)
    if not (isinstance(activation, type) and issubclass(activation, th.nn.Module)):
        raise ConfigError(
            f"{source}: policy_kwargs.activation_fn = {text!r} is not a torch.nn module; "
            "valid choices include Tanh, ReLU, ELU, LeakyReLU"
        )
    return activation


def _optimizer_classes() -> dict[str, type[th.optim.Optimizer]]:
    """The optimisers a file may name, by name: the package's FlatAdam (the policy's default) and torch.optim's
    whose models can be saved (the command line saves every model it trains; an archive holds registered classes
    only, see :func:`~sb3_metacpo.common.serialization.register_class`)."""
    from sb3_metacpo.common.serialization import encode_value

    optimizers: dict[str, type[th.optim.Optimizer]] = {"FlatAdam": FlatAdam}
    for name, cls in sorted(vars(th.optim).items()):
        if isinstance(cls, type) and issubclass(cls, th.optim.Optimizer) and cls is not th.optim.Optimizer:
            optimizers.setdefault(name, cls)
    savable = {}
    for name, cls in optimizers.items():
        try:
            encode_value(cls, "optimizer_class")
        except TypeError:
            continue
        savable[name] = cls
    return savable


def _optimizer_class(text: str, source: str) -> type[th.optim.Optimizer]:
    """``policy_kwargs.optimizer_class``'s name (``Adam``, ``optim.Adam``, ``torch.optim.Adam``, ``FlatAdam``) to the
    class."""
    name = text.removeprefix("torch.").removeprefix("th.").removeprefix("optim.")
    optimizers = _optimizer_classes()
    if name not in optimizers:
        known = getattr(th.optim, name, None)
        what = (
            "cannot be saved in a model archive (the command line saves every model it trains)"
            if isinstance(known, type) and issubclass(known, th.optim.Optimizer)
            else "is not an optimiser of torch.optim or the package's FlatAdam"
        )
        raise ConfigError(f"{source}: policy_kwargs.optimizer_class = {text!r} {what}; valid choices: {', '.join(optimizers)}")
    return optimizers[name]


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (the constructs used in the algorithms' signatures)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is type:
        (base,) = typing.get_args(hint)
        return isinstance(value, type) and (not isinstance(base, type) or issubclass(value, base))
    if origin is not None:
        if isinstance(origin, type) and origin.__module__ == "collections.abc":
            return isinstance(value, origin) or (origin.__name__ == "Callable" and callable(value))
        return isinstance(value, origin) if isinstance(origin, type) else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is type:
        return f"one of {', '.join(_VEC_ENV_CLASSES)}" if "VecEnv" in str(hint) else "a class"
    if origin is not None:
        return getattr(origin, "__name__", str(origin)) + (" (a mapping)" if origin is dict else "")
    return getattr(hint, "__name__", str(hint))
