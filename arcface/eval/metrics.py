"""Score-level metrics shared by the .bin and IJB evaluations, in plain numpy (no sklearn at run time).

`roc_curve` reproduces sklearn.metrics.roc_curve (binary labels, no sample weights, drop_intermediate=True,
first threshold +inf) because upstream's TAR@FAR numbers are read off that exact list of ROC points.
`tar_at_far` applies upstream's rule: flip the curve, then for each FAR take the TPR of the first point
whose FPR is nearest to the FAR (not interpolated, not "best TPR with FPR <= FAR").
"""
import math

import numpy as np

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(labels, scores, drop_intermediate=True):
    """(fpr, tpr, thresholds) exactly as sklearn.metrics.roc_curve(labels, scores) for 0/1 labels."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.shape[0]}) and scores ({scores.shape[0]}) differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    positive = labels == 1
    order = np.argsort(scores, kind="mergesort")[::-1]  # descending, ties keep reversed input order as sklearn
    sorted_scores = scores[order]
    sorted_pos = positive[order]
    distinct = np.flatnonzero(np.diff(sorted_scores))
    idx = np.r_[distinct, sorted_pos.size - 1]
    tps = np.cumsum(sorted_pos, dtype=np.float64)[idx]
    fps = 1.0 + idx - tps
    thresholds = sorted_scores[idx]
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def auc(x, y):
    """Trapezoidal area under a monotonic curve (sklearn.metrics.auc for an increasing x)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def tar_at_far_from_roc(fpr, tpr, fars=IJB_FARS):
    """{far: tar} by upstream's nearest-FPR rule on the flipped curve (ties go to the larger TPR)."""
    fpr_flip = np.flipud(np.asarray(fpr))
    tpr_flip = np.flipud(np.asarray(tpr))
    return {float(far): float(tpr_flip[int(np.argmin(np.abs(fpr_flip - far)))]) for far in fars}


def tar_at_far(labels, scores, fars=IJB_FARS):
    """TAR at each FAR for similarity `scores` (higher = more alike) and 0/1 `labels`."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return tar_at_far_from_roc(fpr, tpr, fars)


def impostors_needed(far):
    """The fewest impostor pairs at which `far` is an operating point of the ROC: one false accept allowed.

    With fewer, no ROC point lies between FPR 0 and `far`; the nearest-FPR rule would then report the TAR of
    another FPR (often 0) under this FAR's name. The .bin and IJB evaluations both leave such FARs empty.
    """
    return math.ceil(round(1.0 / far, 9))


def supported_fars(num_negatives, fars):
    """The FARs that the given number of impostor pairs can resolve (see impostors_needed)."""
    return tuple(far for far in fars if num_negatives >= impostors_needed(far))


def resolved_tar_at_far(fpr, tpr, fars, num_impostors):
    """{far: TAR} by upstream's rule where the impostor count resolves the FAR, {far: None} elsewhere."""
    usable = supported_fars(num_impostors, fars)
    tars = tar_at_far_from_roc(fpr, tpr, usable) if usable else {}
    return {float(far): tars.get(float(far)) for far in fars}


def far_key(far):
    """Column / JSON key as upstream's table header prints the FAR: 1e-06, 1e-05, 0.0001, 0.001, 0.01, 0.1."""
    power = 10 ** round(math.log10(far))
    return str(power) if math.isclose(power, far, rel_tol=1e-12) else repr(float(far))


def contiguous_folds(n, nfolds):
    """(train, test) index pairs of sklearn KFold(n_splits=nfolds, shuffle=False): the first n % k folds get one extra."""
    if nfolds < 2:
        idx = np.arange(n)
        return [(idx, idx)]
    if n < nfolds:
        raise ValueError(f"cannot split {n} pairs into {nfolds} folds")
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    folds = []
    for k in range(nfolds):
        test = np.arange(bounds[k], bounds[k + 1])
        train = np.r_[np.arange(0, bounds[k]), np.arange(bounds[k + 1], n)]
        folds.append((train, test))
    return folds


def kfold_accuracy(dist, issame, thresholds, nfolds=10):
    """Per-fold accuracy with the threshold chosen on the other folds (predict same when dist < threshold).

    Returns (accuracy per fold, threshold per fold). The first best threshold wins ties, as np.argmax upstream.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    correct = (dist[:, None] < thresholds[None, :]) == issame[:, None]  # [pairs, thresholds]
    accuracies, chosen = [], []
    for train, test in contiguous_folds(dist.size, nfolds):
        train_acc = correct[train].sum(0) / train.size
        best = int(np.argmax(train_acc))
        accuracies.append(correct[test, best].sum() / test.size)
        chosen.append(thresholds[best])
    return np.asarray(accuracies), np.asarray(chosen)
