"""The policy: a Gaussian actor that can run on substituted (adapted) parameters, a reward critic and a cost critic.

Observation normalisation statistics live in the policy's buffers, so they travel with ``state_dict``, ``save`` and
``load`` and ``policy.predict`` normalises on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.func import functional_call

ActorParams = dict[str, th.Tensor]

_ACTOR_PREFIXES = ("mlp_extractor.policy_net.", "action_net.", "log_std")
#: numpy versions of common activations for :meth:`CPOPolicy.numpy_actor` (others run through torch, a bit slower).
_NUMPY_ACTIVATIONS: dict[type[nn.Module], Callable[[np.ndarray], np.ndarray]] = {
    nn.Tanh: np.tanh,
    nn.ReLU: lambda x: np.maximum(x, 0),
}


def _sub_params(params: ActorParams, prefix: str) -> ActorParams:
    return {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}


@th.no_grad()
def _torch_on_numpy(module: nn.Module, x: np.ndarray) -> np.ndarray:
    return module(th.from_numpy(x)).numpy()


class CPOPolicy(ActorCriticPolicy):
    """Actor-critic policy for CPO-style algorithms (SB3 ``ActorCriticPolicy`` plus a cost critic).

    All of ``ActorCriticPolicy``'s arguments (``net_arch``, ``activation_fn``, ``log_std_init``, ``ortho_init``...)
    work through ``policy_kwargs``. The cost critic copies the reward critic's architecture.

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
        if not isinstance(action_space, spaces.Box):
            raise TypeError(f"CPOPolicy needs a Box (continuous) action space, got {action_space}")
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise TypeError(f"CPOPolicy needs a flat Box observation space, got {observation_space}")
        if kwargs.get("use_sde", False):
            raise ValueError("gSDE is not supported by CPOPolicy: the CPO step needs a diagonal Gaussian actor")
        self.normalize_observations = normalize_observations
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
        # SB3 types optimizer_class as the abstract Optimizer, whose __init__ takes no lr (SB3 ignores it the same way)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            normalize_observations=self.normalize_observations,
            clip_observations=self.clip_observations,
            n_costs=self.n_costs,
        )
        return data

    # --- observation normalisation ----------------------------------------------------------------------------
    def normalize_obs(self, obs: th.Tensor) -> th.Tensor:
        if not self.normalize_observations:
            return obs
        normalized = (obs - self.obs_mean) / th.sqrt(self.obs_var + 1e-8)
        return th.clamp(normalized, -self.clip_observations, self.clip_observations)

    @th.no_grad()
    def update_obs_stats(self, observations: np.ndarray) -> None:
        """Fold a batch of raw observations ``(n, obs_dim)`` into the running mean and variance."""
        if not self.normalize_observations:
            return
        batch = th.as_tensor(observations, dtype=self.obs_mean.dtype, device=self.obs_mean.device)
        batch = batch.reshape(-1, self.obs_mean.shape[0])
        batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        delta = batch_mean - self.obs_mean
        total = self.obs_count + batch_count
        new_mean = self.obs_mean + delta * batch_count / total
        m2 = self.obs_var * self.obs_count + batch_var * batch_count + delta**2 * self.obs_count * batch_count / total
        self.obs_mean.copy_(new_mean)
        self.obs_var.copy_(m2 / total)
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
        latent = functional_call(self.mlp_extractor.policy_net, _sub_params(params, "mlp_extractor.policy_net."), (features,))
        mean = functional_call(self.action_net, _sub_params(params, "action_net."), (latent,))
        return mean, params["log_std"].expand_as(mean)

    def numpy_actor(self, params: ActorParams, deterministic: bool = False) -> Callable[[np.ndarray], np.ndarray]:
        """The policy as a numpy function ``obs -> actions`` for acting, with a parameter set per observation.

        Every tensor of ``params`` has a leading axis of size n (e.g. the stacked parameters of several tasks indexed
        by each env's task) or 1 (one parameter set for all); ``obs`` is ``(n, obs_dim)``. Parameters and
        normalisation statistics are copied now: the function is for a rollout during which they do not change.
        Each linear layer is one batched ``matmul``; numpy's per-call overhead is a fraction of torch's, and acting
        runs at every env step. The Gaussian noise comes from a numpy generator seeded from torch's global one, so
        sampling is as reproducible under ``set_random_seed`` as torch sampling.
        """
        with th.no_grad():
            arrays = {name: value.detach().cpu().numpy() for name, value in params.items()}
            obs_mean = self.obs_mean.cpu().numpy()
            obs_std = th.sqrt(self.obs_var + 1e-8).cpu().numpy()
        dtype = arrays["log_std"].dtype
        prefix = "mlp_extractor.policy_net."
        layers: list[Any] = []  # (bias (n, 1, out), weightᵀ (n, in, out)) or an element-wise function
        for index, module in [*enumerate(self.mlp_extractor.policy_net), (None, self.action_net)]:
            name = "action_net." if index is None else f"{prefix}{index}."
            if isinstance(module, nn.Linear):
                weight_t = np.ascontiguousarray(arrays[name + "weight"].transpose(0, 2, 1))
                layers.append((arrays[name + "bias"][:, None, :], weight_t))
            elif type(module) in _NUMPY_ACTIVATIONS:
                layers.append(_NUMPY_ACTIVATIONS[type(module)])
            else:  # parameter-free and element-wise (checked at construction)
                layers.append(lambda x, module=module: _torch_on_numpy(module, x))
        std = np.exp(arrays["log_std"])
        rng = np.random.default_rng(int(th.randint(2**62, ())))

        def actor(obs: np.ndarray) -> np.ndarray:
            x = obs.astype(dtype, copy=False)
            if self.normalize_observations:
                x = np.clip((x - obs_mean) / obs_std, -self.clip_observations, self.clip_observations)
            x = x[:, None, :]
            for layer in layers:
                if isinstance(layer, tuple):
                    x = np.matmul(x, layer[1])
                    x += layer[0]
                else:
                    x = layer(x)
            mean = x[:, 0, :]
            return mean if deterministic else mean + rng.standard_normal(mean.shape, dtype=dtype) * std

        return actor

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

        def fisher_vector_product(vector: th.Tensor) -> th.Tensor:
            with th.set_grad_enabled(create_graph):
                parts = vector.split(sizes)
                tangent = {name: part.view_as(value) for (name, value), part in zip(params.items(), parts, strict=True)}
                d_out = None  # forward mode: J v, layer by layer
                for name, layer_input, weight, slope in zip(layers, inputs, weights, slopes, strict=True):
                    d_out = nn.functional.linear(layer_input, tangent[name + "weight"], tangent[name + "bias"]) + (
                        0 if d_out is None else d_out @ weight.T
                    )
                    d_out = d_out if slope is None else d_out * slope
                assert d_out is not None
                upstream = d_out * inverse_variance  # reverse mode: Jᵀ diag(σ⁻²) J v / n
                product = {"log_std": 2 * tangent["log_std"]}
                for index in reversed(range(len(layers))):
                    product[layers[index] + "weight"] = upstream.T @ inputs[index]
                    product[layers[index] + "bias"] = upstream.sum(0)
                    if index > 0:
                        upstream = upstream @ weights[index]
                        slope = slopes[index - 1]
                        upstream = upstream if slope is None else upstream * slope
                return th.cat([product[name].reshape(-1) for name in params]) + damping * vector

        return fisher_vector_product

    def set_actor_override(self, params: ActorParams | None) -> None:
        """Act with ``params`` (e.g. adapted parameters) in ``predict``; None restores the module's own."""
        self._actor_override = None if params is None else {k: v.detach() for k, v in params.items()}

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        mean, log_std = self.actor_mean_log_std(observation, self._actor_override)  # type: ignore[arg-type]
        if deterministic:
            return mean
        return mean + th.randn_like(mean) * log_std.exp()

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

        ``cost_targets`` has one column per cost signal, shape (n, n_costs) (or (n,) for one); ``time_fractions``
        is each sample's time within its episode (step / episode length), the cost critic's extra input."""
        cost_targets = cost_targets.reshape(len(observations), self.n_costs)
        if not (th.isfinite(reward_targets).all() and th.isfinite(cost_targets).all()):
            raise ValueError("non-finite critic targets: the critics were left unchanged")
        self.set_training_mode(True)
        losses = []
        for _ in range(n_epochs):
            for indices in th.randperm(len(observations), device=observations.device).split(batch_size):
                obs = observations[indices]
                loss = nn.functional.mse_loss(self.predict_values(obs).flatten(), reward_targets[indices])
                loss = loss + nn.functional.mse_loss(self.predict_costs(obs, time_fractions[indices]), cost_targets[indices])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
        self.set_training_mode(False)
        return float(np.mean(losses))

    def predict_costs(self, obs: th.Tensor, time_fractions: th.Tensor) -> th.Tensor:
        """Cost-value estimates (expected cost to the end of the episode), shape (n, n_costs); ``time_fractions``:
        each observation's time within its episode, step / episode length, shape (n,)."""
        features = self.extract_features(obs, self.vf_features_extractor)
        time = time_fractions.reshape(-1, 1).to(features.dtype)
        return self.cost_value_net(self.cost_mlp(th.cat([features, time], dim=-1)))

    @th.no_grad()
    def critic_values(self, observations: np.ndarray, time_fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward and cost value estimates of raw observations ``(n, obs_dim)`` at times ``time_fractions`` (n,)
        within their episodes: shapes (n,) and (n, n_costs)."""
        obs = th.as_tensor(observations, device=self.device)
        time = th.as_tensor(time_fractions, device=self.device)
        return self.predict_values(obs).cpu().numpy().reshape(-1), self.predict_costs(obs, time).cpu().numpy()


MlpPolicy = CPOPolicy
