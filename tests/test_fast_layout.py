"""The batched layout tries (``sb3_metacpo.tasks.fast_layout``) against upstream's ``RandomGenerator``, the definition:
the same layouts bit for bit and the random stream left in the same state, so every later draw of an episode is the
same (``tests/test_fast_reset.py`` checks the whole episodes)."""

import gymnasium as gym
import numpy as np
import pytest

from sb3_metacpo.tasks import fast_layout, make_task_distribution
from sb3_metacpo.tasks.compat import import_safety_gymnasium
from sb3_metacpo.tasks.fast_layout import fast_layout_class, first_valid_draw

import_safety_gymnasium()
from safety_gymnasium.utils.random_generator import RandomGenerator  # noqa: E402


def placements_of(env):
    """What a reset of ``env`` hands its generator: placements, extents, margin."""
    env.reset(seed=0)
    generator = env.unwrapped.task.random_generator
    assert isinstance(generator, fast_layout_class())  # the envs do use the batched tries
    return generator.placements, generator.placements_extents, generator.placements_margin


def family_placements(name, **options):
    dist = make_task_distribution(name, seed=3, **options)
    return placements_of(dist.make_env(dist.sample(1)[0]))


def standard_placements(env_id):
    from sb3_metacpo.tasks.safety_gym import fast_standard_env

    return placements_of(fast_standard_env(gym.make(env_id)))


SYNTHETIC = {
    # a rectangle per half of the arena (a draw picks one by area first), one that the keepout empties, and crowding
    "several rectangles": (
        {
            "agent": ([(-2.0, -2.0, 0.0, 2.0), (0.0, -1.0, 2.0, 1.0)], 0.4),
            "a0": ([(-0.1, -0.1, 0.1, 0.1), (1.0, 1.0, 2.0, 2.0)], 0.3),
            "a1": (None, 0.5),
            "b0": ([(0.5, 0.5, 0.6, 0.6), (-2.0, -2.0, 2.0, 2.0)], 0.1),
        },
        [-2.0, -2.0, 2.0, 2.0],
        0.05,
    ),
    "crowded": ({f"o{i}": (None, 0.45) for i in range(6)}, [-1.5, -1.5, 1.5, 1.5], 0.0),  # ~40 % of layouts succeed
}


def cases():
    yield "PointGoalHazard", lambda: family_placements("PointGoalHazard")
    yield "PointGoalHazard with vases", lambda: family_placements("PointGoalHazard", n_vases=2)
    yield "PointButtonHazard with gremlins", lambda: family_placements("PointButtonHazard", n_gremlins=3)
    yield "CarCircle", lambda: family_placements("CarCircle")
    yield "SafetyPointGoal2", lambda: standard_placements("SafetyPointGoal2Gymnasium-v0")
    yield "SafetyCarButton1", lambda: standard_placements("SafetyCarButton1Gymnasium-v0")
    for name, config in SYNTHETIC.items():
        yield name, lambda config=config: config


def generators(config, seed):
    pair = []
    for kind in (RandomGenerator, fast_layout_class()):
        generator = kind()
        generator.set_placements_info(*config)
        generator.set_random_seed(seed)
        pair.append(generator)
    return pair


def same_state(first, second):
    a, b = first.random_generator.get_state(), second.random_generator.get_state()
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize(("name", "config"), list(cases()), ids=[name for name, _ in cases()])
def test_layouts_and_random_stream_are_upstreams(name, config, monkeypatch):
    config = config()
    attempts = failures = 0
    blocks = {"accepted": 0, "rejected": 0}  # the blocks after the tries made one by one

    def counted(*args):
        xy = fast_layout.first_valid_draw.__wrapped__(*args)
        blocks["accepted" if xy is not None else "rejected"] += 1
        return xy

    counted.__wrapped__ = fast_layout.first_valid_draw
    monkeypatch.setattr(fast_layout, "first_valid_draw", counted)
    for seed in range(60):
        stock, fast = generators(config, seed)
        for _ in range(4):  # successive layouts from one stream, as successive resets draw them
            attempts += 1
            ok = stock.sample_layout()
            assert fast.sample_layout() == ok
            assert same_state(stock, fast)
            if not ok:
                failures += 1
                continue
            assert list(fast.layout) == list(stock.layout)
            for key, value in stock.layout.items():
                assert fast.layout[key].dtype == value.dtype and fast.layout[key].tobytes() == value.tobytes(), key
        assert stock.random_rot() == fast.random_rot()  # the draws after a layout
    if name in ("PointGoalHazard", "PointButtonHazard with gremlins", "crowded"):
        assert 0 < failures < attempts  # it did cover layouts drawn again (an object rejected 100 times) and kept ones
    if name in ("SafetyCarButton1", "crowded"):
        assert blocks["accepted"] > 0 and blocks["rejected"] > 0  # and objects placed by a block, rewound
    assert attempts == 240


def test_first_valid_draw_leaves_the_stream_after_the_accepted_try():
    rectangle = (-1.0, -1.0, 1.0, 1.0)
    placed, thresholds = np.array([[0.0, 0.0]]), np.array([1.2])  # only the corners of the square are far enough
    state = np.random.RandomState(5)
    reference = np.random.RandomState(5)
    for _ in range(20):
        xy = first_valid_draw(state, rectangle, placed, thresholds, 99)
        tries = 0
        while True:  # the definition: one uniform x, one uniform y per try, accepted when not closer than 1.2
            tries += 1
            candidate = np.array([reference.uniform(-1.0, 1.0), reference.uniform(-1.0, 1.0)])
            if not np.sqrt(np.sum(np.square(candidate - placed[0]))) < 1.2:
                break
            if tries == 99:
                candidate = None
                break
        if candidate is None:
            assert xy is None
        else:
            assert xy is not None and xy.tobytes() == candidate.tobytes()
        assert state.random_sample() == reference.random_sample()
    # never valid: None, and all the tries' draws consumed
    nowhere = np.random.RandomState(1)
    assert first_valid_draw(nowhere, rectangle, placed, np.array([10.0]), 50) is None
    np.testing.assert_array_equal(nowhere.random_sample(3), np.random.RandomState(1).random_sample(103)[100:])


def test_upstream_generator_without_fast_reset(monkeypatch):
    from sb3_metacpo.tasks import safety_gym

    monkeypatch.setattr(safety_gym, "FAST_RESET", False)
    dist = make_task_distribution("PointGoalHazard", seed=0)
    env = dist.make_env(dist.sample(1)[0])
    env.reset(seed=0)
    assert type(env.unwrapped.task.random_generator) is RandomGenerator
    assert isinstance(gym.make("SafetyPointGoal1Gymnasium-v0").unwrapped.task.random_generator, RandomGenerator)
