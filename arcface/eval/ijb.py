"""IJB-B / IJB-C template evaluation: 1:1 verification (TAR@FAR) and 1:N identification (rank-k, TPIR@FPIR).

Arithmetic of arcface_torch eval_ijbc.py, per image i with feature halves a_i (original) and b_i (flip):
    F1: x_i = a_i + b_i            F0: x_i = a_i
    N0: x_i = x_i / |x_i|          N1: x_i kept (its norm acts as a quality weight)
    D1: x_i = x_i * faceness_i     D0: x_i kept
    media feature = mean of x_i over the images of one media inside one template (a single image is kept)
    template feature = L2-normalise(sum of its media features); pair score = dot of the two templates.
Upstream loops over templates with np.where; here every image gets one weight
w_i = [faceness_i] * [1/|x_i|] / (images of its (template, media)), so a template is sum_i w_i x_i: one
sparse [T, N] x [N, 2d] product in float32 (upstream also sums in float32), then float64 normalisation.
Pairs are scored by blocked float32 matrix products between the templates that occur as first and as
second member of a pair, then picked (few pairs among many templates: row-wise dots instead). Scores
agree with upstream's loop to ~1e-7, the size of upstream's own float32 rounding.

1:N follows insightface's recognition/_evaluation_/ijb/ijb_evals.py (the open-set reading of the IJB
protocol): galleries G1 and G2 (IJB-B: S1, S2) are searched separately by all probe_mixed templates, in
mode N1D1F1 unless told otherwise. For one gallery, a probe whose subject is enrolled is "mated": its
rank is the position of the (first) gallery template of its subject in the similarity-sorted list, and it is
correctly identified when that similarity beats every other subject's. Probes not enrolled give one
non-mated score each, their highest similarity. TPIR at FPIR f: the threshold is the k-th highest non-mated
score with k = max(int(n_nonmated * f), 1); TPIR = fraction of mated probes correctly identified above it.
The reported mean is the average of both galleries' TPIR; combined rank-k counts hits in either gallery
over all probes, as ijb_evals.py prints them.
"""
import itertools
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError
from .alignment import align_face
from .metrics import IJB_FARS, auc, far_key, resolved_tar_at_far, roc_curve

IDENTIFICATION_FPIRS = (0.01, 0.1)
IDENTIFICATION_RANKS = (1, 5, 10)


@dataclass(frozen=True)
class Mode:
    """Upstream's switches: use_norm_score (N), use_detector_score (D), use_flip_test (F)."""

    norm_score: bool = True
    detector_score: bool = True
    flip: bool = True

    @property
    def name(self):
        return f"N{int(self.norm_score)}D{int(self.detector_score)}F{int(self.flip)}"

    @classmethod
    def parse(cls, text):
        match = re.fullmatch(r"N([01])D([01])F([01])", text.strip().upper())
        if not match:
            raise ConfigError(f"mode '{text}' is not N<0|1>D<0|1>F<0|1> (e.g. N1D1F1, upstream's default)")
        return cls(*(bool(int(g)) for g in match.groups()))


ALL_MODES = tuple(Mode(n, d, f) for n, d, f in itertools.product((True, False), repeat=3))


def parse_modes(text):
    """'N1D1F1,N0D1F1' or 'all' -> tuple of Mode."""
    if text.strip().lower() == "all":
        return ALL_MODES
    return tuple(Mode.parse(part) for part in text.split(",") if part.strip())


# ----------------------------------------------------------------------------------------- extraction


