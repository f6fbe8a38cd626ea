"""The engine's plugin mechanism: the registry, how plugins are found, the config sections they own, building them.

The engine imports no plugin. A plugin is a `Plugin` subclass in any module, registered by `@register_plugin`
when its module is imported. Modules are imported from two places before a config is checked:

- the `arcface.plugins` entry point group of installed packages (this project declares its own plugins there in
  setup.cfg, so `pip install` is all it takes), and
- `config.plugin_modules`, a list of module names, for a plugin that is not packaged (a file on `PYTHONPATH`).

A plugin with a `config_section` owns that top-level config key (UKD owns `kd`): the config loader merges the
section's defaults with the user's values and hands the result to the plugin's `validate_section`; the engine
checks nothing inside it. The plugin is switched on by `<section>.enabled = True`, or, for any plugin, by
naming it in `config.plugins`.
"""
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from easydict import EasyDict as edict

from ..errors import ConfigError, did_you_mean
from ..registry import Registry, check_kwargs
from .hooks import Plugin, StepBatch, TrainContext

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "arcface.plugins"
PLUGINS = Registry("plugin")
_SECTIONS: Dict[str, type] = {}        # config key -> the plugin class that owns it
_IMPORTED: set = set()                 # entry points and modules imported already


@dataclass(frozen=True)
class ConfigSection:
    """A top-level config key owned by a plugin: its keys with (default, meaning), for validation and the docs."""
    key: str
    keys: Mapping[str, Tuple[Any, str]]
    intro: str = ""      # a paragraph for docs/configs.md
    example: str = ""    # a python snippet for docs/configs.md
    switch: Optional[str] = "enabled"   # the key that switches the plugin on (None: on whenever present)

    def defaults(self) -> edict:
        return edict({name: _copy(default) for name, (default, _) in self.keys.items()})

    def resolve(self, value, where=None) -> edict:
        """The defaults merged with the user's values; an unknown key is a ConfigError naming the nearest one."""
        where = where or f"config.{self.key}"
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a dict (e.g. `config.{self.key} = edict(...)`), got {value!r}")
        out = self.defaults()
        for name, item in value.items():
            if name not in self.keys:
                raise ConfigError(f"{where}: unknown key '{name}'{did_you_mean(name, self.keys)} "
                                  f"(the keys of `{self.key}` are listed in docs/configs.md)")
            out[name] = edict(item) if isinstance(item, dict) and not isinstance(item, edict) else item
        return out

    def enabled(self, section) -> bool:
        if self.switch is None:
            return True
        return bool((section or {}).get(self.switch, False))


def _copy(value):
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else \
        list(value) if isinstance(value, list) else value


def register_plugin(name):
    """Class decorator: make a Plugin subclass buildable by name (and its config section known)."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise TypeError(f"@register_plugin('{name}') decorates {cls!r}, which is not a Plugin subclass")
        PLUGINS.register(name)(cls)
        cls.name = name
        section = getattr(cls, "config_section", None)
        if section is not None:
            owner = _SECTIONS.get(section.key)
            if owner is not None and owner is not cls:
                raise ValueError(f"config section '{section.key}' is claimed by two plugins: "
                                 f"{owner.name} and {name}")
            _SECTIONS[section.key] = cls
        return cls
    return deco


def discover_plugins(modules=()):
    """Import the installed plugins (entry points) once, then the named modules; both register their plugins."""
    if ENTRY_POINT_GROUP not in _IMPORTED:
        _IMPORTED.add(ENTRY_POINT_GROUP)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as exc:
                raise ConfigError(f"plugin entry point '{entry.name} = {entry.value}' (group {ENTRY_POINT_GROUP}) "
                                  f"cannot be imported: {type(exc).__name__}: {exc}") from exc
    for module in modules or ():
        if not isinstance(module, str) or not module:
            raise ConfigError(f"plugin_modules entries must be module names, got {module!r}")
        if module in _IMPORTED:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugin_modules: cannot import '{module}': {exc} (is it on PYTHONPATH?)") from exc
        _IMPORTED.add(module)


def plugin_sections() -> Dict[str, type]:
    """{config key: plugin class} of every registered plugin that owns a section."""
    return dict(_SECTIONS)


def validate_sections(cfg, where="config"):
    """Replace every plugin section of cfg by its resolved, plugin-validated form (also while it is off)."""
    for key, cls in _SECTIONS.items():
        cfg[key] = cls.validate_section(cls.config_section.resolve(cfg.get(key), f"{where}: {key}"))
    return cfg


def parse_plugin_entry(entry):
    """cfg.plugins entries are a name or a dict {"name": ..., **parameters}."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and "name" in entry:
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}
    raise ConfigError(f"config.plugins entry {entry!r} must be a name or a dict with a 'name' key")


def enabled_plugins(cfg):
    """[(name, parameters)] of the plugins the config switches on, in order: cfg.plugins, then sections."""
    discover_plugins(cfg.get("plugin_modules") or ())
    entries = [parse_plugin_entry(e) for e in (cfg.get("plugins") or [])]
    names = {name for name, _ in entries}
    for key, cls in _SECTIONS.items():
        if cls.config_section.enabled(cfg.get(key)) and cls.name not in names:
            entries.append((cls.name, {}))
    return entries


def build_plugins(cfg):
    plugins = []
    for name, params in enabled_plugins(cfg):
        cls = PLUGINS.get(name)  # unknown name: ConfigError with a suggestion
        check_kwargs(cls, dict(params, cfg=cfg), f"plugin '{name}'")
        plugins.append(cls(cfg, **params))
    return plugins


__all__ = ["ConfigSection", "Plugin", "StepBatch", "TrainContext", "PLUGINS", "ENTRY_POINT_GROUP",
           "register_plugin", "discover_plugins", "plugin_sections", "validate_sections", "enabled_plugins",
           "build_plugins", "parse_plugin_entry"]
