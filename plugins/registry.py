"""The plugin and KD-loss registries: `@register_plugin`, `build_plugins(cfg)`, `@register_kd_loss`, `build_kd_loss`.

A plugin is switched on either by listing its name in `cfg.plugins`, or, when it was registered with a
`config_key`, by `cfg.<config_key>.enabled = True` (the UKD plugin uses `kd`).
"""
from arcface.engine.hooks import Plugin  # noqa: F401  (re-exported for plugin authors)
from arcface.errors import ConfigError
from arcface.registry import Registry, check_kwargs

PLUGINS = Registry("plugin")
KD_LOSSES = Registry("KD loss")
_CONFIG_KEYS = {}


def register_plugin(name, config_key=None):
    def deco(cls):
        PLUGINS.register(name)(cls)
        cls.name = name
        if config_key:
            _CONFIG_KEYS[name] = config_key
        return cls
    return deco


def register_kd_loss(name):
    def deco(cls):
        KD_LOSSES.register(name)(cls)
        cls.name = name
        return cls
    return deco


def _import_builtin():
    # Importing the packages runs their @register decorators.
    import plugins.builtin  # noqa: F401
    import plugins.ukd  # noqa: F401


def enabled_plugins(cfg):
    """[(name, parameters)] of the plugins the config switches on."""
    _import_builtin()
    from plugins.builtin import parse_plugin_entry
    entries = [parse_plugin_entry(e) for e in (cfg.get("plugins") or [])]
    names = [n for n, _ in entries]
    for name, key in _CONFIG_KEYS.items():
        section = cfg.get(key)
        validate = getattr(PLUGINS.get(name), "validate_section", None)
        if isinstance(section, dict) and validate is not None:
            validate(section)  # unknown keys are errors even while the plugin is off
        if isinstance(section, dict) and section.get("enabled", False) and name not in names:
            entries.append((name, {}))
    return entries


def build_plugins(cfg):
    plugins = []
    for name, params in enabled_plugins(cfg):
        cls = PLUGINS.get(name)  # unknown name: ConfigError with a suggestion
        check_kwargs(cls, dict(params, cfg=cfg), f"plugin '{name}'")
        plugins.append(cls(cfg, **params))
    return plugins


def build_kd_loss(name, **kwargs):
    _import_builtin()
    return KD_LOSSES.build(name, **kwargs)


__all__ = ["Plugin", "register_plugin", "register_kd_loss", "build_plugins", "build_kd_loss",
           "PLUGINS", "KD_LOSSES", "ConfigError"]
