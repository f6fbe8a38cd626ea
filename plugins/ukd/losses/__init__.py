"""The KD losses, one per module; importing this package registers every one of them (@register_kd_loss)."""
from . import feature_consistency, iled, l2, rkd, rpsd, sp  # noqa: F401
from .base import KDLoss
from .feature_consistency import FeatureConsistencyLoss
from .iled import ILEDLoss
from .l2 import L2Loss
from .rkd import RKDLoss
from .rpsd import RPSDLoss
from .sp import SimilarityPreservingLoss

__all__ = ["KDLoss", "ILEDLoss", "RPSDLoss", "L2Loss", "FeatureConsistencyLoss", "RKDLoss",
           "SimilarityPreservingLoss"]
