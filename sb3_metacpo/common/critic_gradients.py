"""The critics' regression gradient written out: autograd's values, bit for bit, without its engine.

The critics are refitted with Adam on small minibatches (CPO's defaults: 10 epochs of 128 samples, 160 steps per
update of 2,048 samples), where a step's arithmetic is small and eager PyTorch's bookkeeping is much of its time:
building the graph, then the autograd engine's walk over it. For critics that are plain MLPs (``nn.Linear`` layers
and ``nn.Tanh`` or ``nn.ReLU`` activations, as SB3's ``MlpExtractor`` builds them), :func:`mse_gradients` runs the
forward pass without a graph and the backward pass as the kernels autograd itself calls, with the same operands:

* the mean squared error: ``aten::mse_loss_backward`` (autograd's derivative of ``mse_loss``) with a gradient of 1;
* a linear layer ``y = x Wᵀ + b`` (``addmm(b, x, Wᵀ)``): the weight's gradient ``gᵀ x``, the bias's ``g`` summed
  over the batch (autograd's ``sum_to`` of the broadcast bias), the input's ``g W`` (not computed for the first
  layer, whose input needs no gradient);
* ``tanh``: ``aten::tanh_backward`` on its output; ``relu``: ``aten::threshold_backward`` on its output at 0.

So the gradients equal ``loss.backward()``'s bit for bit (``tests/test_critic_gradients.py`` checks that over
architectures, activations, dtypes and several costs, and whole critic fits against the autograd path);
:data:`FAST_CRITIC_GRADIENTS` ``= False`` restores ``loss.backward()``. Any other critic (another activation or layer
type, a module with hooks, a parameter frozen, a parameter used twice) runs through autograd, and so does every fit
while autograd would behave otherwise (gradients disabled, anomaly detection, saved-tensor hooks) and every fit off
the CPU (the bits are tested on the CPU; another device's libraries may order a product's sums by the call's
layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch as th
from torch import nn

__all__ = [
    "FAST_CRITIC_GRADIENTS",
    "MlpLayers",
    "autograd_as_usual",
    "global_hooks",
    "mlp_layers",
    "module_hooked",
    "mse_gradients",
    "shares_no_parameter",
]

#: Whether :meth:`~sb3_metacpo.common.policies.CPOPolicy.fit_critics` uses :func:`mse_gradients` for MLP critics.
FAST_CRITIC_GRADIENTS = True

_ACTIVATIONS = (nn.Tanh, nn.ReLU)


@dataclass(frozen=True)
class MlpLayers:
    """An MLP as its modules in order: ``nn.Linear`` (exactly that class) and the element-wise activations
    ``nn.Tanh`` and ``nn.ReLU``."""

    modules: tuple[nn.Module, ...]


def module_hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its ``forward``: module hooks (forward, backward, their pre-hooks) or
    parametrisations (the global hooks are :func:`global_hooks`)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hasattr(module, "parametrizations")
    )


def _plain(module: nn.Module) -> bool:
    """A module whose call is its ``forward`` and whose parameters' gradients go straight to ``.grad``: no module or
    tensor hooks (the module's or the global ones), no parametrisations."""
    hooked_tensor = any(
        getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
        for p in module.parameters(recurse=False)
    )
    return not (module_hooked(module) or hooked_tensor)


def global_hooks() -> bool:
    """Whether global module hooks (``torch.nn.modules.module.register_module_*_hook``) are registered."""
    registry = nn.modules.module
    return any(
        getattr(registry, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def mlp_layers(modules: Sequence[nn.Module]) -> MlpLayers | None:
    """``modules`` (applied in this order) as :class:`MlpLayers`, or None if :func:`mse_gradients` cannot run them
    (another module type, a linear layer without bias, hooks, a parameter that does not require a gradient, a module
    used twice)."""
    if global_hooks():
        return None
    flat: list[nn.Module] = []
    for module in modules:
        if type(module) is nn.Sequential:
            if not _plain(module):
                return None
            flat.extend(module)
        else:
            flat.append(module)
    if not flat or type(flat[0]) is not nn.Linear or len({id(module) for module in flat}) != len(flat):
        return None
    for module in flat:
        if type(module) is nn.Linear:
            if module.bias is None or not (module.weight.requires_grad and module.bias.requires_grad):
                return None
        elif type(module) not in _ACTIVATIONS:
            return None
        if not _plain(module):
            return None
    return MlpLayers(tuple(flat))


def shares_no_parameter(*mlps: MlpLayers) -> bool:
    """Whether every parameter appears once across ``mlps`` (autograd sums the gradients of a parameter used twice,
    which :func:`mse_gradients` does not)."""
    params = [p for layers in mlps for module in layers.modules for p in module.parameters(recurse=False)]
    return len({id(p) for p in params}) == len(params)


def autograd_as_usual() -> bool:
    """Whether ``loss.backward()`` would run now as :func:`mse_gradients` does: gradients enabled (else it raises),
    no anomaly detection, no saved-tensor hooks (which may change what the backward pass reads) and no autocast on
    the CPU (under which the forward pass runs in a lower precision and the gradients come back in their
    parameters' dtype)."""
    top_hooks = getattr(th._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooked = top_hooks is None or top_hooks(False) is not None
    return th.is_grad_enabled() and not th.is_anomaly_enabled() and not hooked and not th.is_autocast_enabled("cpu")


def _forward(layers: MlpLayers, x: th.Tensor) -> tuple[th.Tensor, list[th.Tensor]]:
    """The MLP's output on ``x`` and what its backward pass needs: each linear layer's input, each activation's
    output."""
    saved = []
    for module in layers.modules:
        if isinstance(module, nn.Linear):
            saved.append(x)
            x = nn.functional.linear(x, module.weight, module.bias)
        else:
            x = th.tanh(x) if isinstance(module, nn.Tanh) else th.relu(x)
            saved.append(x)
    return x, saved


def _backward(layers: MlpLayers, saved: list[th.Tensor], grad: th.Tensor, grads: dict[th.Tensor, th.Tensor]) -> None:
    """Autograd's backward pass through the MLP from the gradient ``grad`` of its output: the parameters' gradients
    into ``grads``."""
    for index in reversed(range(len(layers.modules))):
        module = layers.modules[index]
        if isinstance(module, nn.Linear):
            grads[module.weight] = grad.t().mm(saved[index])
            grads[module.bias] = grad.sum(0)
            if index > 0:
                grad = grad.mm(module.weight)
        elif isinstance(module, nn.Tanh):
            grad = th.ops.aten.tanh_backward(grad, saved[index])
        else:
            grad = th.ops.aten.threshold_backward(grad, saved[index], 0)


@th.no_grad()
def mse_gradients(
    terms: Sequence[tuple[MlpLayers, th.Tensor, th.Tensor]],
) -> tuple[th.Tensor, dict[th.Tensor, th.Tensor]]:
    """The sum over ``terms`` ``(mlp, inputs, targets)`` of ``mse_loss(mlp(inputs), targets)`` and its gradient with
    respect to every MLP's parameters, bit for bit what ``loss.backward()`` gives. An MLP output of one column is
    compared with 1-D targets (SB3's ``values.flatten()``). The MLPs must not share a parameter (autograd would sum
    its gradients: see :func:`shares_no_parameter`)."""
    if not terms:
        raise ValueError("mse_gradients needs at least one (mlp, inputs, targets) term")
    if len(terms) > 1 and not shares_no_parameter(*(layers for layers, _, _ in terms)):
        raise ValueError("the MLPs of mse_gradients share a parameter, whose gradients autograd would sum: use autograd")
    loss: th.Tensor | None = None
    grads: dict[th.Tensor, th.Tensor] = {}
    passes = []
    for layers, inputs, targets in terms:
        output, saved = _forward(layers, inputs)
        prediction = output.flatten() if targets.dim() == 1 else output
        term = nn.functional.mse_loss(prediction, targets)
        loss = term if loss is None else loss + term
        passes.append((layers, saved, output, prediction, targets))
    assert loss is not None
    one = th.ones((), dtype=loss.dtype, device=loss.device)
    for layers, saved, output, prediction, targets in passes:
        grad = th.ops.aten.mse_loss_backward(one, prediction, targets, 1)  # reduction 1: the mean
        _backward(layers, saved, grad.reshape(output.shape), grads)
    return loss, grads
