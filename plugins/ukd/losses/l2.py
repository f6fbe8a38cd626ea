"""Raw L2 feature distillation (FitNet-style hint on the final embedding; paper.md section 4)."""

from ..batch import KDBatch, KDOutput
from .base import KDLoss, compute_dtype, require_same_dim
from .registry import register_kd_loss


@register_kd_loss("l2")
class L2Loss(KDLoss):
    """L = mean over samples and dimensions of (s - t)^2 on the raw, un-normalised embeddings (nn.MSELoss).

    No parameters. Statistics: norm_ratio = mean ||s|| / mean ||t|| (local batch), since raw L2 also pulls
    the student's embedding norm to the teacher's.

    Distributed: a mean of per-sample terms; each rank returns its local mean (equal local batches).
    """

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        student, teacher = batch.student.to(dtype), batch.teacher.detach().to(dtype)
        loss = (student - teacher).pow(2).mean()
        ratio = student.detach().norm(dim=1).mean() / teacher.norm(dim=1).mean().clamp(min=1e-12)
        return KDOutput(loss=loss, stats={"norm_ratio": float(ratio)})
