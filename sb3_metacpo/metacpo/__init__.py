from sb3_metacpo.metacpo.metacpo import MetaCPO

__all__ = ["MetaCPO"]
