"""IJB-C-sized template aggregation + 1:1 scoring: arcface.eval.ijb vs the loop reference, side by side.

    python -m benchmarks.bench_ijb                      # reference timed on a fraction, extrapolated
    python -m benchmarks.bench_ijb --full               # reference timed on everything (minutes)
    python -m benchmarks.bench_ijb --images 50000 --templates 2500 --pairs 1000000   # smaller

Synthetic features of IJB-C's size: 469,375 images, 23,124 templates (~20 images each, spread over
media with several frames), 15,658,489 random template pairs of which 19,557 are labelled genuine, d=512
(img_feats [N, 1024] float32 as upstream stores original | flip). Mode N1D1F1 (upstream's).
The reference (benchmarks/reference_ijb.py) loops over templates with np.where, so its aggregation time is
linear in the number of templates processed; its pair scoring is linear in the pairs. Unless --full, both
are timed on a stated fraction and scaled up, and the output says so.
"""
import argparse
import time

import numpy as np


from arcface.eval import ijb
from arcface.eval.metrics import tar_at_far
from benchmarks.common import machine, peak_rss_mb
from benchmarks.reference_ijb import (reference_image_features, reference_scores,
                                      reference_template_features)


def synthetic_protocol(images, templates, pairs, genuine, dim, seed=0):
    rng = np.random.default_rng(seed)
    template_of_image = np.concatenate([np.arange(templates), rng.integers(0, templates, images - templates)])
    template_ids = np.sort(rng.choice(np.arange(1, 10 * templates), templates, replace=False))
    tids = template_ids[template_of_image]
    medias = template_of_image * 8 + rng.integers(0, 8, images)  # ~2.5 frames per media on average
    feats = rng.standard_normal((images, 2 * dim), dtype=np.float32)
    faceness = rng.uniform(0.1, 1.0, images).astype(np.float32)
    p1 = template_ids[rng.integers(0, templates, pairs)]
    p2 = template_ids[rng.integers(0, templates, pairs)]
    label = np.zeros(pairs, dtype=np.int64)
    label[rng.choice(pairs, genuine, replace=False)] = 1
    return feats, faceness, tids, medias, p1, p2, label


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=469_375)
    p.add_argument("--templates", type=int, default=23_124)
    p.add_argument("--pairs", type=int, default=15_658_489)
    p.add_argument("--genuine", type=int, default=19_557)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ref-templates", type=int, default=2_000, help="templates the reference aggregates (not --full)")
    p.add_argument("--ref-pairs", type=int, default=2_000_000, help="pairs the reference scores (not --full)")
    p.add_argument("--full", action="store_true", help="time the reference on everything")
    args = p.parse_args()
    print(machine())
    print(f"protocol: {args.images} images, {args.templates} templates, {args.pairs} pairs "
          f"({args.genuine} genuine), d={args.dim}, mode N1D1F1")

    t0 = time.perf_counter()
    feats, faceness, tids, medias, p1, p2, label = synthetic_protocol(
        args.images, args.templates, args.pairs, args.genuine, args.dim)
    print(f"synthetic data: {time.perf_counter() - t0:.1f} s, img_feats {feats.nbytes / 2**30:.2f} GiB")

    mode = ijb.Mode(True, True, True)
    t0 = time.perf_counter()
    t_feats, unique = ijb.template_features(feats, faceness, tids, medias, mode)
    ours_agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = ijb.score_pairs(t_feats, unique, p1, p2)
    ours_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    tars = tar_at_far(label, scores)
    ours_roc = time.perf_counter() - t0
    ours = ours_agg + ours_score
    print(f"ours: aggregation {ours_agg:.2f} s + scoring {ours_score:.2f} s = {ours:.2f} s "
          f"(ROC + TAR@FAR afterwards: {ours_roc:.2f} s); peak RSS {peak_rss_mb():.0f} MB")
    print("  TAR@FAR (random features, sanity only):", {k: round(v, 5) for k, v in tars.items()})

    n_t = unique.size if args.full else min(args.ref_templates, unique.size)
    n_p = args.pairs if args.full else min(args.ref_pairs, args.pairs)
    t0 = time.perf_counter()
    x = reference_image_features(feats, faceness, True, True, True)
    ref_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_feats, _ = reference_template_features(x, tids, medias, template_subset=unique[:n_t])
    ref_agg_part = time.perf_counter() - t0
    del x
    t0 = time.perf_counter()
    ref_scores = reference_scores(t_feats, unique, p1[:n_p], p2[:n_p])
    ref_score_part = time.perf_counter() - t0
    agg_scale, score_scale = unique.size / n_t, args.pairs / n_p
    ref_agg = ref_prep + ref_agg_part * agg_scale
    ref_score = ref_score_part * score_scale
    ref = ref_agg + ref_score
    feat_diff = float(np.abs(ref_feats - t_feats[:n_t]).max())
    score_diff = float(np.abs(ref_scores - scores[:n_p]).max())
    how = "measured on everything" if args.full else (
        f"EXTRAPOLATED: aggregation timed on {n_t}/{unique.size} templates (x{agg_scale:.2f}), "
        f"scoring on {n_p}/{args.pairs} pairs (x{score_scale:.2f})")
    print(f"reference: prep {ref_prep:.2f} s + aggregation {ref_agg - ref_prep:.2f} s + scoring {ref_score:.2f} s "
          f"= {ref:.2f} s ({how})")
    print(f"agreement on the timed part: template features max |diff| {feat_diff:.2e}, scores max |diff| {score_diff:.2e}")
    print(f"ratio reference / ours: aggregation {ref_agg / ours_agg:.1f}x, scoring {ref_score / ours_score:.1f}x, "
          f"total {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
