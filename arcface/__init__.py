"""arcface: an arcface_torch-compatible face-recognition training engine (Partial FC, margin softmax heads,
iResNet / MobileFaceNet / ViT backbones with insightface's state dicts, python configs, torchrun).

The public API, importable from here (each name is loaded on first use, so `import arcface` stays cheap):

    load_config, base_config, validate            configs (arcface/config.py)
    Trainer, train                                 the training loop (arcface/engine/trainer.py)
    get_model, list_models, load_backbone_weights  backbones by name (arcface/backbones/)
    PartialFC_V2, CombinedMarginLoss               the classification head (partial_fc.py, losses.py)
    Plugin, register_plugin, ConfigSection,        the plugin mechanism (arcface/engine/plugins.py, hooks.py)
    StepBatch, TrainContext
    UKDError, ConfigError, DataError,              the errors every tool reports as one line (errors.py)
    CheckpointError, TrainingDiverged

Command-line tools: arcface/tools/ (console scripts ukd-train, ukd-eval-ijb, ...).
"""
import importlib

_PUBLIC = {
    "load_config": "arcface.config", "base_config": "arcface.config", "validate": "arcface.config",
    "Trainer": "arcface.engine.trainer", "train": "arcface.engine.trainer",
    "get_model": "arcface.backbones", "list_models": "arcface.backbones",
    "load_backbone_weights": "arcface.backbones",
    "PartialFC_V2": "arcface.partial_fc", "CombinedMarginLoss": "arcface.losses",
    "Plugin": "arcface.engine.plugins", "register_plugin": "arcface.engine.plugins",
    "ConfigSection": "arcface.engine.plugins", "StepBatch": "arcface.engine.plugins",
    "TrainContext": "arcface.engine.plugins",
    "UKDError": "arcface.errors", "ConfigError": "arcface.errors", "DataError": "arcface.errors",
    "CheckpointError": "arcface.errors", "TrainingDiverged": "arcface.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'arcface' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return __all__
