"""EKD: evaluation-oriented knowledge distillation (Huang et al., CVPR 2022; paper.md section 4)."""
import numbers

import torch
import torch.nn.functional as F

from arcface.engine.distributed import all_gather_nograd
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..pair_mining import (
    accept_counts,
    critical_pairs,
    fpr_thresholds,
    keep_top_k,
    soft_accept_counts,
    upper_pairs,
)
from .base import KDLoss, compute_dtype
from .registry import register_kd_loss

SELECTIONS = ("critical", "hard")
TFACE_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def select_pairs(s_pair, t_pair, same, s_thresholds, t_thresholds, selection, k_neg):
    """(positive, negative) masks over the pairs: see EKDLoss for the two rules."""
    if selection == "hard":
        pos, neg_pool = same, ~same
    else:
        pos, neg_pool = critical_pairs(same, accept_counts(s_pair, s_thresholds), accept_counts(t_pair, t_thresholds))
    return pos, keep_top_k(s_pair, neg_pool, k_neg)


@register_kd_loss("ekd")
class EKDLoss(KDLoss):
    """Match, on the pairs that decide verification, how many operating points accept the pair.

    Every pair i < j of the all-gathered batch has a student similarity s_ij = <s^_i, s^_j> and a teacher one
    t_ij = <t^_i, t^_j>. Each model has one threshold per target false-positive rate f_k: the similarity that
    a fraction f_k of the batch's negative pairs exceeds, followed over steps by an EMA (momentum), separately for
    student and teacher. The rank of a pair is the soft count of thresholds it passes,
    r(x) = sum_k sigmoid((x - threshold_k) / tau), and the loss is

        L = w_pos * mean_{selected positives} (r_s - r_t)^2 + w_neg * mean_{selected negatives} (r_s - r_t)^2.

    Pair selection (from detached similarities):
        'critical' (default, the paper's description): the pairs on which the student's verification decisions
            differ from the teacher's to its harm, counted with each model's own thresholds: positives the
            student accepts at fewer operating points than the teacher (it ranks them below threshold), negatives
            it accepts at more (ranks them above); of those negatives the k_neg the student finds most similar.
        'hard' (TFace's released code): every positive pair and the k_neg negatives the student finds most similar.

    Parameters (config keys):
        fprs: the target false-positive rates, each in (0, 1) (TFace: 1e-1 ... 1e-6).
        tau: sigmoid temperature of the rank count (0.01, TFace's and the paper's best).
        momentum: weight of the current batch in the thresholds' EMA (0.01, TFace); the first step sets them.
        selection: 'critical' or 'hard'.
        k_neg: most negative pairs kept (2000, TFace; the paper found 2000 better than 5000); None keeps all.
        w_pos, w_neg: factors of the two means (0.02, 0.01: TFace's objective at term weight 1).

    Distributed: thresholds and selection come from the all-gathered, detached batch, so they are the same on
    every rank and in one process. A pair's term depends on both of its samples; rank r evaluates the pairs
    touching its local samples, once per local end, against the detached gathered student. Summed over ranks
    that counts every pair twice in value and once in gradient, so each rank returns
    world_size * (half that sum in value, the whole sum in gradient): the mean over ranks is L and DDP's
    average of gradients is the gradient of L.
    Relational: student and teacher embeddings may differ in size (no projector needed).
    Statistics: pos_pairs, neg_pairs (selected, global), rank_gap (mean |r_s - r_t| over them), t_threshold and
    s_threshold at the first target FPR.
    """
    compares_instances = False   # similarities only: the student may have another embedding size

    def __init__(self, fprs=TFACE_FPRS, tau=0.01, momentum=0.01, selection="critical", k_neg=2000, w_pos=0.02,
                 w_neg=0.01):
        super().__init__()
        where = "KD loss 'ekd'"
        if isinstance(fprs, (str, bytes)) or not hasattr(fprs, "__iter__") or not list(fprs):
            raise ConfigError(f"{where}: fprs must be a non-empty list of false-positive rates in (0, 1), "
                              f"got {fprs!r}")
        fprs = list(fprs)
        for f in fprs:
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) < 1.0:
                raise ConfigError(f"{where}: every entry of fprs must be a false-positive rate in (0, 1), got {f!r} "
                                  f"in fprs={fprs!r}")
        if float(tau) <= 0:
            raise ConfigError(f"{where}: tau must be > 0, got {tau}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ConfigError(f"{where}: momentum must be in (0, 1], got {momentum}")
        if selection not in SELECTIONS:
            raise ConfigError(f"{where}: selection must be one of {SELECTIONS}, got {selection!r}")
        if k_neg is not None and (isinstance(k_neg, bool) or int(k_neg) != k_neg or int(k_neg) < 1):
            raise ConfigError(f"{where}: k_neg must be a positive integer or None, got {k_neg!r}")
        for key, value in (("w_pos", w_pos), ("w_neg", w_neg)):
            if float(value) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        self.fprs = [float(f) for f in fprs]
        self.tau, self.momentum, self.selection = float(tau), float(momentum), selection
        self.k_neg = None if k_neg is None else int(k_neg)
        self.w_pos, self.w_neg = float(w_pos), float(w_neg)
        self.register_buffer("s_thresholds", torch.zeros(len(self.fprs), dtype=torch.float64))
        self.register_buffer("t_thresholds", torch.zeros(len(self.fprs), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def check(self, global_batch_size, pk_sampler):
        if global_batch_size < 3:
            raise ConfigError(f"KD loss 'ekd' reads thresholds from the negative pairs of the global batch; a "
                              f"global batch of {global_batch_size} has too few")

    @torch.no_grad()
    def _follow_thresholds(self, s_neg, t_neg):
        """EMA of each model's thresholds at the target FPRs; the first batch with negatives sets them."""
        if s_neg.numel() == 0:
            return
        s_now = fpr_thresholds(s_neg, self.fprs).to(self.s_thresholds)
        t_now = fpr_thresholds(t_neg, self.fprs).to(self.t_thresholds)
        keep = 0.0 if not bool(self.seen) else 1.0 - self.momentum
        self.s_thresholds.mul_(keep).add_((1.0 - keep) * s_now)
        self.t_thresholds.mul_(keep).add_((1.0 - keep) * t_now)
        self.seen.fill_(True)

    def forward(self, batch: KDBatch) -> KDOutput:
        dtype = compute_dtype(batch.student)
        s_local = F.normalize(batch.student.to(dtype), dim=1)
        with torch.no_grad():
            s_all = F.normalize(all_gather_nograd(batch.student.detach().to(dtype)), dim=1)
            t_all = F.normalize(batch.gathered_teacher().to(dtype), dim=1)
            first, second, same = upper_pairs(batch.gathered_labels())
            s_pair = (s_all @ s_all.t())[first, second]
            t_pair = (t_all @ t_all.t())[first, second]
            self._follow_thresholds(s_pair[~same], t_pair[~same])
            s_thr, t_thr = self.s_thresholds.to(dtype), self.t_thresholds.to(dtype)
            pos, neg = select_pairs(s_pair, t_pair, same, s_thr, t_thr, self.selection, self.k_neg)
            n_pos, n_neg = int(pos.sum()), int(neg.sum())
            coef = torch.zeros_like(s_pair)
            if n_pos:
                coef[pos] = self.w_pos / n_pos
            if n_neg:
                coef[neg] = self.w_neg / n_neg
            chosen = pos | neg
            # each chosen pair once per end; keep the ends that are this rank's samples
            rows = torch.cat([first[chosen], second[chosen]])
            cols = torch.cat([second[chosen], first[chosen]])
            factor = coef[chosen].repeat(2)
            r_t = soft_accept_counts(t_pair[chosen], t_thr, self.tau).repeat(2)
            mine = (rows >= batch.offset) & (rows < batch.offset + batch.local_size)
            rows, cols, factor, r_t = rows[mine] - batch.offset, cols[mine], factor[mine], r_t[mine]

        sims = (s_local[rows] * s_all[cols]).sum(dim=1)
        r_s = soft_accept_counts(sims, s_thr, self.tau)
        ends = (factor * (r_s - r_t).pow(2)).sum()
        loss = batch.world_size * (0.5 * ends.detach() + (ends - ends.detach()))
        with torch.no_grad():
            stats = {"pos_pairs": float(n_pos), "neg_pairs": float(n_neg),
                     "rank_gap": float((r_s - r_t).abs().mean()) if r_s.numel() else 0.0,
                     "t_threshold": float(self.t_thresholds[0]), "s_threshold": float(self.s_thresholds[0])}
        return KDOutput(loss=loss, stats=stats)
