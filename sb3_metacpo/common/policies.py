"""The policy: a Gaussian actor that can run on substituted (adapted) parameters, a reward critic and a cost critic.

Observation normalisation statistics live in the policy's buffers, so they travel with ``state_dict``, ``save`` and
``load`` and ``policy.predict`` normalises on its own.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.func import functional_call

from sb3_metacpo.common import critic_gradients
from sb3_metacpo.common.flat_adam import FlatAdam, pack_parameters, packed_view

ActorParams = dict[str, th.Tensor]
SelfCPOPolicy = TypeVar("SelfCPOPolicy", bound="CPOPolicy")

_ACTOR_PREFIXES = ("mlp_extractor.policy_net.", "action_net.", "log_std")
#: index of ``optimizer_class`` among ``ActorCriticPolicy``'s positional arguments after ``lr_schedule``
_OPTIMIZER_CLASS_ARG = list(inspect.signature(ActorCriticPolicy.__init__).parameters).index("optimizer_class") - 4


#: numpy versions of common activations for :meth:`CPOPolicy.numpy_actor` (others run through torch, a bit slower).
def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


_NUMPY_ACTIVATIONS: dict[type[nn.Module], Callable[[np.ndarray], np.ndarray]] = {
    nn.Tanh: np.tanh,
    nn.ReLU: _relu,
}


def log_std_bound(dtype: th.dtype) -> float:
    """``abs(log_std)`` below this keeps exp(±2·log_std), the variance and its inverse, finite and non-zero in
    ``dtype`` (44.36 in float32)."""
    return math.log(th.finfo(dtype).max) / 2


#: the bound of the policy's float32 parameters (``log_std_init`` is checked against it)
LOG_STD_BOUND = log_std_bound(th.float32)
#: Noise draws per env and refill of :class:`BoundActor` (a block of draws is the same stream as single draws).
_NOISE_BLOCK = 64


def _acts_element_wise(module: nn.Module) -> bool:
    """Whether ``module`` maps every entry on its own: the same values on a batch of rows as entry by entry (a
    softmax, which mixes a row's entries, is not)."""
    with th.no_grad():
        x = th.linspace(-3.0, 3.0, 12, dtype=th.float64).reshape(3, 4)
        return bool(th.allclose(module(x), module(x.reshape(-1, 1)).reshape(x.shape)))


def _sub_params(params: ActorParams, prefix: str) -> ActorParams:
    return {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}


@th.no_grad()
def _torch_on_numpy(module: nn.Module, x: np.ndarray) -> np.ndarray:
    return module(th.from_numpy(x)).numpy()


def _linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, out: th.Tensor | None) -> th.Tensor:
    """``linear(x, weight, bias)``, into ``out`` if given (``addmm``, what ``linear`` runs for a 2-D input)."""
    return nn.functional.linear(x, weight, bias) if out is None else th.addmm(bias, x, weight.t(), out=out)


#: the address boundary of a fresh tensor's data on the CPU (torch's CPU allocator), where products' results start
_ALIGNMENT = 64


def _aligned(tensor: th.Tensor) -> bool:
    return tensor.data_ptr() % _ALIGNMENT == 0


