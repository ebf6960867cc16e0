"""Tasks, task distributions and their registry.

A *task* is a small frozen dataclass of parameters (plus a ``layout_seed`` that fixes the random parts of the world,
e.g. where the hazards are). A :class:`TaskDistribution` samples training tasks reproducibly from its seed, keeps a
fixed held-out test set whose parameter ranges are disjoint from the training ranges, and builds a gymnasium env for
any task with the per-step cost in ``info["cost"]``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from sb3_metacpo.tasks.monitor import CostMonitor
from sb3_metacpo.tasks.task_env import TaskEnv, check_task_spaces


def _plain(value: Any) -> Any:
    """A number as Python's ``int`` or ``float`` (the same value for numpy's integers and its 16-, 32- and 64-bit
    floats), anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


@dataclass(frozen=True, kw_only=True)
class Task:
    """Base class of the task dataclasses. ``layout_seed`` fixes the random layout of the task's world."""

    family: ClassVar[str] = ""
    layout_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON serialisable), with the family name, for logs and save files: numbers as Python's
        ``int`` and ``float`` (a task built with numpy numbers, ``np.float32(2.5)``, trained and then failed to save)."""
        return {"family": self.family, **{key: _plain(value) for key, value in dataclasses.asdict(self).items()}}

    def short(self) -> str:
        """A compact one-line description, e.g. for tables."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            parts.append(f"{field.name}={value:.3g}" if isinstance(value, float) else f"{field.name}={value}")
        return " ".join(parts)


@dataclass(frozen=True)
class ParamRange:
    """A closed interval of a task parameter; integer ranges are sampled uniformly over the integers in it."""

    low: float
    high: float
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"invalid range [{self.low}, {self.high}]: need finite low <= high")
        if self.integer and math.ceil(self.low) > math.floor(self.high):
            raise ValueError(f"integer range [{self.low}, {self.high}] contains no integer")

    def _extent(self) -> tuple[float, float]:
        """The values it can take: the integers' first and last for an integer range."""
        return (math.ceil(self.low), math.floor(self.high)) if self.integer else (self.low, self.high)

    def sample(self, rng: np.random.Generator) -> int | float:
        if self.integer:
            return int(rng.integers(math.ceil(self.low), math.floor(self.high), endpoint=True))
        return float(rng.uniform(self.low, self.high))

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def overlaps(self, other: ParamRange) -> bool:
        """Whether a value of one can be a value of the other (integer ranges: by the integers they contain)."""
        low, high = self._extent()
        other_low, other_high = other._extent()
        return low <= other_high and other_low <= high

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" (integer)" if self.integer else "")


def _as_range(value: ParamRange | Sequence[float], integer: bool) -> ParamRange:
    if isinstance(value, ParamRange):
        return value
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
        raise TypeError(f"a parameter range must be a ParamRange or a (low, high) pair, got {value!r}")
    if not all(isinstance(bound, numbers.Real) and not isinstance(bound, bool) for bound in value):
        raise TypeError(f"a parameter range's bounds must be real numbers, got {value!r}")
    return ParamRange(float(value[0]), float(value[1]), integer)


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an integer >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def _seed_pool(entropy: int | tuple[int, ...]) -> tuple[int, ...]:
    """The state numpy seeds a generator from for ``entropy``: equal for entropies that seed the same stream."""
    return tuple(int(word) for word in np.random.SeedSequence(entropy).pool)


