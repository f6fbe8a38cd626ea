"""The live teacher from an ONNX file, run by onnxruntime (kd.teacher_onnx).

Its layout, channel order and normalisation are configured and checked against the graph at start-up, so a
user's own export (or one of insightface's released models) runs as it is. The engine's images are always
(x - 127.5) / 127.5, RGB, NCHW float32; this backend converts them into whatever the model expects.
"""
import os
import time

import numpy as np
import torch

from arcface.errors import CheckpointError, ConfigError, DataError

from .base import TeacherBackend, register_teacher_backend

ENGINE_MEAN = 127.5  # engine images are (pixel - ENGINE_MEAN) / ENGINE_STD, RGB
ENGINE_STD = 127.5
ONNX_LAYOUTS = ("NCHW", "NHWC")
ONNX_CHANNELS = ("RGB", "BGR")
ONNX_NORMALIZE_NAMES = {"arcface": (ENGINE_MEAN, ENGINE_STD), "none": (0.0, 1.0)}
PROBE_BATCH = 2  # images in the start-up probe run of an ONNX teacher


def onnx_mean_std(normalize, where="kd.teacher_onnx_normalize"):
    """(mean, std) float64 [3] in 0..255 pixel units, in the model's channel order."""
    if isinstance(normalize, str) and normalize in ONNX_NORMALIZE_NAMES:
        mean, std = ONNX_NORMALIZE_NAMES[normalize]
    elif isinstance(normalize, dict) and set(normalize) == {"mean", "std"}:
        mean, std = normalize["mean"], normalize["std"]
    else:
        raise ConfigError(f"{where} must be 'arcface', 'none' or {{'mean': m, 'std': s}}, got {normalize!r}")
    out = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,)).copy()
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a number or 3 numbers, got {value!r}") from None
        if not np.isfinite(arr).all():
            raise ConfigError(f"{where}: {name} must be finite, got {value!r}")
        out.append(arr)
    if (out[1] <= 0).any():
        raise ConfigError(f"{where}: std must be > 0, got {std!r}")
    return out[0], out[1]


class OnnxInputConverter:
    """Engine images -> the ONNX model's input: channel order, normalisation, layout.

    The pixel values are recovered in float64 (p = 127.5 x + 127.5) and normalised as the model wants, so
    the only rounding is the final cast to float32; with the engine's own normalisation and order nothing is
    computed at all.
    """

    def __init__(self, layout="NCHW", channels="RGB", normalize="arcface"):
        if layout not in ONNX_LAYOUTS:
            raise ConfigError(f"kd.teacher_onnx_layout must be one of {ONNX_LAYOUTS}, got {layout!r}")
        if channels not in ONNX_CHANNELS:
            raise ConfigError(f"kd.teacher_onnx_channels must be one of {ONNX_CHANNELS}, got {channels!r}")
        self.layout, self.channels = layout, channels
        self.mean, self.std = onnx_mean_std(normalize)
        self.identity_values = bool((self.mean == ENGINE_MEAN).all() and (self.std == ENGINE_STD).all())

    def __call__(self, images):
        """images: float32 [b, 3, S, S] engine convention -> contiguous float32 model input."""
        x = np.asarray(images, dtype=np.float32)
        if self.channels == "BGR":
            x = x[:, ::-1]
        if not self.identity_values:
            pixels = x.astype(np.float64) * ENGINE_STD + ENGINE_MEAN
            x = ((pixels - self.mean[None, :, None, None]) / self.std[None, :, None, None]).astype(np.float32)
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def input_shape(self, batch, size):
        return (batch, 3, size, size) if self.layout == "NCHW" else (batch, size, size, 3)


def _static(dim):
    return int(dim) if isinstance(dim, (int, np.integer)) and int(dim) > 0 else None


