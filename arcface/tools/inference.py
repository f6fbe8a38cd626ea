"""The embedding of one face image (arcface_torch's inference.py, plus alignment, ONNX and a saved output).

    python tools/inference.py --network r50 --weight work_dirs/r50/model.pt --img face.jpg
    python tools/inference.py --weight w600k_r50.onnx --img photo.jpg \\
        --landmarks 38.3,51.7,73.5,51.5,56.0,71.7,41.5,92.4,70.7,92.2 --output face.npy

The image is read with EXIF orientation applied, as RGB. With --landmarks (x, y of left eye, right eye, nose,
left and right mouth corner, in pixels of the image) the face is aligned to the ArcFace template at
--input-size, as the IJB evaluation does; without, the whole image is resized to --input-size (bilinear), as
upstream's script does for an already aligned crop. Pixels are normalised as in training, (x / 255 - 0.5) / 0.5.
The embedding printed and saved is the network's raw output (not L2-normalised), like upstream's.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps

from arcface.cli import exit_status
from arcface.errors import ConfigError, DataError
from arcface.eval.alignment import align_face
from arcface.eval.embedder import build_embedder


def parse_landmarks(text):
    """'x1,y1,...,x5,y5' (commas or spaces) -> [5, 2] float array."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--landmarks must be numbers, got {text!r}") from None
    if len(values) != 10:
        raise ConfigError(f"--landmarks needs 10 numbers (x, y of 5 points: eyes, nose, mouth corners), "
                          f"got {len(values)}")
    return np.asarray(values, dtype=np.float64).reshape(5, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="embed one face image with a trained backbone")
    p.add_argument("--network", default="r50", help="get_model name (iresnet50 is read as r50); unused for .onnx")
    p.add_argument("--weight", default="", help="backbone checkpoint (model.pt / backbone.pth) or an .onnx file")
    p.add_argument("--img", required=True, help="the image file")
    p.add_argument("--input-size", default=112, type=int, help="side of the square crop the model takes")
    p.add_argument("--network-kwargs", default="{}", help='extra get_model keywords as JSON, e.g. \'{"width": 0.5}\'')
    p.add_argument("--landmarks", default="", help="10 numbers x1,y1,...,x5,y5: align instead of resizing")
    p.add_argument("--output", default="", help="also save the embedding: .npy (float32 [d]) or .txt (one per line)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    args = p.parse_args(argv)
    if not args.weight:
        raise ConfigError("give the model: --weight model.pt (with --network) or --weight model.onnx")
    if args.input_size < 1:
        raise ConfigError(f"--input-size must be >= 1, got {args.input_size}")
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    if not isinstance(args.network_kwargs, dict):
        raise ConfigError("--network-kwargs must be a JSON object")
    args.landmarks = parse_landmarks(args.landmarks) if args.landmarks.strip() else None
    if args.output and os.path.splitext(args.output)[1].lower() not in (".npy", ".txt"):
        raise ConfigError(f"--output {args.output}: the file name must end in .npy or .txt")
    return args


def read_image(path):
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as err:  # PIL raises several types for files it cannot decode
        raise DataError(f"image {path} cannot be decoded ({err})") from err


def face_crop(image, input_size, landmarks=None):
    """[3, S, S] uint8: aligned by the 5 landmarks when given, else the whole image resized."""
    if landmarks is not None:
        crop = align_face(image, landmarks, input_size)
    else:
        crop = np.asarray(image.resize((input_size, input_size), Image.BILINEAR), dtype=np.uint8)
    return crop.transpose(2, 0, 1)


def save_embedding(path, embedding):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.lower().endswith(".npy"):
        np.save(path, embedding.astype(np.float32))
    else:
        np.savetxt(path, embedding.astype(np.float32)[:, None], fmt="%.8g")


def run(argv=None):
    args = parse_args(argv)
    crop = face_crop(read_image(args.img), args.input_size, args.landmarks)
    embedder = build_embedder(args.weight, args.network, args.input_size, args.network_kwargs, args.device)
    embedding = embedder(crop[None])[0]
    how = "aligned by 5 landmarks" if args.landmarks is not None else "resized"
    print(f"{args.img}: {how} to {args.input_size}x{args.input_size}, embedding of {embedding.size} floats, "
          f"L2 norm {float(np.linalg.norm(embedding)):.4f}")
    print(embedding)
    if args.output:
        save_embedding(args.output, embedding)
        print(f"saved to {args.output}")
    return embedding


def main(argv=None):
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