def _flat_blocks(like: th.Tensor, params: ActorParams, first_matrix: str, blocks: dict[str, th.Tensor]) -> th.Tensor:
    """A flat vector of one value per entry of ``params`` (in their order, ``like``'s dtype and device), placed so
    that the block of ``first_matrix`` starts on a 64-byte boundary; each entry's block, a view in its shape, goes
    into ``blocks``."""
    sizes = [value.numel() for value in params.values()]
    per_boundary = _ALIGNMENT // like.element_size()
    storage = like.new_empty(sum(sizes) + per_boundary)
    before = sum(sizes[: list(params).index(first_matrix)])
    start = -(storage.data_ptr() // like.element_size() + before) % per_boundary
    flat = storage[start : start + sum(sizes)]
    blocks.update((name, part.view_as(value)) for (name, value), part in zip(params.items(), flat.split(sizes), strict=True))
    return flat


def _mm(a: th.Tensor, b: th.Tensor, out: th.Tensor | None) -> th.Tensor:
    """``a @ b``, into ``out`` if given."""
    return a @ b if out is None else th.mm(a, b, out=out)


def _add(a: th.Tensor, b: th.Tensor | float, in_place: bool) -> th.Tensor:
    """``a + b``, into ``a`` if ``in_place``."""
    return a.add_(b) if in_place else a + b


def _mul(a: th.Tensor, b: th.Tensor, in_place: bool) -> th.Tensor:
    """``a * b``, into ``a`` if ``in_place``."""
    return a.mul_(b) if in_place else a * b


#: A layer of :class:`NumpyActor`: ``(bias (n_sets, 1, out), weightᵀ (n_sets, in, out))`` or an element-wise function.
NumpyLayer = tuple[np.ndarray, np.ndarray] | Callable[[np.ndarray], np.ndarray]


class NumpyActor:
    """The Gaussian actor as numpy arrays, for acting in rollouts: picklable (a Ray worker receives it) and small.

    It holds ``n_sets`` parameter sets (e.g. one per task of a collect, stacked on a leading axis), the observation
    normalisation and a ``noise_seed`` the driver drew. :meth:`bind` gives the function of one rollout round of a
    sampler of ``n_envs`` envs, where env ``env_indices[i]`` acts with parameter set ``set_indices[i]``. The Gaussian
    noise of round ``r`` is one stream per round (seeded with ``noise_seed`` for round 0, ``(noise_seed, r)`` after),
    drawn as one ``(n_envs, action_dim)`` matrix per step, of which env ``j`` takes row ``j``: the actions of an env
    depend on the driver's seed and the env's index only, not on which process runs it or which envs run beside it
    (a worker with a share of the envs draws the whole matrix, ``n_envs * action_dim`` numbers a step, and keeps its
    rows). With every env in one process, round 0's noise is that of one generator seeded with ``noise_seed``.

    :param layers: per linear layer ``(bias (n_sets, 1, out), weightᵀ (n_sets, in, out))``, else an element-wise
        numpy function (picklable)
    :param std: the standard deviation of every set, ``(n_sets, action_dim)``
    :param obs_mean: mean of the observation normalisation (None: observations are not normalised)
    :param obs_std: its standard deviation
    :param clip_observations: the clipping range of normalised observations
    :param deterministic: act with the mean
    :param noise_seed: seed of the noise generators
    """

    def __init__(
        self,
        layers: list[NumpyLayer],
        std: np.ndarray,
        obs_mean: np.ndarray | None,
        obs_std: np.ndarray | None,
        clip_observations: float,
        deterministic: bool,
        noise_seed: int,
    ) -> None:
        self.layers = layers
        self.std = std
        self.obs_mean, self.obs_std, self.clip_observations = obs_mean, obs_std, clip_observations
        self.deterministic = deterministic
        self.noise_seed = int(noise_seed)
        self._bound: dict[bytes, BoundActor] = {}

    @property
    def n_sets(self) -> int:
        """Number of parameter sets."""
        return int(self.std.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what a worker receives, besides a few numbers)."""
        arrays = [self.std, *(part for layer in self.layers if isinstance(layer, tuple) for part in layer)]
        arrays += [array for array in (self.obs_mean, self.obs_std) if array is not None]
        return int(sum(array.nbytes for array in arrays))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bound": {}}

    def bind(
        self,
        set_indices: np.ndarray,
        env_indices: np.ndarray | None = None,
        round_index: int = 0,
        n_envs: int | None = None,
    ) -> BoundActor:
        """The policy of the envs ``env_indices`` (default: all, ``0 .. n - 1``) of a sampler of ``n_envs`` envs
        (default: ``len(set_indices)``) in round ``round_index`` of a collect, env ``env_indices[i]`` acting with
        parameter set ``set_indices[i]``."""
        set_indices = np.asarray(set_indices, dtype=np.int64)
        if set_indices.ndim != 1 or (len(set_indices) and (set_indices.min() < 0 or set_indices.max() >= self.n_sets)):
            raise ValueError(f"set indices must be a vector of integers in [0, {self.n_sets}), got {set_indices}")
        env_indices = np.arange(len(set_indices)) if env_indices is None else np.asarray(env_indices, dtype=np.int64)
        n_envs = len(set_indices) if n_envs is None else int(n_envs)
        if env_indices.shape != set_indices.shape:
            raise ValueError(f"{len(env_indices)} env indices for {len(set_indices)} set indices")
        if len(env_indices) and (env_indices.min() < 0 or env_indices.max() >= n_envs):
            raise ValueError(f"env indices must be in [0, {n_envs}), got {env_indices}")
        return BoundActor(self, set_indices, env_indices, int(round_index), n_envs)

    def __call__(self, observations: np.ndarray, set_indices: np.ndarray) -> np.ndarray:
        """The sampler's ``act(observations, task_indices)`` on envs ``0 .. n - 1`` in round 0 (successive calls
        with the same indices are successive steps)."""
        key = np.asarray(set_indices).tobytes()
        if key not in self._bound:
            self._bound[key] = self.bind(set_indices)
        return self._bound[key](observations)


class BoundActor:
    """The actor of :meth:`NumpyActor.bind`: ``obs (n, obs_dim) -> actions (n, action_dim)``, one call per step."""

    def __init__(
        self, actor: NumpyActor, set_indices: np.ndarray, env_indices: np.ndarray, round_index: int, n_envs: int
    ) -> None:
        self.actor = actor
        self.layers: list[NumpyLayer] = [
            (layer[0][set_indices], layer[1][set_indices]) if isinstance(layer, tuple) else layer for layer in actor.layers
        ]
        self.std = actor.std[set_indices]
        self.dtype = actor.std.dtype
        self.env_indices = env_indices
        self.n_envs = n_envs
        seed = actor.noise_seed if round_index == 0 else [actor.noise_seed, round_index]
        self.generator = np.random.default_rng(seed)
        self._noise = np.zeros((0, len(env_indices), self.std.shape[-1]), dtype=self.dtype)
        self._next = 0

    def _noise_now(self) -> np.ndarray:
        if self._next == len(self._noise):  # a block of steps at once: the same stream as one draw per step
            block = self.generator.standard_normal((_NOISE_BLOCK, self.n_envs, self.std.shape[-1]), dtype=self.dtype)
            self._noise = block[:, self.env_indices]
            self._next = 0
        self._next += 1
        return self._noise[self._next - 1]

    def mean(self, observations: np.ndarray) -> np.ndarray:
        """The mean action of each env."""
        actor = self.actor
        x = observations.astype(self.dtype, copy=False)
        if actor.obs_mean is not None and actor.obs_std is not None:
            # ndarray.clip: np.clip's computation without its dispatch layers (this runs at every env step)
            x = ((x - actor.obs_mean) / actor.obs_std).clip(-actor.clip_observations, actor.clip_observations)
        x = x[:, None, :]
        for layer in self.layers:
            if isinstance(layer, tuple):
                x = np.matmul(x, layer[1])
                x += layer[0]
            else:
                x = layer(x)
        return x[:, 0, :]

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        if len(observations) != len(self.env_indices):
            raise ValueError(f"{len(observations)} observations for an actor bound to {len(self.env_indices)} envs")
        mean = self.mean(observations)
        return mean if self.actor.deterministic else mean + self._noise_now() * self.std


def _positive_number(value: Any) -> bool:
    """A Python or numpy real number > 0 (inf included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) > 0


