"""The meta-gradient through CPO inner updates against central finite differences (float64, batches held fixed),
with one and with two cost constraints."""

from functools import partial

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_metacpo.common.conjugate_gradient import flat_grad
from sb3_metacpo.common.constrained_step import StepConfig
from sb3_metacpo.common.cpo_update import (
    CPOConfig,
    PreparedBatch,
    cpo_update,
    fisher_product,
    gaussian_log_prob,
    replay_updates,
    surrogates,
)
from sb3_metacpo.common.policies import CPOPolicy

OBS_DIM, ACT_DIM, N = 3, 2, 64


def make_policy(net_arch=(8,)):
    th.manual_seed(0)
    policy = CPOPolicy(
        spaces.Box(-1, 1, (OBS_DIM,), np.float32),
        spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        lambda _: 1e-3,
        net_arch=list(net_arch),
        log_std_init=-0.3,
        normalize_observations=False,
    ).double()
    # a non-trivial mean head (SB3 initialises it near zero)
    with th.no_grad():
        policy.action_net.weight.normal_(0, 0.5)
    return policy


def make_batch(policy, params, seed, constraint):
    """A batch at ``params``; ``constraint``: one constraint value, or a tuple of them (one cost signal each)."""
    constraint = np.atleast_1d(np.asarray(constraint, dtype=np.float64))
    m = len(constraint)
    generator = th.Generator().manual_seed(seed)
    obs = th.randn(N, OBS_DIM, generator=generator, dtype=th.float64)
    with th.no_grad():
        mean, log_std = policy.actor_mean_log_std(obs, params)
        actions = mean + log_std.exp() * th.randn(N, ACT_DIM, generator=generator, dtype=th.float64)
        log_prob = gaussian_log_prob(mean, log_std, actions)
    reward_adv = th.randn(N, generator=generator, dtype=th.float64)
    cost_adv = th.randn(N, m, generator=generator, dtype=th.float64)
    return PreparedBatch(
        observations=obs,
        actions=actions,
        log_prob_behaviour=log_prob,
        reward_advantages=reward_adv - reward_adv.mean(),
        cost_advantages=0.3 * (cost_adv - cost_adv.mean(0)),
        constraint=constraint,
        episode_costs=np.zeros(m),
        episode_reward=0.0,
        n_episodes=0,
        reward_returns=np.zeros(N),
        cost_returns=np.zeros((N, m)),
    )


def build_problem(constraint, n_inner, dual_solver="analytic", constrained=True, target_kl=0.02):
    """Inner batches collected on the fly (as in training), then a validation batch at the adapted parameters."""
    policy = make_policy()
    config = CPOConfig(StepConfig(target_kl=target_kl, cg_max_steps=8, dual_solver=dual_solver), constrained=constrained)
    theta = {k: v.detach().clone() for k, v in policy.actor_params().items()}
    params, batches, fractions, cases = theta, [], [], []
    for k in range(n_inner):
        batch = make_batch(policy, params, seed=k, constraint=constraint)
        params, info = cpo_update(policy.actor_mean_log_std, params, batch, config)
        batches.append(batch)
        fractions.append(info.fraction)
        cases.append(info.case)
    validation = make_batch(policy, params, seed=100, constraint=constraint)
    return policy, config, theta, batches, fractions, validation, cases


def meta_objective(policy, config, theta, batches, fractions, validation, create_graph, which=0, fisher=None):
    """The reward surrogate (``which=0``) or cost surrogate j (``which=j+1``) of the replayed adaptation."""
    stages = replay_updates(
        policy.actor_mean_log_std, theta, batches, config, fractions, differentiable=create_graph, fisher=fisher
    )
    reward, costs = surrogates(policy.actor_mean_log_std, stages[-1], validation)
    return reward if which == 0 else costs[which - 1]


