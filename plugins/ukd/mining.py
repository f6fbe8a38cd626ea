"""Sample mining for the KD losses, as pure functions on tensors (no state, no collectives).

ILED picks hard instances over the global batch; RPSD picks, per anchor, its positive keys and its
negative keys. Every choice is made from detached values (distances, margins, teacher similarities), so the
targets of the losses never move with the student's gradient. The collectives that make a choice global
(gathers, sums over ranks) belong to the losses; these functions see one rank's tensors.
"""
import math

import torch

_MASK32 = 0xFFFFFFFF


def hard_count(ratio, n):
    """ceil(ratio * n) without float noise: ratio 0.1 of 30 is 3, not 4."""
    return min(n, math.ceil(round(ratio * n, 9)))


def hard_mask_topk(distance, ratio):
    """[N] bool: the ceil(ratio * N) largest entries of a 1-D distance vector."""
    n_hard = hard_count(ratio, distance.numel())
    mask = torch.zeros_like(distance, dtype=torch.bool)
    if n_hard > 0:
        mask[distance.topk(n_hard).indices] = True
    return mask


def hard_mask_std(distance, kappa):
    """[N] bool: entries above mean + kappa * std (population std, so one sample is never hard)."""
    mean = distance.mean()
    std = distance.std(correction=0) if distance.numel() > 1 else torch.zeros_like(mean)
    return distance > mean + kappa * std


def kth_largest(values, k):
    """The k-th largest entry of a 1-D tensor (k >= 1, clipped to its length): the threshold of the top k."""
    k = min(max(int(k), 1), values.numel())
    return values.topk(k).values[-1]


def target_cosine_on_shard(embeddings, labels, centres, class_start):
    """[n] cos(e_i, w_{y_i}) for the samples whose class centre lies in this shard (rows
    [class_start, class_start + len(centres)) of the classifier), 0 for the others: summed over the shards
    (ranks) it is every sample's target cosine, the margin head's cos(theta_y) before the margin."""
    local = labels.to(torch.int64) - int(class_start)
    inside = (local >= 0) & (local < centres.shape[0])
    out = torch.zeros(labels.shape[0], dtype=embeddings.dtype, device=embeddings.device)
    if bool(inside.any()):
        e = torch.nn.functional.normalize(embeddings[inside], dim=1)
        w = torch.nn.functional.normalize(centres[local[inside]].to(embeddings.dtype), dim=1)
        out[inside] = (e * w).sum(dim=1)
    return out


def positive_mask(anchor_labels, key_labels, key_valid):
    """[b, N] bool: valid keys that share the anchor's label. Self must already be invalid in key_valid."""
    return key_valid & (anchor_labels[:, None] == key_labels[None, :])


def negative_candidates(anchor_labels, key_labels, key_valid):
    """[b, N] bool: valid keys of another label."""
    return key_valid & (anchor_labels[:, None] != key_labels[None, :])


def top_k_mask(scores, candidates, k):
    """[b, N] bool: per row, the k candidates with the largest score (fewer when fewer exist)."""
    mask = torch.zeros_like(candidates)
    k = min(k, scores.shape[1])
    if k <= 0:
        return mask
    masked = scores.masked_fill(~candidates, float("-inf"))
    values, index = masked.topk(k, dim=1)
    mask.scatter_(1, index, torch.isfinite(values))
    return mask


def hard_negative_mask(teacher_sim, candidates, k):
    """[b, N] bool: per anchor, the k negatives the TEACHER finds most similar."""
    return top_k_mask(teacher_sim, candidates, k)


def critical_negative_mask(teacher_sim, candidates, threshold, k):
    """[b, N] bool: per anchor, the k negatives whose teacher similarity lies closest to `threshold` (the
    teacher's decision threshold at a target FAR): the impostor pairs that verification at that FAR decides."""
    return top_k_mask(-(teacher_sim - threshold).abs(), candidates, k)


def impostor_top_values(teacher_sim, candidates, m):
    """The m largest teacher similarities among the candidate (impostor) pairs, flattened (-inf pads when fewer
    exist). Every rank's top m, gathered, hold the global top m: the threshold at FAR m / (global impostors)."""
    flat = teacher_sim.masked_fill(~candidates, float("-inf")).flatten()
    return flat.topk(min(int(m), flat.numel())).values


def hash_uniform(seed, step, rows, n_cols):
    """[len(rows), n_cols] floats in [0, 1), a pure function of (seed, step, row id, column).

    A counter-based hash instead of a generator: every rank draws the same numbers for the same global
    anchor whatever its rank or the world size, with no generator state to save or to keep in sync.
    """
    rows = rows.to(torch.int64)[:, None]
    cols = torch.arange(n_cols, device=rows.device, dtype=torch.int64)[None, :]
    salt = (int(step) * 0x632BE5AB + int(seed) * 0x85EBCA77) & _MASK32
    x = (rows * 0x2545F491 + cols * 0x9E3779B1 + salt) & _MASK32
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * 0x045D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return x.to(torch.float64).div_(2.0 ** 32).to(torch.float32)


def random_negative_mask(candidates, k, seed, step, rows):
    """[b, N] bool: per anchor, k candidates drawn uniformly without replacement, deterministic per step.

    rows are the anchors' positions in the global batch, so the draw does not depend on the rank.
    """
    if k <= 0:
        return torch.zeros_like(candidates)
    scores = hash_uniform(seed, step, rows, candidates.shape[1])
    return top_k_mask(scores, candidates, k)
