"""KD studies: which distillation loss, at which weight, gives the best student, with error bars.

A study file names methods (kd.losses dicts with a grid over their weights or parameters), seeds, data and a
teacher; `plugins.ukd.tools.kd_study` trains every (method, grid point, seed) student with the training tool,
chooses each method's grid point on the validation split and reports its test numbers with intervals over seeds
and a paired subject bootstrap against the best baseline. docs/study.md describes the file and the outputs.
"""
from .spec import Method, Study, load_study

__all__ = ["Method", "Study", "load_study"]
