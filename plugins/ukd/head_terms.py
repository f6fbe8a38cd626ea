"""What the KD losses that act only through the classification head (adadistill, proxyless) share.

Such a loss has no term of its own: the distillation IS the margin softmax against centres it supplies, so it
returns zero and the engine's classification loss carries it. A weight would then scale nothing, so the only
weight accepted is 1 (no ramp, no rescaling), checked at start-up against the run's `kd.losses`.
"""
from arcface.errors import ConfigError

from .batch import KDOutput


def require_unit_weight(cfg, loss_name):
    """ConfigError unless every term of cfg.kd.losses that uses `loss_name` has weight 1 and nothing that scales it."""
    losses = (cfg.get("kd") or {}).get("losses") or {}
    for key, entry in losses.items():
        if not isinstance(entry, dict) or entry.get("loss", key) != loss_name:
            continue
        weight, ramp, scale = entry.get("weight"), entry.get("ramp_steps", 0), entry.get("scale", "none")
        if weight != 1 or ramp or scale != "none":
            raise ConfigError(
                f"kd.losses.{key}: '{loss_name}' distils through the classification head (its term is the margin "
                f"softmax loss/cls itself), so there is nothing for a weight to scale: set weight=1.0 without "
                f"ramp_steps or scale (got weight={weight!r}, ramp_steps={ramp!r}, scale={scale!r})")


def require_no_projector(cfg, loss_name):
    """The head sees the student's own embeddings; centres in the teacher's space need the same size and no map."""
    kd = cfg.get("kd") or {}
    student, teacher = int(cfg.embedding_size), int(kd.get("teacher_embedding_size", cfg.embedding_size))
    if student != teacher or kd.get("projector") == "linear":
        raise ConfigError(f"KD loss '{loss_name}' trains the student's own embeddings against class centres in the "
                          f"teacher's embedding space, so it needs embedding_size == kd.teacher_embedding_size and "
                          f"no projector (got {student} and {teacher}, kd.projector={kd.get('projector')!r})")


def no_term(batch, stats):
    """The KDOutput of a head-only loss: a zero that keeps the total's device and dtype."""
    return KDOutput(loss=batch.student.new_zeros(()), stats=dict(stats))


def require_head(head, loss_name):
    for attr in ("weight", "class_start", "num_local", "num_classes", "embedding_size"):
        if not hasattr(head, attr):
            raise ConfigError(f"KD loss '{loss_name}' needs the engine's Partial FC head (PartialFC_V2) through the "
                              f"configure_head hook; this host's head has no '{attr}'")
