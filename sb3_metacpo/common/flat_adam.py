"""torch's Adam, bit for bit, with one set of element-wise operations per parameter group instead of one per tensor.

torch's default (single-tensor) Adam on the CPU runs about seven small operations per parameter tensor and step: the
critics' 12 tensors make 84 operations of a few microseconds each per 128-sample minibatch, a third of a critic
training step. :class:`FlatAdam` runs the same operations, with the same scalars, once over all of a group's
parameters when they lie one after another in one storage (:func:`pack_parameters` lays them out so;
:class:`~sb3_metacpo.common.policies.CPOPolicy` packs its critics at construction). Adam's arithmetic is
element-wise, so each element gets the same floating-point operations on the same operands either way, provided
torch's CPU kernels compute an element alike wherever it falls (in a vectorised block or a tensor's tail): the
tests check that against ``torch.optim.Adam`` on tensors of several sizes and shapes, float32 and float64. Anything
else (other options, other devices, parameters not packed, tensors at different step counts, a closure) runs
torch's own step.

The state is torch's: per parameter ``step``, ``exp_avg`` and ``exp_avg_sq`` (views into one buffer per group), so
``state_dict`` and ``load_state_dict`` are ``torch.optim.Adam``'s and archives move between the two classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch as th

__all__ = ["FlatAdam", "pack_parameters", "packed_view"]


def pack_parameters(parameters: Sequence[th.Tensor]) -> None:
    """Move ``parameters`` (their values unchanged) into one new contiguous storage, in this order, each a view of
    it: :class:`FlatAdam` then updates them with one operation per step. They must share dtype and device."""
    parameters = list(parameters)
    if not parameters:
        return
    first = parameters[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in parameters):
        raise ValueError("pack_parameters needs parameters of one dtype and device")
    with th.no_grad():
        flat = th.cat([p.detach().reshape(-1) for p in parameters])
        for p, view in zip(parameters, _views_like(flat, parameters), strict=True):
            p.data = view


def _views_like(flat: th.Tensor, tensors: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Consecutive views of ``flat`` shaped as ``tensors``, in order."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def packed_view(tensors: Sequence[th.Tensor]) -> th.Tensor | None:
    """One flat view covering ``tensors`` if they are contiguous and lie one after another in one storage, in this
    order (as :func:`pack_parameters` leaves them), else None."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    itemsize = first.element_size()
    total = 0
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.data_ptr() != expected
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        expected += t.numel() * itemsize
        total += t.numel()
    return first.detach().as_strided((total,), (1,), first.storage_offset())


def _step_dtype() -> th.dtype:
    """The dtype of torch's per-tensor step counts (``torch.optim.optimizer._get_scalar_dtype``, not fused)."""
    return th.float64 if th.get_default_dtype() == th.float64 else th.float32


def _torch_adam_step(optimizer: th.optim.Adam, closure: Callable[[], float] | None) -> float | None:
    """``torch.optim.Adam.step`` without its hook wrapper (the caller's own wrapper already ran the hooks)."""
    step = th.optim.Adam.step
    step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    return step(optimizer, closure)  # type: ignore[no-any-return]


@dataclass
class _Plan:
    """A group's packed parameters with gradients, their flat view and the flat state their views come from."""

    params: list[th.Tensor]
    layouts: list[tuple[int, th.Size]]  # each parameter's data pointer and shape when the plan was made
    flat_params: th.Tensor
    steps: th.Tensor
    exp_avg: th.Tensor
    exp_avg_sq: th.Tensor
    states: list[dict[str, th.Tensor]]  # each parameter's state entries as the plan made them

    def holds(self, params: list[th.Tensor], state: Mapping[th.Tensor, dict[str, Any]]) -> bool:
        """Whether the plan still describes ``params`` and the optimiser's ``state`` (nothing re-pointed or replaced)."""
        if len(params) != len(self.params):
            return False
        for p, q, (pointer, shape), entries in zip(params, self.params, self.layouts, self.states, strict=True):
            current = state.get(p)
            if (
                p is not q
                or p.data_ptr() != pointer
                or p.shape != shape
                or not p.is_contiguous()
                or current is None
                or current.get("step") is not entries["step"]
                or current.get("exp_avg") is not entries["exp_avg"]
                or current.get("exp_avg_sq") is not entries["exp_avg_sq"]
                or len(current) != 3
            ):
                return False
        return True


