"""Export a backbone checkpoint to ONNX (input "data", [B, 3, S, S] normalised, dynamic batch).

    python tools/torch2onnx.py --input work_dirs/r50/model.pt --network r50 [--output r50.onnx]
    python tools/torch2onnx.py work_dirs/r50 --network r50          # a folder means <folder>/model.pt

As upstream, the default output is model.onnx beside the checkpoint. --simplify runs onnxsim when it is
installed and is ignored (with a warning) when it is not.
"""
import argparse
import json
import os
import sys


from arcface.cli import exit_status
from arcface.errors import ConfigError
from arcface.eval.embedder import build_network
from arcface.eval.onnx_export import export_onnx


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="backbone checkpoint -> ONNX")
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or folder (same as --input)")
    p.add_argument("--input", default=None, help="checkpoint file (model.pt) or a folder holding model.pt")
    p.add_argument("--output", default=None, help="output .onnx (default: model.onnx beside the checkpoint)")
    p.add_argument("--network", required=True, help="get_model name, e.g. r50, mbf")
    p.add_argument("--network-kwargs", default="{}", help="extra get_model keywords as JSON")
    p.add_argument("--input-size", default=112, type=int)
    p.add_argument("--opset", default=11, type=int)
    p.add_argument("--simplify", action="store_true", help="run onnxsim if installed")
    args = p.parse_args(argv)
    source = args.input or args.checkpoint
    if not source:
        raise ConfigError("give the checkpoint: --input model.pt")
    if os.path.isdir(source):
        source = os.path.join(source, "model.pt")
    args.input = source
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(source)), "model.onnx")
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    return args


def run(argv=None):
    args = parse_args(argv)
    model = build_network(args.network, args.input, args.input_size, args.network_kwargs)
    path = export_onnx(model, args.output, input_size=args.input_size, opset=args.opset, simplify=args.simplify)
    print(f"wrote {path}")
    return path


def main(argv=None):
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
