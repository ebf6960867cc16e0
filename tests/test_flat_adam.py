"""FlatAdam against torch's Adam (the oracle): the same parameters and state, bit for bit, on every path."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import torch as th

from sb3_metacpo import CPO
from sb3_metacpo.common.flat_adam import FlatAdam, pack_parameters, packed_view
from sb3_metacpo.tasks import make_task_distribution

SHAPES = [(64, 60), (64,), (64, 64), (64,), (1, 64), (1,), (3, 7, 5)]


def twin_parameters(seed: int = 0, dtype: th.dtype = th.float32) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
    gen = th.Generator().manual_seed(seed)
    values = [th.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES]
    return [th.nn.Parameter(v.clone()) for v in values], [th.nn.Parameter(v.clone()) for v in values]


def bits(tensor: th.Tensor) -> bytes:
    return tensor.detach().contiguous().numpy().tobytes()


def assert_same(reference: th.optim.Optimizer, flat: th.optim.Optimizer, a: list, b: list) -> None:
    for p, q in zip(a, b, strict=True):
        assert bits(p) == bits(q)
        ours, theirs = flat.state.get(q, {}), reference.state.get(p, {})
        assert set(ours) == set(theirs)
        for key in theirs:
            assert bits(ours[key]) == bits(theirs[key]), key


def set_grads(a: list, b: list, step: int, skip: tuple[int, ...] = ()) -> None:
    gen = th.Generator().manual_seed(100 + step)
    for index, (p, q) in enumerate(zip(a, b, strict=True)):
        grad = th.randn(p.shape, generator=gen, dtype=p.dtype) * 10.0 ** int(th.randint(-6, 2, (), generator=gen))
        p.grad = None if index in skip else grad.clone()
        q.grad = None if index in skip else grad.clone()


@dataclass
class Twins:
    """Torch's Adam on parameters ``a`` and FlatAdam on equal parameters ``b`` (packed unless told not to)."""

    a: list
    b: list
    reference: th.optim.Adam
    flat: FlatAdam

    @classmethod
    def make(cls, a: list | None = None, b: list | None = None, pack: bool = True, **kwargs: Any) -> Twins:
        if a is None or b is None:
            a, b = twin_parameters()
        if pack:
            pack_parameters(b)
        return cls(a, b, th.optim.Adam(a, **kwargs), FlatAdam(b, **kwargs))

    def run(self, steps: Iterable[int], check_each: bool = False, skip_at: dict[int, tuple[int, ...]] | None = None) -> None:
        """Both optimisers' steps on the same gradients (``set_grads`` of each step number)."""
        for step in steps:
            set_grads(self.a, self.b, step, skip=(skip_at or {}).get(step, ()))
            self.reference.step()
            self.flat.step()
            if check_each:
                self.check()

    def check(self) -> None:
        assert_same(self.reference, self.flat, self.a, self.b)


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
@pytest.mark.parametrize("kwargs", [{}, {"lr": 3e-4, "betas": (0.8, 0.99), "eps": 1e-5}])
def test_packed_step_is_torch_adam(dtype: th.dtype, kwargs: dict) -> None:
    twins = Twins.make(*twin_parameters(dtype=dtype), **kwargs)
    assert packed_view(twins.b) is not None
    twins.run(range(6), check_each=True, skip_at={4: (2,)})  # a step where one tensor has no gradient
    # the step without b[2]'s gradient was torch's (the others do not lie one after another), on the packed state
    b, flat = twins.b, twins.flat
    assert packed_view([flat.state[q]["exp_avg"] for q in b]) is not None
    assert flat.state[b[0]]["step"].item() == 6 and flat.state[b[2]]["step"].item() == 5


def test_many_sizes_and_alignments() -> None:
    """Tensors of random sizes put every element at some point of a vector block or a tail, in one and the other."""
    gen = th.Generator().manual_seed(7)
    for _ in range(25):
        sizes = th.randint(1, 300, (int(th.randint(2, 9, (), generator=gen)),), generator=gen).tolist()
        values = [th.randn(size, generator=gen) for size in sizes]
        twins = Twins.make(
            [th.nn.Parameter(v.clone()) for v in values], [th.nn.Parameter(v.clone()) for v in values], eps=1e-5
        )
        twins.run(range(3))
        twins.check()


def test_one_set_path_runs() -> None:
    """The state of packed parameters is packed too (the path under test is the flat one, not torch's)."""
    twins = Twins.make()
    twins.run(range(3))
    twins.check()
    assert packed_view([twins.flat.state[q]["exp_avg"] for q in twins.b]) is not None
    assert packed_view([twins.flat.state[q]["exp_avg_sq"] for q in twins.b]) is not None


@pytest.mark.parametrize(
    "kwargs", [{"amsgrad": True}, {"weight_decay": 0.1}, {"maximize": True}, {"foreach": True}, {"lr": th.tensor(1e-3)}]
)
def test_other_options_run_torch_step(kwargs: dict) -> None:
    twins = Twins.make(**kwargs)
    twins.run(range(3))
    twins.check()


