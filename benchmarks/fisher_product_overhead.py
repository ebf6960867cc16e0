"""How much of a Fisher-vector product is overhead that compiling could remove, measured in one run.

The closed-form Fisher-vector product (:meth:`CPOPolicy.fisher_product`) is the inner loop of every CPO step
(one per conjugate-gradient iteration). This script times it, on the HalfCheetahVelocity actor (17 -> 64 -> 64 -> 6,
the default ``MlpPolicy``) at the batch sizes of the throughput benchmark, four ways, in CPU seconds of this process
with torch on one thread, alternating the variants over several rounds (medians):

1. the library's product as ``learn()`` runs it without a graph (the first-order inner steps, the outer step);
2. the same function under ``torch.compile`` (inductor, its default mode);
3. the same operations written as one TorchScript function (the interpreter runs the same ATen kernels without
   Python between them);
4. the matrix-product kernels alone: the self time of ``aten::mm`` / ``aten::addmm`` under the torch profiler, what
   any implementation of the same computation with the same kernels spends.

and checks each variant's result against the library's bit for bit.

    python benchmarks/fisher_product_overhead.py | tee benchmarks/results/fisher_product/fisher_product_overhead.txt
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import List  # noqa: UP035 (TorchScript reads the annotations of the scripted function)

import torch as th

from sb3_metacpo.common.policies import CPOPolicy
from sb3_metacpo.tasks import make_task_distribution

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm")


def scripted_product(
    vector: th.Tensor,
    inputs: List[th.Tensor],  # noqa: UP006
    slopes: List[th.Tensor],  # noqa: UP006
    weights: List[th.Tensor],  # noqa: UP006
    sizes: List[int],  # noqa: UP006
    positions: List[int],  # noqa: UP006
    inverse_variance: th.Tensor,
    damping: float,
) -> th.Tensor:
    """The library's product for an MLP with element-wise maps after every hidden layer, written for TorchScript:
    the same operations on the same operands (forward mode J v, then Jᵀ diag(σ⁻²) (J v) / n, then the log-std's
    2 v and the damping). ``positions``: where each layer's weight and bias, then the log-std, lie in ``vector``."""
    parts = vector.split(sizes)
    n_layers = len(weights)
    d_out = th.empty(0)
    for index in range(n_layers):
        weight = parts[positions[2 * index]].view_as(weights[index])
        linear = th.nn.functional.linear(inputs[index], weight, parts[positions[2 * index + 1]])
        d_out = linear if index == 0 else linear + d_out.mm(weights[index].t())
        if index < n_layers - 1:
            d_out = d_out * slopes[index]
    upstream = d_out * inverse_variance
    pieces: List[th.Tensor] = [upstream] * len(sizes)  # noqa: UP006
    pieces[positions[-1]] = 2 * parts[positions[-1]]
    for step in range(n_layers):
        index = n_layers - 1 - step
        pieces[positions[2 * index]] = upstream.t() @ inputs[index]
        pieces[positions[2 * index + 1]] = upstream.sum(0)
        if index > 0:
            upstream = upstream.mm(weights[index]) * slopes[index - 1]
    return th.cat([piece.reshape(-1) for piece in pieces]) + damping * vector


Activations = tuple[list[th.Tensor], list[th.Tensor], list[th.Tensor], th.Tensor]


def scripted_arguments(policy: CPOPolicy, obs: th.Tensor) -> Activations:
    """The cached activations the library's product keeps: each linear layer's input, the tanh slopes, the weights
    and diag(σ⁻²) / n (computed as the library computes them)."""
    params = policy.actor_params()
    linears = [module for module in policy.mlp_extractor.policy_net if isinstance(module, th.nn.Linear)]
    weights = [layer.weight.detach() for layer in [*linears, policy.action_net]]
    inputs, slopes = [], []
    with th.no_grad():
        x = policy.normalize_obs(obs)
        for layer in linears:
            inputs.append(x)
            x = th.nn.functional.linear(x, layer.weight, layer.bias)
            pre = x.detach().requires_grad_(True)
            with th.enable_grad():
                x = th.tanh(pre)
                (slope,) = th.autograd.grad(x.sum(), pre)
            slopes.append(slope)
            x = x.detach()
        inputs.append(x)
        inverse_variance = (-2 * params["log_std"].detach()).exp() / len(obs)
    return inputs, slopes, weights, inverse_variance


