"""tools/inference.py: resized and aligned crops give the embedding a plain forward pass gives; errors are clear."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.backbones import get_model
from arcface.errors import ConfigError, DataError
from arcface.eval.alignment import arcface_template
from arcface.tools import inference

SIZE = 32
NET_KW = {"width": 0.25, "num_features": 16}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("r18", input_size=SIZE, **NET_KW).eval()
    path = tmp_path_factory.mktemp("inference") / "model.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def plain_embedding(model, rgb_uint8_hwc):
    """(x / 255 - 0.5) / 0.5 on the [S, S, 3] crop, channels first, one forward pass."""
    x = torch.from_numpy(rgb_uint8_hwc.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model((x / 255.0 - 0.5) / 0.5)[0].numpy()


def common(path, image):
    return ["--network", "r18", "--weight", path, "--img", image, "--input-size", str(SIZE),
            "--network-kwargs", json.dumps(NET_KW), "--device", "cpu"]


def test_whole_image_is_resized(model_file, tmp_path, capsys):
    model, path = model_file
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 41, 3), dtype=np.uint8)
    image = str(tmp_path / "face.png")
    Image.fromarray(pixels).save(image)
    out = str(tmp_path / "emb.npy")
    got = inference.run(common(path, image) + ["--output", out])
    resized = np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR))
    expected = plain_embedding(model, resized)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(np.load(out), got)
    text = capsys.readouterr().out
    assert "resized to 32x32, embedding of 16 floats" in text and f"{np.linalg.norm(expected):.4f}" in text


def test_landmarks_align_the_face(model_file, tmp_path):
    """Landmarks that are the template moved by (5, 7) pixels: the aligned crop is the image cut at (5, 7)."""
    model, path = model_file
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (SIZE + 20, SIZE + 15, 3), dtype=np.uint8)
    image = str(tmp_path / "loose.png")
    Image.fromarray(pixels).save(image)
    points = arcface_template(SIZE) + [5.0, 7.0]
    text = ",".join(f"{v:.6f}" for v in points.ravel())
    np.testing.assert_allclose(inference.parse_landmarks(text), points, atol=1e-6)
    crop = inference.face_crop(Image.open(image).convert("RGB"), SIZE, inference.parse_landmarks(text))
    crop = crop.transpose(1, 2, 0)
    # bilinear sampling at coordinates a rounding error away from whole pixels: off by at most one level
    assert np.abs(crop.astype(int) - pixels[7:7 + SIZE, 5:5 + SIZE]).max() <= 1
    out = str(tmp_path / "emb.txt")
    got = inference.run(common(path, image) + ["--landmarks", text, "--output", out])
    expected = plain_embedding(model, crop)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(np.loadtxt(out), got, rtol=1e-6)
    resized = inference.run(common(path, image))
    assert np.abs(resized - got).max() > 1e-3  # aligning is not resizing


def test_onnx_weights_give_the_same_embedding(model_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from arcface.eval.onnx_export import export_onnx

    model, path = model_file
    onnx_path = export_onnx(model, str(tmp_path / "model.onnx"), input_size=SIZE)
    pixels = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = str(tmp_path / "crop.png")
    Image.fromarray(pixels).save(image)
    via_onnx = inference.run(["--weight", onnx_path, "--img", image, "--input-size", str(SIZE)])
    expected = plain_embedding(model, pixels)
    np.testing.assert_allclose(via_onnx, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_bad_input_is_a_clear_error(model_file, tmp_path, capsys):
    model, path = model_file
    image = str(tmp_path / "face.png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(image)
    with pytest.raises(ConfigError, match=r"--landmarks needs 10 numbers .*got 7"):
        inference.run(common(path, image) + ["--landmarks", "1,2,3,4,5,6,7"])
    with pytest.raises(ConfigError, match="--landmarks must be numbers"):
        inference.run(common(path, image) + ["--landmarks", "a b"])
    with pytest.raises(ConfigError, match="give the model: --weight"):
        inference.run(["--img", image])
    with pytest.raises(ConfigError, match=r"must end in \.npy or \.txt"):
        inference.run(common(path, image) + ["--output", "emb.csv"])
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match=f"image {missing} does not exist"):
        inference.run(common(path, missing))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be decoded"):
        inference.run(common(path, str(broken)))
    assert inference.main(common(path, missing)) == 2
    assert f"error: image {missing} does not exist" in capsys.readouterr().err
