"""What every teacher backend is, the table of them, and which real teacher a config names.

A backend is called as `backend(images, index=..., flip=...) -> [b, d] float32 tensor` (no gradient, a plain
tensor that may take part in autograd), exposes `last_ms` (time of the last call), `description` (for the
log) and `embedder()` (an arcface.eval embedder for the sanity check, or None when it cannot embed new
images), and stays frozen whatever `train()` is called with. `kd.teacher_backend` picks one by name:

    'torch'  an arcface checkpoint (teacher_network + teacher_weights)          torch_backend.py
    'onnx'   an ONNX file run by onnxruntime (teacher_onnx)                    onnx_backend.py
    'cache'  embeddings computed once by tools/cache_teacher.py, looked up    cache_backend.py
             by (sample index, flip); the teacher never runs during training
"""
import torch

from arcface.engine.precision import autocast_for
from arcface.errors import ConfigError
from arcface.registry import Registry

TEACHER_BACKENDS = Registry("teacher backend")


def register_teacher_backend(name):
    def deco(cls):
        TEACHER_BACKENDS.register(name)(cls)
        cls.backend_name = name
        return cls
    return deco


class TeacherBackend:
    """Base of the backends: frozen (no parameters the optimizer could see, train() a no-op), timed."""
    training = False
    description = ""
    last_ms = 0.0

    def parameters(self):
        return iter(())

    def train(self, mode=True):
        return self

    def __call__(self, images, index=None, flip=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def embedder(self):
        """An arcface.eval embedder of new images (the sanity check), or None."""
        return None


def teacher_source(kd):
    """'torch' or 'onnx': the backend that computes the real teacher (to build a cache or check one)."""
    name = kd.get("teacher_backend", "torch")
    if name in ("torch", "onnx"):
        return name
    return "onnx" if kd.get("teacher_onnx") else "torch"


def configured_teacher_file(kd):
    """The teacher file the config names for its teacher source, or None."""
    return kd.get("teacher_onnx") if teacher_source(kd) == "onnx" else kd.get("teacher_weights")


def teacher_precision(source, fp16, device):
    """How a live teacher of this source computes (recorded in a cache, compared at training time)."""
    if source == "onnx":
        return "onnxruntime float32"
    if not autocast_for(fp16, device)[0]:
        return "float32"
    return "float16 autocast" if torch.device(device).type == "cuda" else "bfloat16 autocast"


def build_teacher_backend(kd, cfg, ctx):
    name = kd.get("teacher_backend", "torch")
    if name not in TEACHER_BACKENDS:
        raise ConfigError(f"kd.teacher_backend must be one of {TEACHER_BACKENDS.names()}, got {name!r}")
    return TEACHER_BACKENDS.get(name)(kd, cfg, ctx)
