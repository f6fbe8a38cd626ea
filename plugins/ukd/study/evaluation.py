"""A study's evaluation splits, prepared once, and one model scored on them.

Every student of a study is scored on the same validation and test splits, so what does not depend on the
model is done once per split and kept as plain .npy files: the IJB-style loose crops aligned to the input size,
the template / media / detector-score columns, the pair list with each template's subject (the bootstrap
resamples subjects), and the decoded .bin pairs. A run then only embeds: the alignment of ~10^4 loose crops
would otherwise cost more than a small student's evaluation itself.

Scores follow tools/eval_ijb.py (mode N1D1F1: flip-summed, norm- and detector-weighted media means; upstream's
nearest-FPR TAR rule) and tools/eval_verification.py (10-fold accuracy), through the same library functions.
"""
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from arcface.errors import DataError
from arcface.eval import ijb, ijb_io, report
from arcface.eval.metrics import far_key
from arcface.eval.verification import VerificationSet, evaluate_embeddings, embed_views, load_bin

SPLIT_FORMAT = 1
IJB_MODE = ijb.Mode(norm_score=True, detector_score=True, flip=True)


def metric_name(far):
    """'TAR@1e-4' for far=1e-4 (the study's metric keys)."""
    exponent = round(math.log10(far))
    return f"TAR@1e{exponent}" if math.isclose(10.0 ** exponent, far, rel_tol=1e-9) else f"TAR@{far:g}"