class TaskDistribution(ABC):
    """A family of constrained tasks.

    :param seed: seed of the training-task stream: the same seed gives the same sequence of :meth:`sample` calls.
    :param test_seed: seed of the held-out test set (defaults to a fixed per-family value, so that runs with
        different training seeds are evaluated on the same test tasks).
    :param train_ranges: overrides of the training ranges, ``{name: (low, high)}``.
    :param test_ranges: overrides of the held-out test ranges, ``{name: (low, high)}``.
    :param max_episode_steps: episode length (time-limit truncation); defaults to the family's.
    """

    name: ClassVar[str]
    task_cls: ClassVar[type[Task]]
    #: Valid values of every ranged parameter (physical validity, not the training range).
    limits: ClassVar[dict[str, ParamRange]]
    default_train_ranges: ClassVar[dict[str, ParamRange]]
    default_test_ranges: ClassVar[dict[str, ParamRange]]
    default_max_episode_steps: ClassVar[int]
    #: A cost limit (expected episode cost) that makes the family's constraint bind for a typical policy.
    default_cost_limit: ClassVar[float]
    #: The per-step cost signals the family's envs report in ``info`` (the total ``"cost"`` first), which a
    #: ``cost_limit`` mapping may name.
    cost_names: ClassVar[tuple[str, ...]] = ("cost",)
    default_test_seed: ClassVar[int] = 2024

    def __init__(
        self,
        seed: int = 0,
        test_seed: int | None = None,
        train_ranges: Mapping[str, ParamRange | Sequence[float]] | None = None,
        test_ranges: Mapping[str, ParamRange | Sequence[float]] | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        for name, value in (("seed", seed), ("test_seed", test_seed)):
            # Below 2**32: numpy splits larger seeds into 32-bit words, so seed = test_seed + 2**32 would draw the
            # stream of the unseen tasks' (test_seed, 1).
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32
            ):
                raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
        self.seed = int(seed)
        self.test_seed = self.default_test_seed if test_seed is None else int(test_seed)
        self.train_ranges = self._merge_ranges(self.default_train_ranges, train_ranges, "train_ranges")
        self.test_ranges = self._merge_ranges(self.default_test_ranges, test_ranges, "test_ranges")
        self.max_episode_steps = self.default_max_episode_steps if max_episode_steps is None else max_episode_steps
        if isinstance(self.max_episode_steps, numbers.Integral) and not isinstance(self.max_episode_steps, bool):
            self.max_episode_steps = int(self.max_episode_steps)
        if (
            not isinstance(self.max_episode_steps, int)
            or isinstance(self.max_episode_steps, bool)
            or self.max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be a positive integer, got {self.max_episode_steps!r}")
        if all(self.train_ranges[k].overlaps(self.test_ranges[k]) for k in self.limits):
            raise ValueError(
                f"{self.name}: the test ranges overlap the training ranges in every parameter, so held-out tasks "
                "could equal training tasks; make at least one parameter's train and test ranges disjoint"
            )
        self._rng = self.training_rng(self.seed)
        self._spaces: tuple[gym.Space, gym.Space] | None = None

    def training_rng(self, entropy: int | tuple[int, ...]) -> np.random.Generator:
        """A stream of training tasks seeded with ``entropy`` (the distribution's ``seed``, or a resampling env's
        ``(seed, reset seed, env index, 3)``): ``default_rng(entropy)``, unless that is a held-out set's stream
        (``test_seed`` draws the test tasks, ``(test_seed, 1)`` the unseen ones; a training seed equal to
        ``test_seed`` made the training tasks those sets' tasks, the same parameters where the ranges agree): then
        ``default_rng((*entropy, 2))``, a stream of its own. Streams are compared by numpy's seed state, not by the
        tuple: ``(test_seed, 1, 0)`` seeds the same stream as ``(test_seed, 1)``."""
        if _seed_pool(entropy) in {_seed_pool(self.test_seed), _seed_pool((self.test_seed, 1))}:
            return np.random.default_rng((*(int(value) for value in np.atleast_1d(entropy)), 2))
        return np.random.default_rng(entropy)

    def _merge_ranges(
        self, defaults: Mapping[str, ParamRange], overrides: Mapping[str, Any] | None, what: str
    ) -> dict[str, ParamRange]:
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"{what} must be a mapping of parameter names to ranges, got {type(overrides).__name__}")
        ranges = dict(defaults)
        for key, value in (overrides or {}).items():
            if key not in self.limits:
                raise ValueError(f"{self.name} has no parameter {key!r} in {what}; its parameters are {sorted(self.limits)}")
            integer = self.limits[key].integer
            if isinstance(value, ParamRange) and value.integer != integer:
                # the family decides (and get_params saves only the bounds): a flag of its own would not survive
                raise ValueError(
                    f"{self.name}: {what}[{key!r}] = {value}, but {key} is {'an integer' if integer else 'a real'} "
                    f"parameter: give ParamRange({value.low:g}, {value.high:g}, integer={integer}) or a (low, high) pair"
                )
            ranges[key] = _as_range(value, integer)
        for key, value in ranges.items():
            limit = self.limits[key]
            if not (limit.contains(value.low) and limit.contains(value.high)):
                raise ValueError(f"{self.name}: {what}[{key!r}] = {value} is outside the valid range {limit}")
        return ranges

    # --- tasks -------------------------------------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator, ranges: Mapping[str, ParamRange]) -> Task:
        params = {key: ranges[key].sample(rng) for key in self.limits}
        return self.task_cls(layout_seed=int(rng.integers(2**31 - 1)), **params)

    def sample(self, n: int, rng: np.random.Generator | None = None) -> list[Task]:
        """Draw ``n`` training tasks; successive calls continue the seeded stream (or ``rng``'s, when given)."""
        _check_count(n)
        rng = self._rng if rng is None else rng
        return [self._draw(rng, self.train_ranges) for _ in range(n)]

    def test_tasks(self, n: int = 5) -> list[Task]:
        """The first ``n`` tasks of the fixed held-out set (``test_tasks(3)`` is a prefix of ``test_tasks(5)``)."""
        _check_count(n)
        rng = np.random.default_rng(self.test_seed)
        return [self._draw(rng, self.test_ranges) for _ in range(n)]

    def unseen_tasks(self, n: int = 5) -> list[Task]:
        """The first ``n`` tasks of a fixed set drawn from the *training* ranges with their own seed (the pair
        ``(test_seed, 1)``, a stream no training stream draws, see :meth:`training_rng`): unseen tasks of the training
        distribution, the paper's setting, beside the harder :meth:`test_tasks`. Distinct from every training draw (continuous
        parameters and 31-bit layout seeds)."""
        _check_count(n)
        rng = np.random.default_rng((self.test_seed, 1))
        return [self._draw(rng, self.train_ranges) for _ in range(n)]

    def is_training_task(self, task: Task) -> bool:
        """Whether ``task`` lies in the training ranges (held-out test tasks never do)."""
        return all(self.train_ranges[k].contains(getattr(task, k)) for k in self.limits)

    def validate_task(self, task: Task) -> None:
        """Raise a ValueError naming the first parameter of ``task`` outside its valid range."""
        if not isinstance(task, self.task_cls):
            raise TypeError(f"{self.name} builds {self.task_cls.__name__} tasks, got {type(task).__name__}")
        seed = task.layout_seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
            raise ValueError(f"{self.name}: layout_seed={seed!r} must be an integer in [0, 2**32)")
        for key, limit in self.limits.items():
            value = getattr(task, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{self.name}: {key}={value!r} must be a number in {limit}")
            if limit.integer and not isinstance(value, numbers.Integral):  # 2.0 fails where an int is needed
                raise ValueError(f"{self.name}: {key}={value!r} must be an integer (an int, not a float) in {limit}")
            if not limit.contains(value):
                raise ValueError(f"{self.name}: {key}={value!r} is out of range; valid range is {limit}")

    # --- envs --------------------------------------------------------------------------------------------------
    @abstractmethod
    def _make_base_env(self, task: Task, render_mode: str | None = None) -> gym.Env:
        """Build the raw gymnasium env of ``task`` (5-tuple API, cost in ``info["cost"]``, own time limit)."""

    def _switch_base_env(self, env: gym.Env, task: Task) -> bool:
        """Switch ``env`` (of :meth:`_make_base_env`) to ``task`` in place, where the family can do so without
        rebuilding it and with every later episode the same as a rebuilt env's; ``False`` (the default) when it
        cannot, and :meth:`TaskEnv.set_task <sb3_metacpo.tasks.task_env.TaskEnv.set_task>` builds a new env. The
        env is reset before its next step either way."""
        return False

    def make_env(self, task: Task, render_mode: str | None = None, monitor_file: str | None = None) -> gym.Env:
        """Build the env of ``task``: the family's env with per-episode seeds and an episode-cost monitor.

        The first env built gives the family's spaces (:attr:`spaces`, which builds the first held-out task's env when
        none was built yet); a task whose env has other observation or action shapes raises a ``ValueError`` naming
        it."""
        self.validate_task(task)
        env = TaskEnv(self, task, render_mode=render_mode)
        spaces = (env.observation_space, env.action_space)
        if self._spaces is None:
            self._spaces = spaces
        else:
            try:  # before the monitor opens its file
                check_task_spaces(self, task, spaces, self._spaces)
            except ValueError:
                env.close()
                raise
        return CostMonitor(env, filename=monitor_file)

    @property
    def spaces(self) -> tuple[gym.Space, gym.Space]:
        """(observation_space, action_space), the same for every task of the family."""
        if self._spaces is None:
            self.make_env(self.test_tasks(1)[0]).close()  # the first env built sets them
        assert self._spaces is not None
        return self._spaces

    # --- serialisation -----------------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this distribution (JSON serialisable)."""
        return {
            "seed": self.seed,
            "test_seed": self.test_seed,
            "train_ranges": {k: (v.low, v.high) for k, v in self.train_ranges.items()},
            "test_ranges": {k: (v.low, v.high) for k, v in self.test_ranges.items()},
            "max_episode_steps": self.max_episode_steps,
        }

    def task_from_dict(self, data: Mapping[str, Any]) -> Task:
        """Inverse of :meth:`Task.to_dict`."""
        data = dict(data)
        family = data.pop("family", self.name)
        if family != self.name:
            raise ValueError(f"task of family {family!r} given to the {self.name} distribution")
        return self.task_cls(**data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, max_episode_steps={self.max_episode_steps})"


_REGISTRY: dict[str, type[TaskDistribution]] = {}


def register_task_distribution(cls: type[TaskDistribution]) -> type[TaskDistribution]:
    """Class decorator that makes a family available to :func:`make_task_distribution` under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a task distribution named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_task_distributions() -> list[str]:
    """Names of the registered task families."""
    return sorted(_REGISTRY)


def task_distribution_class(name: str) -> type[TaskDistribution]:
    """The class of the registered family ``name`` (its constructor's arguments are what
    :func:`make_task_distribution` accepts for it)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown task distribution {name!r}; known ones are: {', '.join(list_task_distributions())}")
    return _REGISTRY[name]


def make_task_distribution(name: str, **overrides: Any) -> TaskDistribution:
    """Build the registered family ``name``; ``overrides`` go to its constructor (seed, ranges, episode length)."""
    return task_distribution_class(name)(**overrides)
