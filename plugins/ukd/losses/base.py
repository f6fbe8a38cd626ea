"""Base class of KD losses (one subclass per file, registered with @register_kd_loss("name")) and the small
helpers several losses share."""
import torch
import torch.nn.functional as F

from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput

DISTANCES = ("cosine", "l2sq", "mse")


class KDLoss(torch.nn.Module):
    """Contract:

    - forward(batch: KDBatch) -> KDOutput with an unweighted scalar loss and float statistics.
    - Distributed rule: each rank returns a loss on its local anchors such that the DDP average of the
      per-rank gradients equals the gradient of the same loss computed on the whole global batch in one
      process (tests check 2 processes against 1). Anything mined over the batch is mined over the
      all-gathered (detached) batch.
    - after_step(batch): update state (e.g. a memory bank) after the optimizer step; identical on every rank.
    - check(global_batch_size, pk_sampler): raise ConfigError at start-up for settings that cannot work.
    - bind_training(ctx): once at start-up with the engine's TrainContext (schedule, loader, cfg), for losses that
      follow the run's length or need to check the loader; raise ConfigError there.
    - State lives in registered buffers so that state_dict()/load_state_dict() save and restore it.
    """
    name = "kd_loss"

    def forward(self, batch: KDBatch) -> KDOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, batch: KDBatch) -> None:
        pass

    def check(self, global_batch_size: int, pk_sampler: bool) -> None:
        pass

    def bind_training(self, ctx) -> None:
        pass

    # True: the loss compares a student embedding with its teacher embedding one to one, so their sizes must agree
    # (a projector when they differ). Relational losses that only compare similarities set it False, which lets
    # kd.projector='none' distil a student of another embedding size.
    compares_instances = True

    # A loss that works inside the classification head (class centres, margins) sets uses_head = True and
    # overrides these; the engine's contract is arcface.engine.hooks.Plugin.configure_head / before_head.
    uses_head = False

    def configure_head(self, head) -> None:
        pass

    def before_head(self, head, batch: KDBatch) -> None:
        pass


def compute_dtype(tensor):
    """At least float32 (AMP hands fp16 embeddings), float64 kept (golden tests)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def instance_distance(student, teacher, distance):
    """[b] per-sample student-teacher distance."""
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-12)
    diff = student - teacher
    if distance == "l2sq":
        return 0.5 * diff.pow(2).sum(dim=1)
    return diff.pow(2).mean(dim=1)


def require_same_dim(batch, loss_name):
    if batch.student.shape[1] != batch.teacher.shape[1]:
        raise ConfigError(f"KD loss '{loss_name}' compares student and teacher embeddings one to one, but they "
                          f"differ in size (student {batch.student.shape[1]}, teacher {batch.teacher.shape[1]}): "
                          f"add a student->teacher projector or use a relational loss (rpsd, rkd, sp)")
