"""A study file: what is compared (methods and their grids), on what (data, teacher, student config), how often (seeds).

A study is a python file defining `study = dict(...)` (and optionally `quick = dict(...)`, whose keys replace the
study's under --quick), in the spirit of the config files. docs/study.md lists every key. Everything is checked
here, before any data is generated or anything trained; the per-run configs are checked in validation.py.
"""
import copy
import itertools
import os
import re
import runpy
from dataclasses import dataclass, field

from arcface.errors import ConfigError, did_you_mean

STUDY_KEYS = ("name", "student", "seeds", "primary", "fars", "bootstrap", "data", "teacher", "train", "methods")
DATA_KEYS = ("folder", "make_synthetic", "val", "test")
SPLIT_KEYS = ("ijb", "target", "bin")
TEACHER_KEYS = ("config", "set", "weights", "network", "network_kwargs", "embedding_size", "cache")
METHOD_KEYS = ("name", "losses", "kd", "grid", "baseline")
DEFAULT_FARS = (1e-3, 1e-4, 1e-5)
NO_KD_POINT = "default"


def _fail(where, message):
    raise ConfigError(f"{where}: {message}")


def _check_keys(where, given, known):
    if not isinstance(given, dict):
        _fail(where, f"must be a dict, got {type(given).__name__}")
    for key in given:
        if key not in known:
            _fail(where, f"unknown key '{key}'{did_you_mean(key, known)} (known: {', '.join(known)})")


def format_value(value):
    """30.0 -> '30', 0.25 -> '0.25': how grid values appear in run names and tables."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def slug(text):
    """A folder-safe form of a method name or grid point ('no KD' -> 'no-kd')."""
    out = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", str(text)).strip("-").lower()
    return out or "x"


@dataclass(frozen=True)
class GridAxis:
    """One axis of a method's grid: every path in `paths` takes the same value (several paths: a tied axis)."""

    paths: tuple
    values: tuple


@dataclass
class Method:
    name: str
    losses: dict = None          # kd.losses; None: distillation off (the plain student)
    kd: dict = field(default_factory=dict)  # other kd keys, e.g. {'projector': 'linear'}
    grid: tuple = ()             # GridAxis, ...
    baseline: bool = False

    @property
    def kd_enabled(self):
        return self.losses is not None

    def points(self):
        """Every grid point as {path: value}, in grid order (the cartesian product of the axes)."""
        if not self.grid:
            return [{}]
        out = []
        for combo in itertools.product(*(axis.values for axis in self.grid)):
            point = {}
            for axis, value in zip(self.grid, combo):
                for path in axis.paths:
                    point[path] = value
            out.append(point)
        return out

    def apply(self, point):
        """(kd.losses, other kd keys) of one grid point."""
        losses = copy.deepcopy(self.losses)
        kd = copy.deepcopy(self.kd)
        for path, value in point.items():
            if "." in path:
                term, param = path.split(".", 1)
                losses[term][param] = value
            else:
                kd[path] = value
        return losses, kd


def point_label(point):
    """'fc.weight=30' or 'iled.weight=10,rpsd.weight=30'; the no-grid point is 'default'."""
    return ",".join(f"{k}={format_value(v)}" for k, v in point.items()) if point else NO_KD_POINT


