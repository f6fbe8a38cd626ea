"""Paired bootstrap over test subjects for TAR@FAR, with the same rule as the reported numbers.

Why subjects and not pairs: a template recurs in many pairs and a subject in several templates, so pairs are not
independent; resampling pairs would give intervals far too narrow. A replicate draws n subjects with replacement
(multiplicities w_k); a genuine pair of subject k then counts w_k times, an impostor pair of subjects (i, j)
w_i * w_j times. TAR@FAR of a replicate is the project's rule (metrics.roc_curve, upstream's nearest-FPR reading)
on that weighted pair list, i.e. exactly what tools/eval_ijb.py would print for the pair list with every pair
written out as many times as it counts: all-ones multiplicities give the reported number back.

Cost: only pairs scoring above the impostor score at FPR `HEAD_FPR_FACTOR` x the largest FAR can change a TAR
below that FAR (the nearest-FPR rule never picks a point beyond 2 x FAR), so each replicate's ROC is built on that
head and the whole-list totals; a replicate whose weighted head does not reach 2 x FAR falls back to the full list.

Paired: every model is scored on the same replicates (and, for the seed-pooled difference, the same resampled
seeds), so a difference's interval carries the test-set noise once, not twice.
"""
import numpy as np
import torch

from arcface.errors import DataError
from arcface.eval.metrics import tar_at_far_from_roc

HEAD_FPR_FACTOR = 4.0


def _sorted_groups(scores):
    """Descending order of the scores and the last position of each run of equal scores in that order."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ordered = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]
    return order, ends


def _roc_points(cum_pos, cum_neg, ends, total_pos, total_neg, truncated):
    """(fpr, tpr) of the weighted ROC: sklearn's curve with sample weights (zero-weight thresholds removed,
    collinear points dropped); `truncated`: the arrays are the head of a longer list, so its last point is kept
    without looking beyond it."""
    tps, fps = cum_pos[ends], cum_neg[ends]
    steps = np.diff(np.r_[0.0, tps + fps])
    nonzero = steps > 0
    tps, fps = tps[nonzero], fps[nonzero]
    if fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        if truncated:
            keep[-1] = True
        tps, fps = tps[keep], fps[keep]
    return np.r_[0.0, fps] / total_neg, np.r_[0.0, tps] / total_pos


def weighted_tar_at_far(scores, labels, weights, fars):
    """TAR at each FAR of pairs counted `weights` times (floats allowed): the reference, on the whole list."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    weights = np.asarray(weights, dtype=np.float64)
    if not (scores.shape == labels.shape == weights.shape):
        raise DataError(f"scores {scores.shape}, labels {labels.shape} and weights {weights.shape} differ in shape")
    order, ends = _sorted_groups(scores)
    pos = (labels[order] == 1) * weights[order]
    neg = (labels[order] != 1) * weights[order]
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        raise DataError("weighted TAR@FAR needs genuine and impostor pairs of positive weight")
    fpr, tpr = _roc_points(np.cumsum(pos), np.cumsum(neg), ends, total_pos, total_neg, truncated=False)
    tars = tar_at_far_from_roc(fpr, tpr, fars)
    return np.array([tars[float(f)] for f in fars])


