"""The critics' regression gradient written out (``sb3_metacpo.common.critic_gradients``) against autograd, bit for
bit, and against central differences of the loss's definition; whole critic fits with and without it."""

from __future__ import annotations

import itertools

import pytest
import torch as th
from torch import nn

from sb3_metacpo import CPO
from sb3_metacpo.common import critic_gradients
from sb3_metacpo.common.critic_gradients import mlp_layers, mse_gradients
from sb3_metacpo.tasks import make_task_distribution


def bits(t: th.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()


def mlp(sizes: list[int], activation: type[nn.Module], dtype: th.dtype, seed: int) -> nn.Sequential:
    th.manual_seed(seed)
    modules: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        modules.append(nn.Linear(n_in, n_out))
        if index < len(sizes) - 2:
            modules.append(activation())
    return nn.Sequential(*modules).to(dtype)


def autograd_loss_and_grads(terms: list[tuple[nn.Sequential, th.Tensor, th.Tensor]]) -> tuple[th.Tensor, list[th.Tensor]]:
    """The reference: the loss as CPOPolicy.fit_critics wrote it before, through autograd."""
    loss = None
    for net, inputs, targets in terms:
        output = net(inputs)
        term = nn.functional.mse_loss(output.flatten() if targets.dim() == 1 else output, targets)
        loss = term if loss is None else loss + term
    assert loss is not None
    params = [p for net, _, _ in terms for p in net.parameters()]
    for p in params:
        p.grad = None
    loss.backward()
    return loss.detach(), [p.grad for p in params]  # type: ignore[misc]


CASES = [
    # (reward MLP sizes, cost MLP sizes, activation, dtype, costs): SB3's default, ReLU, no hidden layer, float64,
    # two cost signals
    ([6, 64, 64, 1], [7, 64, 64, 1], nn.Tanh, th.float32, 1),
    ([6, 32, 1], [7, 32, 1], nn.ReLU, th.float32, 1),
    ([6, 1], [7, 1], nn.Tanh, th.float32, 1),
    ([6, 16, 8, 1], [7, 16, 8, 2], nn.Tanh, th.float64, 2),
    ([6, 64, 64, 1], [7, 64, 64, 3], nn.ReLU, th.float64, 3),
]


@pytest.mark.parametrize(("reward_sizes", "cost_sizes", "activation", "dtype", "n_costs"), CASES)
def test_written_out_gradients_equal_autograds_bit_for_bit(reward_sizes, cost_sizes, activation, dtype, n_costs):
    reward_net = mlp(reward_sizes, activation, dtype, 0)
    cost_net = mlp(cost_sizes, activation, dtype, 1)
    reward_layers, cost_layers = mlp_layers([reward_net]), mlp_layers([cost_net])
    assert reward_layers is not None and cost_layers is not None
    gen = th.Generator().manual_seed(2)
    for batch in (64, 37, 1):
        x = th.randn(batch, 6, generator=gen, dtype=dtype) * 2
        x_cost = th.cat([x, th.rand(batch, 1, generator=gen, dtype=dtype)], dim=1)
        reward_targets = th.randn(batch, generator=gen, dtype=dtype)
        cost_targets = th.rand(batch, n_costs, generator=gen, dtype=dtype) * 5
        terms = [(reward_net, x, reward_targets), (cost_net, x_cost, cost_targets)]
        loss, reference = autograd_loss_and_grads(terms)
        ours_loss, grads = mse_gradients([(reward_layers, x, reward_targets), (cost_layers, x_cost, cost_targets)])
        assert bits(ours_loss) == bits(loss)
        params = [*reward_net.parameters(), *cost_net.parameters()]
        assert set(grads) == set(params)
        for p, expected in zip(params, reference, strict=True):
            assert grads[p].shape == p.shape and grads[p].dtype == p.dtype
            assert bits(grads[p]) == bits(expected)


def test_written_out_gradient_matches_central_differences_of_the_loss():
    """An oracle independent of autograd: central differences of sum of mean squared errors, float64."""
    net = mlp([3, 5, 4, 2], nn.Tanh, th.float64, 3)
    layers = mlp_layers([net])
    assert layers is not None
    gen = th.Generator().manual_seed(4)
    x, targets = th.randn(9, 3, generator=gen, dtype=th.float64), th.randn(9, 2, generator=gen, dtype=th.float64)

    def loss_at() -> float:
        with th.no_grad():
            return float(((net(x) - targets) ** 2).mean())

    _, grads = mse_gradients([(layers, x, targets)])
    eps = 1e-6
    for p in net.parameters():
        numeric = th.zeros_like(p)
        for index in range(p.numel()):
            flat = p.data.view(-1)
            original = flat[index].item()
            flat[index] = original + eps
            up = loss_at()
            flat[index] = original - eps
            down = loss_at()
            flat[index] = original
            numeric.view(-1)[index] = (up - down) / (2 * eps)
        assert th.allclose(grads[p], numeric, rtol=1e-6, atol=1e-9)


class Doubling(nn.Module):
    def forward(self, x: th.Tensor) -> th.Tensor:
        return 2 * x


class LinearSubclass(nn.Linear):
    pass


def test_critics_it_cannot_run_go_through_autograd():
    assert mlp_layers([nn.Sequential(nn.Linear(3, 4), nn.ELU(), nn.Linear(4, 1))]) is None  # another activation
    assert mlp_layers([nn.Sequential(nn.Linear(3, 4), Doubling(), nn.Linear(4, 1))]) is None  # another module
    assert mlp_layers([LinearSubclass(3, 1)]) is None  # a subclass may compute something else
    assert mlp_layers([nn.Linear(3, 1, bias=False)]) is None
    assert mlp_layers([nn.Sequential(nn.Tanh(), nn.Linear(3, 1))]) is None  # not a linear layer first
    frozen = nn.Linear(3, 1)
    frozen.bias.requires_grad_(False)
    assert mlp_layers([frozen]) is None
    hooked = nn.Linear(3, 1)
    handle = hooked.register_forward_hook(lambda module, args, output: output * 2)
    assert mlp_layers([hooked]) is None
    handle.remove()
    assert mlp_layers([hooked]) is not None
    container = nn.Sequential(nn.Linear(3, 1))
    handle = container.register_forward_pre_hook(lambda module, args: None)
    assert mlp_layers([container]) is None
    handle.remove()
    tensor_hooked = nn.Linear(3, 1)
    tensor_hooked.weight.register_hook(lambda grad: grad * 0)
    assert mlp_layers([tensor_hooked]) is None
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert mlp_layers([nn.Linear(3, 1)]) is None  # a global hook
    finally:
        handle.remove()
    assert mlp_layers([nn.Linear(3, 1)]) is not None


class CountedPath:
    """Counts the calls of the written-out gradient while in use."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = critic_gradients.mse_gradients

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(critic_gradients, "mse_gradients", counted)


def fit(fast: bool, policy_kwargs: dict, n_costs: int = 1, target_dtype: th.dtype = th.float32) -> tuple:
    critic_gradients.FAST_CRITIC_GRADIENTS = fast
    try:
        cost_limit = 5.0 if n_costs == 1 else {"cost": 5.0, "cost_hazards": 5.0}
        model = CPO(
            "MlpPolicy",
            make_task_distribution("Toy2DNav", seed=0),
            n_steps=128,
            seed=0,
            cost_limit=cost_limit,
            policy_kwargs=policy_kwargs,
        )
        policy = model.policy
        gen = th.Generator().manual_seed(5)
        n = 300
        obs = th.randn(n, policy.observation_space.shape[0], generator=gen) * 2
        losses = [
            policy.fit_critics(
                obs,
                th.randn(n, generator=gen).to(target_dtype),
                th.rand(n, n_costs, generator=gen).to(target_dtype) * 3,
                2,
                64,
                th.rand(n, generator=gen),
            )
            for _ in range(2)
        ]
        state = {k: bits(v) for k, v in policy.state_dict().items()}
        optimizer = [{k: bits(v) for k, v in s.items()} for _, s in sorted(policy.optimizer.state_dict()["state"].items())]
        return losses, state, optimizer
    finally:
        critic_gradients.FAST_CRITIC_GRADIENTS = True


@pytest.mark.parametrize(
    ("policy_kwargs", "n_costs"),
    [
        ({}, 1),
        ({"activation_fn": nn.ReLU, "net_arch": {"pi": [16], "vf": [32, 16]}}, 1),
        ({"net_arch": {"pi": [16], "vf": []}}, 1),
        ({}, 2),
    ],
)
def test_policy_fits_its_critics_as_with_autograd(policy_kwargs, n_costs, monkeypatch):
    """Whole fits (two calls of two epochs, FlatAdam's state carried between them): the losses, every parameter and
    buffer, and the optimiser's state are autograd's bit for bit."""
    path = CountedPath(monkeypatch)
    fast = fit(True, policy_kwargs, n_costs)
    assert path.calls == 2 * 2 * 5  # two fits of two epochs of five minibatches (300 samples, 64 per minibatch)
    reference = fit(False, policy_kwargs, n_costs)
    assert path.calls == 20  # FAST_CRITIC_GRADIENTS = False: autograd only
    assert fast == reference


def test_policy_with_other_critics_fits_through_autograd(monkeypatch):
    model = CPO(
        "MlpPolicy",
        make_task_distribution("Toy2DNav", seed=0),
        n_steps=128,
        seed=0,
        policy_kwargs={"activation_fn": nn.ELU},
    )
    assert model.policy._critic_layers() is None
    path = CountedPath(monkeypatch)
    fit(True, {"activation_fn": nn.ELU})
    # float64 targets for float32 critics: autograd's path, where the loss is promoted to float64
    fit(True, {}, target_dtype=th.float64)
    assert path.calls == 0
    default = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=128, seed=0)
    assert default.policy._critic_layers() is not None
    # a layer shared by the two critics: autograd sums its two gradients
    default.policy.cost_mlp[2] = default.policy.mlp_extractor.value_net[2]
    assert default.policy._critic_layers() is None


def test_a_module_used_twice_goes_through_autograd():
    layer = nn.Linear(4, 4)
    assert mlp_layers([nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(4, 1))]) is None
    first, second = mlp_layers([nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1))]), mlp_layers([layer])
    assert first is not None and second is not None
    x, targets = th.randn(5, 4), th.randn(5)
    with pytest.raises(ValueError, match="share a parameter"):
        mse_gradients([(first, x, targets), (second, x, th.randn(5, 4))])
    with pytest.raises(ValueError, match="at least one"):
        mse_gradients([])


def test_fits_where_autograd_would_behave_otherwise_go_through_it(monkeypatch):
    model = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=128, seed=0)
    policy = model.policy
    n = 100
    gen = th.Generator().manual_seed(6)
    obs = th.randn(n, policy.observation_space.shape[0], generator=gen)
    args = (obs, th.randn(n, generator=gen), th.rand(n, generator=gen), 1, 64, th.rand(n, generator=gen))
    path = CountedPath(monkeypatch)
    with th.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        policy.fit_critics(*args)  # as loss.backward() without gradients
    with th.autograd.detect_anomaly():
        policy.fit_critics(*args)
    with th.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        policy.fit_critics(*args)
    with th.autocast("cpu", dtype=th.bfloat16):  # bfloat16 gradients would not fit the float32 parameters
        policy.fit_critics(*args)
    assert path.calls == 0
    policy.fit_critics(*args)
    assert path.calls == 2


def test_reward_targets_of_shape_n_by_1_fit_as_flat_ones_on_both_paths():
    """(n, 1) reward targets once broadcast against the (n,) values to an (n, n) loss in autograd's path: both paths
    must fit them exactly as the same targets flat."""
    n = 100

    def fit_with(shape: tuple[int, ...], fast: bool) -> dict:
        critic_gradients.FAST_CRITIC_GRADIENTS = fast
        try:
            policy = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=128, seed=0).policy
            gen = th.Generator().manual_seed(7)
            obs = th.randn(n, policy.observation_space.shape[0], generator=gen)
            targets = th.randn(n, generator=gen).reshape(shape)
            th.manual_seed(3)
            policy.fit_critics(obs, targets, th.rand(n, generator=gen), 2, 32, th.rand(n, generator=gen))
            return {k: bits(v) for k, v in policy.state_dict().items()}
        finally:
            critic_gradients.FAST_CRITIC_GRADIENTS = True

    flat = fit_with((n,), True)
    assert fit_with((n, 1), True) == flat
    assert fit_with((n, 1), False) == flat
