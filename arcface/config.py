"""Config files as in arcface_torch: `config = edict(...)` in python, the defaults merged under a job file.

Differences from upstream, all for safety: the job file may live anywhere (upstream requires `configs/`
and the working directory), the defaults ship with the package (arcface/config_defaults.py), unknown keys are
an error naming the nearest known key, values given on the command line (`--set lr=0.05 kd.enabled=True`)
override the file, and legacy keys of older upstream configs are accepted and reported as ignored.

The engine checks its own keys only. A top-level key owned by a plugin (found through the plugin registry,
arcface/engine/plugins.py) gets that plugin's defaults and is checked by the plugin.
"""
import ast
import difflib
import logging
import os
import runpy
from pathlib import Path

from easydict import EasyDict as edict

from .config_defaults import engine_defaults
from .config_keys import ALL_KEYS, DERIVED_KEYS, KEY_ALIASES, LEGACY_KEYS
from .engine.plugins import PLUGINS, discover_plugins, parse_plugin_entry, plugin_sections, validate_sections
from .errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)


def unknown_key_error(key, known, where):
    if key in DERIVED_KEYS:
        return ConfigError(f"{where}: '{key}' is not a config key: it is {DERIVED_KEYS[key]}; remove it")
    hint = "every key is listed in docs/configs.md"
    if not plugin_sections():
        hint += ("; no plugin with a config section is registered: `pip install -e .` registers this project's "
                 "plugins (e.g. the KD plugin's `kd`)")
    return ConfigError(f"{where}: unknown config key '{key}'{suggest_key(key, known)} ({hint})")


def suggest_key(key, known):
    """'; did you mean ...?' by meaning (KEY_ALIASES: the names other trainers use) or else by spelling."""
    alias = KEY_ALIASES.get(str(key).lower().replace("-", "_"))
    if alias in known:
        return f"; did you mean '{alias}'?"
    spelled = difflib.get_close_matches(str(key), list(known) + list(KEY_ALIASES), n=1, cutoff=0.6)
    if spelled:
        return f"; did you mean '{KEY_ALIASES.get(spelled[0], spelled[0])}'?"
    return did_you_mean(key, known)


def base_config():
    """What an empty job file loads to: the engine's defaults and the defaults of every registered plugin's
    config section."""
    discover_plugins()
    cfg = engine_defaults()
    for key, cls in plugin_sections().items():
        cfg[key] = cls.config_section.defaults()
    return cfg


def _load_py(path):
    path = Path(path)
    if not path.exists() and path.suffix != ".py" and path.with_suffix(".py").exists():
        path = path.with_suffix(".py")  # upstream style: `configs/ms1mv3_r50` without .py
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # syntax errors and the like, with the file named
        raise ConfigError(f"{path}: could not be executed: {type(exc).__name__}: {exc}") from exc
    if "config" not in namespace:
        raise ConfigError(f"{path}: defines no `config` (expected `config = edict()` as in arcface_torch)")
    return path, namespace["config"]


