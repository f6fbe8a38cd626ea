"""AdaDistill: distillation inside the margin softmax (Boutros, Struc, Damer, ECCV 2024; paper.md section 4)."""
import torch
import torch.nn.functional as F

from arcface.engine.distributed import all_gather_nograd
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..head_terms import (
    no_term,
    require_head,
    require_no_projector,
    require_unit_weight,
)
from .base import KDLoss
from .registry import register_kd_loss


def occurrence_rank(rows):
    """[n] how many earlier entries of `rows` hold the same value (0 for a first occurrence), by position."""
    order = torch.sort(rows, stable=True).indices
    ordered = rows[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(starts, torch.arange(rows.numel(), device=rows.device), 0), 0).values
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(rows.numel(), device=rows.device) - run_start
    return rank


@torch.no_grad()
def follow_teacher(centres, class_start, student, teacher, labels, hard_weighting):
    """Move this shard's centres towards the teacher embeddings of their samples, in batch order; statistics.

    centres: [num_local, d] this rank's rows (classes class_start ...), changed in place; student, teacher: the
    whole batch's unit embeddings [B, d]; labels [B]. Sample k of class y (in batch order) does
        w_y <- a_k w_y + (1 - a_k) t_k,  a_k = clamp(cos(s_k, t_k) * cos(w_y, t_k), 1e-6, 1)   (hard_weighting)
                                          a_k = clamp(cos(s_k, t_k), 1e-6, 1)                  (plain adaptive)
    where w_y already includes the earlier samples of y: a class seen K times (P x K) is updated K times in
    order, so the result is a function of the batch alone, whoever owns the shard.
    """
    rows = labels - class_start
    owned = torch.nonzero((rows >= 0) & (rows < centres.shape[0])).view(-1)
    stats = {"alpha": 0.0, "lambda": 0.0, "updates": float(owned.numel())}
    if owned.numel() == 0:
        return stats
    rows, s, t = rows[owned], student[owned].to(centres.dtype), teacher[owned].to(centres.dtype)
    cos_st = (s * t).sum(dim=1).clamp(-1.0, 1.0)
    rank = occurrence_rank(rows)
    alpha_sum = lam_sum = 0.0
    for r in range(int(rank.max()) + 1):
        now = torch.nonzero(rank == r).view(-1)            # distinct classes: one vectorised update
        w = centres[rows[now]]
        if hard_weighting:
            lam = F.cosine_similarity(w, t[now], dim=1, eps=1e-12).clamp(1e-6, 1.0)
            alpha = (cos_st[now] * lam).clamp(1e-6, 1.0)
            lam_sum += float(lam.sum())
        else:
            alpha = cos_st[now].clamp(1e-6, 1.0)
        centres[rows[now]] = alpha[:, None] * w + (1.0 - alpha[:, None]) * t[now]
        alpha_sum += float(alpha.sum())
    stats["alpha"] = alpha_sum / owned.numel()
    stats["lambda"] = lam_sum / owned.numel() if hard_weighting else 0.0
    return stats


@register_kd_loss("adadistill")
class AdaDistillLoss(KDLoss):
    """The student's margin softmax against class centres that follow the teacher's embeddings.

    configure_head freezes Partial FC's centres (the optimizer never moves them: AdaDistill trains only the
    backbone); before every Partial FC forward, before_head moves each class centre towards the teacher
    embeddings of its samples in the batch with an adaptive EMA (follow_teacher): a sample the student already
    matches (cos(s, t) high) and whose class centre agrees with the teacher (cos(w, t) high) changes the centre
    little; a hard one pulls it towards the teacher. The centres start from Partial FC's own initialisation; the
    first sample of a class nearly replaces it (cos(w, t) ~ 0 gives a ~ 1e-6). The margin is the engine's
    (margin_list; AdaDistill: ArcFace m=0.45 or CosFace m=0.35, s=64).

    Parameters (config keys):
        hard_weighting: a = cos(s, t) * cos(w, t) (True, the paper's best, "AdaArcDistill") or a = cos(s, t)
            (False, its plain adaptive alpha).

    Weight: the term itself is zero, the distillation is loss/cls; only weight 1 is accepted (head_terms.py).
    Distributed: every rank gathers the detached batch (student, teacher, labels) and updates only the classes of
    its own shard, in global batch order, so 2 processes hold exactly the centres of 1 process. (Upstream updates
    each rank's full centre table from its local batch only, and keeps one arbitrary write per repeated class.)
    Statistics (of the previous micro-step's update, this rank's shard): alpha, lambda, updates; cos_st (global).
    """
    uses_head = True

    def __init__(self, hard_weighting=True):
        super().__init__()
        if not isinstance(hard_weighting, bool):
            raise ConfigError(f"KD loss 'adadistill': hard_weighting must be True or False, got {hard_weighting!r}")
        self.hard_weighting = hard_weighting
        self.head = None
        self._stats = {}

    def configure_head(self, head):
        require_head(head, self.name)
        head.weight.requires_grad_(False)
        self.head = head

    def bind_training(self, ctx):
        require_unit_weight(ctx.cfg, self.name)
        require_no_projector(ctx.cfg, self.name)
        if self.head is None:
            raise ConfigError("KD loss 'adadistill' works inside Partial FC, but this host never called "
                              "configure_head (patches/ukd_graft.py runs upstream's head: use tools/train.py)")

    def before_head(self, head, batch: KDBatch):
        if batch.teacher.shape[1] != head.weight.shape[1]:
            raise ConfigError(f"KD loss 'adadistill' moves {head.weight.shape[1]}-d class centres towards "
                              f"{batch.teacher.shape[1]}-d teacher embeddings: set embedding_size = "
                              "kd.teacher_embedding_size")
        with torch.no_grad():
            student = F.normalize(all_gather_nograd(batch.student.detach().float()), dim=1)
            teacher = F.normalize(batch.gathered_teacher().float(), dim=1)
            stats = follow_teacher(head.weight.data, head.class_start, student, teacher, batch.gathered_labels(),
                                   self.hard_weighting)
            stats["cos_st"] = float((student * teacher).sum(dim=1).mean())
        self._stats = stats

    def forward(self, batch: KDBatch) -> KDOutput:
        return no_term(batch, self._stats)
