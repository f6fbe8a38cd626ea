"""The live teacher from an arcface checkpoint (kd.teacher_network + kd.teacher_weights)."""
from arcface.engine.precision import autocast_for

from ..teacher import build_teacher
from .base import TeacherBackend, register_teacher_backend


@register_teacher_backend("torch")
class TorchTeacherBackend(TeacherBackend):
    def __init__(self, kd, cfg, ctx):
        self.device = ctx.device
        # fp16 as the student gets it: fp16 autocast on CUDA, bf16 on CPUs that run it fast, else float32
        autocast = autocast_for(bool(cfg.fp16), ctx.device)[0]
        self.model = build_teacher(kd, autocast, ctx.device, cfg.input_size, bool(cfg.get("channels_last")))
        self.description = f"{kd.teacher_network} from {kd.teacher_weights}"

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
