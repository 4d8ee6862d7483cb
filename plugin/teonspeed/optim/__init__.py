from .optimizers import HTMuon, Muon, TEON
from .base import OrthoOptimizer

__all__ = ["Muon", "TEON", "HTMuon", "OrthoOptimizer"]