def cpu_seconds(function: Callable[[], object], repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        function()
    return (time.process_time() - start) / repeats


def kernel_seconds(function: Callable[[], object], repeats: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            function()
    micros = sum(event.self_cpu_time_total for event in prof.key_averages() if event.key in MATRIX_PRODUCTS)
    return micros / 1e6 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[200, 800], help="batch sizes (rows of the product)")
    parser.add_argument("--repeats", type=int, default=2000, help="products per timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are printed)")
    args = parser.parse_args()
    th.set_num_threads(1)
    th.manual_seed(0)
    observation_space, action_space = make_task_distribution("HalfCheetahVelocity", seed=0).spaces
    policy = CPOPolicy(observation_space, action_space, lambda _: 3e-4)
    params = {name: value.detach() for name, value in policy.actor_params().items()}
    sizes = [value.numel() for value in params.values()]
    names = list(params)
    layers = [name[: -len("weight")] for name in names if name.endswith("weight")]
    layers.sort(key=lambda layer: (layer.startswith("action_net."), layer))  # hidden layers in order, then the head
    positions = [names.index(layer + part) for layer in layers for part in ("weight", "bias")] + [names.index("log_std")]
    print(
        f"Fisher-vector product of the HalfCheetahVelocity actor ({sum(sizes)} parameters); {platform.machine()}, "
        f"{platform.python_version()}, torch {th.__version__} (1 thread); CPU microseconds per product, median of "
        f"{args.rounds} alternating rounds of {args.repeats}"
    )
    print()
    columns = ("library", "compiled", "(x lib)", "script", "(x lib)", "kernels")
    print(f"{'samples':>8} " + " ".join(f"{column:>9}" for column in columns) + f" {'share':>6}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = th.jit.script(scripted_product)
    for n in args.samples:
        obs = th.as_tensor(observation_space.sample()).repeat(n, 1) + th.randn(n, observation_space.shape[0])
        vector = th.randn(sum(sizes))
        library = policy.fisher_product(params, obs, 0.1)
        reference = library(vector).clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = th.compile(library)
            start = time.perf_counter()
            compiled_out = compiled(vector).clone()
            compile_seconds = time.perf_counter() - start
        inputs, slopes, weights, inverse_variance = scripted_arguments(policy, obs)
        run_script = partial(script, vector, inputs, slopes, weights, sizes, positions, inverse_variance, 0.1)
        outputs = {"compiled": compiled_out, "script": run_script()}
        equal = {key: th.equal(out, reference) for key, out in outputs.items()}
        differences = {key: (out - reference).abs().max().item() for key, out in outputs.items()}
        times: dict[str, list[float]] = {"library": [], "compiled": [], "script": []}
        for _ in range(args.rounds):
            times["library"].append(cpu_seconds(lambda: library(vector), args.repeats))  # noqa: B023
            times["compiled"].append(cpu_seconds(lambda: compiled(vector), args.repeats))  # noqa: B023
            times["script"].append(cpu_seconds(run_script, args.repeats))
        kernels = kernel_seconds(lambda: library(vector), args.repeats)  # noqa: B023
        median = {key: statistics.median(values) * 1e6 for key, values in times.items()}
        print(
            f"{n:>8} {median['library']:>9.1f} {median['compiled']:>9.1f} {median['compiled'] / median['library']:>9.2f} "
            f"{median['script']:>9.1f} {median['script'] / median['library']:>9.2f} {kernels * 1e6:>9.1f} "
            f"{kernels * 1e6 / median['library']:>6.2f}"
        )
        for key in ("compiled", "script"):
            verdict = "bit for bit" if equal[key] else f"differs, max |difference| {differences[key]:.3g}"
            print(f"{'':>8} {key}: {verdict}")
        print(f"{'':>8} compiled: first call (compilation) {compile_seconds:.1f} s wall clock")
    print()
    print("kernels: self time of aten::mm / aten::addmm under the torch profiler; share: kernels / library.")


if __name__ == "__main__":
    main()