def _number_list(where, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        _fail(where, f"must be a list of values, got {values!r}")
    values = tuple(values)
    if not values:
        _fail(where, "is an empty grid; give at least one value (or leave the axis out)")
    if len(set(map(repr, values))) != len(values):
        _fail(where, f"lists a value twice: {list(values)}")
    return values


def _parse_grid(where, method, grid):
    if not isinstance(grid, dict):
        _fail(where, f"grid must be a dict {{path: [values]}}, e.g. {{'fc.weight': [3, 10, 30]}}, got {grid!r}")
    if grid and method.losses is None:
        _fail(where, "has a grid but no losses; a grid varies loss parameters or kd keys of a KD method")
    axes, seen = [], set()
    for key, values in grid.items():
        paths = tuple(key) if isinstance(key, tuple) else (key,)
        for path in paths:
            if not isinstance(path, str) or not path:
                _fail(where, f"grid path {path!r} must be a string 'term.parameter' or a kd key")
            if path in seen:
                _fail(where, f"grid path '{path}' appears twice")
            seen.add(path)
            if "." in path:
                term = path.split(".", 1)[0]
                if term not in method.losses:
                    _fail(where, f"grid path '{path}': the method has no KD term '{term}'"
                                 f"{did_you_mean(term, method.losses)} (terms: {', '.join(method.losses)})")
            elif path in ("losses", "enabled"):
                _fail(where, f"grid path '{path}' cannot be varied (give loss parameters as 'term.parameter')")
        axes.append(GridAxis(paths, _number_list(f"{where} grid '{key}'", values)))
    return tuple(axes)


def _parse_method(where, entry):
    _check_keys(where, entry, METHOD_KEYS)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        _fail(where, f"needs a 'name' (a non-empty string), got {name!r}")
    where = f"{where} ('{name}')"
    losses = entry.get("losses")
    if losses is not None:
        if not isinstance(losses, dict) or not losses:
            _fail(where, f"losses must be a non-empty kd.losses dict {{term: {{'weight': w, ...}}}}, got {losses!r}")
        for term, params in losses.items():
            if not isinstance(params, dict):
                _fail(where, f"losses['{term}'] must be a dict of the term's weight and parameters, got {params!r}")
        losses = copy.deepcopy(dict(losses))
    kd = entry.get("kd") or {}
    if not isinstance(kd, dict):
        _fail(where, f"kd must be a dict of kd keys, got {kd!r}")
    for key in ("enabled", "losses"):
        if key in kd:
            _fail(where, f"kd['{key}'] is set by the study (give the losses as the method's 'losses')")
    if kd and losses is None:
        _fail(where, "sets kd keys but has no losses (distillation is off for it)")
    method = Method(name=name.strip(), losses=losses, kd=copy.deepcopy(dict(kd)),
                    baseline=bool(entry.get("baseline", False)))
    method.grid = _parse_grid(where, method, entry.get("grid", {}))
    return method


@dataclass
class SplitSpec:
    ijb: str
    target: str = "IJBC"
    bin: str = None


@dataclass
class Study:
    path: str
    name: str
    student: str
    seeds: tuple
    primary: str
    fars: tuple
    bootstrap: int
    data: dict
    val: SplitSpec
    test: SplitSpec
    teacher: dict
    train: dict
    methods: list
    quick: bool = False

    @property
    def baselines(self):
        return [m for m in self.methods if m.baseline]

    def method(self, name):
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"{self.path}: no method '{name}'{did_you_mean(name, [m.name for m in self.methods])}")

    def metric_names(self):
        from .evaluation import metric_name
        names = [metric_name(f) for f in self.fars]
        if self.test.bin:
            names.append("accuracy")
        return names


def _resolve(path, base_dir):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _parse_split(where, entry, folder):
    _check_keys(where, entry, SPLIT_KEYS)
    if not entry.get("ijb"):
        _fail(where, "needs 'ijb': the IJB-style folder of the split (relative to data.folder)")
    target = str(entry.get("target", "IJBC")).upper()
    if target not in ("IJBB", "IJBC"):
        _fail(where, f"target must be IJBB or IJBC (the meta files' prefix), got {entry.get('target')!r}")
    return SplitSpec(ijb=_resolve(entry["ijb"], folder), target=target,
                     bin=_resolve(entry["bin"], folder) if entry.get("bin") else None)


