"""Reader of insightface's IJB test-suite layout (`IJB_release/IJBB|IJBC`), without pandas.

    <root>/loose_crop/<img>.jpg
    <root>/meta/<p>_face_tid_mid.txt         "<img> <template_id> <media_id>"
    <root>/meta/<p>_template_pair_label.txt  "<tid1> <tid2> <0|1>"
    <root>/meta/<p>_name_5pts_score.txt      "<img> x1 y1 ... x5 y5 <faceness>"   (same row order as tid_mid)
    <root>/meta/<p>_1N_gallery_G1.csv, _G2.csv (IJB-B: _S1, _S2), <p>_1N_probe_mixed.csv   (1:N, optional)

with <p> = ijbb | ijbc. Every file problem is a DataError naming the file (and the line for bad rows).
"""
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError

TARGETS = ("IJBB", "IJBC")
GALLERY_NAMES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


@dataclass
class IJBImages:
    names: list          # image file names, in the row order of *_name_5pts_score.txt
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray     # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2]
    faceness: np.ndarray   # float32 [N]


@dataclass
class IJBPairs:
    t1: np.ndarray     # int64 [P]
    t2: np.ndarray     # int64 [P]
    label: np.ndarray  # int64 [P], 0 / 1


@dataclass
class IJBSearchSet:
    """A 1:N gallery or probe list: one row per (template, subject) from the CSV."""

    name: str
    templates: np.ndarray
    subjects: np.ndarray


def check_target(target):
    target = str(target).upper()
    if target not in TARGETS:
        raise ConfigError(f"--target must be IJBB or IJBC, got '{target}'")
    return target


def meta_path(root, target, suffix):
    return os.path.join(root, "meta", f"{check_target(target).lower()}_{suffix}")


def _require(path):
    if not os.path.isfile(path):
        raise DataError(f"IJB meta file {path} does not exist")


def _first_bad_line(path, expected_fields, parse):
    """Line number and text of the first row that does not parse (the slow path, only after a failure)."""
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != expected_fields:
                    raise ValueError
                parse(fields)
            except ValueError:
                return lineno, line.rstrip("\n")
    return None, None


def _int_columns(path, ncols, what):
    """All-integer whitespace table through numpy's C parser; a bad row is reported with its line number."""
    _require(path)
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        if table.shape[1] != ncols:
            raise ValueError
        return table
    except ValueError:
        lineno, line = _first_bad_line(path, ncols, lambda fields: [int(x) for x in fields])
        where = f"line {lineno}: {line!r}" if lineno else f"{ncols} integer columns expected"
        raise DataError(f"{path}: {where} is not '{what}'") from None


def read_pairs(path):
    table = _int_columns(path, 3, "<template_id_1> <template_id_2> <label 0|1>")
    label = table[:, 2]
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        raise DataError(f"{path}: line {int(bad[0]) + 1} has label {int(label[bad[0]])}; labels must be 0 or 1")
    return IJBPairs(t1=table[:, 0].copy(), t2=table[:, 1].copy(), label=label.copy())


def _named_rows(path, fields, convert, layout):
    """(names, rows) of `<img_name> v1 .. vk` lines: each row converted by `convert`; a malformed line is a
    DataError with its number and the expected layout."""
    _require(path)
    names, rows = [], []
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != fields:
                    raise ValueError
                rows.append([convert(x) for x in parts[1:]])
            except ValueError:
                raise DataError(f"{path}: line {lineno}: {line.rstrip()!r} is not '{layout}' "
                                f"({fields} fields, got {len(parts)})") from None
            names.append(parts[0])
    return names, rows


def read_face_tid_mid(path):
    """(names, templates, medias) of `<img> <template_id> <media_id>` rows."""
    names, rows = _named_rows(path, 3, int, "<img_name> <template_id> <media_id>")
    ids = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return names, ids[:, 0].copy(), ids[:, 1].copy()


def read_name_5pts_score(path):
    """(names, landmarks [N,5,2] float32, faceness [N] float32) of `<img> x1 y1 .. x5 y5 <score>` rows."""
    names, rows = _named_rows(path, 12, float, "<img_name> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <faceness_score>")
    values = np.asarray(rows, dtype=np.float32).reshape(-1, 11)
    return names, values[:, :10].reshape(-1, 5, 2).copy(), values[:, 10].copy()


