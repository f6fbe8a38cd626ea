"""The UKD plugin: a frozen teacher's forward pass plus the configured KD losses, on the engine's hook points.

    after_forward: teacher(images) on the exact tensor the student saw (same flip, same autocast)
                   -> projector(student) if the sizes differ -> KDBatch -> weighted KD terms
    after_step:    memory-bank updates (all-gathered, identical on every rank)
    state_dict:    projector weights and loss state (banks), saved in checkpoint_gpu_<rank>.pt
"""
import logging

import torch

from arcface.engine import distributed as D
from arcface.errors import ConfigError
from arcface.engine.plugins import Plugin, register_plugin

from .batch import KDBatch
from .composer import KDComposer
from .config import KD_SECTION, resolve_kd_config
from .teacher_backends import build_teacher_backend

log = logging.getLogger("arcface")


def batches_have_positives(cfg):
    """Whether every batch holds several images of its identities: the P x K sampler with K >= 2 and some of the
    batch drawn by identity (the random sampler, or pk_random_fraction=1, almost never pairs two images)."""
    return cfg.sampler == "pk" and int(cfg.pk_k) >= 2 and float(cfg.pk_random_fraction) < 1.0


@register_plugin("ukd")
class UKDPlugin(Plugin):
    config_section = KD_SECTION

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kd = resolve_kd_config(cfg.kd)
        self.composer = KDComposer(dict(self.kd.losses))
        self.teacher = None
        self.projector = None
        self.projector_wrapped = None
        s_dim, t_dim = int(cfg.embedding_size), int(self.kd.teacher_embedding_size)
        mode = self.kd.projector
        if mode not in ("auto", "linear", "none"):
            raise ConfigError(f"kd.projector must be auto, linear or none, got {mode!r}")
        if mode == "linear" or (mode == "auto" and s_dim != t_dim):
            self.projector = torch.nn.Linear(s_dim, t_dim, bias=False)
        elif s_dim != t_dim:
            one_to_one = [key for key, term in self.composer.terms.items() if term.compares_instances]
            if one_to_one:
                raise ConfigError(f"student embedding_size {s_dim} differs from kd.teacher_embedding_size {t_dim}, "
                                  f"and kd.losses {one_to_one} compare the two embeddings one to one: set "
                                  "kd.projector='auto' or 'linear' (projector='none' suits relational losses only, "
                                  "e.g. sp, rkd)")
        self._pending = []
        self._stats = {}
        self._stat_counts = {}

    # ---- set-up ---------------------------------------------------------------------------
    def trainable_modules(self):
        return [self.projector] if self.projector is not None else []

    def bind_trainable(self, wrapped):
        self.projector_wrapped = wrapped[0] if wrapped else None

    def before_training(self, ctx):
        cfg = self.cfg
        self.device = ctx.device
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.teacher = build_teacher_backend(self.kd, cfg, ctx)
        self.composer.to(ctx.device)
        self.composer.check(cfg.batch_size * ctx.world_size, batches_have_positives(cfg))
        self.composer.bind_training(ctx)
        if ctx.rank == 0:
            log.info(f"UKD: teacher {getattr(self.teacher, 'description', self.kd.teacher_weights)}"
                     f"{', projector ' + str(tuple(self.projector.weight.shape[::-1])) if self.projector is not None else ''}")
            log.info(f"UKD: {self.composer.formula()}")
        if self.kd.teacher_check:
            self._teacher_sanity_check(ctx)

    def _teacher_sanity_check(self, ctx):
        """Rank 0 evaluates the teacher on the .bin targets; a poor teacher stops every rank with its error."""
        targets = self.kd.teacher_check_targets or list(self.cfg.val_targets)
        D.on_rank0(self._evaluate_teacher, self.cfg, targets)

    def _evaluate_teacher(self, cfg, targets):
        import os
        paths = [os.path.join(str(cfg.rec), f"{t}.bin") for t in targets]
        present = [(t, p) for t, p in zip(targets, paths) if os.path.isfile(p)]
        if not present:
            log.warning("UKD: teacher sanity check skipped: no .bin verification set found "
                        f"({', '.join(paths) or 'no targets configured'})")
            return
        from arcface.eval.verification import evaluate_verification, load_bin
        embedder = self.teacher.embedder()
        if embedder is None:
            log.info("UKD: teacher sanity check skipped: the teacher backend cannot embed new images")
            return
        for name, path in present:
            data = load_bin(path, input_size=cfg.input_size)
            result = evaluate_verification(embedder, data, batch_size=cfg.val_batch_size)
            acc = float(result["accuracy"])
            log.info(f"UKD: teacher sanity check [{name}] accuracy {acc:.5f} "
                     f"(minimum {self.kd.teacher_min_accuracy})")
            if acc < float(self.kd.teacher_min_accuracy):
                raise ConfigError(f"teacher sanity check failed: {self.kd.teacher_weights} ({self.kd.teacher_network}) "
                                  f"reaches {acc:.4f} on {path}, below kd.teacher_min_accuracy="
                                  f"{self.kd.teacher_min_accuracy}. Wrong weights, network or preprocessing? "
                                  "(kd.teacher_check=False turns the check off)")

    # ---- per step ------------------------------------------------------------------------------
    def after_forward(self, batch):
        teacher = self.teacher(batch.images, index=batch.index, flip=batch.flip)
        student = batch.embeddings.float()
        if self.projector_wrapped is not None:
            student = self.projector_wrapped(student)
        elif self.projector is not None:
            student = self.projector(student)
        record = KDBatch(student=student, teacher=teacher, labels=batch.labels, step=batch.step,
                         rank=self.rank, world_size=self.world_size, index=batch.index, flip=batch.flip)
        terms, stats = self.composer(record)
        self._pending.append(record)
        stats = dict(stats)
        stats["teacher_ms"] = self.teacher.last_ms
        for k, v in stats.items():
            self._stats[k] = self._stats.get(k, 0.0) + float(v)
            self._stat_counts[k] = self._stat_counts.get(k, 0) + 1
        return {f"kd/{name}": value for name, value in terms.items()}

    def uses_head(self):
        return bool(self.composer.head_terms())

    def configure_head(self, head):
        self.composer.configure_head(head)

    def before_head(self, head, batch):
        """The KD record of this micro-step (teacher embeddings included) was made in after_forward just before."""
        self.composer.before_head(head, self._pending[-1])

    def after_step(self, batch):
        for record in self._pending:
            record.student = record.student.detach()
            self.composer.after_step(record)
        self._pending = []

    def scalars(self):
        out = {f"kd/{k}": v / self._stat_counts[k] for k, v in self._stats.items()}
        self._stats, self._stat_counts = {}, {}
        return out

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self):
        return {"composer": self.composer.state_dict(),
                "projector": self.projector.state_dict() if self.projector is not None else None}

    def load_state_dict(self, state):
        self.composer.load_state_dict(state["composer"])
        if self.projector is not None and state.get("projector") is not None:
            self.projector.load_state_dict(state["projector"])