def load_study(path, quick=False, cwd=None):
    """The checked Study of a study file (with its `quick` replacements when quick=True)."""
    cwd = cwd or os.getcwd()
    path = _resolve(path, cwd)
    if not os.path.isfile(path):
        raise ConfigError(f"study file not found: {path}")
    try:
        namespace = runpy.run_path(path)
    except Exception as exc:
        raise ConfigError(f"{path}: could not be executed: {type(exc).__name__}: {exc}") from exc
    raw = namespace.get("study")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: defines no `study = dict(...)` (see docs/study.md)")
    raw = dict(raw)
    if quick:
        replace = namespace.get("quick")
        if not isinstance(replace, dict):
            raise ConfigError(f"{path}: --quick needs a `quick = dict(...)` of the keys to replace (see docs/study.md)")
        _check_keys(f"{path}: quick", replace, STUDY_KEYS)
        raw.update(replace)
    where = f"{path}: study"
    _check_keys(where, raw, STUDY_KEYS)
    for key in ("student", "seeds", "data", "teacher", "methods"):
        if key not in raw:
            _fail(where, f"missing '{key}'")

    seeds = raw["seeds"]
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        _fail(where, f"seeds must be a list of integers, got {seeds!r}")
    seeds = tuple(seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        _fail(where, f"seeds must be integers, got {list(seeds)}")
    if len(seeds) < 2:
        _fail(where, f"seeds lists {len(seeds)} seed(s); intervals over seeds need at least 2 (3 or more advised)")
    if len(set(seeds)) != len(seeds):
        _fail(where, f"seeds lists a seed twice: {list(seeds)}")

    fars = tuple(float(f) for f in raw.get("fars", DEFAULT_FARS))
    if not fars or any(not (0 < f < 1) for f in fars):
        _fail(where, f"fars must be FARs in (0, 1), got {list(fars)}")
    bootstrap = raw.get("bootstrap", 1000)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 100:
        _fail(where, f"bootstrap must be an integer >= 100 (replicates), got {bootstrap!r}")

    data = raw["data"]
    _check_keys(f"{where} data", data, DATA_KEYS)
    if not data.get("folder"):
        _fail(f"{where} data", "needs 'folder' (the training set: train.rec/.idx, generated there with make_synthetic)")
    folder = _resolve(data["folder"], cwd)
    generator = data.get("make_synthetic")
    if generator is not None and not isinstance(generator, dict):
        _fail(f"{where} data", f"make_synthetic must be a dict of tools/make_synthetic.py options, got {generator!r}")
    for key in ("val", "test"):
        if key not in data:
            _fail(f"{where} data", f"missing '{key}' (the {'selection' if key == 'val' else 'reporting'} split)")
    val = _parse_split(f"{where} data.val", data["val"], folder)
    test = _parse_split(f"{where} data.test", data["test"], folder)
    if os.path.realpath(val.ijb) == os.path.realpath(test.ijb):
        _fail(f"{where} data", f"val and test name the same IJB folder {val.ijb}; they must hold disjoint identities")
    if val.bin and test.bin and os.path.realpath(val.bin) == os.path.realpath(test.bin):
        _fail(f"{where} data", f"val and test name the same .bin {val.bin}; they must hold disjoint identities")

    from .evaluation import metric_name
    metrics = [metric_name(f) for f in fars] + (["accuracy"] if val.bin and test.bin else [])
    primary = raw.get("primary", "TAR@1e-4")
    if primary not in metrics:  # accuracy is reported with a test .bin, chosen on only with a val .bin too
        _fail(where, f"primary '{primary}' is not one of the study's metrics ({', '.join(metrics)}; 'accuracy' needs "
                     "a .bin in both splits, a TAR@FAR needs its FAR in 'fars')")

    teacher = raw["teacher"]
    _check_keys(f"{where} teacher", teacher, TEACHER_KEYS)
    teacher = dict(teacher)
    if bool(teacher.get("config")) == bool(teacher.get("weights")):
        _fail(f"{where} teacher", "give either 'config' (the runner trains the teacher once) or 'weights' (a "
                                  "trained teacher's model.pt, with 'network' and 'embedding_size')")
    if teacher.get("weights") and not teacher.get("network"):
        _fail(f"{where} teacher", "'weights' needs 'network' (the teacher's get_model name, e.g. 'r34')")
    for key in ("config", "weights", "cache"):
        teacher[key] = _resolve(teacher.get(key), cwd)
    teacher["set"] = _overrides(f"{where} teacher.set", teacher.get("set", {}))

    methods = raw["methods"]
    if not isinstance(methods, (list, tuple)) or not methods:
        _fail(where, "methods must be a non-empty list of dict(name=..., losses=..., grid=...)")
    parsed = [_parse_method(f"{where} methods[{i}]", m) for i, m in enumerate(methods)]
    names = [m.name for m in parsed]
    for name in names:
        if names.count(name) > 1:
            _fail(where, f"two methods are called '{name}'")
    slugs = [slug(n) for n in names]
    for name, s in zip(names, slugs):
        if slugs.count(s) > 1:
            _fail(where, f"method names {[n for n, t in zip(names, slugs) if t == s]} share the folder name '{s}'")
    if not any(m.baseline for m in parsed):
        _fail(where, "no method is marked baseline=True; name the baselines every method is compared with")

    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Study(path=path, name=str(name) + ("-quick" if quick else ""), student=_resolve(raw["student"], cwd),
                 seeds=seeds, primary=primary, fars=fars, bootstrap=bootstrap, data=dict(data, folder=folder),
                 val=val, test=test, teacher=teacher, train=_overrides(f"{where} train", raw.get("train", {})),
                 methods=parsed, quick=quick)


def _overrides(where, given):
    """A {key: value} dict (or a list of 'key=value' strings) of config overrides, as an ordered dict."""
    if isinstance(given, dict):
        return dict(given)
    if isinstance(given, (list, tuple)):
        from arcface.config import parse_override
        out = {}
        for item in given:
            keys, value = parse_override(str(item))
            out[".".join(keys)] = value
        return out
    _fail(where, f"must be a dict {{key: value}} of config overrides, got {given!r}")

