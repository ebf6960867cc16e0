from sb3_metacpo.meta_trpo.meta_trpo import MetaTRPO

__all__ = ["MetaTRPO"]
