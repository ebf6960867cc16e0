"""Meta-TRPO (MAML-TRPO): the meta-update of MetaCPO with the cost constraint removed from every step."""

from __future__ import annotations

from typing import ClassVar, TypeVar

from stable_baselines3.common.type_aliases import MaybeCallback

from sb3_metacpo.metacpo.metacpo import MetaCPO

SelfMetaTRPO = TypeVar("SelfMetaTRPO", bound="MetaTRPO")


class MetaTRPO(MetaCPO):
    """MAML-TRPO: like :class:`MetaCPO`, but every inner, outer and adaptation update is a plain TRPO step.

    The cost is still measured and logged (``rollout/ep_cost_mean``, ``meta/*_cost_mean``) against ``cost_limit``,
    but it never constrains an update: this is the unconstrained baseline of the Meta-CPO paper. The arguments are
    those of :class:`MetaCPO`; the cost-specific ones (``dual_solver``, ``cost_gamma``, ``cost_confidence``,
    ``recovery``, ``meta_constraint``, ``meta_constraint_alpha``) have no effect on the updates.
    """

    _constrained: ClassVar[bool] = False

    def learn(
        self: SelfMetaTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MetaTRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMetaTRPO:
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)
