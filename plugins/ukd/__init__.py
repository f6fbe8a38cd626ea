"""Unified knowledge distillation (ILED + RPSD) for face recognition, as an engine plugin."""
from . import losses  # noqa: F401  (registers the KD losses)
from . import plugin  # noqa: F401  (registers the 'ukd' plugin)
