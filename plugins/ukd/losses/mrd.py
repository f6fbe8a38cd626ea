"""MRD: CoupleFace's mutual relation distillation (Liu et al., ECCV 2022; paper.md section 4), in our reading."""
import torch
import torch.nn.functional as F

from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..pair_mining import per_row_top_k
from .base import KDLoss, compute_dtype
from .registry import register_kd_loss

FORMS = ("mse", "kl")
_FAR = -1e9  # a finite "minus infinity" for masked logits (0 * inf would turn gradients into NaN)


def informative_relations(teacher_rows, labels, anchors, k_neg, positives):
    """(positive, negative) [b, N] masks of the relations mined for anchors (their positions in the batch):
    teacher_rows [b, N] the anchors' teacher similarities to every sample, labels [N] the batch's labels."""
    columns = torch.arange(labels.shape[0], device=labels.device)
    not_self = columns[None, :] != anchors[:, None]
    same = labels[anchors][:, None] == labels[None, :]
    neg = per_row_top_k(teacher_rows, not_self & ~same, k_neg)
    pos = not_self & same if positives else torch.zeros_like(neg)
    return pos, neg


@register_kd_loss("mrd")
class MRDLoss(KDLoss):
    """Distil the relations between a sample and the teacher features of other samples, on informative ones.

    CoupleFace's equations are not public to us (paper.md: only the abstract was read); this is what its abstract
    states, with our choices where it is silent. The mutual relation of sample i with sample j is, for the
    student, r_s(i, j) = <s^_i, t^_j> (its own feature against the TEACHER's feature of j) and, for the teacher,
    r_t(i, j) = <t^_i, t^_j>. Informative relations of anchor i (mined on the all-gathered, detached teacher
    batch, i itself excluded): the k_neg other-identity samples the teacher finds most similar to i (hard
    negatives: the relations near the decision boundary), plus, when `positives`, i's same-identity samples.
    The relation-aware distillation loss on those, per anchor, then averaged over anchors:

        'mse' (default, the only description we have: paper.md section 4): mean_j (r_s(i, j) - r_t(i, j))^2;
        'kl': KL(softmax_j(r_t(i, .) / tau) || softmax_j(r_s(i, .) / tau)), the relations as a distribution.

    Unlike rpsd there is no memory bank: the keys are the current global batch only. CoupleFace's full objective
    is this term plus feature consistency: {"fc": {"weight": w_fc}, "mrd": {"weight": w_mrd}}.

    Parameters (config keys):
        k_neg: informative negatives per anchor (64, ours: about the top eighth of a 512-image batch).
        positives: also distil the relations to the anchor's same-identity samples (True; needs P x K batches
            to matter).
        form: 'mse' or 'kl'.
        tau: 'kl' temperature (0.05, ours).

    Distributed: the keys are teacher features (no gradient) and the mining uses the gathered teacher batch, so
    each rank's mean over its local anchors averages (DDP) to the global mean.
    Statistics: neg_per_anchor, pos_per_anchor, relation_gap (mean |r_s - r_t| over the mined relations).
    """

    def __init__(self, k_neg=64, positives=True, form="mse", tau=0.05):
        super().__init__()
        where = "KD loss 'mrd'"
        if isinstance(k_neg, bool) or int(k_neg) != k_neg or int(k_neg) < 0:
            raise ConfigError(f"{where}: k_neg must be an integer >= 0, got {k_neg!r}")
        if not isinstance(positives, bool):
            raise ConfigError(f"{where}: positives must be True or False, got {positives!r}")
        if form not in FORMS:
            raise ConfigError(f"{where}: form must be one of {FORMS}, got {form!r}")
        if float(tau) <= 0:
            raise ConfigError(f"{where}: tau must be > 0, got {tau}")
        if int(k_neg) == 0 and not positives:
            raise ConfigError(f"{where}: k_neg=0 with positives=False mines no relation at all")
        self.k_neg, self.positives, self.form, self.tau = int(k_neg), positives, form, float(tau)

    def forward(self, batch: KDBatch) -> KDOutput:
        dtype = compute_dtype(batch.student)
        if batch.student.shape[1] != batch.teacher.shape[1]:
            raise ConfigError(f"KD loss 'mrd' compares the student's features with the teacher's, but they differ "
                              f"in size (student {batch.student.shape[1]}, teacher {batch.teacher.shape[1]}): add "
                              "a student->teacher projector (kd.projector)")
        student = F.normalize(batch.student.to(dtype), dim=1)
        keys = F.normalize(batch.gathered_teacher().to(dtype), dim=1)
        with torch.no_grad():
            anchors = torch.arange(batch.local_size, device=keys.device) + batch.offset
            r_t = (keys @ keys.t())[anchors]                     # rows of the full product: same on every rank
            pos, neg = informative_relations(r_t, batch.gathered_labels(), anchors, self.k_neg, self.positives)
            mined = pos | neg
            count = mined.sum(dim=1)
        r_s = student @ keys.t()
        if self.form == "mse":
            per_anchor = ((r_s - r_t).pow(2) * mined).sum(dim=1) / count.clamp(min=1)
        else:
            log_p = F.log_softmax((r_t / self.tau).masked_fill(~mined, _FAR), dim=1)
            log_q = F.log_softmax((r_s / self.tau).masked_fill(~mined, _FAR), dim=1)
            per_anchor = (log_p.exp() * (log_p - log_q) * mined).sum(dim=1)
        loss = per_anchor.mean()
        with torch.no_grad():
            stats = {"neg_per_anchor": float(neg.sum()) / batch.local_size,
                     "pos_per_anchor": float(pos.sum()) / batch.local_size,
                     "relation_gap": float(((r_s - r_t).abs() * mined).sum()) / max(int(count.sum()), 1)}
        return KDOutput(loss=loss, stats=stats)