class FlatAdam(th.optim.Adam):
    """``torch.optim.Adam`` (same arguments, same state, same results bit for bit) that updates a group's packed
    parameters (:func:`pack_parameters`) with one set of element-wise operations over all of them.

    The one-set path runs for groups with Adam's defaults besides ``lr``, ``betas`` and ``eps`` (no weight decay,
    ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable`` or ``differentiable``), float learning rate
    and betas, dense real gradients, and parameters with gradients that are packed, on the CPU (where torch's
    default is its single-tensor Adam) and all at the same step count; any other step is torch's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[int, _Plan] = {}  # by group index

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's optimisers copy and pickle only defaults, state and groups: plans are made again
        super().__setstate__(state)
        self._plans = {}

    @th.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Adam step (see the class); ``closure`` as torch's."""
        if closure is None:
            plans = [self._plan(index, group) for index, group in enumerate(self.param_groups)]
        if closure is not None or any(plan is False for plan in plans):
            # torch's step increments the step counts of the parameters with gradients, which a closure may change:
            # every plan is checked again (equal step counts included) before the next one-set step
            self._plans.clear()
            return _torch_adam_step(self, closure)
        for group, plan in zip(self.param_groups, plans, strict=True):
            if plan is None:  # no parameter of the group has a gradient
                continue
            assert isinstance(plan, _Plan)
            grad = th.cat([p.grad.reshape(-1) for p in plan.params])  # type: ignore[union-attr]
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            # torch.optim.adam._single_tensor_adam's operations and scalars, over every parameter at once
            plan.steps += 1
            step = plan.steps[0].item()
            plan.exp_avg.lerp_(grad, 1 - beta1)
            plan.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (plan.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            plan.flat_params.addcdiv_(plan.exp_avg, denom, value=-step_size)
        return None

    def _plan(self, index: int, group: dict[str, Any]) -> _Plan | bool | None:
        """The group's :class:`_Plan` (made, and the state packed, when the last one no longer holds), None if no
        parameter has a gradient, False if this step needs torch's."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        options_default = not (
            group["weight_decay"]
            or group["amsgrad"]
            or group["maximize"]
            or group["foreach"]
            or group["fused"]
            or group["capturable"]
            or group["differentiable"]
        )
        scalars = all(isinstance(value, float) for value in (group["lr"], *group["betas"], group["eps"]))
        if not (options_default and scalars):
            return False
        if any(p.grad.is_sparse or p.grad.is_complex() for p in params):  # type: ignore[union-attr]
            return False
        plan = self._plans.get(index)
        if plan is not None and plan.holds(params, self.state):
            return plan
        plan = self._make_plan(params)
        if plan is None:
            self._plans.pop(index, None)
            return False
        self._plans[index] = plan
        return plan

    def _make_plan(self, params: list[th.Tensor]) -> _Plan | None:
        """A plan for ``params``, with their state packed into flat buffers (torch's lazy initialisation when they
        have none); None when they are not packed or their state cannot be."""
        flat_params = packed_view(params)
        if flat_params is None or flat_params.device.type != "cpu":
            # elsewhere (CUDA...) torch's default is its multi-tensor Adam, which this does not reproduce
            return None
        states = [self.state[p] for p in params]
        if all(len(state) == 0 for state in states):
            steps = th.zeros(len(params), dtype=_step_dtype())
            exp_avg, exp_avg_sq = th.zeros_like(flat_params), th.zeros_like(flat_params)
        else:
            if any(set(state) != {"step", "exp_avg", "exp_avg_sq"} for state in states):
                return None
            step_tensors = [state["step"] for state in states]
            if any(t.dim() != 0 or t.dtype != _step_dtype() or t.device.type != "cpu" for t in step_tensors):
                return None
            values = [t.item() for t in step_tensors]
            if any(value != values[0] for value in values):
                return None  # tensors at different step counts: torch's per-tensor bias corrections
            if any(
                state[key].shape != p.shape or state[key].dtype != p.dtype or state[key].device != p.device
                for p, state in zip(params, states, strict=True)
                for key in ("exp_avg", "exp_avg_sq")
            ):
                return None
            # e.g. after load_state_dict, or the first step after another set of parameters had gradients
            steps = th.stack([t.detach().clone() for t in step_tensors])
            exp_avg = th.cat([state["exp_avg"].detach().reshape(-1) for state in states])
            exp_avg_sq = th.cat([state["exp_avg_sq"].detach().reshape(-1) for state in states])
        entries = []
        views = zip(params, steps, _views_like(exp_avg, params), _views_like(exp_avg_sq, params), strict=True)
        for p, step, average, average_sq in views:
            self.state[p] = {"step": step, "exp_avg": average, "exp_avg_sq": average_sq}
            entries.append(dict(self.state[p]))  # the tensors, to notice any of them replaced in the state
        layouts = [(p.data_ptr(), p.shape) for p in params]
        return _Plan(params, layouts, flat_params, steps, exp_avg, exp_avg_sq, entries)
