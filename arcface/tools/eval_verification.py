"""Verification accuracy on insightface .bin sets (lfw, cfp_fp, agedb_30, ...), upstream's 10-fold protocol.

    python tools/eval_verification.py --model-prefix work_dirs/r50/model.pt --network r50 \
        --data-dir datasets/ms1m-retinaface-t1 --targets lfw,cfp_fp,agedb_30
    python tools/eval_verification.py --model-prefix model.onnx --data-dir ... --targets lfw

Prints upstream's lines ([name]XNorm / Accuracy-Flip) and a table; --result-dir also gets verification.json.
"""
import argparse
import json
import os
import sys


from arcface.cli import exit_status
from arcface.errors import ConfigError
from arcface.eval import report
from arcface.eval.embedder import build_embedder
from arcface.eval.verification import evaluate_verification, load_bin


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="verification accuracy on .bin pair sets")
    p.add_argument("--model-prefix", default="", help="backbone checkpoint (model.pt) or an .onnx file")
    p.add_argument("--onnx", default="", help="an exported .onnx model (instead of --model-prefix)")
    p.add_argument("--network", default="r50", help="get_model name")
    p.add_argument("--network-kwargs", default="{}", help="extra get_model keywords as JSON")
    p.add_argument("--data-dir", required=True, help="folder holding <target>.bin")
    p.add_argument("--targets", default="lfw,cfp_fp,agedb_30", help="comma list of .bin names")
    p.add_argument("--batch-size", default=64, type=int)
    p.add_argument("--nfolds", default=10, type=int)
    p.add_argument("--input-size", default=None, type=int,
                   help="image side the model takes (default: an ONNX model's own input size, else 112)")
    p.add_argument("--result-dir", default="", help="also write verification.json and table.txt here")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.model = args.onnx or args.model_prefix
    if not args.model:
        raise ConfigError("give a model: --model-prefix (checkpoint or .onnx) or --onnx")
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return args


def run(argv=None):
    args = parse_args(argv)
    embedder = build_embedder(args.model, args.network, args.input_size, args.network_kwargs, args.device)
    args.input_size = embedder.input_size
    results = {}
    for name in args.targets:
        dataset = load_bin(os.path.join(args.data_dir, f"{name}.bin"), args.input_size, name=name)
        res = evaluate_verification(embedder, dataset, args.batch_size, args.nfolds, progress=not args.no_progress)
        print("[%s]XNorm: %f" % (name, res["xnorm"]))
        print("[%s]Accuracy-Flip: %1.5f+-%1.5f" % (name, res["accuracy"], res["std"]))
        results[name] = res
    text = report.verification_table(results).get_string()
    print(text)
    if args.result_dir:
        report.write_json(os.path.join(args.result_dir, "verification.json"), results)
        report.atomic_write(os.path.join(args.result_dir, "table.txt"), text + "\n")
    return results


def main(argv=None):
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
