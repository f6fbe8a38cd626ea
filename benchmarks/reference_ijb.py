"""REFERENCE ONLY: our own plain, loop-based re-implementation of upstream's IJB routines.

Written by us from reading insightface's recognition/arcface_torch/eval_ijbc.py (1:1) and
recognition/_evaluation_/ijb/ijb_evals.py (1:N); not a copy of that code. It follows the same steps in
the same naive way (a Python loop over templates with np.where per template and per media, pair scores
in chunks of 100k through a template-id lookup array, sklearn-style ROC with explicit loops, a loop over
probes for 1:N) so tests can check that the vectorised arcface.eval.ijb gives the same numbers and
bench_ijb.py can time the two side by side. Do not use it for real evaluations: it is slow on purpose.
"""
import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def reference_image_features(img_feats, faceness, use_norm_score=True, use_detector_score=True, use_flip_test=True):
    """Per-image input features with upstream's switches, in upstream's float32 arithmetic order."""
    half = img_feats.shape[1] // 2
    if use_flip_test:
        feats = img_feats[:, :half] + img_feats[:, half:]
    else:
        feats = img_feats[:, :half]
    if not use_norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, axis=-1, keepdims=True))
    if use_detector_score:
        feats = feats * faceness[:, np.newaxis]
    return feats


def reference_template_features(feats, templates, medias, template_subset=None):
    """Loop over templates: media mean (single images kept), sum over medias, then L2 (zero rows stay zero)."""
    unique_templates = np.unique(templates) if template_subset is None else np.asarray(template_subset)
    out = np.zeros((len(unique_templates), feats.shape[1]))
    for row, template in enumerate(unique_templates):
        members = np.where(templates == template)[0]
        template_feats = feats[members]
        template_medias = medias[members]
        media_vectors = []
        for media in np.unique(template_medias):
            in_media = np.where(template_medias == media)[0]
            if len(in_media) == 1:
                media_vectors.append(template_feats[in_media[0]])
            else:
                media_vectors.append(np.mean(template_feats[in_media], axis=0))
        out[row] = np.sum(np.array(media_vectors), axis=0)
    norms = np.sqrt(np.sum(out ** 2, axis=1, keepdims=True))
    norms[norms == 0] = 1.0
    return out / norms, unique_templates


def reference_scores(template_feats, unique_templates, p1, p2, chunk=100000):
    """Cosine per pair through a template-id -> row lookup array, 100k pairs at a time."""
    lookup = np.zeros(int(np.max(unique_templates)) + 1, dtype=np.int64)
    for row, template in enumerate(unique_templates):
        lookup[template] = row
    scores = np.zeros(len(p1))
    for start in range(0, len(p1), chunk):
        a = template_feats[lookup[p1[start:start + chunk]]]
        b = template_feats[lookup[p2[start:start + chunk]]]
        scores[start:start + chunk] = np.sum(a * b, axis=-1)
    return scores


def reference_roc(labels, scores):
    """sklearn.metrics.roc_curve semantics, written as loops: one point per distinct score, collinear
    interior points dropped, a leading (0, 0) point with threshold +inf."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    tps, fps, thresholds = [], [], []
    tp = fp = 0
    for n, index in enumerate(order):
        if labels[index] == 1:
            tp += 1
        else:
            fp += 1
        last = n == len(order) - 1
        if last or scores[order[n + 1]] != scores[index]:
            tps.append(tp)
            fps.append(fp)
            thresholds.append(scores[index])
    if len(fps) > 2:
        keep = [0]
        for i in range(1, len(fps) - 1):
            bends = (fps[i + 1] - 2 * fps[i] + fps[i - 1]) != 0 or (tps[i + 1] - 2 * tps[i] + tps[i - 1]) != 0
            if bends:
                keep.append(i)
        keep.append(len(fps) - 1)
        tps = [tps[i] for i in keep]
        fps = [fps[i] for i in keep]
        thresholds = [thresholds[i] for i in keep]
    tps = [0] + tps
    fps = [0] + fps
    thresholds = [np.inf] + thresholds
    fpr = np.array(fps, dtype=np.float64) / fps[-1]
    tpr = np.array(tps, dtype=np.float64) / tps[-1]
    return fpr, tpr, np.array(thresholds)


def reference_tar_at_far(labels, scores, fars=FARS):
    """Upstream's table rule: reverse the ROC, take the TPR of the first point nearest in FPR to each FAR."""
    fpr, tpr, _ = reference_roc(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = {}
    for far in fars:
        _, best = min(zip(np.abs(fpr - far), range(len(fpr))))
        out[far] = float(tpr[best])
    return out


def reference_identification(probe_feats, probe_ids, gallery_feats, gallery_ids, fpirs=(0.01, 0.1), ranks=(1, 5, 10)):
    """ijb_evals.py-style open-set search of one gallery, one probe at a time."""
    sims = probe_feats @ gallery_feats.T
    hits = {k: 0 for k in ranks}
    pos_sims, neg_max, nonmated = [], [], []
    for i, subject in enumerate(probe_ids):
        row = sims[i]
        if subject in gallery_ids:
            target = int(np.argwhere(gallery_ids == subject)[0, 0])
            ranked = np.argsort(row, kind="stable")[::-1]
            for k in ranks:
                hits[k] += int(target in ranked[:k])
            pos_sims.append(row[gallery_ids == subject][0])
            others = row[gallery_ids != subject]
            neg_max.append(others.max() if others.size else -np.inf)
        else:
            nonmated.append(row.max())
    pos_sims, neg_max = np.array(pos_sims), np.array(neg_max)
    correct = pos_sims > neg_max
    ordered = np.sort(np.array(nonmated))[::-1]
    tpir = {}
    for fpir in fpirs:
        threshold = ordered[max(int(len(ordered) * fpir) - 1, 0)]
        tpir[fpir] = float(np.sum(correct & (pos_sims > threshold)) / len(pos_sims))
    return {"rank_hits": hits, "mated": len(pos_sims), "tpir": tpir}
