"""Unified knowledge distillation (ILED + RPSD) for face recognition, as an engine plugin.

Importing the package registers the `ukd` plugin (config section `kd`) and the KD losses. The pieces a user of
the plugin or an author of a KD loss needs are re-exported here.
"""
from .batch import KDBatch, KDOutput
from .losses.base import KDLoss
from .losses.registry import KD_LOSSES, build_kd_loss, register_kd_loss
from .plugin import UKDPlugin

__all__ = ["KDBatch", "KDOutput", "KDLoss", "KD_LOSSES", "build_kd_loss", "register_kd_loss", "UKDPlugin"]
