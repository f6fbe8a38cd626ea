"""Write procedural faces in the formats the engine reads: insightface train.rec/.idx + property,
verification .bin pairs, an IJB-style folder, and a manifest that lets a finished folder be reused.

Determinism: every image is a pure function of (seed, identity, sample, stream, size, mode, difficulty);
workers render, the parent writes in plan order, so the bytes do not depend on the number of workers.
Training, verification and IJB identities are disjoint index ranges, each starting on a family boundary
so no family straddles two parts.
"""
import functools
import io
import json
import multiprocessing
import os
import pickle
import shutil

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import ConfigError, DataError
from ..recordio import IndexedRecordIO, IRHeader, pack
from .identity import FAMILY_SIZE, make_identity
from .nuisance import Nuisance, sample_nuisance, sample_rng, scene_rng, stream_id
from .render import LOOSE_FACTOR, MAX_SIZE, MIN_SIZE, render

GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
NUM_FOLDS = 10
_STREAM_PLAN = 31


# -- small helpers ----------------------------------------------------------------------------------------
def _atomic_write_bytes(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    _atomic_write_bytes(path, text.encode("utf-8"))


def _align_up(n, k):
    return ((n + k - 1) // k) * k


def identity_splits(num_ids, val_ids=0, ijb_ids=0):
    """Index ranges (start, end) of the training, verification and IJB identities."""
    train = (0, int(num_ids))
    v0 = _align_up(train[1], FAMILY_SIZE)
    val = (v0, v0 + int(val_ids))
    i0 = _align_up(val[1], FAMILY_SIZE)
    return {"train": train, "val": val, "ijb": (i0, i0 + int(ijb_ids))}


@functools.lru_cache(maxsize=256)
def _identity(seed, index):
    return make_identity(seed, index)


def _render_task(task):
    """Worker body: (seed, identity, sample, stream, size, mode, difficulty, pose_scale, media) -> image bytes
    plus landmarks and score. `media` is None for independent images, else the media key of an IJB frame."""
    seed, ident, sample, stream, size, mode, difficulty, pose_scale, media = task
    rng = sample_rng(seed, ident, sample, stream)
    scene = None if media is None else scene_rng(seed, ident, media, stream)
    nuisance = sample_nuisance(rng, difficulty, pose_scale, mode, scene=scene)
    out = render(_identity(seed, ident), nuisance, size, mode)
    return out.jpeg(), out.landmarks, out.score


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def parallel_render(tasks, workers=None, desc=None, progress=True):
    """Render tasks in order with `workers` processes (1 = in this process); yields worker results."""
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"synthetic faces: workers must be >= 1, got {workers}")
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers == 1 or len(tasks) < 2:
            for task in tasks:
                yield _render_task(task)
                bar.update(1)
            return
        chunk = max(1, min(64, len(tasks) // (workers * 8)))
        with _pool_context().Pool(workers) as pool:
            for result in pool.imap(_render_task, tasks, chunksize=chunk):
                yield result
                bar.update(1)
    finally:
        bar.close()


def _check_positive(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"synthetic faces: {name} must be an integer >= {minimum}, got {value!r}")


# -- training rec -----------------------------------------------------------------------------------------
def write_train_rec(out_dir, seed, num_ids, per_id, size=112, difficulty=0.5, workers=None, progress=True):
    """train.rec/train.idx in insightface layout (header record 0, images grouped by identity with float
    labels 0..num_ids-1, then one [first, end) range record per identity) and the `property` file."""
    _check_positive("num_ids", num_ids)
    _check_positive("per_id", per_id)
    os.makedirs(out_dir, exist_ok=True)
    n_img = num_ids * per_id
    rec, idx = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    writer = IndexedRecordIO(idx + ".tmp", rec + ".tmp", "w")
    try:
        writer.write_idx(0, pack(IRHeader(2, [n_img + 1, n_img + 1 + num_ids], 0, 0), b""))
        tasks = [(seed, c, j, 0, size, "aligned", difficulty, 1.0, None) for c in range(num_ids) for j in range(per_id)]
        for key, (jpeg, _, _) in enumerate(parallel_render(tasks, workers, "train.rec", progress), start=1):
            writer.write_idx(key, pack(IRHeader(0, float((key - 1) // per_id), key, 0), jpeg))
        for c in range(num_ids):
            first = 1 + c * per_id
            key = n_img + 1 + c
            writer.write_idx(key, pack(IRHeader(2, [first, first + per_id], key, 0), b""))
    except BaseException:
        writer.close()
        for path in (rec + ".tmp", idx + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise
    writer.close()
    os.replace(rec + ".tmp", rec)
    os.replace(idx + ".tmp", idx)
    _atomic_write_text(os.path.join(out_dir, "property"), f"{num_ids},{size},{size}\n")
    return rec


# -- verification .bin ------------------------------------------------------------------------------------
def plan_pairs(seed, identities, pairs, name, hard_impostors=False):
    """[(id_a, sample_a, id_b, sample_b, same)] in NUM_FOLDS contiguous folds, each half genuine."""
    identities = [int(i) for i in identities]
    if pairs % (2 * NUM_FOLDS) != 0 or pairs <= 0:
        raise ConfigError(f"synthetic faces: pairs for {name} must be a positive multiple of {2 * NUM_FOLDS} "
                          f"({NUM_FOLDS} folds, each half genuine), got {pairs}")
    if len(identities) < 2:
        raise ConfigError(f"synthetic faces: {name} needs at least 2 held-out identities, got {len(identities)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_PLAN, stream_id(name)]))
    families = {}
    for i in identities:
        families.setdefault(i // FAMILY_SIZE, []).append(i)
    per_fold = pairs // NUM_FOLDS
    plan = []
    for _ in range(NUM_FOLDS):
        flags = np.array([True] * (per_fold // 2) + [False] * (per_fold // 2))
        rng.shuffle(flags)
        for same in flags:
            a = identities[int(rng.integers(len(identities)))]
            if same:
                b = a
            else:
                siblings = [s for s in families[a // FAMILY_SIZE] if s != a]
                if hard_impostors and siblings and rng.random() < 0.5:
                    b = siblings[int(rng.integers(len(siblings)))]
                else:
                    b = a
                    while b == a:
                        b = identities[int(rng.integers(len(identities)))]
            sa = int(rng.integers(0, 2**31 - 1))
            sb = sa
            while sb == sa:
                sb = int(rng.integers(0, 2**31 - 1))
            plan.append((a, sa, b, sb, bool(same)))
    return plan


def write_verification_bin(path, seed, identities, pairs=3000, size=112, difficulty=0.5, pose_scale=1.0,
                           hard_impostors=False, workers=None, progress=True):
    """A lfw.bin-style pickle (protocol 4) of ([2*pairs JPEG bytes], [pairs bools]) of the given identities."""
    name = os.path.basename(str(path))
    plan = plan_pairs(seed, identities, pairs, name, hard_impostors)
    stream = stream_id(name)
    tasks = []
    for a, sa, b, sb, _ in plan:
        tasks.append((seed, a, sa, stream, size, "aligned", difficulty, pose_scale, None))
        tasks.append((seed, b, sb, stream, size, "aligned", difficulty, pose_scale, None))
    bins = [jpeg for jpeg, _, _ in parallel_render(tasks, workers, name, progress)]
    issame = [same for *_, same in plan]
    _atomic_write_bytes(str(path), pickle.dumps((bins, issame), protocol=4))
    return str(path)


# -- IJB folder -------------------------------------------------------------------------------------------
def gallery_names(name):
    """The two 1:N gallery file tags: IJB-B calls them S1/S2, IJB-C (and anything else) G1/G2."""
    return ("S1", "S2") if name.lower() == "ijbb" else ("G1", "G2")


def plan_ijb(seed, identities, templates_per_subject=3, max_media=3, max_frames=3, impostor_ratio=20, name="IJBC"):
    """Subjects, templates, media and images of an IJB-style set, and its template pairs."""
    identities = [int(i) for i in identities]
    if len(identities) < 2:
        raise ConfigError(f"synthetic faces: {name} needs at least 2 identities (two disjoint galleries), "
                          f"got {len(identities)}")
    _check_positive("templates per subject", templates_per_subject, 2)
    _check_positive("media per template", max_media)
    _check_positive("frames per media", max_frames)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_PLAN, stream_id(name), 1]))
    images, templates = [], []   # images: (name, tid, mid, identity, frame_key, media_key)
    tid = mid = 0
    for subject, ident in enumerate(identities, start=1):
        for t in range(templates_per_subject):
            tid += 1
            templates.append({"tid": tid, "subject": subject, "identity": ident, "gallery": t == 0, "images": []})
            for _ in range(int(rng.integers(1, max_media + 1))):
                mid += 1
                frames = int(rng.integers(1, max_frames + 1))
                for f in range(frames):
                    name_ = f"{len(images) + 1}.jpg"
                    templates[-1]["images"].append(name_)
                    images.append((name_, tid, mid, ident, mid * 1000 + f, mid))
    genuine = []
    by_subject = {}
    for tpl in templates:
        by_subject.setdefault(tpl["subject"], []).append(tpl["tid"])
    for tids in by_subject.values():
        genuine += [(a, b) for k, a in enumerate(tids) for b in tids[k + 1:]]
    subject_of = {tpl["tid"]: tpl["subject"] for tpl in templates}
    n_t = len(templates)
    possible = n_t * (n_t - 1) // 2 - len(genuine)
    want = min(int(impostor_ratio) * len(genuine), possible)
    impostors = set()
    while len(impostors) < want:
        a, b = (int(x) for x in rng.integers(1, n_t + 1, size=2))
        if subject_of[a] != subject_of[b]:
            impostors.add((min(a, b), max(a, b)))
    pairs = sorted([(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in impostors])
    return images, templates, pairs


def write_ijb(out_dir, seed, identities, name="IJBC", size=112, difficulty=0.6, templates_per_subject=3,
              max_media=3, max_frames=3, impostor_ratio=20, workers=None, progress=True, prefix=None):
    """An insightface IJB test-suite folder out_dir/<name>/ (loose crops, meta txt files, 1:N CSVs). The meta
    files are called <prefix>_* (default: the folder name in lower case), so a second folder, e.g. a validation
    split, can be read as the same target (prefix 'ijbc') as the first."""
    prefix = (prefix or name).lower()
    images, templates, pairs = plan_ijb(seed, identities, templates_per_subject, max_media, max_frames,
                                        impostor_ratio, name)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.partial")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "loose_crop"))
    os.makedirs(os.path.join(tmp, "meta"))
    stream = stream_id(name)
    tasks = [(seed, ident, frame, stream, size, "loose", difficulty, 1.0, media)
             for _, _, _, ident, frame, media in images]
    tid_mid, pts_rows, boxes = [], [], {}
    for (img_name, tid, mid, *_), (jpeg, lmk, score) in zip(images, parallel_render(tasks, workers, name, progress)):
        with open(os.path.join(tmp, "loose_crop", img_name), "wb") as f:
            f.write(jpeg)
        tid_mid.append(f"{img_name} {tid} {mid}")
        pts_rows.append(img_name + " " + " ".join(f"{v:.3f}" for v in np.asarray(lmk).ravel()) + f" {score:.3f}")
        iod = float(np.hypot(*(lmk[1] - lmk[0])))
        cx, cy = float(lmk[:, 0].mean()), float(lmk[:, 1].mean())
        boxes[img_name] = (mid, int(round(cx - 1.6 * iod)), int(round(cy - 1.9 * iod)), int(round(3.2 * iod)),
                           int(round(3.6 * iod)))
    meta = os.path.join(tmp, "meta")
    _atomic_write_text(os.path.join(meta, f"{prefix}_face_tid_mid.txt"), "\n".join(tid_mid) + "\n")
    _atomic_write_text(os.path.join(meta, f"{prefix}_name_5pts_score.txt"), "\n".join(pts_rows) + "\n")
    _atomic_write_text(os.path.join(meta, f"{prefix}_template_pair_label.txt"),
                       "".join(f"{a} {b} {label}\n" for a, b, label in pairs))
    n_sub = len(identities)
    half = (n_sub + 1) // 2
    g1, g2 = gallery_names(prefix)
    groups = {"G1": lambda t: t["gallery"] and t["subject"] <= half,
              "G2": lambda t: t["gallery"] and t["subject"] > half,
              "probe_mixed": lambda t: not t["gallery"]}
    fname = {"G1": f"1N_gallery_{g1}", "G2": f"1N_gallery_{g2}", "probe_mixed": "1N_probe_mixed"}
    for group, keep in groups.items():
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"]
        for tpl in templates:
            if keep(tpl):
                for img_name in tpl["images"]:
                    mid, x, y, w, h = boxes[img_name]
                    lines.append(f"{tpl['tid']},{tpl['subject']},{img_name},{mid},{x},{y},{w},{h}")
        _atomic_write_text(os.path.join(meta, f"{prefix}_{fname[group]}.csv"), "\n".join(lines) + "\n")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# -- whole folder + manifest ------------------------------------------------------------------------------
# Options added after the first manifests were written: stored in the spec only when they differ from these
# defaults, so a folder generated with the defaults keeps its manifest (and every byte) unchanged.
EXTRA_SPEC_DEFAULTS = {"val_ijb_name": "", "ijb_bin_pairs": 0, "ijb_bin_name": ""}


def dataset_spec(seed=0, num_ids=100, per_id=20, size=112, difficulty=0.5, val_ids=0, pairs=3000,
                 val_name="synth_val.bin", hard_pairs=0, hard_name="synth_hard.bin", ijb_ids=0, ijb_name="IJBC",
                 ijb_templates=3, ijb_media=3, ijb_frames=3, ijb_impostor_ratio=20, ijb_difficulty=0.6,
                 val_ijb_name="", ijb_bin_pairs=0, ijb_bin_name=""):
    """The arguments that define a generated folder, as stored in (and compared with) its manifest.

    val_ijb_name: also write an IJB-style folder of the verification identities (a validation split in the
    test's format; its meta files carry the prefix of ijb_name). ijb_bin_pairs / ijb_bin_name: also write
    .bin pairs of the IJB identities (the test split's verification accuracy)."""
    spec = {"seed": int(seed), "num_ids": int(num_ids), "per_id": int(per_id), "size": int(size),
            "difficulty": float(difficulty), "val_ids": int(val_ids), "pairs": int(pairs), "val_name": val_name,
            "hard_pairs": int(hard_pairs), "hard_name": hard_name, "ijb_ids": int(ijb_ids), "ijb_name": ijb_name,
            "ijb_templates": int(ijb_templates), "ijb_media": int(ijb_media), "ijb_frames": int(ijb_frames),
            "ijb_impostor_ratio": int(ijb_impostor_ratio), "ijb_difficulty": float(ijb_difficulty)}
    extra = {"val_ijb_name": str(val_ijb_name or ""), "ijb_bin_pairs": int(ijb_bin_pairs),
             "ijb_bin_name": str(ijb_bin_name or "")}
    spec.update({k: v for k, v in extra.items() if v != EXTRA_SPEC_DEFAULTS[k]})
    return spec


def _spec_value(spec, key):
    return spec.get(key, EXTRA_SPEC_DEFAULTS.get(key))


def artifact_splits(spec):
    """{path relative to the folder: 'train' | 'val' | 'ijb'}: whose identities each written file holds."""
    out = {"train.rec": "train"}
    if spec["val_ids"]:
        out[spec["val_name"]] = "val"
        if spec["hard_pairs"]:
            out[spec["hard_name"]] = "val"
        if _spec_value(spec, "val_ijb_name"):
            out[_spec_value(spec, "val_ijb_name")] = "val"
    if spec["ijb_ids"]:
        out[spec["ijb_name"]] = "ijb"
        if _spec_value(spec, "ijb_bin_pairs"):
            out[_spec_value(spec, "ijb_bin_name")] = "ijb"
    return out


def _plain_name(key, value, folder=False):
    bad = "/\\. " if folder else "/\\"
    if not value or os.path.basename(value) != value or value.startswith(".") or any(c in value for c in bad):
        kind = "folder" if folder else "file"
        raise ConfigError(f"synthetic faces: {key} must be a plain {kind} name, got {value!r}")


def validate_spec(spec):
    """Reject a bad argument before any image is rendered (a late failure would waste the training set)."""
    for key in ("num_ids", "per_id"):
        _check_positive(key, spec[key])
    for key in ("val_ids", "hard_pairs", "ijb_ids"):
        _check_positive(key, spec[key], 0)
    if not (MIN_SIZE <= spec["size"] <= MAX_SIZE):
        raise ConfigError(f"synthetic faces: size must lie in [{MIN_SIZE}, {MAX_SIZE}], got {spec['size']}")
    for key in ("difficulty", "ijb_difficulty"):
        if not (0.0 <= spec[key] <= 1.0):
            raise ConfigError(f"synthetic faces: {key} must lie in [0, 1], got {spec[key]}")
    if spec["val_ids"]:
        if spec["val_ids"] < 2:
            raise ConfigError(f"synthetic faces: val_ids must be 0 or >= 2 (impostor pairs), got {spec['val_ids']}")
        for key in ("pairs", "hard_pairs"):
            if (key == "pairs" or spec[key]) and (spec[key] <= 0 or spec[key] % (2 * NUM_FOLDS)):
                raise ConfigError(f"synthetic faces: {key} must be a positive multiple of {2 * NUM_FOLDS} "
                                  f"({NUM_FOLDS} folds, each half genuine), got {spec[key]}")
        for key in ("val_name", "hard_name"):
            if not spec[key] or os.path.basename(spec[key]) != spec[key] or spec[key].startswith("."):
                raise ConfigError(f"synthetic faces: {key} must be a plain file name, got {spec[key]!r}")
        if spec["val_name"] == spec["hard_name"] and spec["hard_pairs"]:
            raise ConfigError(f"synthetic faces: val_name and hard_name are both {spec['val_name']!r}")
    elif spec["hard_pairs"]:
        raise ConfigError("synthetic faces: hard_pairs needs held-out identities (val_ids > 0)")
    if spec["ijb_ids"]:
        if spec["ijb_ids"] < 2:
            raise ConfigError(f"synthetic faces: ijb_ids must be 0 or >= 2 (two disjoint galleries), "
                              f"got {spec['ijb_ids']}")
        _check_positive("ijb_templates", spec["ijb_templates"], 2)
        _check_positive("ijb_media", spec["ijb_media"])
        _check_positive("ijb_frames", spec["ijb_frames"])
        _check_positive("ijb_impostor_ratio", spec["ijb_impostor_ratio"], 0)
        if not spec["ijb_name"] or any(c in spec["ijb_name"] for c in "/\\. "):
            raise ConfigError(f"synthetic faces: ijb_name must be a plain folder name, got {spec['ijb_name']!r}")
    _validate_extra_spec(spec)


def _validate_extra_spec(spec):
    val_ijb, bin_pairs, bin_name = (_spec_value(spec, k) for k in ("val_ijb_name", "ijb_bin_pairs", "ijb_bin_name"))
    if val_ijb:
        if not spec["val_ids"]:
            raise ConfigError("synthetic faces: val_ijb_name needs verification identities (val_ids >= 2)")
        _plain_name("val_ijb_name", val_ijb, folder=True)
        if spec["ijb_ids"] and val_ijb == spec["ijb_name"]:
            raise ConfigError(f"synthetic faces: val_ijb_name and ijb_name are both {val_ijb!r}")
        _check_positive("ijb_templates", spec["ijb_templates"], 2)
        _check_positive("ijb_media", spec["ijb_media"])
        _check_positive("ijb_frames", spec["ijb_frames"])
    if bin_pairs or bin_name:
        if not spec["ijb_ids"]:
            raise ConfigError("synthetic faces: ijb_bin_pairs needs IJB identities (ijb_ids >= 2)")
        if not isinstance(bin_pairs, int) or bin_pairs <= 0 or bin_pairs % (2 * NUM_FOLDS):
            raise ConfigError(f"synthetic faces: ijb_bin_pairs must be a positive multiple of {2 * NUM_FOLDS} "
                              f"({NUM_FOLDS} folds, each half genuine), got {bin_pairs}")
        _plain_name("ijb_bin_name", bin_name)
        taken = [spec["val_name"], spec["hard_name"]] if spec["val_ids"] else []
        if bin_name in taken:
            raise ConfigError(f"synthetic faces: ijb_bin_name {bin_name!r} is already the name of another .bin")


def _file_sizes(out_dir, rels):
    return {rel: os.path.getsize(os.path.join(out_dir, rel)) for rel in rels}


def load_manifest(out_dir):
    """The folder's manifest dict, or None when there is none."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it or pass --force to regenerate")


def manifest_matches(out_dir, spec):
    """True when out_dir holds a complete folder generated from `spec` by this generator version."""
    man = load_manifest(out_dir)
    if not man or man.get("version") != GENERATOR_VERSION or man.get("spec") != spec:
        return False
    for rel, size in man.get("files", {}).items():
        path = os.path.join(out_dir, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def generate(out_dir, seed=0, num_ids=100, per_id=20, size=112, difficulty=0.5, val_ids=0, pairs=3000,
             val_name="synth_val.bin", hard_pairs=0, hard_name="synth_hard.bin", ijb_ids=0, ijb_name="IJBC",
             ijb_templates=3, ijb_media=3, ijb_frames=3, ijb_impostor_ratio=20, ijb_difficulty=0.6, workers=None,
             force=False, progress=True, val_ijb_name="", ijb_bin_pairs=0, ijb_bin_name=""):
    """Generate a whole folder (skipped when its manifest already matches); returns the manifest dict."""
    spec = dataset_spec(seed, num_ids, per_id, size, difficulty, val_ids, pairs, val_name, hard_pairs, hard_name,
                        ijb_ids, ijb_name, ijb_templates, ijb_media, ijb_frames, ijb_impostor_ratio, ijb_difficulty,
                        val_ijb_name, ijb_bin_pairs, ijb_bin_name)
    validate_spec(spec)
    if not force and manifest_matches(out_dir, spec):
        return load_manifest(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    man_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(man_path):
        os.remove(man_path)  # a half-regenerated folder must not look complete
    splits = identity_splits(num_ids, val_ids, ijb_ids)
    files = ["train.rec", "train.idx", "property"]
    write_train_rec(out_dir, seed, num_ids, per_id, size, difficulty, workers, progress)
    counts = {"train_images": num_ids * per_id, "train_ids": num_ids}
    val_range = range(*splits["val"])
    if val_ids:
        write_verification_bin(os.path.join(out_dir, val_name), seed, val_range, pairs, size, difficulty, 1.0,
                               False, workers, progress)
        files.append(val_name)
        counts["val_pairs"] = pairs
        if hard_pairs:
            write_verification_bin(os.path.join(out_dir, hard_name), seed, val_range, hard_pairs, size,
                                   min(1.0, difficulty + 0.25), 1.8, True, workers, progress)
            files.append(hard_name)
            counts["hard_pairs"] = hard_pairs
    ijb_folders = []  # (folder name, identities, counts prefix)
    if val_ids and val_ijb_name:
        ijb_folders.append((val_ijb_name, val_range, "val_ijb"))
    if ijb_ids:
        ijb_folders.append((ijb_name, range(*splits["ijb"]), "ijb"))
    for folder_name, identities, key in ijb_folders:
        folder = write_ijb(out_dir, seed, identities, folder_name, size, ijb_difficulty, ijb_templates,
                           ijb_media, ijb_frames, ijb_impostor_ratio, workers, progress, prefix=ijb_name)
        prefix = ijb_name.lower()
        g1, g2 = gallery_names(ijb_name)
        meta = [f"{folder_name}/meta/{prefix}_{k}" for k in ("face_tid_mid.txt", "name_5pts_score.txt",
                                                             "template_pair_label.txt", f"1N_gallery_{g1}.csv",
                                                             f"1N_gallery_{g2}.csv", "1N_probe_mixed.csv")]
        files += meta
        with open(os.path.join(folder, "meta", f"{prefix}_face_tid_mid.txt")) as f:
            counts[f"{key}_images"] = sum(1 for line in f if line.strip())
        with open(os.path.join(folder, "meta", f"{prefix}_template_pair_label.txt")) as f:
            counts[f"{key}_pairs"] = sum(1 for line in f if line.strip())
        counts["ijb_loose_size"] = int(round(size * LOOSE_FACTOR))
    if ijb_ids and ijb_bin_pairs:
        write_verification_bin(os.path.join(out_dir, ijb_bin_name), seed, range(*splits["ijb"]), ijb_bin_pairs, size,
                               difficulty, 1.0, False, workers, progress)
        files.append(ijb_bin_name)
        counts["ijb_bin_pairs"] = ijb_bin_pairs
    manifest = {"version": GENERATOR_VERSION, "spec": spec, "counts": counts,
                "splits": {k: list(v) for k, v in splits.items()}, "files": _file_sizes(out_dir, files)}
    _atomic_write_text(man_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# -- preview ----------------------------------------------------------------------------------------------
def contact_sheet(seed=0, ids=8, samples=6, size=112, difficulty=0.5, mode="aligned", first_id=0):
    """A grid image (rows = identities; first column clean, then nuisance samples) as a uint8 array."""
    _check_positive("ids", ids)
    _check_positive("samples", samples)
    rows = []
    for i in range(first_id, first_id + ids):
        ident = _identity(seed, i)
        row = [render(ident, Nuisance.none(), size, mode).image]
        for j in range(samples - 1):
            row.append(render(ident, sample_nuisance(sample_rng(seed, i, j), difficulty, 1.0, mode), size, mode).image)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def write_preview(path, **kwargs):
    """Save contact_sheet(**kwargs) as a PNG (atomically)."""
    sheet = contact_sheet(**kwargs)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    _atomic_write_bytes(str(path), buf.getvalue())
    return str(path)


__all__ = ["GENERATOR_VERSION", "NUM_FOLDS", "artifact_splits", "dataset_spec", "validate_spec", "identity_splits",
           "parallel_render",
           "write_train_rec", "plan_pairs", "write_verification_bin", "plan_ijb", "write_ijb", "generate",
           "load_manifest", "manifest_matches", "contact_sheet", "write_preview"]
