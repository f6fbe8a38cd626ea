"""SP: similarity-preserving KD (Tung & Mori, ICCV 2019), on unit embeddings as TFace does (paper.md section 4)."""
import torch.nn.functional as F

from arcface.engine.distributed import all_gather_nograd

from ..batch import KDBatch, KDOutput
from .base import KDLoss, compute_dtype
from .registry import register_kd_loss


@register_kd_loss("sp")
class SimilarityPreservingLoss(KDLoss):
    """L = ||S^ S^T - T^ T^T||_F^2 / B^2 over the global batch (rows L2-normalised; dims may differ).

    No parameters. Statistics: gram_gap = mean |<s^_i, s^_j> - <t^_i, t^_j>| over the local rows.

    Distributed: rank r evaluates the rows of its local samples against the all-gathered, detached
    student and teacher batch. Each pair (i, j) depends on two students; in the full loss the gradient of
    s_i collects the pair from both ends, which the row form gets by doubling its gradient (the value is
    left as is). Returned value: world_size * (rows' share of L); its mean over ranks is L and the DDP
    average of the gradients is the gradient of L. With one process this is exactly SP on the batch.
    """

    compares_instances = False

    def forward(self, batch: KDBatch) -> KDOutput:
        dtype = compute_dtype(batch.student)
        s_local = F.normalize(batch.student.to(dtype), dim=1)
        s_keys = F.normalize(all_gather_nograd(batch.student.detach().to(dtype)), dim=1)
        t_local = F.normalize(batch.teacher.detach().to(dtype), dim=1)
        t_keys = F.normalize(batch.gathered_teacher().to(dtype), dim=1)
        n_global = s_keys.shape[0]

        gap = s_local @ s_keys.t() - t_local @ t_keys.t()                  # [b, B]
        rows = gap.pow(2).sum() * (batch.world_size / n_global ** 2)
        loss = rows.detach() + (2 * rows - 2 * rows.detach())             # value of rows, gradient of 2 * rows
        return KDOutput(loss=loss, stats={"gram_gap": float(gap.detach().abs().mean())})
