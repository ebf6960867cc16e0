from sb3_metacpo.cpo.cpo import CPO

__all__ = ["CPO"]