#: The running observation statistics (mean, variance and count).
ObsStats = tuple[th.Tensor, th.Tensor, th.Tensor]

#: The largest critic target magnitude (a discounted return of rewards or costs) the critics regress on. The squared
#: errors and Adam's second moments overflow float32 a few orders of magnitude above it (a [64, 64] critic fitted 1e18
#: and went non-finite from 1e19 on), and no reward or cost scale that trains needs more.
MAX_CRITIC_TARGET = 1e15


def _optimizer_snapshot(optimizer: th.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's ``state_dict`` with its state tensors copied (what ``load_state_dict`` restores it from),
    without a deep copy of everything else."""
    state = optimizer.state_dict()
    state["state"] = {
        key: {name: value.clone() if isinstance(value, th.Tensor) else copy.deepcopy(value) for name, value in entry.items()}
        for key, entry in state["state"].items()
    }
    state["param_groups"] = [dict(group) for group in state["param_groups"]]
    return state


def check_critic_targets(reward_targets: th.Tensor, cost_targets: th.Tensor) -> None:
    """Raise a ``ValueError`` (nothing has changed yet) where the critics' targets are not finite or too large for
    their float32 regression (beyond :data:`MAX_CRITIC_TARGET`)."""
    for name, targets in (("reward", reward_targets), ("cost", cost_targets)):
        if not bool(th.isfinite(targets).all()):
            raise ValueError(f"non-finite {name} critic targets (returns): nothing was updated")
        largest = float(targets.abs().max()) if targets.numel() else 0.0
        if largest > MAX_CRITIC_TARGET:
            raise ValueError(
                f"the {name} critic's targets (discounted returns) reach {largest:.3g}, beyond {MAX_CRITIC_TARGET:g}, "
                f"where its float32 regression overflows: scale the env's {name}s; nothing was updated"
            )


def check_flat_observation_space(space: spaces.Space) -> spaces.Box:
    """``space``, or a ``TypeError`` naming the fix unless it is a flat Box (a vector): the policies are MLPs on
    vectors."""
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise TypeError(
            f"CPOPolicy needs a flat Box observation space (a vector), got {space}: Dict, Tuple and image "
            "observations are not supported; flatten them, e.g. gymnasium.wrappers.FlattenObservation(env)"
        )
    return space


def check_flat_action_space(space: spaces.Space) -> spaces.Box:
    """``space``, or a ``TypeError`` unless it is a flat Box (continuous actions, a vector): the actor is a diagonal
    Gaussian, and the rollouts clip and store flat actions."""
    if not isinstance(space, spaces.Box):
        raise TypeError(f"CPOPolicy needs a Box (continuous) action space, got {space}")
    if len(space.shape) != 1:
        raise TypeError(
            f"CPOPolicy needs a flat Box action space, got shape {space.shape}: give the env a flat one "
            "(a gymnasium.ActionWrapper whose action(flat) reshapes it)"
        )
    return space


class CPOPolicy(ActorCriticPolicy):
    """Actor-critic policy for CPO-style algorithms (SB3 ``ActorCriticPolicy`` plus a cost critic).

    All of ``ActorCriticPolicy``'s arguments (``net_arch``, ``activation_fn``, ``log_std_init``, ``ortho_init``...)
    work through ``policy_kwargs``. The cost critic copies the reward critic's architecture. The critics' optimiser
    defaults to :class:`~sb3_metacpo.common.flat_adam.FlatAdam` (torch's Adam bit for bit, with SB3's ``eps=1e-5``
    when no ``optimizer_kwargs`` are given, as SB3 does for Adam), over the critics' parameters packed into one
    storage; ``optimizer_class`` and ``optimizer_kwargs`` choose another.

    :param normalize_observations: normalise observations with running mean/std statistics (clipped to
        ``[-clip_observations, clip_observations]``); the algorithms update them from the collected data.
    :param clip_observations: clipping range of normalised observations.
    :param n_costs: number of cost signals the cost critic estimates (one output each; set by the algorithms from
        their cost constraints).
    """

    # running observation statistics (buffers registered in __init__)
    obs_mean: th.Tensor
    obs_var: th.Tensor
    obs_count: th.Tensor

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        normalize_observations: bool = True,
        clip_observations: float = 10.0,
        n_costs: int = 1,
        **kwargs: Any,
    ) -> None:
        action_space = check_flat_action_space(action_space)
        observation_space = check_flat_observation_space(observation_space)
        if len(args) <= _OPTIMIZER_CLASS_ARG:  # not given positionally: FlatAdam unless given by name
            kwargs.setdefault("optimizer_class", FlatAdam)
            if kwargs["optimizer_class"] is FlatAdam and kwargs.get("optimizer_kwargs") is None:
                kwargs["optimizer_kwargs"] = {"eps": 1e-5}  # what SB3 gives torch's Adam when no kwargs are given
        if kwargs.get("use_sde", False):
            raise ValueError("gSDE is not supported by CPOPolicy: the CPO step needs a diagonal Gaussian actor")
        if not kwargs.get("share_features_extractor", True):
            raise ValueError(
                "share_features_extractor=False is not supported by CPOPolicy: its features extractor has no "
                "parameters (the observation normalisation is in the policy), so a separate one for the critics would "
                "change nothing; leave share_features_extractor at its default (True)"
            )
        from sb3_metacpo.common.checks import is_bool, is_real  # here: checks imports the updates, which import this

        if not is_bool(normalize_observations):
            raise ValueError(f"normalize_observations must be True or False, got {normalize_observations!r}")
        if not _positive_number(clip_observations):
            raise ValueError(f"clip_observations must be a number > 0 (inf: no clipping), got {clip_observations!r}")
        log_std_init = kwargs.get("log_std_init", 0.0)
        if not (is_real(log_std_init) and abs(log_std_init) < LOG_STD_BOUND):
            raise ValueError(
                f"log_std_init must be a number in (-{LOG_STD_BOUND:.2f}, {LOG_STD_BOUND:.2f}) (the actor's initial "
                f"log-std; beyond it the variance or its inverse overflows float32), got {log_std_init!r}"
            )
        self.normalize_observations = bool(normalize_observations)
        self.clip_observations = clip_observations
        if not isinstance(n_costs, int) or n_costs < 1:
            raise ValueError(f"n_costs must be a positive integer, got {n_costs!r}")
        self.n_costs = n_costs
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)
        if any(True for _ in self.features_extractor.parameters()):
            raise ValueError(
                "CPOPolicy adapts the actor functionally and needs a parameter-free features extractor (the default "
                "FlattenExtractor); put trainable layers in net_arch instead"
            )
        for module in self.mlp_extractor.policy_net:
            if not isinstance(module, nn.Linear) and any(True for _ in module.parameters()):
                raise ValueError(
                    f"CPOPolicy's actor must be linear layers and parameter-free activations, got {module}: "
                    "use net_arch and activation_fn to shape it"
                )
            if not isinstance(module, nn.Linear) and not _acts_element_wise(module):
                raise ValueError(
                    f"CPOPolicy's actor needs element-wise activations (the rollouts' numpy actor and the closed-form "
                    f"Fisher product apply them entry by entry), got {module}: use e.g. nn.Tanh or nn.ReLU"
                )
        dim = int(np.prod(observation_space.shape))
        self.register_buffer("obs_mean", th.zeros(dim))
        self.register_buffer("obs_var", th.ones(dim))
        self.register_buffer("obs_count", th.tensor(1e-4))
        self._actor_override: ActorParams | None = None

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        assert isinstance(self.action_dist, DiagGaussianDistribution)
        # The cost critic sees the time within the episode (t / episode length) beside the features: the constraint
        # is on the undiscounted, finite-horizon episode cost, whose cost-to-go depends on the time left.
        self.cost_mlp = copy.deepcopy(self.mlp_extractor.value_net)
        first = next((i for i, module in enumerate(self.cost_mlp) if isinstance(module, nn.Linear)), None)
        if first is None:
            self.cost_value_net = nn.Linear(self.mlp_extractor.latent_dim_vf + 1, self.n_costs)
        else:
            layer = self.cost_mlp[first]
            assert isinstance(layer, nn.Linear)
            self.cost_mlp[first] = nn.Linear(layer.in_features + 1, layer.out_features)
            self.cost_value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, self.n_costs)
        if self.ortho_init:
            self.cost_mlp.apply(partial(self.init_weights, gain=np.sqrt(2)))
            self.cost_value_net.apply(partial(self.init_weights, gain=1))
        else:
            for module in self.cost_mlp.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        self._pack_critics()
        # SB3 types optimizer_class as the abstract Optimizer, whose __init__ takes no lr (SB3 ignores it the same way)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _pack_critics(self) -> None:
        """The critics' parameters (everything but the actor) in one storage, in parameter order, if they are not
        (after construction, or a ``copy.deepcopy`` of the policy): :class:`FlatAdam` then updates them with one set
        of operations per minibatch, torch's Adam bit for bit."""
        critics = [p for name, p in self.named_parameters() if not name.startswith(_ACTOR_PREFIXES)]
        if critics and packed_view(critics) is None:
            pack_parameters(critics)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            normalize_observations=self.normalize_observations,
            clip_observations=self.clip_observations,
            n_costs=self.n_costs,
        )
        return data

    # --- saving and loading the policy alone (data only; see sb3_metacpo.common.serialization) ----------------
    def save(self, path: str | os.PathLike[str]) -> Path:  # type: ignore[override]
        """Save the policy alone (SB3's ``policy.save``): its class, spaces and constructor arguments as JSON, its
        parameters and buffers (actor, critics, observation statistics) and, after ``adapt``, the actor override
        (the adapted parameters, :meth:`set_actor_override`) as tensors, so that the loaded policy predicts as this
        one does. Written atomically; ``.zip`` is added when ``path`` has no suffix. Returns the path written.

        The optimiser's state is not saved (as in SB3), its learning rate is. To continue training, save the whole
        model (``model.save``).
        """
        from sb3_metacpo.common.serialization import save_policy

        return save_policy(self, path)

    @classmethod
    def load(cls: type[SelfCPOPolicy], path: str | os.PathLike[str], device: th.device | str = "auto") -> SelfCPOPolicy:
        """Load a policy saved by :meth:`save`, running no code from the file: JSON metadata, tensors read with
        ``torch.load(weights_only=True)``, classes (policy, activation, optimiser) from the registry of allowed
        classes. The actor override (adapted parameters) is restored if one was saved. A file in SB3's pickled
        format (``BaseModel.save``), a model's archive or anything else is refused with an
        :class:`~sb3_metacpo.common.serialization.ArchiveError` naming the problem.

        :param path: the file (``.zip`` is added when the path has no suffix and the file without it is absent)
        :param device: torch device of the loaded policy
        """
        from sb3_metacpo.common.serialization import load_policy

        return load_policy(cls, path, device)

    @classmethod
    def load_sb3_file(cls: type[SelfCPOPolicy], path: str, device: th.device | str = "auto") -> SelfCPOPolicy:
        """Load a policy file in SB3's format (``BaseModel.save``) with SB3's loader, which unpickles (runs) the
        file: only for files you trust, e.g. to re-save them with :meth:`save`."""
        return super().load(path, device)

    # --- observation normalisation ----------------------------------------------------------------------------
    def normalize_obs(self, obs: th.Tensor) -> th.Tensor:
        if not self.normalize_observations:
            return obs
        normalized = (obs - self.obs_mean) / th.sqrt(self.obs_var + 1e-8)
        return th.clamp(normalized, -self.clip_observations, self.clip_observations)

    @th.no_grad()
    def update_obs_stats(self, observations: np.ndarray) -> None:
        """Fold a batch of raw observations ``(n, obs_dim)`` into the running mean and variance (a ``ValueError``,
        with the statistics unchanged, where they would overflow: see :meth:`obs_stats_after`)."""
        self.set_obs_stats(self.obs_stats_after(observations))

    @th.no_grad()
    def obs_stats_after(self, observations: np.ndarray) -> ObsStats | None:
        """The running mean, variance and count after folding in a batch of raw observations ``(n, obs_dim)``,
        without storing them (None without normalisation). Finite observations can still overflow the statistics'
        float32 (a variance of values beyond ~1e19): that raises a ``ValueError`` here, before anything changes."""
        if not self.normalize_observations:
            return None
        batch = th.as_tensor(observations, dtype=self.obs_mean.dtype, device=self.obs_mean.device)
        batch = batch.reshape(-1, self.obs_mean.shape[0])
        batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        delta = batch_mean - self.obs_mean
        total = self.obs_count + batch_count
        new_mean = self.obs_mean + delta * batch_count / total
        m2 = self.obs_var * self.obs_count + batch_var * batch_count + delta**2 * self.obs_count * batch_count / total
        new_var = m2 / total
        if not bool(th.isfinite(new_mean).all() and th.isfinite(new_var).all()):
            largest = float(np.abs(np.asarray(observations, dtype=np.float64)).max()) if np.size(observations) else 0.0
            raise ValueError(
                f"the observations (largest magnitude {largest:.3g}) overflow the running statistics of observation "
                f"normalisation ({self.obs_mean.dtype}): scale the env's observations, or pass "
                "normalize_observations=False in policy_kwargs; nothing was updated"
            )
        return new_mean, new_var, total

    @th.no_grad()
    def set_obs_stats(self, stats: ObsStats | None) -> None:
        """Store statistics computed by :meth:`obs_stats_after` (None: nothing to store)."""
        if stats is None:
            return
        new_mean, new_var, total = stats
        self.obs_mean.copy_(new_mean)
        self.obs_var.copy_(new_var)
        self.obs_count.copy_(total)

    def extract_features(self, obs: PyTorchObs, features_extractor: Any = None) -> Any:  # type: ignore[override]
        return super().extract_features(self.normalize_obs(obs), features_extractor)  # type: ignore[arg-type]

    # --- functional actor -------------------------------------------------------------------------------------
    def actor_params(self) -> ActorParams:
        """The actor's parameters by name (the meta-parameters theta): hidden layers, mean head and log-std."""
        return {name: p for name, p in self.named_parameters() if name.startswith(_ACTOR_PREFIXES)}

    def actor_mean_log_std(self, obs: th.Tensor, params: ActorParams | None = None) -> tuple[th.Tensor, th.Tensor]:
        """Mean and log-std of the Gaussian actor at ``params`` (the module's own parameters when None)."""
        params = self.actor_params() if params is None else params
        features = self.normalize_obs(obs.to(self.obs_mean.dtype))  # envs may emit float64
        mean = self._written_out_mean(features, params)
        if mean is None:
            latent = functional_call(
                self.mlp_extractor.policy_net, _sub_params(params, "mlp_extractor.policy_net."), (features,)
            )
            mean = functional_call(self.action_net, _sub_params(params, "action_net."), (latent,))
        return mean, params["log_std"].expand_as(mean)

    def _written_out_mean(self, features: th.Tensor, params: ActorParams) -> th.Tensor | None:
        """The actor's mean at ``params`` as ``functional_call`` computes it, the same operations on the same operands
        (``linear`` for each ``nn.Linear``, each activation called), without its swapping of the modules' parameters
        (about a fifth of a forward pass with gradients at 200 samples); None, and ``functional_call`` runs the
        modules, whenever their own calls could do otherwise: hooks or parametrisations, a subclass of ``nn.Linear``
        or ``nn.Sequential``, or a name of ``params`` that the linear layers do not use (a parameter of another
        module, e.g. of an ``action_net`` replaced by a ``Sequential``, or an unknown name) or that one of them lacks."""
        policy_net = self.mlp_extractor.policy_net
        if (
            type(policy_net) is not nn.Sequential
            or critic_gradients.global_hooks()
            or critic_gradients.module_hooked(policy_net)
        ):
            return None
        x, used = features, 1  # log_std
        for index, module in [*enumerate(policy_net), (None, self.action_net)]:
            if critic_gradients.module_hooked(module):
                return None
            if type(module) is nn.Linear:
                prefix = "action_net." if index is None else f"mlp_extractor.policy_net.{index}."
                weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
                if weight is None or (bias is None) != (module.bias is None):
                    return None
                x = nn.functional.linear(x, weight, bias)
                used += 1 if bias is None else 2
            else:  # its own call: ``functional_call`` would swap in those of its parameters named in ``params``,
                x = module(x)  # and any such name is left unused here (below)
        return x if used == len(params) else None

    def numpy_actor_sets(self, params: ActorParams, deterministic: bool = False, noise_seed: int | None = None) -> NumpyActor:
        """The policy as a :class:`NumpyActor` with a parameter set per row of ``params``.

        Every tensor of ``params`` has a leading axis of size n_sets (e.g. the stacked parameters of several tasks).
        Parameters and normalisation statistics are copied now: the actor is for rollouts during which they do not
        change. Each linear layer is one batched ``matmul``; numpy's per-call overhead is a fraction of torch's, and
        acting runs at every env step. ``noise_seed`` (default: drawn from torch's global generator, so sampling is
        as reproducible under ``set_random_seed`` as torch sampling) seeds the noise streams (one per round, see
        :class:`NumpyActor`).
        """
        with th.no_grad():
            arrays = {name: value.detach().cpu().numpy() for name, value in params.items()}
            obs_mean = self.obs_mean.cpu().numpy()
            obs_std = th.sqrt(self.obs_var + 1e-8).cpu().numpy()
        prefix = "mlp_extractor.policy_net."
        layers: list[NumpyLayer] = []
        for index, module in [*enumerate(self.mlp_extractor.policy_net), (None, self.action_net)]:
            name = "action_net." if index is None else f"{prefix}{index}."
            if isinstance(module, nn.Linear):
                weight_t = np.ascontiguousarray(arrays[name + "weight"].transpose(0, 2, 1))
                layers.append((arrays[name + "bias"][:, None, :], weight_t))
            elif type(module) in _NUMPY_ACTIVATIONS:
                layers.append(_NUMPY_ACTIVATIONS[type(module)])
            else:  # parameter-free and element-wise (checked at construction)
                layers.append(partial(_torch_on_numpy, module))
        if noise_seed is None:
            noise_seed = int(th.randint(2**62, ()))
        return NumpyActor(
            layers,
            np.exp(arrays["log_std"]),
            obs_mean if self.normalize_observations else None,
            obs_std if self.normalize_observations else None,
            self.clip_observations,
            deterministic,
            noise_seed,
        )

    def numpy_actor(self, params: ActorParams, deterministic: bool = False) -> Callable[[np.ndarray], np.ndarray]:
        """The policy as a numpy function ``obs (n, obs_dim) -> actions`` for the n envs of a rollout, one call per
        step, with the parameter set ``params`` (leading axis of size n, one set per env, or 1, one for all).

        The Gaussian noise comes from one numpy generator seeded from torch's global one when this is called (see
        :class:`NumpyActor`), so sampling is as reproducible under ``set_random_seed`` as torch sampling.
        """
        actor = self.numpy_actor_sets(params, deterministic)
        bound: list[BoundActor] = []

        def act(obs: np.ndarray) -> np.ndarray:
            if not bound:
                sets = np.zeros(len(obs), dtype=np.int64) if actor.n_sets == 1 else np.arange(len(obs))
                bound.append(actor.bind(sets))
            return bound[0](obs)

        return act

    def fisher_product(
        self, params: ActorParams, obs: th.Tensor, damping: float, create_graph: bool = False
    ) -> Callable[[th.Tensor], th.Tensor]:
        """v -> (F + damping I) v in closed form, F the Fisher matrix of the actor at ``params`` on ``obs``.

        For a Gaussian with state-independent log-std, F is block diagonal: ``Jᵀ diag(σ⁻²) J / n`` for the mean's
        parameters (J the Jacobian of the mean) and ``2 I`` for the log-std. Each product is one forward-mode and
        one reverse-mode pass through the MLP, written out on activations cached here, about half the cost of the
        double backward of the KL (:func:`~sb3_metacpo.common.cpo_update.fisher_product`, which it equals). With
        ``create_graph`` the products stay differentiable w.r.t. ``params`` (second-order meta-gradient). ``v`` is
        flat, in the order of ``params``.
        """
        prefix = "mlp_extractor.policy_net."
        layers = [f"{prefix}{i}." for i, m in enumerate(self.mlp_extractor.policy_net) if isinstance(m, nn.Linear)]
        layers.append("action_net.")
        with th.set_grad_enabled(create_graph):
            inputs: list[th.Tensor] = []  # the input of every linear layer
            slopes: list[th.Tensor | None] = []  # derivative of the element-wise maps after each linear layer
            x = self.normalize_obs(obs.to(self.obs_mean.dtype))
            for module in [*self.mlp_extractor.policy_net, self.action_net]:
                if isinstance(module, nn.Linear):
                    name = layers[len(inputs)]
                    inputs.append(x)
                    slopes.append(None)
                    x = nn.functional.linear(x, params[name + "weight"], params[name + "bias"])
                else:  # element-wise: its Jacobian is the diagonal of the gradient of its sum
                    with th.enable_grad():
                        pre = x if create_graph else x.detach().requires_grad_(True)
                        x = module(pre)
                        (slope,) = th.autograd.grad(x.sum(), pre, create_graph=create_graph)
                    previous = slopes[-1]
                    slopes[-1] = slope if previous is None else previous * slope
            weights = [params[name + "weight"] for name in layers]
            inverse_variance = (-2 * params["log_std"]).exp() / len(obs)
        sizes = [value.numel() for value in params.values()]
        # Without a graph (the outer step, first-order inner steps) the (n, width) arrays are written into buffers
        # allocated at the first product, in place or with out=: the same operations on the same operands, without
        # fresh pages for every product; with a graph every array is a new tensor.
        into = not create_graph
        buffers: list[th.Tensor] = []  # per layer: J v, the mm term beside it, the reverse-mode array
        # Without a graph, on the CPU, the product's blocks are also written into their places in one flat vector
        # (what the concatenation below gives, without concatenating; the rounding of MKL's products into it is
        # tested, another device's libraries are not); otherwise they are new tensors, concatenated.
        in_place = into and inputs[0].device.type == "cpu"
        flat: list[th.Tensor] = []
        blocks: dict[str, th.Tensor] = {}  # name -> its block, written in place
        moved: dict[str, th.Tensor] = {}  # weight name -> its block, computed apart and copied there (below)

        def fisher_vector_product(vector: th.Tensor) -> th.Tensor:
            with th.set_grad_enabled(create_graph):
                if into and not buffers:
                    buffers.extend(inputs[0].new_empty(len(obs), w.shape[0]) for w in weights for _ in range(3))
                if in_place and not flat:
                    flat.append(_flat_blocks(inputs[0], params, layers[0] + "weight", blocks))
                    # MKL's product can round otherwise into a result that does not start on a 64-byte boundary (seen
                    # here at 8-byte offsets, with two rows): a weight block that does not is computed apart.
                    moved.update(
                        (n + "weight", blocks.pop(n + "weight")) for n in layers if not _aligned(blocks[n + "weight"])
                    )

                def buffer(index: int) -> th.Tensor | None:
                    return buffers[index] if into else None

                parts = vector.split(sizes)
                tangent = {name: part.view_as(value) for (name, value), part in zip(params.items(), parts, strict=True)}
                d_out = None  # forward mode: J v, layer by layer
                for index, (name, layer_input, weight, slope) in enumerate(zip(layers, inputs, weights, slopes, strict=True)):
                    linear = _linear(layer_input, tangent[name + "weight"], tangent[name + "bias"], buffer(3 * index))
                    d_out = _add(linear, 0 if d_out is None else _mm(d_out, weight.T, buffer(3 * index + 1)), into)
                    d_out = d_out if slope is None else _mul(d_out, slope, into)
                assert d_out is not None
                upstream = _mul(d_out, inverse_variance, into)  # reverse mode: Jᵀ diag(σ⁻²) J v / n
                product = {"log_std": th.mul(tangent["log_std"], 2, out=blocks.get("log_std"))}
                for index in reversed(range(len(layers))):
                    weight_name, bias_name = layers[index] + "weight", layers[index] + "bias"
                    product[weight_name] = _mm(upstream.T, inputs[index], blocks.get(weight_name))
                    if weight_name in moved:
                        moved[weight_name].copy_(product[weight_name])
                    product[bias_name] = th.sum(upstream, 0, out=blocks.get(bias_name))
                    if index > 0:
                        upstream = _mm(upstream, weights[index], buffer(3 * (index - 1) + 2))
                        slope = slopes[index - 1]
                        upstream = upstream if slope is None else _mul(upstream, slope, into)
                if in_place:
                    return flat[0] + damping * vector
                return th.cat([product[name].reshape(-1) for name in params]) + damping * vector

        return fisher_vector_product

    def set_actor_override(self, params: ActorParams | None) -> None:
        """Act with ``params`` (e.g. adapted parameters) in ``predict``, ``forward``, ``get_distribution`` and
        ``evaluate_actions``; None restores the module's own."""
        self._actor_override = None if params is None else {k: v.detach() for k, v in params.items()}

    # SB3's get_distribution, forward and evaluate_actions run the base class's feature extraction (no observation
    # normalisation) and the module's own actor parameters: all three go through actor_mean_log_std here.
    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        """The actor's Gaussian at (normalised) ``obs``, with the override's parameters if one is set."""
        mean, log_std = self.actor_mean_log_std(obs, self._actor_override)  # type: ignore[arg-type]
        assert isinstance(self.action_dist, DiagGaussianDistribution)
        return self.action_dist.proba_distribution(mean, log_std)

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, reward values and the actions' log-probabilities (SB3's ``forward``)."""
        distribution = self.get_distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), self.predict_values(obs), log_prob  # type: ignore[misc]

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Reward values, log-probabilities and entropy of ``actions`` at ``obs`` (SB3's ``evaluate_actions``)."""
        distribution = self.get_distribution(obs)
        return self.predict_values(obs), distribution.log_prob(actions), distribution.entropy()

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        mean, log_std = self.actor_mean_log_std(observation, self._actor_override)  # type: ignore[arg-type]
        if not bool(th.isfinite(mean).all()):  # SB3's policies raise here too (its distribution checks its mean)
            raise ValueError(
                "predict: the policy's action is not finite, for observations with non-finite values (NaN, or inf "
                "where observations are not normalised): check the env's observations"
            )
        if deterministic:
            return mean
        action = mean + th.randn_like(mean) * log_std.exp()
        if not bool(th.isfinite(action).all()):  # a finite mean with a non-finite (or overflowing) standard deviation
            raise ValueError(
                f"predict: the stochastic action is not finite (log-std {log_std.detach().flatten().tolist()}): the "
                "policy's parameters are not usable; predict(deterministic=True) acts with the mean"
            )
        return action

    def fit_critics(
        self,
        observations: th.Tensor,
        reward_targets: th.Tensor,
        cost_targets: th.Tensor,
        n_epochs: int,
        batch_size: int,
        time_fractions: th.Tensor,
    ) -> float:
        """Regress the reward and cost critics on their targets (``n_epochs`` of Adam minibatches); mean loss.

        ``reward_targets`` has shape (n,) or (n, 1); ``cost_targets`` one column per cost signal, shape (n, n_costs)
        (or (n,) for one); ``time_fractions``
        is each sample's time within its episode (step / episode length), the cost critic's extra input. Plain MLP
        critics get their gradients from :func:`~sb3_metacpo.common.critic_gradients.mse_gradients` (autograd's, bit
        for bit, without its engine); any other critic from ``loss.backward()``."""
        # (n,) and (n, 1) alike: an (n, 1) target against the (n,) values would broadcast to (n, n) in mse_loss
        reward_targets = reward_targets.reshape(len(observations))
        cost_targets = cost_targets.reshape(len(observations), self.n_costs)
        check_critic_targets(reward_targets, cost_targets)
        self._pack_critics()
        # the last line of defence (the targets are checked above): a fit that leaves a non-finite critic parameter
        # or optimiser state (e.g. a learning rate that overflows them) is undone
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved_parameters = [p.detach().clone() for p in trained]
        saved_optimizer = _optimizer_snapshot(self.optimizer)
        self.set_training_mode(True)
        # The critics' inputs once for all samples: normalisation and concatenation are element-wise, so a minibatch's
        # rows are the values predict_values / predict_costs would compute from its observations
        with th.no_grad():
            features = self.extract_features(observations, self.vf_features_extractor)
            cost_inputs = self._cost_inputs(features, time_fractions)
        losses = []
        # written out for one dtype throughout (mixed dtypes promote in autograd's path), on the CPU (where the bits
        # are tested; other devices' libraries may order a product's sums by the call's layout)
        same_dtype = reward_targets.dtype == cost_targets.dtype == features.dtype  # cost_inputs: features' dtype
        on_cpu = features.device.type == "cpu"
        fast = critic_gradients.FAST_CRITIC_GRADIENTS and same_dtype and on_cpu and critic_gradients.autograd_as_usual()
        critics = self._critic_layers() if fast else None
        try:
            for _ in range(n_epochs):
                for indices in th.randperm(len(observations), device=observations.device).split(batch_size):
                    self.optimizer.zero_grad()
                    if critics is not None:  # autograd's gradients bit for bit, without its graph and engine
                        reward_mlp, cost_mlp = critics
                        loss, grads = critic_gradients.mse_gradients(
                            [
                                (reward_mlp, features[indices], reward_targets[indices]),
                                (cost_mlp, cost_inputs[indices], cost_targets[indices]),
                            ]
                        )
                        for parameter, grad in grads.items():
                            parameter.grad = grad
                    else:
                        loss = nn.functional.mse_loss(self._values_of(features[indices]).flatten(), reward_targets[indices])
                        loss = loss + nn.functional.mse_loss(self._costs_of(cost_inputs[indices]), cost_targets[indices])
                        loss.backward()
                    self.optimizer.step()
                    losses.append(loss.item())
        except BaseException:  # an overflow inside the optimiser's step, a Ctrl-C: nothing half-updated stays
            self._restore_critics(trained, saved_parameters, saved_optimizer)
            raise
        self.set_training_mode(False)
        state = [value for entry in self.optimizer.state.values() for value in entry.values()]
        tensors = [*trained, *(value for value in state if isinstance(value, th.Tensor) and value.is_floating_point())]
        if not all(bool(th.isfinite(tensor).all()) for tensor in tensors):
            self._restore_critics(trained, saved_parameters, saved_optimizer)
            raise FloatingPointError(
                "the critics' regression produced non-finite critic parameters or optimiser state (learning rate "
                f"{[group['lr'] for group in self.optimizer.param_groups]}): the critics and their optimiser were "
                "restored to their state before the fit"
            )
        return float(np.mean(losses))

    def _restore_critics(self, trained: list[th.Tensor], saved: list[th.Tensor], optimizer_state: dict[str, Any]) -> None:
        """Put back the critics' parameters and their optimiser's state as they were before a fit."""
        with th.no_grad():
            for parameter, value in zip(trained, saved, strict=True):
                parameter.copy_(value)
        self.optimizer.load_state_dict(optimizer_state)
        self.set_training_mode(False)

    def _critic_layers(self) -> tuple[critic_gradients.MlpLayers, critic_gradients.MlpLayers] | None:
        """The reward and cost critics as :class:`~sb3_metacpo.common.critic_gradients.MlpLayers` (what
        :meth:`_values_of` and :meth:`_costs_of` apply), or None when either is not a plain MLP or those methods
        (or the extractor's ``forward_critic``) are overridden."""
        overridden = (
            type(self)._values_of is not CPOPolicy._values_of
            or type(self)._costs_of is not CPOPolicy._costs_of
            or type(self.mlp_extractor).forward_critic is not MlpExtractor.forward_critic
        )
        if overridden:
            return None
        reward = critic_gradients.mlp_layers([self.mlp_extractor.value_net, self.value_net])
        cost = critic_gradients.mlp_layers([self.cost_mlp, self.cost_value_net])
        if reward is None or cost is None or not critic_gradients.shares_no_parameter(reward, cost):
            return None
        dtypes = {p.dtype for layers in (reward, cost) for m in layers.modules for p in m.parameters()}
        return (reward, cost) if dtypes == {self.obs_mean.dtype} else None

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Reward-value estimates, shape (n, 1), of normalised observations (SB3's ``predict_values`` calls the base
        class's feature extraction, which would skip the normalisation the actor and the cost critic get)."""
        return self._values_of(self.extract_features(obs, self.vf_features_extractor))

    def predict_costs(self, obs: th.Tensor, time_fractions: th.Tensor) -> th.Tensor:
        """Cost-value estimates (expected cost to the end of the episode), shape (n, n_costs); ``time_fractions``:
        each observation's time within its episode, step / episode length, shape (n,)."""
        features = self.extract_features(obs, self.vf_features_extractor)
        return self._costs_of(self._cost_inputs(features, time_fractions))

    def _values_of(self, features: th.Tensor) -> th.Tensor:
        """The reward critic on (normalised) features."""
        return self.value_net(self.mlp_extractor.forward_critic(features))

    @staticmethod
    def _cost_inputs(features: th.Tensor, time_fractions: th.Tensor) -> th.Tensor:
        """The cost critic's input: the features and the time within the episode."""
        return th.cat([features, time_fractions.reshape(-1, 1).to(features.dtype)], dim=-1)

    def _costs_of(self, cost_inputs: th.Tensor) -> th.Tensor:
        """The cost critic on its inputs (:meth:`_cost_inputs`)."""
        return self.cost_value_net(self.cost_mlp(cost_inputs))

    @th.no_grad()
    def critic_values(self, observations: np.ndarray, time_fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward and cost value estimates of raw observations ``(n, obs_dim)`` at times ``time_fractions`` (n,)
        within their episodes: shapes (n,) and (n, n_costs)."""
        obs = th.as_tensor(observations, device=self.device)
        time = th.as_tensor(time_fractions, device=self.device)
        return self.predict_values(obs).cpu().numpy().reshape(-1), self.predict_costs(obs, time).cpu().numpy()


MlpPolicy = CPOPolicy
