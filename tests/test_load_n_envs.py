"""CPO.load with an env of another number of envs than the saved model's: n_steps is per env and per update, the
number of envs is the given env's (or load's n_envs for an env the model builds), and learn counts accordingly."""

import warnings

import pytest
from stable_baselines3.common.env_util import make_vec_env

from sb3_metacpo import CPO, MetaCPO, make_task_distribution


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A CPO model trained on 4 envs of 100 steps per update."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = CPO("MlpPolicy", dist, n_envs=4, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(400)
    path = tmp_path_factory.mktemp("model") / "cpo.zip"
    model.save(path)
    return path, dist


def fine_tune(model, n_updates, reset_num_timesteps):
    start, updates = model.num_timesteps, model._n_updates
    model.learn(n_updates * model.n_steps * model.n_envs, reset_num_timesteps=reset_num_timesteps)
    steps = model.num_timesteps - (0 if reset_num_timesteps else start)
    return steps, model._n_updates - updates


@pytest.mark.parametrize("reset_num_timesteps", [True, False])
@pytest.mark.parametrize(
    ("make_env", "kwargs", "n_envs"),
    [
        (lambda dist, task: make_vec_env(lambda: dist.make_env(task), n_envs=2, seed=0), {}, 2),  # a VecEnv: its envs
        (lambda dist, task: dist.make_env(task), {}, 1),  # an env object: one
        (lambda dist, task: task, {"n_envs": 1}, 1),  # an env the model builds: load's n_envs
        (lambda dist, task: dist, {"n_envs": 3}, 3),
    ],
    ids=["vec_env_of_2", "env", "task_n_envs_1", "distribution_n_envs_3"],
)
def test_load_with_another_number_of_envs_does_what_it_says(saved, make_env, kwargs, n_envs, reset_num_timesteps):
    path, dist = saved
    env = make_env(dist, dist.test_tasks(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the number of envs is the one asked for
        model = CPO.load(path, env=env, n_steps=50, **kwargs)
    assert model.n_envs == n_envs and model.env.num_envs == n_envs and model.n_steps == 50
    # learn(3 x n_steps x n_envs) is 3 updates of n_steps x n_envs env steps, not 1 update of the saved 4 envs
    assert fine_tune(model, 3, reset_num_timesteps) == (3 * 50 * n_envs, 3)
    assert model._rollout.rewards.shape == (50, n_envs)


def test_load_says_when_it_builds_the_saved_number_of_envs(saved):
    path, dist = saved
    task = dist.test_tasks(1)[0]
    with pytest.warns(UserWarning, match=r"builds 4 envs .*the saved n_envs.*= 4000 env steps.*Pass n_envs="):
        model = CPO.load(path, env=task, n_steps=1000)
    assert model.n_envs == 4


def test_meta_cpo_loaded_with_another_number_of_envs_resumes_from_its_seed(tmp_path):
    """MetaCPO.load(path, n_envs=4) of a 2-env model failed on resuming ("2 episode-stream states for a sampler of 4
    envs"): the saved streams are not those envs', so they start from the seed, and it says so."""
    dist = make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)
    model = MetaCPO("MlpPolicy", dist, meta_batch_size=2, n_steps=100, seed=0, policy_kwargs=dict(net_arch=[8]))
    model.learn(400)
    loaded = MetaCPO.load(model.save(tmp_path / "model"), n_envs=4)
    with pytest.warns(UserWarning, match="episode streams are for 2 envs, this model has 4"):
        loaded.learn(400, reset_num_timesteps=False)
    assert loaded.num_timesteps == 800 and loaded._n_updates == 2
