"""FC: feature consistency distillation, the standard FR-KD baseline (CoupleFace's FCD; paper.md section 4)."""
import torch.nn.functional as F


from ..batch import KDBatch, KDOutput
from .base import KDLoss, compute_dtype, require_same_dim
from .registry import register_kd_loss


@register_kd_loss("fc")
class FeatureConsistencyLoss(KDLoss):
    """L = mean_i (1 - cos(s_i, t_i)) over the global batch.

    1/2 ||s^ - t^||^2 on the unit vectors is exactly 1 - cos, so the two written forms of FCD are one loss
    and there is no option to choose between them. No parameters. Statistics: cos_mean (local batch).

    Distributed: the loss is a mean of per-sample terms, so each rank returns the mean over its local
    samples (equal local batches), and the DDP average is the global mean.
    """

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        cos = F.cosine_similarity(batch.student.to(dtype), batch.teacher.detach().to(dtype), dim=1, eps=1e-12)
        return KDOutput(loss=(1.0 - cos).mean(), stats={"cos_mean": float(cos.detach().mean())})
