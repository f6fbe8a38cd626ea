"""One call shape for every model the evaluations run: `embedder(batch) -> np.float32 [B, d]`.

A batch is [B, 3, S, S] RGB. uint8 batches are normalised here with upstream's (x / 255 - 0.5) / 0.5;
floating batches are taken as already normalised. Keeping images uint8 until this point is what keeps
the .bin sets and IJB crops small in memory.
"""
import os
import re

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError


def normalise_uint8(batch):
    """(x / 255 - 0.5) / 0.5 as float32, the arcface_torch input convention."""
    return (np.asarray(batch, dtype=np.float32) / 255.0 - 0.5) / 0.5


def _as_numpy_batch(batch):
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise DataError(f"expected an image batch [B, 3, S, S], got shape {list(batch.shape)}")
    return batch


class TorchEmbedder:
    """Runs a torch module under no_grad on `device` (default: where its parameters live).

    The caller owns the train / eval mode: the verification callback switches it, the tools build the
    model in eval mode.
    """

    def __init__(self, module, device=None):
        self.module = module
        if device is None:
            first = next(iter(module.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        size = getattr(module, "input_size", None)
        self.input_size = int(size) if isinstance(size, (int, np.integer)) else None
        self.source = getattr(module, "network", type(module).__name__)

    def check_input_size(self, size, what="the data"):
        if self.input_size is not None and int(size) != self.input_size:
            raise ConfigError(f"{self.source} was built for {self.input_size}x{self.input_size} input but "
                              f"{what} is {size}x{size}; rebuild it with input_size={size} or resize the data")

    def __call__(self, batch):
        batch = _as_numpy_batch(batch)
        self.check_input_size(batch.shape[-1], "the batch")
        data = normalise_uint8(batch) if batch.dtype == np.uint8 else np.asarray(batch, dtype=np.float32)
        with torch.no_grad():
            out = self.module(torch.from_numpy(np.ascontiguousarray(data)).to(self.device))
        return out.detach().float().cpu().numpy()


def onnx_providers(ort, device=None):
    """onnxruntime execution providers for a device: CUDA when asked for (or, with no device given, when
    onnxruntime-gpu offers it), else the CPU."""
    available = ort.get_available_providers()
    wanted = torch.device(device).type if device is not None else \
        ("cuda" if "CUDAExecutionProvider" in available else "cpu")
    if wanted == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--device cuda, but this onnxruntime has no CUDAExecutionProvider (providers: "
                              f"{', '.join(available)}); pip install 'ukd[onnx-gpu]' (onnxruntime-gpu)")
        index = torch.device(device).index if device is not None else None
        return [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEmbedder:
    """onnxruntime session of an exported backbone, on the CPU or a GPU; its input size is read from the graph."""

    def __init__(self, path, device=None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError(f"evaluating {path} needs onnxruntime (pip install onnxruntime)") from err
        if not os.path.isfile(path):
            raise CheckpointError(f"ONNX model {path} does not exist")
        self.path = str(path)
        self.source = self.path
        providers = onnx_providers(ort, device)
        try:
            self.session = ort.InferenceSession(self.path, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt graphs
            raise CheckpointError(f"cannot load ONNX model {path}: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [(i.name, i.shape) for i in inputs]
            raise CheckpointError(f"ONNX model {path} must take one [B, 3, S, S] input, it takes {shapes}")
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2], inputs[0].shape[3]
        self.input_size = int(height) if isinstance(height, int) and height == width else None
        self.output_name = self.session.get_outputs()[0].name

    def check_input_size(self, size, what="the data"):
        if self.input_size is not None and int(size) != self.input_size:
            raise DataError(f"ONNX model {self.path} expects {self.input_size}x{self.input_size} input but "
                            f"{what} is {size}x{size}")

    def __call__(self, batch):
        batch = _as_numpy_batch(batch)
        self.check_input_size(batch.shape[-1], "the batch")
        data = normalise_uint8(batch) if batch.dtype == np.uint8 else np.asarray(batch, dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(data)})[0]
        return np.asarray(out, dtype=np.float32)


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def upstream_alias(network):
    """Upstream's docs say `--network iresnet50`, which its get_model never accepted; read it as r50."""
    match = re.fullmatch(r"iresnet(\d+)", str(network))
    return f"r{match.group(1)}" if match else network


def build_network(network, checkpoint, input_size=112, network_kwargs=None):
    """get_model(network, ...) with weights from `checkpoint` (strict), in eval mode on the CPU."""
    from arcface.backbones import get_model  # lazy: the tools import this module early
    from arcface.backbones.loading import load_backbone_weights, read_backbone_state

    kwargs = {"dropout": 0.0, "fp16": False, "input_size": int(input_size)}
    extra = dict(network_kwargs or {})
    if "input_size" in extra and int(extra["input_size"]) != int(input_size):
        raise ConfigError(f"--network-kwargs input_size={extra['input_size']} contradicts --input-size {input_size}")
    kwargs.update(extra)
    weights = read_backbone_state(checkpoint)  # read once: sized from it, then loaded from it
    if "num_features" not in kwargs:
        kwargs["num_features"] = _embedding_size_of(weights.state, upstream_alias(network), kwargs)
    model = get_model(upstream_alias(network), **kwargs)
    load_backbone_weights(model, weights, strict=True)
    return model.eval()


def _embedding_size_of(state, network, kwargs, default=512):
    """The embedding size stored in a backbone state dict, so the tools need no --num-features.

    Two meta-device builds of the network (num_features 8 and 16, nothing allocated) show which tensor's
    dimension follows num_features; the state's tensor of that name gives its value. A state without that
    tensor gets the default, and load_backbone_weights reports what does not fit.
    """
    from arcface.backbones import get_model

    with torch.device("meta"):
        small = get_model(network, **dict(kwargs, num_features=8)).state_dict()
        large = get_model(network, **dict(kwargs, num_features=16)).state_dict()
    for key, tensor in small.items():
        if key in state and tensor.shape != large[key].shape:
            dim = next(i for i, (a, b) in enumerate(zip(tensor.shape, large[key].shape)) if a != b)
            return int(state[key].shape[dim])
    return default


def build_embedder(model_path, network=None, input_size=None, network_kwargs=None, device=None):
    """A .onnx file gives an OnnxEmbedder (on `device`: CUDA or CPU), anything else a torch checkpoint for
    `network`. input_size None: the ONNX graph's own (else 112); a given size must agree with the model's. The
    embedder's `input_size` is the size to feed it."""
    if str(model_path).lower().endswith(".onnx"):
        embedder = OnnxEmbedder(model_path, device)
    else:
        if not network:
            raise ConfigError(f"--network is needed to build a model for the checkpoint {model_path}")
        device = torch.device(device) if device is not None else default_device()
        module = build_network(network, model_path, input_size or 112, network_kwargs).to(device)
        embedder = TorchEmbedder(module, device)
    if input_size is not None:
        embedder.check_input_size(input_size, "--input-size")
    if embedder.input_size is None:
        embedder.input_size = int(input_size or 112)
    return embedder
