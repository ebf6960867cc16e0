"""Meta-learning really helps: a short, seeded meta-training on Toy2DNav beats adapting a random initialisation."""

import numpy as np

from sb3_metacpo import MetaCPO, make_task_distribution
from sb3_metacpo.common.evaluation import meta_evaluate

N_UPDATES, N_STEPS = 3, 400


def final_records(model, tasks):
    records = meta_evaluate(model, tasks, N_UPDATES, N_STEPS, n_eval_episodes=10, deterministic=True)
    return [record for record in records if record.n_updates == N_UPDATES]


def test_meta_trained_policy_adapts_better_and_safely():
    kwargs = dict(meta_batch_size=8, n_inner_updates=1, n_steps=N_STEPS, seed=0)
    dist = make_task_distribution("Toy2DNav", seed=0)
    tasks = dist.test_tasks(5)
    meta = MetaCPO("MlpPolicy", dist, **kwargs).learn(100_000)
    random_init = MetaCPO("MlpPolicy", make_task_distribution("Toy2DNav", seed=0), **kwargs)

    meta_final, random_final = final_records(meta, tasks), final_records(random_init, tasks)
    meta_return = np.mean([record.ep_rew_mean for record in meta_final])
    random_return = np.mean([record.ep_rew_mean for record in random_final])
    assert meta_return > random_return + 10, (meta_return, random_return)
    limit = meta.effective_cost_limit
    under = sum(record.ep_cost_mean <= limit for record in meta_final)
    assert under >= 3, [record.ep_cost_mean for record in meta_final]