def load_aligned_crop(path, landmarks, input_size):
    """RGB crop [3, S, S] uint8 of one loose crop; EXIF orientation applied as cv2.imread does."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"IJB image {path} does not exist") from None
    except Exception as err:  # PIL raises several types for corrupt files
        raise DataError(f"IJB image {path} cannot be decoded ({err})") from err
    return align_face(image, landmarks, input_size).transpose(2, 0, 1)


def extract_features(embedder, image_paths, landmarks, batch_size=128, input_size=112, workers=4, progress=True):
    """img_feats [N, 2d] float32: the embedding of each aligned crop, then of its mirror (upstream layout)."""
    from tqdm import tqdm

    count = len(image_paths)
    feats = None
    starts = list(range(0, count, batch_size))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def submit(start):  # split a batch over the workers; PIL decodes outside the GIL
            step = max(1, -(-min(batch_size, count - start) // max(1, workers)))
            return [pool.submit(lambda s=s: np.stack([
                load_aligned_crop(image_paths[i], landmarks[i], input_size)
                for i in range(s, min(s + step, start + batch_size, count))]))
                for s in range(start, min(start + batch_size, count), step)]

        pending = submit(starts[0]) if starts else None
        for n, start in enumerate(tqdm(starts, desc="IJB features", disable=not progress)):
            blob = np.concatenate([f.result() for f in pending])
            pending = submit(starts[n + 1]) if n + 1 < len(starts) else None
            both = embedder(np.concatenate([blob, blob[:, :, :, ::-1]]))
            half = blob.shape[0]
            if feats is None:
                feats = np.empty((count, 2 * both.shape[1]), dtype=np.float32)
            feats[start:start + half] = np.concatenate([both[:half], both[half:]], axis=1)
    if feats is None:
        raise DataError("no IJB images to extract")
    return feats


# ------------------------------------------------------------------------------------ aggregation


def template_features(img_feats, faceness, templates, medias, mode=Mode(), chunk_rows=32768):
    """(L2-normalised float64 [T, d] template features, sorted unique template ids).

    The per-image weights form a sparse [T, N] matrix W (one non-zero per image), and W @ img_feats is one
    CSR product over the untouched [N, 2d] float32 array: no copy of the features, float32 sums as upstream.
    """
    img_feats = np.asarray(img_feats)
    count = img_feats.shape[0]
    if img_feats.ndim != 2 or img_feats.shape[1] % 2:
        raise DataError(f"img_feats must be [N, 2d] (original | flipped halves), got {list(img_feats.shape)}")
    for what, arr in (("faceness_scores", faceness), ("templates", templates), ("medias", medias)):
        if len(arr) != count:
            raise DataError(f"{what} has {len(arr)} rows but img_feats has {count}")
    dim = img_feats.shape[1] // 2
    unique_templates, t_index = np.unique(np.asarray(templates), return_inverse=True)
    _, m_index = np.unique(np.asarray(medias), return_inverse=True)
    pair_key = t_index.astype(np.int64) * (int(m_index.max()) + 1) + m_index
    _, key_index, key_counts = np.unique(pair_key, return_inverse=True, return_counts=True)
    weight = 1.0 / key_counts[key_index].astype(np.float64)
    if mode.detector_score:
        weight *= np.asarray(faceness, dtype=np.float64)
    feats_t = torch.from_numpy(img_feats if img_feats.dtype == np.float32 else img_feats.astype(np.float32))
    if not mode.norm_score:
        weight /= _image_norms(feats_t, dim, mode.flip, chunk_rows)
    order = np.argsort(t_index, kind="stable")
    crow = np.r_[0, np.cumsum(np.bincount(t_index, minlength=unique_templates.size))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(order),
                                         torch.from_numpy(weight[order].astype(np.float32)),
                                         size=(unique_templates.size, count), check_invariants=False)
        summed = (matrix @ feats_t).to(torch.float64)  # [T, 2d]: both halves, so no strided copy is needed
    out = summed[:, :dim] + summed[:, dim:] if mode.flip else summed[:, :dim]
    out = out / _safe_norms(out)[:, None]
    return out.numpy(), unique_templates


def _image_norms(feats_t, dim, flip, chunk_rows):
    """|x_i| of each image input feature (flip-summed for F1), chunked so no [N, d] copy is made."""
    norms = np.empty(feats_t.shape[0], dtype=np.float64)
    for start in range(0, feats_t.shape[0], chunk_rows):
        rows = feats_t[start:start + chunk_rows]
        x = rows[:, :dim] + rows[:, dim:] if flip else rows[:, :dim]
        norms[start:start + chunk_rows] = torch.linalg.vector_norm(x.to(torch.float64), dim=1).numpy()
    norms[norms == 0] = 1.0
    return norms


def _safe_norms(x):
    norms = torch.linalg.vector_norm(x, dim=1)
    return torch.where(norms == 0, torch.ones_like(norms), norms)


def template_index(unique_templates, ids, source):
    """Row of each template id in `unique_templates`; an unknown id is a DataError naming `source`."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return ids
    lo, hi = int(unique_templates[0]), int(unique_templates[-1])
    if lo >= 0 and hi < 50_000_000:  # direct lookup table: O(P) instead of a binary search per id
        table = np.full(hi + 2, -1, dtype=np.int64)
        table[unique_templates] = np.arange(unique_templates.size)
        index = table[np.clip(ids, 0, hi + 1)]
        index[(ids < 0) | (ids > hi)] = -1
    else:
        index = np.clip(np.searchsorted(unique_templates, ids), 0, unique_templates.size - 1)
        index[unique_templates[index] != ids] = -1
    missing = np.flatnonzero(index < 0)
    if missing.size:
        raise DataError(f"{source}: template {int(ids[missing[0]])} (row {int(missing[0]) + 1}) has no images in "
                        f"the face_tid_mid list ({missing.size} such rows)")
    return index


