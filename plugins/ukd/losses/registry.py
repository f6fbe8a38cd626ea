"""The table of KD losses: `@register_kd_loss(name)` on a KDLoss subclass, `build_kd_loss(name, **params)`.

A loss is one file: every module of this package is imported before a loss is looked up, so a new file here is
found without an import line anywhere; a loss in another installed package registers through the
`ukd.kd_losses` entry point group (its module is imported the same way).
"""
import importlib
import importlib.metadata
import pkgutil

from arcface.errors import ConfigError
from arcface.registry import Registry

KD_LOSSES = Registry("KD loss")
ENTRY_POINT_GROUP = "ukd.kd_losses"
_LOADED = []


def register_kd_loss(name):
    def deco(cls):
        KD_LOSSES.register(name)(cls)
        cls.name = name
        return cls
    return deco


def load_losses():
    """Import every loss module of this package and of the `ukd.kd_losses` entry points, once."""
    if _LOADED:
        return
    _LOADED.append(True)
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_") and info.name not in ("base", "registry"):
            importlib.import_module(f"{package}.{info.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            raise ConfigError(f"KD loss entry point '{entry.name} = {entry.value}' (group {ENTRY_POINT_GROUP}) "
                              f"cannot be imported: {type(exc).__name__}: {exc}") from exc


def kd_loss_class(name):
    load_losses()
    return KD_LOSSES.get(name)


def build_kd_loss(name, **kwargs):
    load_losses()
    return KD_LOSSES.build(name, **kwargs)