class SubjectBootstrap:
    """Replicates of one test pair list, drawn once and shared by every model scored on it."""

    def __init__(self, subject1, subject2, labels, fars, replicates=1000, seed=0, chunk=64):
        self.labels = np.asarray(labels)
        s1, s2 = np.asarray(subject1), np.asarray(subject2)
        if not (s1.shape == s2.shape == self.labels.shape):
            raise DataError(f"pair subjects {s1.shape} / {s2.shape} and labels {self.labels.shape} differ in shape")
        genuine = self.labels == 1
        if np.any((s1 == s2) != genuine):
            raise DataError("a genuine pair must join templates of one subject and an impostor pair two subjects")
        self.fars = tuple(float(f) for f in fars)
        self.replicates, self.chunk = int(replicates), int(chunk)
        subjects, index = np.unique(np.r_[s1, s2], return_inverse=True)
        self.i1, self.i2 = index[:s1.size], index[s1.size:]
        self.n_subjects = subjects.size
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1301]))
        self.weights = rng.multinomial(self.n_subjects, np.full(self.n_subjects, 1.0 / self.n_subjects),
                                       size=self.replicates).astype(np.float64)  # [B, n]
        self.seed_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1302]))
        genuine_count = np.bincount(self.i1[genuine], minlength=self.n_subjects).astype(np.float64)
        self.total_pos = self.weights @ genuine_count
        imp1, imp2 = self.i1[~genuine], self.i2[~genuine]
        pairs = torch.from_numpy(np.stack([imp1, imp2]))
        counts = torch.sparse_coo_tensor(pairs, torch.ones(imp1.size, dtype=torch.float64),
                                         (self.n_subjects, self.n_subjects), check_invariants=False).coalesce()
        w_t = torch.from_numpy(self.weights.T.copy())  # [n, B]
        self.total_neg = ((torch.sparse.mm(counts, w_t)) * w_t).sum(0).numpy()  # sum_p w_i(p) * w_j(p)
        self.fallbacks = 0

    def pair_weights(self, rows, index=None):
        """Multiplicities of the pairs (all, or those at `index`) in replicates `rows`: [len(rows), P]."""
        i1 = self.i1 if index is None else self.i1[index]
        i2 = self.i2 if index is None else self.i2[index]
        genuine = (self.labels if index is None else self.labels[index]) == 1
        w1 = self.weights[rows][:, i1]
        return np.where(genuine[None, :], w1, w1 * self.weights[rows][:, i2])

    def point(self, scores):
        """TAR at each FAR with every pair counted once (= the reported metric)."""
        return weighted_tar_at_far(scores, self.labels, np.ones(self.labels.size), self.fars)

    def tars(self, scores):
        """[B, F]: TAR at each FAR on every replicate."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.labels.shape:
            raise DataError(f"{scores.size} scores for a pair list of {self.labels.size}")
        genuine = self.labels == 1
        impostor_scores = np.sort(scores[~genuine])[::-1]
        depth = min(impostor_scores.size - 1, int(np.ceil(HEAD_FPR_FACTOR * max(self.fars) * impostor_scores.size)))
        head = np.flatnonzero(scores >= impostor_scores[depth])
        order, ends = _sorted_groups(scores[head])
        head = head[order]
        is_pos = genuine[head]
        out = np.empty((self.replicates, len(self.fars)))
        for start in range(0, self.replicates, self.chunk):
            rows = np.arange(start, min(start + self.chunk, self.replicates))
            w = self.pair_weights(rows, head)
            cum_pos = np.cumsum(np.where(is_pos[None, :], w, 0.0), axis=1)
            cum_neg = np.cumsum(np.where(is_pos[None, :], 0.0, w), axis=1)
            for k, b in enumerate(rows):
                fpr, tpr = _roc_points(cum_pos[k], cum_neg[k], ends, self.total_pos[b], self.total_neg[b],
                                       truncated=head.size < scores.size)
                if fpr[-1] > 2.0 * max(self.fars) or head.size == scores.size:
                    tars = tar_at_far_from_roc(fpr, tpr, self.fars)
                    out[b] = [tars[f] for f in self.fars]
                    continue
                self.fallbacks += 1  # this replicate's weights thin the head out: use the whole list
                out[b] = weighted_tar_at_far(scores, self.labels, self.pair_weights([b])[0], self.fars)
        return out

    def seed_draws(self, n_seeds):
        """[B, n_seeds] resampled seed positions, one row per replicate (share them between compared methods)."""
        return self.seed_rng.integers(0, n_seeds, size=(self.replicates, n_seeds))


def percentile_interval(samples, level=0.95):
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def seed_pooled(per_seed, draws=None):
    """[B, F] seed means of per-seed replicates [S, B, F]; with `draws` [B, S] the seeds are resampled too."""
    per_seed = np.asarray(per_seed)
    if draws is None:
        return per_seed.mean(axis=0)
    rows = np.arange(per_seed.shape[1])[:, None]
    return per_seed[draws, rows, :].mean(axis=1)