# ---------------------------------------------------------------------------------------- scoring


def score_pairs(feats, unique_templates, t1, t2, block_bytes=256 << 20, progress=False, source="pair list"):
    """Cosine score of each template pair, float64 [P]."""
    from tqdm import tqdm

    i1 = template_index(unique_templates, t1, source)
    i2 = template_index(unique_templates, t2, source)
    scores = np.empty(i1.size, dtype=np.float64)
    if i1.size == 0:
        return scores
    rows, r1 = _compact(i1, unique_templates.size)
    cols, c2 = _compact(i2, unique_templates.size)
    feats_t = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))  # dots of unit vectors: ~1e-7
    if rows.size * cols.size > 64 * i1.size:  # few pairs among many templates: direct row-wise dots
        step = max(1, block_bytes // (8 * feats.shape[1]))
        i1_t, i2_t = torch.from_numpy(i1), torch.from_numpy(i2)
        for start in tqdm(range(0, i1.size, step), desc="IJB pairs", disable=not progress):
            a = feats_t.index_select(0, i1_t[start:start + step])
            b = feats_t.index_select(0, i2_t[start:start + step])
            scores[start:start + step] = torch.einsum("ij,ij->i", a, b).numpy()
        return scores
    block = max(1, block_bytes // (4 * cols.size))
    block_of_pair = r1 // block
    nblocks = int(block_of_pair.max()) + 1
    order = np.argsort(block_of_pair.astype(np.uint16 if nblocks < 65536 else np.int64), kind="stable")
    bounds = np.searchsorted(block_of_pair[order], np.arange(nblocks + 1))
    right = feats_t.index_select(0, torch.from_numpy(cols)).T.contiguous()
    for b in tqdm(range(nblocks), desc="IJB pairs", disable=not progress):
        members = order[bounds[b]:bounds[b + 1]]
        if members.size == 0:
            continue
        left = feats_t.index_select(0, torch.from_numpy(rows[b * block:(b + 1) * block]))
        sims = (left @ right).numpy()
        scores[members] = sims[r1[members] - b * block, c2[members]]
    return scores


def _compact(index, size):
    """(sorted distinct values, position of each entry among them) for indices < size, in O(n)."""
    used = np.zeros(size, dtype=bool)
    used[index] = True
    values = np.flatnonzero(used)
    position = np.cumsum(used) - 1
    return values, position[index]


# -------------------------------------------------------------------------------------------- 1:1


def verification_metrics(scores, labels, fars=IJB_FARS):
    """TAR at each FAR (upstream's nearest-FPR rule; None where too few impostor pairs resolve the FAR, the
    rule the .bin evaluation applies too), the ROC, its AUC and the pair counts."""
    labels = np.asarray(labels)
    genuine, impostor = int((labels == 1).sum()), int((labels == 0).sum())
    if not genuine or not impostor:
        raise DataError("the pair list needs both genuine (1) and impostor (0) pairs to compute a ROC")
    fpr, tpr, _ = roc_curve(labels, scores)
    tars = resolved_tar_at_far(fpr, tpr, fars, impostor)
    return {"tar_at_far": {far_key(f): t for f, t in tars.items()}, "auc": auc(fpr, tpr), "fpr": fpr, "tpr": tpr,
            "genuine_pairs": genuine, "impostor_pairs": impostor}


def evaluate_verification_modes(img_feats, faceness, templates, medias, pairs, modes=(Mode(),), progress=False):
    """{mode name: {'tar_at_far', 'auc', 'fpr', 'tpr', 'scores'}} for each mode."""
    results = {}
    for mode in modes:
        feats, unique = template_features(img_feats, faceness, templates, medias, mode)
        scores = score_pairs(feats, unique, pairs.t1, pairs.t2, progress=progress)
        res = verification_metrics(scores, pairs.label)
        res["scores"] = scores
        results[mode.name] = res
    return results


# -------------------------------------------------------------------------------------------- 1:N


def search_templates(feats, unique_templates, search_set, source):
    """(features, subject ids) of the unique templates of a gallery / probe list (first subject per template)."""
    chosen, first = np.unique(search_set.templates, return_index=True)
    rows = template_index(unique_templates, chosen, source)
    return feats[rows], search_set.subjects[first]


def identification_metrics(probe_feats, probe_subjects, gallery_feats, gallery_subjects,
                           fpirs=IDENTIFICATION_FPIRS, ranks=IDENTIFICATION_RANKS, chunk=4096):
    """Rank-k hits and TPIR@FPIR of one gallery searched by all probes (see the module docstring)."""
    gallery_subjects = np.asarray(gallery_subjects)
    subjects_sorted, first_index = np.unique(gallery_subjects, return_index=True)
    where = np.clip(np.searchsorted(subjects_sorted, probe_subjects), 0, max(subjects_sorted.size - 1, 0))
    mated = subjects_sorted[where] == probe_subjects
    target = first_index[where]
    columns = np.arange(gallery_subjects.size)
    rank_hits = {k: 0 for k in ranks}
    pos_sims, correct, nonmated_max = [], [], []
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery_feats, dtype=np.float64)).T
    for start in range(0, probe_feats.shape[0], chunk):
        stop = min(start + chunk, probe_feats.shape[0])
        sim = (torch.from_numpy(np.ascontiguousarray(probe_feats[start:stop], dtype=np.float64)) @ gallery_t).numpy()
        is_mated = mated[start:stop]
        m_sim = sim[is_mated]
        m_target = target[start:stop][is_mated]
        pos = m_sim[np.arange(m_sim.shape[0]), m_target]
        # position in argsort(sim)[::-1]: higher scores first, equal scores by descending column
        ahead = (m_sim > pos[:, None]).sum(1) + ((m_sim == pos[:, None]) & (columns > m_target[:, None])).sum(1)
        for k in ranks:
            rank_hits[k] += int((ahead < k).sum())
        same = gallery_subjects[None, :] == probe_subjects[start:stop][is_mated][:, None]
        others = np.where(same, -np.inf, m_sim).max(1) if m_sim.size else np.empty(0)
        pos_sims.append(pos)
        correct.append(pos > others)
        nonmated_max.append(sim[~is_mated].max(1) if (~is_mated).any() else np.empty(0))
    pos_sims, correct = np.concatenate(pos_sims), np.concatenate(correct)
    nonmated = np.sort(np.concatenate(nonmated_max))[::-1]
    n_mated = int(pos_sims.size)
    tpir, thresholds = {}, {}
    for fpir in fpirs:
        if nonmated.size == 0 or n_mated == 0:
            tpir[far_key(fpir)], thresholds[far_key(fpir)] = float("nan"), float("nan")
            continue
        threshold = nonmated[max(int(nonmated.size * fpir) - 1, 0)]
        tpir[far_key(fpir)] = float(np.logical_and(correct, pos_sims > threshold).sum() / n_mated)
        thresholds[far_key(fpir)] = float(threshold)
    return {
        "mated_probes": n_mated,
        "nonmated_probes": int(nonmated.size),
        "rank_hits": {str(k): v for k, v in rank_hits.items()},
        "rank": {str(k): (v / n_mated if n_mated else float("nan")) for k, v in rank_hits.items()},
        "tpir_at_fpir": tpir,
        "thresholds": thresholds,
    }


