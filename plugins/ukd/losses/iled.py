"""ILED: instance-level embedding distillation with dynamic hard mining (paper.md section 1.2)."""
from arcface.engine.distributed import all_gather_nograd
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..mining import hard_mask_std, hard_mask_topk
from .base import DISTANCES, KDLoss, compute_dtype, instance_distance, require_same_dim
from .registry import register_kd_loss

MODES = ("topk", "std")


@register_kd_loss("iled")
class ILEDLoss(KDLoss):
    """L = sum_i w_i d_i / sum_i w_i over the global batch, w_i = 1 + beta * [i is hard] (no gradient).

    Hardness is recomputed every step from the detached distances of the all-gathered global batch.

    Parameters (config keys):
        ratio: mode 'topk': fraction of the global batch that is hard, ceil(ratio * B) samples (0.25).
        beta: extra weight of a hard sample (1.0); 0 turns ILED into plain feature consistency.
        mode: 'topk' (a fixed fraction) or 'std' (d > mean + kappa * std over the global batch).
        kappa: mode 'std': how many standard deviations above the mean is hard (1.0).
        distance: 'cosine' = 1 - cos(s, t), the same as 1/2 ||s^ - t^||^2 on the unit vectors (default);
                  'l2sq' = 1/2 ||s - t||^2 on the raw embeddings (summed over dimensions);
                  'mse' = mean over dimensions of (s - t)^2 on the raw embeddings.

    Distributed: each rank returns world_size * sum_local(w d) / sum_global(w); the DDP average of the
    per-rank gradients is then the gradient of the global-batch loss.
    Statistics: hard_frac, d_mean, d_hard_mean (over the global batch).
    """

    def __init__(self, ratio=0.25, beta=1.0, mode="topk", kappa=1.0, distance="cosine"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"KD loss 'iled': mode must be one of {MODES}, got {mode!r}")
        if distance not in DISTANCES:
            raise ConfigError(f"KD loss 'iled': distance must be one of {DISTANCES}, got {distance!r}")
        if not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError(f"KD loss 'iled': ratio must be in [0, 1], got {ratio}")
        if float(beta) < 0:
            raise ConfigError(f"KD loss 'iled': beta must be >= 0, got {beta}")
        self.ratio, self.beta, self.mode = float(ratio), float(beta), mode
        self.kappa, self.distance = float(kappa), distance

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        d = instance_distance(batch.student.to(dtype), batch.teacher.detach().to(dtype), self.distance)
        d_global = all_gather_nograd(d.detach())
        if self.mode == "topk":
            hard_global = hard_mask_topk(d_global, self.ratio)
        else:
            hard_global = hard_mask_std(d_global, self.kappa)
        w_global = 1.0 + self.beta * hard_global.to(dtype)
        w_local = w_global[batch.offset:batch.offset + batch.local_size]
        loss = batch.world_size * (w_local * d).sum() / w_global.sum()

        n_hard = int(hard_global.sum())
        stats = {
            "hard_frac": n_hard / d_global.numel(),
            "d_mean": float(d_global.mean()),
            "d_hard_mean": float(d_global[hard_global].mean()) if n_hard else 0.0,
        }
        return KDOutput(loss=loss, stats=stats)
