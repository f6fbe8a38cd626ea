"""Pair selection for the losses that compare relations between samples of the global batch (ekd, mrd).

Pure functions on detached tensors and no collectives: every rank, given the same all-gathered batch, picks the
same pairs, which is what lets a per-rank loss average to the one-process loss.
"""
import math

import torch


def upper_pairs(labels):
    """(first, second, same_identity) of every pair i < j of a batch, in row-major order."""
    n = labels.shape[0]
    first, second = torch.triu_indices(n, n, 1, device=labels.device)
    return first, second, labels[first] == labels[second]


def fpr_index(count, fpr):
    """0-based position, in descending order, of the negative similarity at false-positive rate `fpr` among
    `count` negatives: floor(count * fpr), so that at most a fraction fpr of them lie strictly above it."""
    return min(count - 1, math.floor(round(count * fpr, 9)))


def fpr_thresholds(negative_sims, fprs):
    """[K] the similarity at each target false-positive rate, read from one batch's negative pairs."""
    count = negative_sims.numel()
    positions = [fpr_index(count, f) for f in fprs]
    top = negative_sims.topk(max(positions) + 1).values
    return top[torch.tensor(positions, device=top.device)]


def accept_counts(sims, thresholds):
    """[P] int: at how many of the operating points (thresholds) each pair is accepted (similarity above)."""
    return (sims[:, None] > thresholds[None, :]).sum(dim=1)


def soft_accept_counts(sims, thresholds, tau):
    """[P] the differentiable count: sum_k sigmoid((sim - threshold_k) / tau)."""
    return torch.sigmoid((sims[:, None] - thresholds[None, :]) / tau).sum(dim=1)


def critical_pairs(same, student_counts, teacher_counts):
    """(positive, negative) masks of the pairs on which the student's decisions at the operating points are worse
    than the teacher's: positives it accepts at fewer points (lost true accepts), negatives it accepts at more
    (extra false accepts)."""
    return same & (student_counts < teacher_counts), ~same & (student_counts > teacher_counts)


def keep_top_k(scores, mask, k):
    """1-D mask: of the entries in `mask`, the k with the largest score (all of them when k is None or larger)."""
    if k is None or int(mask.sum()) <= k:
        return mask.clone()
    keep = torch.zeros_like(mask)
    keep[scores.masked_fill(~mask, float("-inf")).topk(k).indices] = True
    return keep


def per_row_top_k(scores, candidates, k):
    """[b, N] mask: in each row, the k candidates with the largest score (fewer when fewer exist)."""
    mask = torch.zeros_like(candidates)
    k = min(int(k), scores.shape[1])
    if k <= 0:
        return mask
    values, index = scores.masked_fill(~candidates, float("-inf")).topk(k, dim=1)
    return mask.scatter_(1, index, torch.isfinite(values))
