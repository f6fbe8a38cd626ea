"""The ONNX teacher backend: equal to the torch teacher it was exported from, in the insightface layout and in
a user's NHWC / BGR / other-normalisation export, and refused at start-up when it does not fit the run."""
import warnings

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from arcface.eval.embedder import TorchEmbedder  # noqa: E402
from arcface.eval.onnx_export import export_onnx  # noqa: E402
from arcface.errors import CheckpointError, ConfigError  # noqa: E402
from arcface.engine.hooks import TrainContext  # noqa: E402
from plugins.ukd import cache as C  # noqa: E402
from plugins.ukd.teacher_backends import OnnxInputConverter, build_teacher_backend  # noqa: E402
from test_teacher_cache import DIM, SIZE, make_cfg, make_rec, make_teacher, one_thread  # noqa: E402,F401

TOL = 1e-4
BGR_MEAN, BGR_STD = [104.0, 117.0, 123.0], [58.0, 57.0, 59.0]  # model channel order (B, G, R)


class NhwcBgrPixels(torch.nn.Module):
    """A user's export: NHWC, BGR, raw 0..255 pixels in; converts to what the backbone was trained on."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)[:, [2, 1, 0]]
        return self.backbone((x - 127.5) / 127.5)


class NchwBgrMeanStd(torch.nn.Module):
    """NCHW, BGR, (pixel - mean) / std per channel."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(BGR_STD).view(1, 3, 1, 1))

    def forward(self, x):
        pixels = (x * self.std + self.mean)[:, [2, 1, 0]]
        return self.backbone((pixels - 127.5) / 127.5)


DYNAMIC_BATCH = {"input": {0: "batch"}, "embedding": {0: "batch"}}


def export(module, path, shape, dynamic=DYNAMIC_BATCH):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(module.eval(), (torch.rand(*shape) * 255,), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["embedding"],
                          dynamic_axes=dynamic)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    model = make_teacher(tmp / "teacher.pt")
    return edict(tmp=tmp, model=model, pt=str(tmp / "teacher.pt"),
                 plain=export_onnx(model, str(tmp / "teacher.onnx"), input_size=SIZE),
                 nhwc=export(NhwcBgrPixels(model), tmp / "nhwc.onnx", (1, SIZE, SIZE, 3)),
                 meanstd=export(NchwBgrMeanStd(model), tmp / "meanstd.onnx", (1, 3, SIZE, SIZE)),
                 dynamic=export(model, tmp / "dynamic.onnx", (1, 3, SIZE, SIZE),
                                {"input": {0: "b", 1: "c", 2: "h", 3: "w"}, "embedding": {0: "b"}}),
                 static1=export(model, tmp / "static1.onnx", (1, 3, SIZE, SIZE), dynamic=None))


def backend(models, rec="synthetic", input_size=SIZE, **kd):
    cfg = make_cfg(rec, models.pt, input_size=input_size, kd=dict({"teacher_backend": "onnx"}, **kd))
    return build_teacher_backend(cfg.kd, cfg, TrainContext(cfg=cfg, backbone=None, device=torch.device("cpu"),
                                                            rank=0, world_size=1))


