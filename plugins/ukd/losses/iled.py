"""ILED: instance-level embedding distillation with dynamic hard mining (method.md section 3)."""
import torch

from arcface.engine.distributed import all_gather_nograd, all_reduce_sum
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..mining import hard_count, hard_mask_std, hard_mask_topk, kth_largest, target_cosine_on_shard
from .base import DISTANCES, KDLoss, compute_dtype, instance_distance, require_same_dim
from .registry import register_kd_loss

MODES = ("topk", "std", "ema")
HARDNESS = ("distance", "margin")


@register_kd_loss("iled")
class ILEDLoss(KDLoss):
    """L = sum_i w_i d_i / sum_i w_i over the global batch, w_i = 1 + beta * [i is hard] (no gradient).

    Hardness is recomputed every step from detached scores of the all-gathered global batch: the distillation
    distance d_i itself, or how badly the margin head classifies the sample (1 - cos(s_i, w_{y_i}), its target
    cosine before the margin: a sample the student's own classifier finds hard).

    Parameters (config keys):
        ratio: modes 'topk' and 'ema': fraction of the global batch that is hard, ceil(ratio * B) samples (0.25).
        beta: extra weight of a hard sample (1.0); 0 turns ILED into plain feature consistency.
        mode: 'topk' (a fixed fraction of each batch), 'std' (score > mean + kappa * std over the global batch)
              or 'ema' (score >= a threshold that follows training: the EMA over steps of the batch's
              ceil(ratio * B)-th largest score; the hard fraction then varies from batch to batch).
        kappa: mode 'std': how many standard deviations above the mean is hard (1.0).
        distance: 'cosine' = 1 - cos(s, t), the same as 1/2 ||s^ - t^||^2 on the unit vectors (default);
                  'l2sq' = 1/2 ||s - t||^2 on the raw embeddings (summed over dimensions);
                  'mse' = mean over dimensions of (s - t)^2 on the raw embeddings.
        hardness: what ranks the samples: 'distance' (d_i, default) or 'margin' (1 - target cosine of the
                  student's classification head, read from the head's class centres with a sum over ranks).
        ratio_end: anneal ratio linearly from `ratio` at step 0 to `ratio_end` at the run's last step
                   (TrainContext.schedule.total_step); None = constant ratio. Modes 'topk' and 'ema'.
        momentum: mode 'ema': the threshold's EMA momentum (None = 0.9; 0 = this batch's value, i.e. 'topk').

    Distributed: each rank returns world_size * sum_local(w d) / sum_global(w); the DDP average of the
    per-rank gradients is then the gradient of the global-batch loss. The EMA threshold is updated from the
    global batch, identically on every rank, and saved with the checkpoint.
    Statistics: hard_frac, d_mean, d_hard_mean (over the global batch); ratio when annealed; threshold (ema);
    target_cos (margin: mean target cosine).
    """

    def __init__(self, ratio=0.25, beta=1.0, mode="topk", kappa=1.0, distance="cosine", hardness="distance",
                 ratio_end=None, momentum=None):
        super().__init__()
        where = "KD loss 'iled'"
        for key, value, allowed in (("mode", mode, MODES), ("distance", distance, DISTANCES),
                                    ("hardness", hardness, HARDNESS)):
            if value not in allowed:
                raise ConfigError(f"{where}: {key} must be one of {allowed}, got {value!r}")
        for key, value in (("ratio", ratio), ("ratio_end", ratio_end)):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{where}: {key} must be in [0, 1], got {value}")
        if float(beta) < 0:
            raise ConfigError(f"{where}: beta must be >= 0, got {beta}")
        if mode == "std" and ratio_end is not None:
            raise ConfigError(f"{where}: ratio_end anneals the hard ratio of modes 'topk' and 'ema'; mode 'std' "
                              "has no ratio")
        if mode != "ema" and momentum is not None:
            raise ConfigError(f"{where}: momentum is the EMA threshold's of mode 'ema'; with mode={mode!r} it "
                              "would do nothing")
        momentum = 0.9 if momentum is None else float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"{where}: momentum must be in [0, 1), got {momentum}")
        self.ratio, self.beta, self.mode = float(ratio), float(beta), mode
        self.kappa, self.distance, self.hardness = float(kappa), distance, hardness
        self.ratio_end = None if ratio_end is None else float(ratio_end)
        self.momentum = momentum
        self.uses_head = hardness == "margin"
        self.head = None
        self.total_step = None
        if mode == "ema":
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
            self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))

    # ---- start-up ---------------------------------------------------------------------------------------
    def bind_training(self, ctx):
        if self.ratio_end is not None:
            if ctx.schedule is None:
                raise ConfigError("KD loss 'iled': ratio_end anneals over the run's schedule, but this host "
                                  "gives no TrainContext.schedule")
            self.total_step = int(ctx.schedule.total_step)
        if self.hardness == "margin":
            kd = ctx.cfg.get("kd") or {}
            if kd.get("projector") == "linear":
                raise ConfigError("KD loss 'iled': hardness='margin' compares the student's embedding with its own "
                                  "class centres, but kd.projector='linear' hands ILED the projected embedding; "
                                  "use projector 'auto' with equal sizes, or hardness='distance'")

    def configure_head(self, head):
        self.head = head

    def ratio_at(self, step):
        if self.ratio_end is None:
            return self.ratio
        if self.total_step is None:
            raise ConfigError("KD loss 'iled': ratio_end needs the run's total step count; bind_training(ctx) "
                              "was not called (the UKD plugin does so at start-up)")
        progress = min(1.0, max(step, 0) / max(self.total_step, 1))
        return self.ratio + (self.ratio_end - self.ratio) * progress

    # ---- hardness ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _margin_hardness(self, batch, dtype):
        head = self.head
        if head is None:
            raise ConfigError("KD loss 'iled': hardness='margin' needs the classification head, but "
                              "configure_head was never called (a host without head hooks, such as the graft "
                              "into upstream's train_v2.py, cannot offer it); use hardness='distance'")
        if head.weight.shape[1] != batch.student.shape[1]:
            raise ConfigError(f"KD loss 'iled': hardness='margin' needs the student's own embedding, but ILED "
                              f"gets {batch.student.shape[1]}-d embeddings and the head's centres are "
                              f"{head.weight.shape[1]}-d")
        student = all_gather_nograd(batch.student.detach().to(dtype))
        cos = target_cosine_on_shard(student, batch.gathered_labels(), head.weight.detach(), head.class_start)
        return all_reduce_sum(cos)

    @torch.no_grad()
    def _ema_mask(self, score, ratio):
        k = hard_count(ratio, score.numel())
        if k == 0:
            return torch.zeros_like(score, dtype=torch.bool)
        value = kth_largest(score, k).to(torch.float64)
        if int(self.threshold_steps) > 0:
            value = self.momentum * self.threshold + (1.0 - self.momentum) * value
        self.threshold.copy_(value)
        self.threshold_steps += 1
        return score >= self.threshold.to(score.dtype)

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        d = instance_distance(batch.student.to(dtype), batch.teacher.detach().to(dtype), self.distance)
        d_global = all_gather_nograd(d.detach())
        stats = {}
        if self.hardness == "margin":
            target_cos = self._margin_hardness(batch, dtype)
            score = 1.0 - target_cos
            stats["target_cos"] = float(target_cos.mean())
        else:
            score = d_global
        ratio = self.ratio_at(batch.step)
        if self.mode == "topk":
            hard_global = hard_mask_topk(score, ratio)
        elif self.mode == "std":
            hard_global = hard_mask_std(score, self.kappa)
        else:
            hard_global = self._ema_mask(score, ratio)
            stats["threshold"] = float(self.threshold)
        if self.ratio_end is not None:
            stats["ratio"] = ratio
        w_global = 1.0 + self.beta * hard_global.to(dtype)
        w_local = w_global[batch.offset:batch.offset + batch.local_size]
        loss = batch.world_size * (w_local * d).sum() / w_global.sum()

        n_hard = int(hard_global.sum())
        stats.update({
            "hard_frac": n_hard / d_global.numel(),
            "d_mean": float(d_global.mean()),
            "d_hard_mean": float(d_global[hard_global].mean()) if n_hard else 0.0,
        })
        return KDOutput(loss=loss, stats=stats)