def evaluate_identification(img_feats, faceness, templates, medias, galleries, probes, mode=Mode(),
                            fpirs=IDENTIFICATION_FPIRS, ranks=IDENTIFICATION_RANKS, source=""):
    """Each gallery searched by the probes, plus the mean TPIR and the combined rank-k of ijb_evals.py."""
    feats, unique = template_features(img_feats, faceness, templates, medias, mode)
    probe_feats, probe_subjects = search_templates(feats, unique, probes, f"{source}probe list")
    out = {"mode": mode.name, "probes": int(probe_subjects.size), "galleries": {}}
    for gallery in galleries:
        g_feats, g_subjects = search_templates(feats, unique, gallery, f"{source}gallery {gallery.name}")
        res = identification_metrics(probe_feats, probe_subjects, g_feats, g_subjects, fpirs, ranks)
        res["templates"] = int(g_subjects.size)
        out["galleries"][gallery.name] = res
    per = list(out["galleries"].values())
    out["mean"] = {
        "rank": {str(k): sum(g["rank_hits"][str(k)] for g in per) / max(out["probes"], 1) for k in ranks},
        "tpir_at_fpir": {far_key(f): float(np.mean([g["tpir_at_fpir"][far_key(f)] for g in per])) for f in fpirs},
    }
    return out


