"""ONNX export: same numbers as torch, dynamic batch, input named "data"; OnnxEmbedder and the tools."""
import json
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from arcface.errors import ConfigError, DataError
from arcface.eval.embedder import OnnxEmbedder, TorchEmbedder, build_embedder
from arcface.eval.onnx_export import export_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from arcface.tools import eval_verification, torch2onnx


class SmallNet(torch.nn.Module):
    def __init__(self, size=24, dim=10):
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.PReLU(8),
                                        torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8 * (size // 4) ** 2, dim)
        self.input_size = size

    def forward(self, x):
        return self.fc(self.body(x))


def test_export_matches_torch_with_dynamic_batch(tmp_path):
    model = SmallNet().eval()
    path = str(tmp_path / "small.onnx")
    assert export_onnx(model, path, input_size=24) == path
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["data"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert os.listdir(tmp_path) == ["small.onnx"]  # no temp file left behind
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 24, 24)
        ours = session.run(None, {"data": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert ours.shape == (batch, 10)
        assert np.abs(ours - ref).max() <= 1e-4
    embedder = OnnxEmbedder(path)
    assert embedder.input_size == 24
    uint8 = np.random.default_rng(0).integers(0, 256, (3, 3, 24, 24)).astype(np.uint8)
    np.testing.assert_allclose(embedder(uint8), TorchEmbedder(model)(uint8), atol=1e-4)


def test_onnx_input_size_mismatch_names_file_and_sizes(tmp_path):
    path = str(tmp_path / "small.onnx")
    export_onnx(SmallNet().eval(), path, input_size=24)
    embedder = OnnxEmbedder(path)
    with pytest.raises(DataError, match=rf"{path} expects 24x24 input but the batch is 112x112"):
        embedder(np.zeros((2, 3, 112, 112), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{path} expects 24x24 input but --input-size is 112x112"):
        build_embedder(path, input_size=112)


def test_torch2onnx_tool_and_onnx_in_eval_tools(tmp_path):
    from arcface.backbones import get_model

    kwargs = {"width": 0.25, "num_features": 16}
    torch.manual_seed(0)
    model = get_model("r18", input_size=32, **kwargs).eval()
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    torch.save(model.state_dict(), ckpt_dir / "model.pt")
    out = torch2onnx.run([str(ckpt_dir), "--network", "r18", "--network-kwargs", json.dumps(kwargs),
                           "--input-size", "32", "--simplify"])
    assert out == os.path.join(str(ckpt_dir), "model.onnx") and os.path.isfile(out)
    x = np.random.default_rng(2).integers(0, 256, (4, 3, 32, 32)).astype(np.uint8)
    onnx_emb = build_embedder(out, input_size=32)
    torch_emb = build_embedder(str(ckpt_dir / "model.pt"), "r18", 32, kwargs, device="cpu")
    a, b = onnx_emb(x), torch_emb(x)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())

    # both evaluation tools take the .onnx for --model-prefix and agree with the checkpoint
    write_small_bin(tmp_path / "mini.bin", size=32)
    common = ["--data-dir", str(tmp_path), "--targets", "mini", "--input-size", "32", "--no-progress",
              "--batch-size", "4"]
    via_onnx = eval_verification.run(common + ["--model-prefix", out])
    via_torch = eval_verification.run(common + ["--model-prefix", str(ckpt_dir / "model.pt"), "--network", "r18",
                                                 "--network-kwargs", json.dumps(kwargs), "--device", "cpu",
                                                 "--result-dir", str(tmp_path / "res")])
    assert via_onnx["mini"]["accuracy"] == via_torch["mini"]["accuracy"]
    assert via_onnx["mini"]["xnorm"] == pytest.approx(via_torch["mini"]["xnorm"], rel=1e-4)
    assert json.load(open(tmp_path / "res" / "verification.json"))["mini"]["pairs"] == 10


def write_small_bin(path, size=32, pairs=10):
    import io
    import pickle

    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (pairs, size, size, 3))
    bins = []
    for i in range(pairs):
        for j in range(2):
            img = base[i] if (i % 2 == 0 or j == 0) else base[(i + 1) % pairs]
            noisy = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy).save(buf, format="JPEG")
            bins.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((bins, [i % 2 == 0 for i in range(pairs)]), f)


def test_onnx_evaluation_takes_its_input_size_from_the_model_and_honours_the_device(tmp_path):
    path = str(tmp_path / "small.onnx")
    export_onnx(SmallNet().eval(), path, input_size=24)
    assert build_embedder(path).input_size == 24  # no --input-size: the graph's own, not 112
    assert build_embedder(path, device="cpu").session.get_providers() == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match=r"--device cuda, but this onnxruntime has no CUDAExecutionProvider"):
            build_embedder(path, device="cuda")
