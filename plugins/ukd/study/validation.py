"""Checks that must pass before a study trains anything: every run's config, the splits' identities, the cache.

A study of 40 runs that dies at run 23 on a misspelt loss parameter, or that reports numbers on a test split sharing
people with the validation split, wastes hours or, worse, misleads. So every run's full config is loaded through
the engine's loader and its KD section built through the KD-loss registry, the identity ranges of the generated
splits are compared, and a given teacher cache is checked against the training data, all up front.
"""
import os

from arcface.errors import ConfigError, DataError


def check_run_config(config_path, overrides, where):
    """Load one run's config and build its KD losses; a ConfigError names `where` (method, grid point, seed)."""
    from arcface.config import load_config

    try:
        cfg = load_config(config_path, [f"{k}={v!r}" for k, v in overrides.items()])
        kd_section = cfg.get("kd") or {}
        from plugins.ukd.config import resolve_kd_config
        kd = resolve_kd_config(kd_section)
        if kd.get("enabled"):
            composer = _build_composer(dict(kd.losses))
            check = getattr(composer, "check", None)
            if check is not None:
                check(int(cfg.batch_size), cfg.get("sampler") == "pk")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg


def _build_composer(losses):
    """The KD composer of a losses dict. A loss class without its own constructor takes any keyword through
    torch's Module.__init__ and fails with a TypeError: report that as a ConfigError naming the term."""
    from plugins.ukd.composer import KDComposer

    try:
        return KDComposer(losses)
    except TypeError as err:
        for term, entry in losses.items():
            try:
                KDComposer({term: entry})
            except TypeError as term_err:
                params = sorted(k for k in entry if k not in ("weight", "ramp_steps", "loss"))
                raise ConfigError(f"kd.losses.{term}: the loss does not take the parameter(s) {params} "
                                  f"({term_err})") from None
        raise ConfigError(f"kd.losses: {err}") from None


def _artifact_ranges(manifest):
    """{relative path of an artifact: (first identity, end)} of a generated folder, from its manifest."""
    from arcface.data.synthetic import artifact_splits

    splits = manifest["splits"]
    return {rel: tuple(splits[part]) for rel, part in artifact_splits(manifest["spec"]).items()}


def split_identity_ranges(data_folder, split, name):
    """[(path, (lo, hi))] of the identities of a split's files, read from the data folder's manifest; None for files
    outside a generated folder (their identities cannot be known)."""
    from arcface.data.synthetic import load_manifest

    manifest = load_manifest(data_folder)
    if manifest is None:
        return None
    ranges = _artifact_ranges(manifest)
    out = []
    for path in (split.ijb, split.bin):
        if not path:
            continue
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(data_folder))
        if rel not in ranges:
            return None
        out.append((path, ranges[rel]))
    return out


def check_disjoint_identities(data_folder, val, test):
    """Validation, test and training identities must not overlap (known for generated folders)."""
    from arcface.data.synthetic import load_manifest

    manifest = load_manifest(data_folder)
    if manifest is None:
        return "unchecked (the data folder has no generator manifest)"
    train = tuple(manifest["splits"]["train"])
    found = {}
    for name, split in (("val", val), ("test", test)):
        ranges = split_identity_ranges(data_folder, split, name)
        if ranges is None:
            return f"unchecked ({name} files are not artifacts of {data_folder})"
        found[name] = ranges
    for name, ranges in found.items():
        for path, (lo, hi) in ranges:
            if lo < train[1] and train[0] < hi:
                raise DataError(f"{name} split file {path} holds identities {lo}..{hi - 1}, which overlap the training "
                                f"identities {train[0]}..{train[1] - 1}")
    for vpath, (vlo, vhi) in found["val"]:
        for tpath, (tlo, thi) in found["test"]:
            if vlo < thi and tlo < vhi:
                raise DataError(f"the val split's {vpath} (identities {vlo}..{vhi - 1}) and the test split's {tpath} "
                                f"(identities {tlo}..{thi - 1}) share identities; selection and report must use "
                                "disjoint people")
    ranges = sorted({r for items in found.values() for _, r in items})
    return "disjoint: training " + f"{train[0]}..{train[1] - 1}, " + ", ".join(
        f"{name} " + "/".join(f"{lo}..{hi - 1}" for lo, hi in sorted({r for _, r in found[name]}))
        for name in ("val", "test")) if ranges else "disjoint"


def check_teacher_cache(path, rec, input_size, embedding_size, teacher_file=None):
    """A ConfigError (from the cache's own checks) unless `path` is a complete cache of this data and teacher."""
    from plugins.ukd.cache import dataset_identity, file_sha256, open_for_training

    if not os.path.isfile(path):
        raise ConfigError(f"teacher cache {path} does not exist")
    dataset = dataset_identity(rec, what="the study's teacher cache needs data.folder to be")
    sha = file_sha256(teacher_file) if teacher_file and os.path.isfile(teacher_file) else None
    cache = open_for_training(path, dataset, int(input_size), int(embedding_size), teacher_file, sha)
    close = getattr(cache, "close", None)
    if close is not None:
        close()