def read_images(root, target):
    """The image table: tid_mid and 5pts rows must describe the same images in the same order."""
    tid_path = meta_path(root, target, "face_tid_mid.txt")
    pts_path = meta_path(root, target, "name_5pts_score.txt")
    names, templates, medias = read_face_tid_mid(tid_path)
    pts_names, landmarks, faceness = read_name_5pts_score(pts_path)
    if len(names) != len(pts_names):
        raise DataError(f"{tid_path} lists {len(names)} images but {pts_path} lists {len(pts_names)}; "
                        "they must be row-aligned")
    for row, (a, b) in enumerate(zip(names, pts_names)):
        if a != b:
            raise DataError(f"row {row + 1} names {a!r} in {tid_path} but {b!r} in {pts_path}; "
                            "the two files must list the same images in the same order")
    return IJBImages(names=names, templates=templates, medias=medias, landmarks=landmarks, faceness=faceness)


def read_template_pairs(root, target):
    return read_pairs(meta_path(root, target, "template_pair_label.txt"))


def read_search_csv(path, name):
    """TEMPLATE_ID / SUBJECT_ID columns (found by header name) of a 1:N gallery or probe CSV."""
    _require(path)
    with open(path, "r") as f:
        header = f.readline()
        columns = [c.strip().upper() for c in header.split(",")]
        if "TEMPLATE_ID" not in columns or "SUBJECT_ID" not in columns:
            raise DataError(f"{path}: line 1 must be a header naming TEMPLATE_ID and SUBJECT_ID, got {header.strip()!r}")
        t_col, s_col = columns.index("TEMPLATE_ID"), columns.index("SUBJECT_ID")
        rows = []
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            fields = line.split(",")
            try:
                rows.append((int(fields[t_col]), int(fields[s_col])))
            except (ValueError, IndexError):
                raise DataError(f"{path}: line {lineno}: {line.rstrip()!r} has no integer TEMPLATE_ID "
                                f"(column {t_col + 1}) and SUBJECT_ID (column {s_col + 1})") from None
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return IJBSearchSet(name=name, templates=rows[:, 0].copy(), subjects=rows[:, 1].copy())


def search_csv_paths(root, target):
    """{'G1': path, 'G2': path, 'probe': path} (IJB-B: S1 / S2) of the 1:N protocol."""
    g1, g2 = GALLERY_NAMES[check_target(target)]
    return {g1: meta_path(root, target, f"1N_gallery_{g1}.csv"),
            g2: meta_path(root, target, f"1N_gallery_{g2}.csv"),
            "probe": meta_path(root, target, "1N_probe_mixed.csv")}


def has_search_protocol(root, target):
    return all(os.path.isfile(p) for p in search_csv_paths(root, target).values())


def read_search_protocol(root, target):
    """(galleries [IJBSearchSet, IJBSearchSet], probes IJBSearchSet) of the 1:N protocol."""
    paths = search_csv_paths(root, target)
    galleries = [read_search_csv(paths[name], name) for name in GALLERY_NAMES[check_target(target)]]
    return galleries, read_search_csv(paths["probe"], "probe_mixed")


def read_template_subjects(root, target):
    """(template ids, subject ids) of every template the 1:N lists name (galleries and probes), sorted by template.

    The 1:1 pair list knows only templates; a bootstrap over people needs each template's subject, which the
    1:N lists are the only meta files to carry. A template listed with two subjects is a DataError.
    """
    galleries, probes = read_search_protocol(root, target)
    sets = galleries + [probes]
    templates = np.concatenate([s.templates for s in sets])
    subjects = np.concatenate([s.subjects for s in sets])
    pairs = np.unique(np.stack([templates, subjects], axis=1), axis=0)
    unique, first = np.unique(pairs[:, 0], return_index=True)
    if unique.size != pairs.shape[0]:
        dup = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
        names = ", ".join(sorted(search_csv_paths(root, target).values()))
        raise DataError(f"template {int(dup)} is listed with more than one SUBJECT_ID in the 1:N lists ({names})")
    return unique, pairs[first, 1].copy()


def image_dir(root):
    return os.path.join(root, "loose_crop")


def check_images_exist(root, names):
    """Fail before hours of extraction, naming the first missing crop."""
    folder = image_dir(root)
    if not os.path.isdir(folder):
        raise DataError(f"IJB image folder {folder} does not exist")
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"IJB image {path} (listed in the meta files) does not exist")