def test_unpacked_parameters_run_torch_step() -> None:
    twins = Twins.make(pack=False)
    assert packed_view(twins.b) is None
    twins.run(range(3))
    twins.check()


def test_closure_and_hooks() -> None:
    twins = Twins.make()
    calls = []
    twins.flat.register_step_pre_hook(lambda *args: calls.append("pre"))
    twins.flat.register_step_post_hook(lambda *args: calls.append("post"))
    twins.run([0])
    assert calls == ["pre", "post"]
    set_grads(twins.a, twins.b, 1)
    assert twins.reference.step(lambda: 1.0) == twins.flat.step(lambda: 1.0) == 1.0
    assert calls == ["pre", "post", "pre", "post"]
    twins.check()


def test_closure_with_fewer_gradients_then_one_set_step() -> None:
    """A closure's step on part of the parameters leaves their step counts apart: the next step is torch's too."""
    twins = Twins.make()
    twins.run(range(2))

    def closure(params: list) -> float:
        params[0].grad = None
        return 0.0

    twins.reference.step(lambda: closure(twins.a))
    twins.flat.step(lambda: closure(twins.b))
    twins.run(range(2, 5), check_each=True)


def test_state_dict_round_trip_and_from_torch_adam() -> None:
    """Saved and loaded (torch.save), FlatAdam's state continues as torch's; torch's Adam state loads into it."""
    twins = Twins.make()
    twins.run(range(3))
    for source in (twins.flat, twins.reference):  # our own archive, and one of torch's Adam
        buffer = io.BytesIO()
        th.save(source.state_dict(), buffer)
        buffer.seek(0)
        copies = [[th.nn.Parameter(p.detach().clone()) for p in side] for side in (twins.a, twins.b)]
        loaded = Twins.make(*copies)
        loaded.reference.load_state_dict(twins.reference.state_dict())
        loaded.flat.load_state_dict(th.load(buffer, weights_only=True))
        loaded.run(range(3, 6), check_each=True)
        assert packed_view([loaded.flat.state[q]["exp_avg"] for q in loaded.b]) is not None


def test_replaced_state_or_parameters_are_noticed() -> None:
    """State replaced in place, a parameter re-pointed: the next step still equals torch's."""
    twins = Twins.make()
    a, b = twins.a, twins.b
    twins.run([0])
    twins.reference.state[a[1]]["exp_avg"] = th.ones_like(a[1])
    twins.flat.state[b[1]]["exp_avg"] = th.ones_like(b[1])
    twins.run([1])
    twins.check()
    with th.no_grad():
        b[3].data = b[3].detach().clone()  # out of the packed storage: torch's step from now on, still equal
    twins.run(range(2, 4), check_each=True)


def test_pack_parameters_keeps_values_and_refuses_mixed_dtypes() -> None:
    a, b = twin_parameters()
    pack_parameters(b)
    assert all(bits(p) == bits(q) for p, q in zip(a, b, strict=True))
    storage = b[0].untyped_storage().data_ptr()
    assert all(q.untyped_storage().data_ptr() == storage for q in b)
    with pytest.raises(ValueError, match="one dtype and device"):
        pack_parameters([th.nn.Parameter(th.zeros(2)), th.nn.Parameter(th.zeros(2, dtype=th.float64))])


def fitted_critics(optimizer_class: type | None, deepcopied: bool = False) -> tuple[dict, dict]:
    kwargs = {} if optimizer_class is None else {"policy_kwargs": {"optimizer_class": optimizer_class}}
    model = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=256, seed=0, **kwargs)
    policy = model.policy
    if deepcopied:
        import copy

        policy = copy.deepcopy(policy)
    gen = th.Generator().manual_seed(1)
    n = 300
    obs = th.randn(n, policy.observation_space.shape[0], generator=gen)
    policy.fit_critics(obs, th.randn(n, generator=gen), th.randn(n, generator=gen), 3, 64, th.rand(n, generator=gen))
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = {i: {k: v.clone() for k, v in s.items()} for i, s in policy.optimizer.state_dict()["state"].items()}
    return state, opt


def test_policy_critics_fit_as_with_torch_adam() -> None:
    """CPOPolicy's default optimiser (FlatAdam, SB3's eps for Adam) fits the critics bit for bit as torch's Adam,
    also after a deepcopy of the policy (which unpacks the parameters; the fit packs them again)."""
    model = CPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), n_steps=256, seed=0)
    assert type(model.policy.optimizer) is FlatAdam and model.policy.optimizer.defaults["eps"] == 1e-5
    reference = fitted_critics(th.optim.Adam)
    for result in (fitted_critics(None), fitted_critics(None, deepcopied=True)):
        for ours, theirs in zip(result, reference, strict=True):
            assert ours.keys() == theirs.keys()
            for key in theirs:
                if isinstance(theirs[key], dict):
                    assert all(bits(ours[key][k]) == bits(theirs[key][k]) for k in theirs[key])
                else:
                    assert bits(ours[key]) == bits(theirs[key]), key