# ------------------------------------------------------------------------------------- features file


def save_features(path, img_feats, faceness, names=None):
    """Atomic .npz with img_feats [N, 2d], faceness_scores [N] (and image_names when given)."""
    arrays = {"img_feats": np.asarray(img_feats, dtype=np.float32),
              "faceness_scores": np.asarray(faceness, dtype=np.float32)}
    if names is not None:
        arrays["image_names"] = np.asarray(names, dtype=str)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_features(path, names=None):
    """(img_feats, faceness_scores) from save_features' .npz, checked against the meta file's image list."""
    if not os.path.isfile(path):
        raise DataError(f"features file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path} is not a readable .npz ({err})") from err
    with data:
        for key in ("img_feats", "faceness_scores"):
            if key not in data.files:
                raise DataError(f"{path} has no '{key}' array (it has {', '.join(data.files)})")
        feats, faceness = data["img_feats"], data["faceness_scores"]
        stored_names = data["image_names"] if "image_names" in data.files else None
    if feats.ndim != 2 or feats.shape[1] % 2 or faceness.shape != (feats.shape[0],):
        raise DataError(f"{path}: img_feats {list(feats.shape)} must be [N, 2d] and faceness_scores "
                        f"{list(faceness.shape)} must be [N]")
    if names is not None:
        if feats.shape[0] != len(names):
            raise DataError(f"{path} holds {feats.shape[0]} rows but the meta files list {len(names)} images")
        if stored_names is not None:
            bad = np.flatnonzero(stored_names != np.asarray(names, dtype=str))
            if bad.size:
                raise DataError(f"{path}: row {int(bad[0]) + 1} is {stored_names[bad[0]]!r} but the meta files "
                                f"list {names[bad[0]]!r}; features must follow *_name_5pts_score.txt order")
    return feats, faceness
