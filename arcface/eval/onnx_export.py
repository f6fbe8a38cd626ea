"""Backbone -> ONNX as arcface_torch's torch2onnx: input named "data", [B, 3, S, S] normalised, dynamic batch.

Uses torch's TorchScript exporter (dynamo=False): it needs no onnxscript and yields the same graph kind
upstream's files have. The file is checked with onnx.checker and only then moved into place.
"""
import copy
import os
import warnings

import torch

from ..errors import ConfigError

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"


def export_onnx(model, path, input_size=112, opset=11, simplify=False):
    """Write `model` (any nn.Module; DDP unwrapped) to `path`; returns the path. simplify needs onnxsim."""
    try:
        import onnx
    except ImportError as err:
        raise ConfigError("exporting to ONNX needs the onnx package (pip install onnx)") from err
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    net = copy.deepcopy(model).cpu().float().eval()
    dummy = torch.zeros(1, 3, int(input_size), int(input_size)).uniform_(-1, 1)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notices
            torch.onnx.export(net, (dummy,), tmp, dynamo=False, opset_version=int(opset),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        graph = onnx.load(tmp)
        if simplify:
            graph = _simplify(graph)
            onnx.save(graph, tmp)
        onnx.checker.check_model(graph)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _simplify(graph):
    try:
        from onnxsim import simplify
    except ImportError:
        warnings.warn("onnxsim is not installed; --simplify ignored")
        return graph
    simplified, ok = simplify(graph)
    if not ok:
        warnings.warn("onnxsim could not validate the simplified graph; keeping the original")
        return graph
    return simplified