class OnnxTeacher:
    """An onnxruntime session of a teacher, checked at start-up against input_size and embedding size.

    Checks, each a ConfigError naming the key to change: one 4-d float input; its static dimensions agree
    with the configured layout (3 channels where the layout puts them) and with cfg.input_size; a probe
    batch runs and returns [batch, kd.teacher_embedding_size].
    """

    def __init__(self, path, input_size, embedding_size, layout="NCHW", channels="RGB", normalize="arcface",
                 device="cpu"):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError(f"kd.teacher_onnx={path} needs onnxruntime (pip install onnxruntime, or "
                              "onnxruntime-gpu for CUDA)") from err
        if not path:
            raise ConfigError("kd.teacher_onnx is not set: give the teacher's .onnx file")
        if not os.path.isfile(str(path)):
            raise CheckpointError(f"kd.teacher_onnx: ONNX teacher {path} does not exist")
        self.path = str(path)
        self.input_size, self.embedding_size = int(input_size), int(embedding_size)
        self.convert = OnnxInputConverter(layout, channels, normalize)
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(self.path, providers=providers)
        except Exception as err:  # onnxruntime has its own exception types for corrupt graphs
            raise CheckpointError(f"kd.teacher_onnx: cannot load {self.path}: {err}") from err
        self.providers = self.session.get_providers()
        self._check_input()
        self.output_name = self.session.get_outputs()[0].name
        self._probe()

    def _check_input(self):
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"ONNX teacher {self.path} has {len(inputs)} inputs "
                              f"({[(i.name, i.shape) for i in inputs]}); a face teacher takes one image batch")
        node = inputs[0]
        self.input_name = node.name
        if node.type != "tensor(float)":
            raise ConfigError(f"ONNX teacher {self.path}: input '{node.name}' is {node.type}; only float32 "
                              "inputs are supported (export the model in float32)")
        shape = list(node.shape)
        if len(shape) != 4:
            raise ConfigError(f"ONNX teacher {self.path}: input '{node.name}' has shape {shape}, expected a 4-d "
                              f"image batch ({self.convert.layout})")
        dims = [_static(d) for d in shape]
        layout = self.convert.layout
        channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
        other, other_axis = ("NHWC", 3) if layout == "NCHW" else ("NCHW", 1)
        if dims[channel_axis] != 3 and (dims[channel_axis] is not None or dims[other_axis] == 3):
            hint = (f"; it looks like {other}: set kd.teacher_onnx_layout='{other}'"
                    if dims[other_axis] == 3 else "")
            raise ConfigError(f"ONNX teacher {self.path}: input '{node.name}' has shape {shape}; with "
                              f"kd.teacher_onnx_layout='{layout}' axis {channel_axis} holds the 3 colour "
                              f"channels but it is {shape[channel_axis]}{hint}")
        sizes = [dims[a] for a in spatial]
        for size in sizes:
            if size is not None and size != self.input_size:
                raise ConfigError(f"ONNX teacher {self.path} expects {sizes[0]}x{sizes[1]} images (input "
                                  f"'{node.name}' shape {shape}, layout {layout}) but cfg.input_size="
                                  f"{self.input_size}; set input_size={size} or export the teacher for "
                                  f"{self.input_size}x{self.input_size}")
        self.input_shape = shape
        self.static_batch = dims[0]  # some exports fix the batch (often to 1): run() feeds slices of that size

    def _probe(self):
        probe = np.zeros((PROBE_BATCH, 3, self.input_size, self.input_size), dtype=np.float32)
        try:
            out = self.run(probe)
        except Exception as err:
            shape = list(self.convert.input_shape(PROBE_BATCH, self.input_size))
            raise ConfigError(f"ONNX teacher {self.path} failed on a {shape} "
                              f"probe batch (kd.teacher_onnx_layout='{self.convert.layout}', input_size="
                              f"{self.input_size}; model input shape {self.input_shape}): {err}") from None
        if out.ndim != 2 or out.shape != (PROBE_BATCH, self.embedding_size):
            raise ConfigError(f"ONNX teacher {self.path} returns shape {list(out.shape)} for a batch of "
                              f"{PROBE_BATCH}, expected [{PROBE_BATCH}, {self.embedding_size}] "
                              "(kd.teacher_embedding_size)")

    def run(self, images):
        """float32 [b, 3, S, S] engine images -> float32 [b, d] numpy."""
        data = self.convert(images)
        step = self.static_batch
        if step is None or data.shape[0] == step:
            return np.asarray(self.session.run([self.output_name], {self.input_name: data})[0], dtype=np.float32)
        parts = []
        for start in range(0, data.shape[0], step):
            part = data[start:start + step]
            count = part.shape[0]
            if count < step:  # pad the last slice to the fixed batch, keep only the real rows
                part = np.concatenate([part, np.zeros((step - count,) + part.shape[1:], dtype=part.dtype)])
            parts.append(self.session.run([self.output_name], {self.input_name: part})[0][:count])
        return np.asarray(np.concatenate(parts), dtype=np.float32)


class OnnxTeacherEmbedder:
    """arcface.eval embedder over an OnnxTeacher: the verification sets' uint8 batches pass through the
    configured layout / normalisation conversion, which arcface.eval.embedder.OnnxEmbedder does not do."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.input_size = teacher.input_size
        self.source = teacher.path

    def check_input_size(self, size, what="the data"):
        if int(size) != self.input_size:
            raise DataError(f"ONNX teacher {self.source} runs at {self.input_size}x{self.input_size} but {what} "
                            f"is {size}x{size}")

    def __call__(self, batch):
        from arcface.eval.embedder import normalise_uint8
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise DataError(f"expected an image batch [B, 3, S, S], got shape {list(batch.shape)}")
        self.check_input_size(batch.shape[-1], "the batch")
        data = normalise_uint8(batch) if batch.dtype == np.uint8 else batch.astype(np.float32)
        return self.teacher.run(data)


def build_onnx_teacher(kd, input_size, device):
    return OnnxTeacher(kd.get("teacher_onnx"), input_size, kd.teacher_embedding_size,
                       layout=kd.get("teacher_onnx_layout", "NCHW"), channels=kd.get("teacher_onnx_channels", "RGB"),
                       normalize=kd.get("teacher_onnx_normalize", "arcface"), device=device)


@register_teacher_backend("onnx")
class OnnxTeacherBackend(TeacherBackend):
    def __init__(self, kd, cfg, ctx):
        self.device = ctx.device
        self.model = build_onnx_teacher(kd, cfg.input_size, ctx.device)
        self.description = f"ONNX {self.model.path} ({', '.join(self.model.providers)})"

    def __call__(self, images, index=None, flip=None):
        start = time.perf_counter()
        out = self.model.run(images.detach().float().cpu().numpy())
        result = torch.from_numpy(out).to(images.device)
        self.last_ms = (time.perf_counter() - start) * 1000
        return result

    def embedder(self):
        return OnnxTeacherEmbedder(self.model)
