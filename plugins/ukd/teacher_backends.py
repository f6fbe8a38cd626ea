"""Teacher backends behind one interface: where the teacher's embeddings come from.

A backend is called as `backend(images, index=..., flip=...) -> [b, d] float32 tensor` (no gradient, a plain
tensor that may take part in autograd), exposes `last_ms` (time of the last call) and `embedder()` (an
arcface.eval embedder for the sanity check, or None when it cannot embed new images), and `train()` keeps it
frozen. `kd.teacher_backend` picks one: 'torch' (an arcface checkpoint).
"""
from arcface.errors import ConfigError

from .teacher import build_teacher


class TorchTeacherBackend:
    def __init__(self, kd, cfg, ctx):
        self.device = ctx.device
        self.model = build_teacher(kd, bool(cfg.fp16), ctx.device, cfg.input_size)

    @property
    def last_ms(self):
        return self.model.last_ms

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def training(self):
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def __call__(self, images, index=None, flip=None):
        return self.model(images)

    def embedder(self):
        from arcface.eval.embedder import TorchEmbedder
        return TorchEmbedder(self.model.backbone, self.device)


BACKENDS = {"torch": TorchTeacherBackend}


def build_teacher_backend(kd, cfg, ctx):
    name = kd.get("teacher_backend", "torch")
    if name not in BACKENDS:
        raise ConfigError(f"kd.teacher_backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name](kd, cfg, ctx)