def _fingerprint(path):
    """Size and mtime of a source file, so a regenerated data set is noticed and the split prepared again."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sources(ijb_root, target, bin_path):
    files = [ijb_io.meta_path(ijb_root, target, s) for s in
             ("face_tid_mid.txt", "name_5pts_score.txt", "template_pair_label.txt")]
    files += list(ijb_io.search_csv_paths(ijb_root, target).values())
    if bin_path:
        files.append(bin_path)
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"evaluation split file {path} does not exist")
    return [_fingerprint(p) for p in files]


def _aligned_crops(ijb_root, images, input_size, workers):
    folder = ijb_io.image_dir(ijb_root)
    ijb_io.check_images_exist(ijb_root, images.names)
    crops = np.empty((len(images.names), 3, input_size, input_size), dtype=np.uint8)

    def one(i):
        crops[i] = ijb.load_aligned_crop(os.path.join(folder, images.names[i]), images.landmarks[i], input_size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(len(images.names))))
    return crops


def prepare_split(out_dir, ijb_root, target="IJBC", bin_path=None, input_size=112, workers=2):
    """Write (or reuse) the model-independent arrays of one split under out_dir; returns out_dir."""
    target = ijb_io.check_target(target)
    meta = {"format": SPLIT_FORMAT, "ijb": os.path.abspath(ijb_root), "target": target, "input_size": int(input_size),
            "bin": os.path.abspath(bin_path) if bin_path else None, "sources": _sources(ijb_root, target, bin_path)}
    meta_file = os.path.join(out_dir, "split.json")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            if json.load(f) == meta:
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_file):
        os.remove(meta_file)  # a half-rewritten split must not look complete
    images = ijb_io.read_images(ijb_root, target)
    pairs = ijb_io.read_template_pairs(ijb_root, target)
    tids, subjects = ijb_io.read_template_subjects(ijb_root, target)
    pair_source = ijb_io.meta_path(ijb_root, target, "template_pair_label.txt")
    s1 = subjects[ijb.template_index(tids, pairs.t1, pair_source)]
    s2 = subjects[ijb.template_index(tids, pairs.t2, pair_source)]
    wrong = np.flatnonzero((s1 == s2) != (pairs.label == 1))
    if wrong.size:
        raise DataError(f"{pair_source}: line {int(wrong[0]) + 1} labels templates {int(pairs.t1[wrong[0]])} and "
                        f"{int(pairs.t2[wrong[0]])} {int(pairs.label[wrong[0]])}, but the 1:N lists give them subjects "
                        f"{int(s1[wrong[0]])} and {int(s2[wrong[0]])}")
    arrays = {"crops": _aligned_crops(ijb_root, images, int(input_size), workers),
              "templates": images.templates, "medias": images.medias, "faceness": images.faceness,
              "pair_t1": pairs.t1, "pair_t2": pairs.t2, "pair_label": pairs.label,
              "pair_subject1": s1, "pair_subject2": s2}
    if bin_path:
        verification = load_bin(bin_path, int(input_size))
        arrays["bin_images"], arrays["bin_issame"] = verification.images, verification.issame
    for name, value in arrays.items():
        np.save(os.path.join(out_dir, f"{name}.npy"), np.ascontiguousarray(value))
    meta["counts"] = {"images": int(len(images.names)), "templates": int(np.unique(images.templates).size),
                      "subjects": int(np.unique(np.r_[s1, s2]).size), "genuine": int(pairs.label.sum()),
                      "impostor": int((pairs.label == 0).sum()),
                      "bin_pairs": int(arrays["bin_issame"].size) if bin_path else 0}
    report.write_json(meta_file, meta)
    return out_dir


class EvalSplit:
    """The arrays prepare_split wrote, memory-mapped (several evaluations share the page cache)."""

    def __init__(self, folder, name=None):
        meta_file = os.path.join(folder, "split.json")
        if not os.path.isfile(meta_file):
            raise DataError(f"{folder} is not a prepared evaluation split (no split.json); prepare_split writes it")
        with open(meta_file) as f:
            self.meta = json.load(f)
        self.folder = folder
        self.name = name or os.path.basename(os.path.normpath(folder))
        self.input_size = int(self.meta["input_size"])

    def array(self, name):
        path = os.path.join(self.folder, f"{name}.npy")
        if not os.path.isfile(path):
            raise DataError(f"evaluation split {self.folder}: {name}.npy is missing; prepare the split again")
        return np.load(path, mmap_mode="r")

    @property
    def has_bin(self):
        return bool(self.meta.get("bin"))

    @property
    def counts(self):
        return self.meta["counts"]


def embed_crops(embedder, crops, batch_size=256):
    """img_feats [N, 2d] float32: each crop's embedding, then its mirror's (tools/eval_ijb.py's layout)."""
    feats = None
    for start in range(0, crops.shape[0], batch_size):
        blob = np.ascontiguousarray(crops[start:start + batch_size])
        both = embedder(np.concatenate([blob, np.ascontiguousarray(blob[:, :, :, ::-1])]))
        half = blob.shape[0]
        if feats is None:
            feats = np.empty((crops.shape[0], 2 * both.shape[1]), dtype=np.float32)
        feats[start:start + half] = np.concatenate([both[:half], both[half:]], axis=1)
    if feats is None:
        raise DataError("no IJB crops to embed")
    return feats


def pair_scores(template_feats, unique_templates, split):
    return ijb.score_pairs(template_feats, unique_templates, np.asarray(split.array("pair_t1")),
                           np.asarray(split.array("pair_t2")), source=f"{split.folder} pair list")


def score_split(embedder, split, fars, batch_size=256):
    """(metrics {'TAR@1e-4': x, ..., 'AUC', 'accuracy'}, template features [T, d] float32, template ids [T])."""
    feats = embed_crops(embedder, split.array("crops"), batch_size)
    t_feats, unique = ijb.template_features(feats, np.asarray(split.array("faceness")),
                                            np.asarray(split.array("templates")), np.asarray(split.array("medias")),
                                            IJB_MODE)
    t_feats = t_feats.astype(np.float32)  # score_pairs computes in float32: nothing is lost
    scores = pair_scores(t_feats, unique, split)
    res = ijb.verification_metrics(scores, np.asarray(split.array("pair_label")), tuple(fars))
    metrics = {metric_name(f): res["tar_at_far"][far_key(f)] for f in fars}
    metrics["AUC"] = res["auc"]
    if split.has_bin:
        data = VerificationSet(split.name, np.asarray(split.array("bin_images")), np.asarray(split.array("bin_issame")))
        emb, emb_flip = embed_views(embedder, data, batch_size)
        ver = evaluate_embeddings(emb, emb_flip, data.issame)
        metrics["accuracy"] = ver["accuracy"]
        metrics["accuracy_std"] = ver["std"]
    return metrics, t_feats, unique