def parse_override(text):
    """'a.b=value' -> (['a', 'b'], python value); values are python literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().split("."), value


def _to_edict(value):
    if isinstance(value, dict) and not isinstance(value, edict):
        return edict(value)
    return value


def load_config(path, overrides=()):
    """Return the merged, validated EasyDict for a job file (plus `key=value` overrides)."""
    path, job = _load_py(path)
    overrides = [parse_override(item) for item in overrides]
    modules = job.get("plugin_modules") or []
    for keys, value in overrides:
        if keys == ["plugin_modules"]:
            modules = value
    discover_plugins(modules if isinstance(modules, (list, tuple)) else [modules])
    cfg = base_config()
    sections = plugin_sections()
    known = set(ALL_KEYS) | set(sections)
    for key, value in dict(job).items():
        if key not in known:
            raise unknown_key_error(key, known, str(path))
        if key in LEGACY_KEYS:
            log.warning("%s: legacy key '%s' is ignored (%s)", path, key, LEGACY_KEYS[key])
        if key in sections and isinstance(value, dict):
            merged = edict(cfg[key])  # a section the job writes in part keeps the other defaults
            merged.update(value)
            value = merged
        cfg[key] = _to_edict(value)
    for keys, value in overrides:
        if keys[0] not in known:
            raise unknown_key_error(keys[0], known, "--set")
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = edict()
            node = node[k]
        node[keys[-1]] = _to_edict(value)
    cfg.config_name = path.stem
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", path.stem)
    validate(cfg, str(path))
    return cfg


def validate(cfg, where="config"):
    """Value checks that would otherwise fail deep inside training (after the data is set up, or mid-run)."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"{where}: {msg}")

    def number(key, low=None, high=None, low_open=False, integer=False, optional=False):
        value = cfg.get(key)
        if value is None and optional:
            return
        kind = "an int" if integer else "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
        if ok and integer:
            ok = float(value).is_integer()
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
            ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            bounds.append(f"<= {high}")
            ok = ok and value <= high
        need(ok, f"`{key}` must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}"
                 f"{' (or None)' if optional else ''}, got {value!r}")

    need(cfg.rec is not None, "`rec` is not set (a dataset folder with train.rec/train.idx, an image folder, or "
                              "'synthetic')")
    number("num_classes", 1, integer=True)
    number("batch_size", 1, integer=True)
    number("embedding_size", 1, integer=True)
    number("input_size", 1, integer=True)
    need(isinstance(cfg.margin_list, (list, tuple)) and len(tuple(cfg.margin_list)) == 3,
         f"`margin_list` must be (m1, m2, m3), got {cfg.margin_list!r}")
    number("margin_scale", 0, low_open=True)
    need(cfg.optimizer in ("sgd", "adamw"), f"`optimizer` must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    number("lr", 0, low_open=True)
    number("momentum", 0, 1)
    number("weight_decay", 0)
    number("sample_rate", 0, 1, low_open=True)
    number("gradient_acc", 1, integer=True)
    number("num_epoch", 0, integer=True)
    number("max_steps", 1, integer=True, optional=True)
    need(cfg.num_epoch > 0 or cfg.max_steps, "`num_epoch` = 0 needs `max_steps` (the run's length in steps)")
    number("warmup_epoch", None)
    number("frequent", 1, integer=True)
    number("verbose", 1, integer=True)
    number("save_every_steps", 0, integer=True)
    number("clip_grad_norm", None)
    number("num_workers", 0, integer=True)
    number("num_threads", 1, integer=True, optional=True)
    number("seed", 0, integer=True)
    number("dist_timeout", 0, low_open=True)
    need(cfg.margin_gradient in ("straight_through", "exact"),
         f"`margin_gradient` must be 'straight_through' or 'exact', got {cfg.margin_gradient!r}")
    need(cfg.sampler in ("random", "pk"), f"`sampler` must be 'random' or 'pk', got {cfg.sampler!r}")
    if cfg.sampler == "pk":
        number("pk_k", 1, integer=True)
        number("pk_random_fraction", 0, 1)
    if cfg.dali:
        odd = [f"{k}={cfg[k]!r}" for k, default in (("sampler", "random"), ("skip_bad_records", False))
               if cfg[k] != default]
        need(not odd, f"dali=True reads train.rec in DALI's own shuffled order and cannot honour {', '.join(odd)}; "
                      "set dali=False to use them")
    need(cfg.device in ("auto", "cpu", "cuda"), f"`device` must be auto, cpu or cuda, got {cfg.device!r}")
    need(isinstance(cfg.val_targets, (list, tuple)), f"`val_targets` must be a list of names, got {cfg.val_targets!r}")
    need(isinstance(cfg.network_kwargs, dict), f"`network_kwargs` must be a dict, got {cfg.network_kwargs!r}")
    need(isinstance(cfg.get("plugins", []), (list, tuple)), f"`plugins` must be a list, got {cfg.get('plugins')!r}")
    modules = cfg.get("plugin_modules", [])
    need(isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules),
         f"`plugin_modules` must be a list of module names, got {modules!r}")
    discover_plugins(modules)
    for entry in cfg.get("plugins") or []:
        try:
            PLUGINS.get(parse_plugin_entry(entry)[0])
        except ConfigError as exc:
            raise ConfigError(f"{where}: `plugins`: {exc}") from None
    return validate_sections(cfg, where)