def engine_images(n=6, seed=0):
    """Images as the engine hands them: uint8 pixels -> (x - 127.5) / 127.5."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3, SIZE, SIZE)).astype(np.float32)
    return torch.from_numpy((pixels - 127.5) / 127.5)


def reference(models, images):
    with torch.no_grad():
        return models.model(images)


def test_insightface_layout_export_equals_torch_teacher(models):
    onnx = backend(models, teacher_onnx=models.plain)
    images = engine_images()
    out = onnx(images)
    assert out.dtype == torch.float32 and out.shape == (6, DIM) and not out.requires_grad
    assert (out - reference(models, images)).abs().max() <= TOL
    assert onnx.last_ms > 0 and not onnx.training and list(onnx.parameters()) == []
    # the sanity-check embedder takes the verification sets' uint8 batches
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3, SIZE, SIZE), dtype=np.uint8)
    expected = TorchEmbedder(models.model)(pixels)
    assert np.abs(onnx.embedder()(pixels) - expected).max() <= TOL


@pytest.mark.parametrize("which,settings", [
    ("nhwc", dict(teacher_onnx_layout="NHWC", teacher_onnx_channels="BGR", teacher_onnx_normalize="none")),
    ("meanstd", dict(teacher_onnx_channels="BGR", teacher_onnx_normalize={"mean": BGR_MEAN, "std": BGR_STD})),
    ("static1", dict()),  # batch fixed to 1 in the graph: fed one image at a time
])
def test_user_export_with_other_layout_and_normalisation_equals_torch_teacher(models, which, settings):
    onnx = backend(models, teacher_onnx=models[which], **settings)
    images = engine_images(seed=2)
    assert (onnx(images) - reference(models, images)).abs().max() <= TOL


def test_input_conversion_is_exact():
    images = engine_images(2, seed=3).numpy()
    pixels = images * 127.5 + 127.5
    assert np.array_equal(OnnxInputConverter()(images), images)  # the engine's own convention: untouched
    nhwc_bgr = OnnxInputConverter("NHWC", "BGR", "none")(images)
    np.testing.assert_allclose(nhwc_bgr, pixels[:, ::-1].transpose(0, 2, 3, 1), rtol=0, atol=1e-4)
    custom = OnnxInputConverter("NCHW", "RGB", {"mean": [0.0, 10.0, 20.0], "std": 2.0})(images)
    np.testing.assert_allclose(custom, (pixels - np.array([0, 10, 20.0])[None, :, None, None]) / 2.0, atol=1e-5)


def test_mismatched_models_fail_at_start_up(models):
    with pytest.raises(ConfigError, match=r"expects 16x16 images.*cfg.input_size=24"):
        backend(models, input_size=24, teacher_onnx=models.plain)
    with pytest.raises(ConfigError, match="looks like NHWC"):
        backend(models, teacher_onnx=models.nhwc)  # NHWC model, default NCHW layout
    with pytest.raises(ConfigError, match="looks like NCHW"):
        backend(models, teacher_onnx=models.plain, teacher_onnx_layout="NHWC")
    with pytest.raises(ConfigError, match="probe batch"):  # every axis dynamic: only running it can tell
        backend(models, teacher_onnx=models.dynamic, teacher_onnx_layout="NHWC")
    with pytest.raises(ConfigError, match="teacher_embedding_size"):
        backend(models, teacher_onnx=models.plain, teacher_embedding_size=32)
    with pytest.raises(ConfigError, match="teacher_onnx_normalize"):
        backend(models, teacher_onnx=models.plain, teacher_onnx_normalize="imagenet")
    with pytest.raises(ConfigError, match="std must be > 0"):
        backend(models, teacher_onnx=models.plain, teacher_onnx_normalize={"mean": 0, "std": [1, 0, 1]})
    with pytest.raises(ConfigError, match="teacher_onnx_layout"):
        backend(models, teacher_onnx=models.plain, teacher_onnx_layout="CHW")
    with pytest.raises(CheckpointError, match="does not exist"):
        backend(models, teacher_onnx=str(models.tmp / "missing.onnx"))
    with pytest.raises(ConfigError, match="teacher_onnx is not set"):
        backend(models)


def test_cache_built_from_onnx_teacher(models):
    rec, _ = make_rec(models.tmp / "rec")
    out = str(models.tmp / "onnx.tcache")
    kd = dict(teacher_onnx=models.nhwc, teacher_onnx_layout="NHWC", teacher_onnx_channels="BGR",
              teacher_onnx_normalize="none")
    C.build_teacher_cache(make_cfg(rec, models.pt, out, kd=dict(kd, teacher_backend="onnx")), batch_size=4,
                          chunk_size=8, progress=False)
    torch_out = str(models.tmp / "torch.tcache")
    C.build_teacher_cache(make_cfg(rec, models.pt, torch_out), batch_size=4, chunk_size=8, progress=False)
    header, complete = C.read_header(out)
    assert complete and header["teacher"]["source"] == "onnx" and header["teacher"]["onnx"]["layout"] == "NHWC"
    a, b = C.CacheFile.open(out), C.CacheFile.open(torch_out)
    assert np.abs(a.embeddings.astype(np.float32) - b.embeddings.astype(np.float32)).max() <= 2.0 ** -11
    # training from it: teacher_onnx configured too, so its hash is checked; the sanity check can embed
    train = backend(models, rec=rec, teacher_cache=out, **dict(kd, teacher_backend="cache"))
    assert train.embedder() is not None
    with pytest.raises(ConfigError, match="sha256"):
        backend(models, rec=rec, teacher_cache=out, **dict(kd, teacher_backend="cache", teacher_onnx=models.plain,
                                                            teacher_onnx_layout="NCHW", teacher_onnx_channels="RGB",
                                                            teacher_onnx_normalize="arcface"))