def finite_difference(function, theta, eps=1e-5):
    names = list(theta)
    grads = []
    for name in names:
        flat = theta[name].reshape(-1)
        for i in range(flat.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = {k: v.clone() for k, v in theta.items()}
                shifted[name].view(-1)[i] += sign * eps
                values.append(float(function(shifted)))
            grads.append((values[0] - values[1]) / (2 * eps))
    return th.tensor(grads, dtype=th.float64)


@pytest.mark.parametrize(
    ("constraint", "n_inner", "solver", "expected_case", "closed_form_fisher"),
    [
        (-1.0, 1, "analytic", "trpo", False),  # the whole trust region is feasible
        (0.02, 1, "analytic", "dual", False),  # the constraint binds
        (0.02, 1, "cvxpylayers", "dual", False),  # the same through the differentiable convex program
        (5.0, 1, "analytic", "recovery", False),  # infeasible
        (0.02, 2, "analytic", "dual", False),  # two inner updates
        (0.02, 2, "analytic", "dual", True),  # Fisher products in closed form (CPOPolicy.fisher_product), as trained
        ((0.01, 0.005), 1, "cvxpylayers", "dual", False),  # two constraints, both violated now
        ((0.01, 0.005), 1, "analytic", "dual", False),  # the same through the exact active-set solver
        ((0.01, -0.01), 2, "cvxpylayers", "dual", True),  # one violated, one satisfied; two inner updates
        ((0.01, -0.01), 2, "analytic", "dual", True),
    ],
)
def test_second_order_meta_gradient_matches_finite_differences(constraint, n_inner, solver, expected_case, closed_form_fisher):
    policy, config, theta, batches, fractions, validation, cases = build_problem(constraint, n_inner, solver)
    assert cases[0] == expected_case and all(f > 0 for f in fractions)
    fisher = policy.fisher_product if closed_form_fisher else None
    m = len(np.atleast_1d(constraint))
    for which in range(m + 1):  # meta-objective (reward) and meta-constraint (each cost) gradients
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        value = meta_objective(policy, config, leaves, batches, fractions, validation, True, which, fisher)
        analytic = flat_grad(value, list(leaves.values()))

        def objective(p, which=which):
            return meta_objective(policy, config, p, batches, fractions, validation, False, which, fisher).detach()

        numeric = finite_difference(objective, theta)
        error = float((analytic - numeric).norm() / numeric.norm())
        assert error <= 1e-4, f"relative error {error:.2e}"


def test_first_order_meta_gradient_is_the_post_adaptation_gradient():
    policy, config, theta, batches, fractions, validation, _ = build_problem(0.02, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    adapted = replay_updates(policy.actor_mean_log_std, leaves, batches, config, fractions, differentiable=False)[-1]
    meta_grad = flat_grad(surrogates(policy.actor_mean_log_std, adapted, validation)[0], list(leaves.values()))
    post = {k: v.detach().clone().requires_grad_(True) for k, v in adapted.items()}
    post_grad = flat_grad(surrogates(policy.actor_mean_log_std, post, validation)[0], list(post.values()))
    th.testing.assert_close(meta_grad, post_grad, rtol=0, atol=0)
    # the exact second-order gradient differs: the inner Jacobian is not the identity
    exact_leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    exact = flat_grad(
        meta_objective(policy, config, exact_leaves, batches, fractions, validation, True), list(exact_leaves.values())
    )
    assert float((exact - meta_grad).norm() / exact.norm()) > 1e-2


def normalising_policy(net_arch, activation_fn, dtype, **kwargs):
    """A policy with observation normalisation fitted to off-centre observations, in ``dtype``."""
    policy = CPOPolicy(
        spaces.Box(-1, 1, (OBS_DIM,), np.float32),
        spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        lambda _: 1e-3,
        net_arch=net_arch,
        activation_fn=activation_fn,
        log_std_init=-0.3,
        **kwargs,
    ).to(dtype)
    policy.update_obs_stats(np.random.default_rng(0).normal(0.5, 2.0, (50, OBS_DIM)))
    return policy


@pytest.mark.parametrize("net_arch", [[8], [8, 6], []])
@pytest.mark.parametrize("activation_fn", [th.nn.Tanh, th.nn.ReLU])
def test_closed_form_fisher_product_equals_the_double_backward_of_the_kl(net_arch, activation_fn):
    """Products and their derivatives w.r.t. the parameters (second order), with observation normalisation."""
    th.manual_seed(1)
    policy = normalising_policy(net_arch, activation_fn, th.float64, clip_observations=1.0)
    obs = 3 * th.randn(N, OBS_DIM, dtype=th.float64)  # many normalised values clipped
    vector = th.randn(sum(p.numel() for p in policy.actor_params().values()), dtype=th.float64)
    products = []
    for fisher in (partial(fisher_product, policy.actor_mean_log_std), policy.fisher_product):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in policy.actor_params().items()}
        product = fisher(params, obs, 0.1, True)(vector)
        grads = th.autograd.grad(product.square().sum(), list(params.values()), allow_unused=True)
        grads = [th.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        products.append((product, th.cat([g.reshape(-1) for g in grads])))
    th.testing.assert_close(products[1][0], products[0][0], rtol=1e-12, atol=1e-12)
    th.testing.assert_close(products[1][1], products[0][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("net_arch", [[8], [8, 6], []])
@pytest.mark.parametrize("activation_fn", [th.nn.Tanh, th.nn.ReLU])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_fisher_products_without_a_graph_are_those_with_one_bit_for_bit(net_arch, activation_fn, dtype):
    """Without a graph the products write their (n, width) arrays into buffers kept between calls: the same
    operations on the same operands, so the same bits as the graph-keeping products, call after call."""
    th.manual_seed(2)
    policy = normalising_policy(net_arch, activation_fn, dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in policy.actor_params().items()}
    obs = 3 * th.randn(N, OBS_DIM, dtype=dtype)
    buffered = policy.fisher_product(params, obs, 0.1)
    with_graph = policy.fisher_product(params, obs, 0.1, create_graph=True)
    for _ in range(3):  # the buffers are reused
        vector = th.randn(sum(p.numel() for p in params.values()), dtype=dtype)
        product = buffered(vector)
        assert not product.requires_grad
        assert product.numpy().tobytes() == with_graph(vector).detach().numpy().tobytes()


@pytest.mark.parametrize("net_arch", [[64, 64], [30], [30, 7]])
@pytest.mark.parametrize("act_dim", [1, 2, 6])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_fisher_products_written_in_place_are_the_concatenated_ones_bit_for_bit(net_arch, act_dim, dtype):
    """Without a graph each block of a product is written into its place in one flat vector; MKL rounds some
    products otherwise into a result that does not start on a 64-byte boundary (two rows into an 8-byte offset, on
    the development machine), so the blocks that cannot start on one are computed apart. At the sizes of the
    navigation tasks (hundreds of samples, few actions) and widths that leave some blocks off the boundary (30, 7),
    the products must be the graph-keeping path's, which concatenates fresh tensors."""
    th.manual_seed(3)
    policy = CPOPolicy(
        spaces.Box(-1, 1, (7,), np.float32), spaces.Box(-1, 1, (act_dim,), np.float32), lambda _: 1e-3, net_arch=net_arch
    ).to(dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in policy.actor_params().items()}
    obs = th.randn(500, 7, dtype=dtype)
    buffered = policy.fisher_product(params, obs, 0.1)
    with_graph = policy.fisher_product(params, obs, 0.1, create_graph=True)
    for _ in range(2):
        vector = th.randn(sum(p.numel() for p in params.values()), dtype=dtype)
        assert buffered(vector).numpy().tobytes() == with_graph(vector).detach().numpy().tobytes()


def _functional_call_mean(policy, obs, params):
    """The actor's mean as ``torch.func.functional_call`` computes it, the modules' own calls at ``params``."""
    features = policy.normalize_obs(obs.to(policy.obs_mean.dtype))
    sub = {k[len("mlp_extractor.policy_net.") :]: v for k, v in params.items() if k.startswith("mlp_extractor.policy_net.")}
    latent = th.func.functional_call(policy.mlp_extractor.policy_net, sub, (features,))
    head = {k[len("action_net.") :]: v for k, v in params.items() if k.startswith("action_net.")}
    return th.func.functional_call(policy.action_net, head, (latent,))


@pytest.mark.parametrize("net_arch", [[8], [8, 6], []])
@pytest.mark.parametrize("activation_fn", [th.nn.Tanh, th.nn.ReLU, th.nn.ELU])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_the_actor_written_out_is_functional_call_bit_for_bit(net_arch, activation_fn, dtype):
    """``actor_mean_log_std`` runs the layers itself instead of ``functional_call``: the same values, first and
    second derivatives (the meta-gradient differentiates through the inner updates' gradients), bit for bit."""
    th.manual_seed(4)
    policy = normalising_policy(net_arch, activation_fn, dtype)
    obs = 3 * th.randn(N, OBS_DIM, dtype=dtype)
    results = []
    for mean_of in (lambda p: policy.actor_mean_log_std(obs, p)[0], lambda p: _functional_call_mean(policy, obs, p)):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in policy.actor_params().items()}
        mean = mean_of(params)
        grads = th.autograd.grad(mean.tanh().sum(), list(params.values()), create_graph=True, allow_unused=True)
        first = th.cat([g.reshape(-1) for g in grads if g is not None])
        second = th.autograd.grad(first.square().sum(), list(params.values()), allow_unused=True)
        results.append([mean, first, *(g for g in second if g is not None)])
    for ours, reference in zip(*results, strict=True):
        assert ours.detach().numpy().tobytes() == reference.detach().numpy().tobytes()


@pytest.mark.parametrize("where", ["policy_net", "layer", "action_net", "global"])
def test_the_actor_runs_the_modules_own_calls_when_they_do_more_than_forward(where):
    """A forward hook (here one that doubles a module's output) runs as ``functional_call`` runs it: the written-out
    layers step aside."""

    def double(module, inputs, output):
        return 2 * output

    policy = normalising_policy([8], th.nn.Tanh, th.float64)
    obs = th.randn(N, OBS_DIM, dtype=th.float64)
    params = policy.actor_params()
    plain = policy.actor_mean_log_std(obs, params)[0]
    if where == "global":
        handle = th.nn.modules.module.register_module_forward_hook(double)
    else:
        module = {"policy_net": policy.mlp_extractor.policy_net, "layer": policy.mlp_extractor.policy_net[0]}.get(
            where, policy.action_net
        )
        handle = module.register_forward_hook(double)
    try:
        hooked = policy.actor_mean_log_std(obs, params)[0]
        assert th.equal(hooked, _functional_call_mean(policy, obs, params)) and not th.allclose(hooked, plain)
    finally:
        handle.remove()
    assert th.equal(policy.actor_mean_log_std(obs, params)[0], plain)


class _DoublingLinear(th.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _DoublingSequential(th.nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def _swap_first_layer(policy):
    old = policy.mlp_extractor.policy_net[0]
    new = _DoublingLinear(old.in_features, old.out_features).to(old.weight.dtype)
    new.load_state_dict(old.state_dict())
    policy.mlp_extractor.policy_net[0] = new


def _parametrise_first_layer(policy):
    class Double(th.nn.Module):
        def forward(self, weight):
            return 2 * weight

    th.nn.utils.parametrize.register_parametrization(policy.mlp_extractor.policy_net[0], "weight", Double())


def _sequential_head(policy):
    head = th.nn.Sequential(th.nn.Linear(policy.action_net.in_features, ACT_DIM)).to(policy.action_net.weight.dtype)
    policy.action_net = head


def _doubling_policy_net(policy):
    policy.mlp_extractor.policy_net = _DoublingSequential(*policy.mlp_extractor.policy_net)


#: module changes after construction under which the actor's own calls differ from its layers written out
STRUCTURAL = {
    "a subclass of nn.Linear": _swap_first_layer,
    "a parametrised weight": _parametrise_first_layer,
    "a Sequential as action_net": _sequential_head,
    "a subclass of nn.Sequential": _doubling_policy_net,
}


@pytest.mark.parametrize("change", sorted(STRUCTURAL))
def test_the_actor_runs_the_modules_own_calls_when_they_are_not_plain_layers(change):
    """After such a change (made after construction, which the constructor cannot see), the mean is what
    ``functional_call`` gives at the parameters passed in, not the written-out layers' (nor the modules' own
    parameters')."""
    policy = normalising_policy([8], th.nn.Tanh, th.float64)
    STRUCTURAL[change](policy)
    obs = th.randn(N, OBS_DIM, dtype=th.float64)
    params = {k: v.detach() + 0.5 for k, v in policy.actor_params().items()}
    features = policy.normalize_obs(obs)
    assert policy._written_out_mean(features, params) is None
    assert th.equal(policy.actor_mean_log_std(obs, params)[0], _functional_call_mean(policy, obs, params))


def test_the_actor_writes_out_plain_layers_only_for_exactly_its_parameters():
    """The written-out layers run for the actor's own parameter names; with one missing (``functional_call`` takes
    the module's) or one unknown (``functional_call`` raises) the modules' own calls run."""
    policy = normalising_policy([8], th.nn.Tanh, th.float64)
    obs = th.randn(N, OBS_DIM, dtype=th.float64)
    features = policy.normalize_obs(obs)
    params = {k: v.detach() + 0.5 for k, v in policy.actor_params().items()}
    assert policy._written_out_mean(features, params) is not None
    missing = {k: v for k, v in params.items() if k != "action_net.bias"}
    assert policy._written_out_mean(features, missing) is None
    assert th.equal(policy.actor_mean_log_std(obs, missing)[0], _functional_call_mean(policy, obs, missing))
    unknown = {**params, "mlp_extractor.policy_net.9.weight": params["action_net.weight"]}
    assert policy._written_out_mean(features, unknown) is None
    with pytest.raises(AttributeError):
        _functional_call_mean(policy, obs, unknown)
    with pytest.raises(AttributeError):
        policy.actor_mean_log_std(obs, unknown)


def test_fvp_sample_freq_uses_every_kth_sample_for_the_fisher():
    policy = make_policy()
    theta = {k: v.detach().clone() for k, v in policy.actor_params().items()}
    batch = make_batch(policy, theta, seed=0, constraint=0.02)
    # Every observation twice in a row: obs[::2] has exactly the Fisher matrix of the whole batch.
    doubled = make_batch(policy, theta, seed=0, constraint=0.02)
    doubled.observations = batch.observations.repeat_interleave(2, dim=0)[:N]
    steps = {}
    for name, data in (("random", batch), ("doubled", doubled)):
        for freq in (1, 2):
            config = CPOConfig(StepConfig(target_kl=0.02, cg_max_steps=8), fvp_sample_freq=freq)
            params, _ = cpo_update(policy.actor_mean_log_std, theta, data, config, fisher=policy.fisher_product)
            steps[name, freq] = th.cat([(params[k] - theta[k]).reshape(-1) for k in theta])
    th.testing.assert_close(steps["doubled", 2], steps["doubled", 1], rtol=1e-9, atol=1e-12)
    assert float((steps["random", 2] - steps["random", 1]).norm() / steps["random", 1].norm()) > 1e-3


def test_meta_gradient_matches_finite_differences_of_the_definition():
    """The second-order meta-gradient against central differences of F(θ) computed *from its definition*, with none
    of the library's CPO code: g, a by autograd, the Fisher matrix as the explicit Hessian of the KL, the step by
    cvxpy on the primal problem, and the constraint value b(θ) = b(data) + L_C(θ) − L_C(θ_data). Holding b constant
    in the library (as the code once did) moves its meta-gradient off this reference by far more than the tolerance:
    the check would catch a dropped d(step)/db · db/dθ path."""
    import cvxpy as cp

    from sb3_metacpo.common import cpo_update as cpo_update_module
    from sb3_metacpo.common.cpo_update import gaussian_kl

    policy = make_policy(net_arch=(4,))
    actor = policy.actor_mean_log_std
    target_kl, damping, constraint = 0.02, 0.1, 0.02
    config = CPOConfig(StepConfig(target_kl=target_kl, cg_max_steps=200), cg_damping=damping)
    theta = {k: v.detach().clone() for k, v in policy.actor_params().items()}
    names, shapes = list(theta), [v.shape for v in theta.values()]
    batch = make_batch(policy, theta, seed=0, constraint=constraint)
    _, result = cpo_update(actor, theta, batch, config)
    assert result.case == "dual" and result.nu[0] > 1e-3 and result.fraction > 0  # the constraint binds
    validation = make_batch(policy, theta, seed=100, constraint=constraint)

    def unflatten(flat):
        out, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def definition(flat):
        """F(θ) = L_R(θ + α·x*(θ); validation), x* from cvxpy on the primal with b(θ) as defined."""
        flat = flat.detach().clone().requires_grad_(True)
        params = unflatten(flat)
        reward, costs = surrogates(actor, params, batch)
        g = th.autograd.grad(reward, flat, retain_graph=True)[0]
        a = th.autograd.grad(costs[0], flat)[0]
        b = float(batch.constraint[0] + costs[0].detach() - batch.cost_advantages[:, 0].mean())
        fixed = tuple(value.detach() for value in actor(batch.observations[:: config.fvp_sample_freq], params))

        def kl(z):
            return gaussian_kl(*fixed, *actor(batch.observations, unflatten(z))).mean()

        hessian = th.autograd.functional.hessian(kl, flat.detach()) + damping * th.eye(flat.numel(), dtype=th.float64)
        factor = np.linalg.cholesky(hessian.numpy())
        x = cp.Variable(flat.numel())
        problem = cp.Problem(
            cp.Maximize(g.numpy() @ x),
            [cp.norm(factor.T @ x) <= np.sqrt(2 * target_kl), b + a.numpy() @ x <= 0],
        )
        problem.solve(
            solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-12, max_step_fraction=0.95
        )
        adapted = unflatten(flat.detach() + result.fraction * th.from_numpy(x.value))
        return float(surrogates(actor, adapted, validation)[0])

    flat0 = th.cat([v.reshape(-1) for v in theta.values()])
    eps = 1e-4
    numeric = th.tensor(
        [
            (
                definition(flat0 + eps * th.eye(flat0.numel(), dtype=th.float64)[i])
                - definition(flat0 - eps * th.eye(flat0.numel(), dtype=th.float64)[i])
            )
            / (2 * eps)
            for i in range(flat0.numel())
        ],
        dtype=th.float64,
    )

    def library_gradient():
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        stages = replay_updates(actor, leaves, [batch], config, [result.fraction], differentiable=True)
        return flat_grad(surrogates(actor, stages[-1], validation)[0], list(leaves.values()))

    error = float((library_gradient() - numeric).norm() / numeric.norm())
    assert error <= 1e-3, f"relative error {error:.2e}"

    # The library with b held constant (the dropped path) is far off the definition.
    real = cpo_update_module.constraint_values
    try:
        cpo_update_module.constraint_values = lambda data, cost: real(data, cost).detach()
        dropped = float((library_gradient() - numeric).norm() / numeric.norm())
    finally:
        cpo_update_module.constraint_values = real
    print(f"meta-gradient vs the definition: {error:.2e} (b held constant: {dropped:.2e})")
    assert dropped > 10 * max(error, 1e-4), (dropped, error)


@pytest.mark.parametrize("mode", ["mean", "stages", "stages_cvar"])
def test_meta_objective_gradients_equal_the_backward_of_its_aggregates(mode):
    """MetaObjective.gradients starts each product from the per-task terms its scalar depends on; the plain backward
    of the aggregated F and L (the definition) must give the same gradients (float64, second order, 2 inner updates,
    3 tasks whose constraints differ)."""
    from sb3_metacpo.metacpo.meta_objective import MetaObjective, TaskAdaptation

    policy, config, theta, *_ = build_problem(0.02, 1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    tasks = []
    for constraint in (0.02, -0.01, 0.01):
        _, _, _, batches, fractions, validation, _ = build_problem(constraint, 2)
        stages = replay_updates(policy.actor_mean_log_std, leaves, batches, config, fractions, differentiable=True)
        tasks.append(TaskAdaptation(stages=stages, batches=[*batches, validation], fractions=fractions))
    objective = MetaObjective(
        policy.actor_mean_log_std, tasks, config, second_order=True, fisher=None, mode=mode, cvar_alpha=0.5
    )
    value = objective.value([task.stages for task in tasks])
    reward_grad, cost_grads = objective.gradients(value, list(leaves.values()))
    expected_reward = flat_grad(value.reward, list(leaves.values()), retain_graph=True)
    expected_costs = th.stack([flat_grad(cost, list(leaves.values()), retain_graph=True) for cost in value.cost_surrogates])
    assert cost_grads.shape == (1 if mode == "mean" else 3, expected_reward.numel())
    th.testing.assert_close(reward_grad, expected_reward, rtol=1e-12, atol=1e-14)
    th.testing.assert_close(cost_grads, expected_costs, rtol=1e-12, atol=1e-14)
    assert float(cost_grads.norm()) > 0


def test_cvar_candidates_are_valued_with_the_live_tasks():
    """ "stages_cvar" averages the worst tasks, and its gradient holds them fixed; the outer line search adds
    L(candidate) − L(θ) to b(θ), so a candidate must be valued with θ's tasks too. Oracle: each task's own
    constraint values (a one-task "stages" objective), averaged over θ's worst tasks. At a candidate whose own worst
    tasks differ, the candidate's CVaR would mix two sets of tasks (a violation the line search then saw as not
    reduced, rejecting steps that reduced it)."""
    from sb3_metacpo.metacpo.meta_objective import MetaObjective, TaskAdaptation

    policy, config, theta, *_ = build_problem(0.02, 1)
    actor = policy.actor_mean_log_std
    tasks = []
    for index, constraint in enumerate((0.02, -0.01, 0.01, 0.0)):  # each task its own data
        batch = make_batch(policy, theta, seed=10 * index, constraint=constraint)
        adapted, info = cpo_update(actor, theta, batch, config)
        validation = make_batch(policy, adapted, seed=10 * index + 5, constraint=constraint)
        tasks.append(TaskAdaptation(stages=[theta, adapted], batches=[batch, validation], fractions=[info.fraction]))
    cvar = MetaObjective(actor, tasks, config, second_order=False, fisher=None, mode="stages_cvar", cvar_alpha=0.5)
    singles = [MetaObjective(actor, [task], config, second_order=False, fisher=None, mode="stages") for task in tasks]

    def per_task(stages_per_task):  # (tasks, stages) constraint values, one task at a time
        return th.stack([single.value([stages]).constraints for single, stages in zip(singles, stages_per_task, strict=True)])

    live = cvar.value([task.stages for task in tasks])
    at_theta = per_task([task.stages for task in tasks])
    worst = at_theta.argsort(dim=0, descending=True)[:2]
    th.testing.assert_close(live.constraints, at_theta.gather(0, worst).mean(0), rtol=0, atol=1e-12)
    generator = th.Generator().manual_seed(0)
    n_params = sum(value.numel() for value in theta.values())
    for scale in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        step = scale * th.randn(n_params, generator=generator, dtype=th.float64)
        candidate = cvar.stages_at(theta, step)
        values = per_task(candidate)
        if not th.equal(values.argsort(dim=0, descending=True)[:2].sort(0).values, worst.sort(0).values):
            break
    else:
        pytest.fail("no candidate changed the worst tasks: the check would not tell")
    held = cvar.value(candidate, selection=live.selection)
    th.testing.assert_close(held.constraints, values.gather(0, worst).mean(0), rtol=0, atol=1e-12)
    # b(θ) + L(candidate) − L(θ), what the line search computes, is the held value
    line_search = live.constraints + held.cost_surrogates - live.cost_surrogates
    th.testing.assert_close(line_search, held.constraints, rtol=0, atol=1e-12)
    assert not th.allclose(cvar.value(candidate).constraints, held.constraints)


def test_the_second_order_meta_gradient_of_a_training_run_matches_differences_of_its_inner_updates(monkeypatch):
    """On Toy2DNav batches the inner conjugate gradients met their absolute tolerance after a few iterations, a number
    that depended on θ: autograd differentiated the iterations run at θ, whose derivative had not converged (off the
    central differences of the inner updates by up to 8x, with sign flips). With the second-order meta-gradient the
    inner solves now run all their iterations, in training and in the outer line search's replays alike."""
    from sb3_metacpo import MetaCPO, make_task_distribution
    from sb3_metacpo.common.cpo_update import add_flat, detached

    pairs: list[tuple[float, float]] = []
    real_outer = MetaCPO._outer_step

    def outer(self, objective, theta, value, reward_grad, cost_grads):
        result = real_outer(self, objective, theta, value, reward_grad, cost_grads)
        if pairs:
            return result
        start, x, params = detached(theta), result.direction.detach(), list(theta.values())
        for task in objective.tasks:
            for k in range(1, len(task.stages)):
                cost = surrogates(self._actor, task.stages[k], task.batches[k])[1][0]
                live = float(flat_grad(cost, params, retain_graph=True) @ x)

                def replayed(eps, task=task, k=k):
                    stages = replay_updates(
                        self._actor,
                        add_flat(start, eps * x),
                        task.batches[:-1],
                        objective.inner_config,
                        task.fractions,
                        differentiable=False,
                        fisher=objective.fisher,
                    )
                    return float(surrogates(self._actor, stages[k], task.batches[k])[1][0])

                pairs.append((live, (replayed(1e-3) - replayed(-1e-3)) / 2e-3))
        return result

    monkeypatch.setattr(MetaCPO, "_outer_step", outer)
    distribution = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaCPO(
        "MlpPolicy",
        distribution,
        meta_batch_size=4,
        n_steps=200,
        seed=1,
        policy_kwargs=dict(net_arch=[16]),
        meta_constraint="stages_cvar",
        recovery="confident",
        cost_limit=1.0,
        n_inner_updates=2,
    )
    model.learn(200 * 4 * 3)
    assert len(pairs) == 8
    worst = max(abs(live - numeric) / max(abs(numeric), 1e-3) for live, numeric in pairs)
    assert worst < 0.25, pairs
