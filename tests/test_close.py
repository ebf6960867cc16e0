"""``model.close()`` releases the envs and workers the model built for sampling; the run goes on as without it."""

from __future__ import annotations

import torch as th
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metacpo import CPO, MetaCPO, make_task_distribution
from sb3_metacpo.common.serialization import read_archive


def toy():
    return make_task_distribution("Toy2DNav", seed=0, max_episode_steps=50)


def flat(model) -> th.Tensor:
    return th.cat([value.detach().flatten() for value in model.policy.state_dict().values()])


def meta_run(close: bool, path):
    """learn, adapt, learn again, save: with ``close()`` after each step or never."""
    kwargs = dict(meta_batch_size=2, n_steps=100, seed=0, vec_env_cls=SubprocVecEnv, policy_kwargs=dict(net_arch=[16]))
    model = MetaCPO("MlpPolicy", toy(), **kwargs)
    released = []
    model.learn(400)
    if close:
        sampler = model.sampler
        model.close()
        released.append(sampler.vec_env)  # type: ignore[union-attr]
        assert model.sampler is None and model.env is None
    task = toy().test_tasks(1)[0]
    model.adapt(task, n_updates=1, n_steps=100)
    adapted = th.cat([value.flatten() for value in model.adapted_params.values()])  # type: ignore[union-attr]
    evaluation = model.evaluate_params(task, model.policy.actor_params(), n_episodes=2)
    if close:
        model.close()
        assert model._adaptation_sampler_cache is None
    model.learn(400, reset_num_timesteps=False)
    if close:
        model.close()
    saved = model.save(path)
    return model, adapted, evaluation, saved, released


def test_metacpo_close_releases_its_workers_and_the_run_goes_on_as_without_it(tmp_path):
    kept, kept_adapted, kept_evaluation, kept_path, _ = meta_run(False, tmp_path / "kept")
    closed, closed_adapted, closed_evaluation, closed_path, released = meta_run(True, tmp_path / "closed")
    assert released and all(vec_env.closed for vec_env in released)  # the SubprocVecEnv workers ended
    assert th.equal(flat(closed), flat(kept)) and th.equal(closed_adapted, kept_adapted)
    assert closed_evaluation.episode_costs == kept_evaluation.episode_costs
    # the archive of a closed model keeps the episode streams of its released samplers
    assert read_archive(closed_path)[0]["rng"] == read_archive(kept_path)[0]["rng"]
    resumed = [MetaCPO.load(path, env=toy()) for path in (kept_path, closed_path)]
    for model in resumed:
        model.learn(400, reset_num_timesteps=False)
    assert th.equal(flat(resumed[0]), flat(resumed[1]))  # the closed model's archive resumes as the other's
    kept.close()
    closed.close()  # twice is harmless


def test_cpo_close_releases_its_adaptation_sampler_and_keeps_the_env_it_was_given():
    def run(close: bool) -> tuple[th.Tensor, tuple[float, ...]]:
        model = CPO("MlpPolicy", toy(), n_steps=100, seed=0, policy_kwargs=dict(net_arch=[16]))
        model.learn(200)
        task = toy().test_tasks(1)[0]
        model.adapt(task, n_updates=1, n_steps=100)
        if close:
            model.close()
            assert model._adaptation_sampler_cache is None and model.get_env() is not None
        model.learn(200, reset_num_timesteps=False)
        evaluation = model.evaluate_params(task, model.policy.actor_params(), n_episodes=2)
        return flat(model), evaluation.episode_costs + evaluation.episode_rewards

    kept, closed = run(False), run(True)
    assert th.equal(kept[0], closed[0]) and kept[1] == closed[1]
