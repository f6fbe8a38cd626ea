"""IJB-B / IJB-C evaluation with arcface_torch's eval_ijbc.py options, plus re-scoring from saved features.

    python tools/eval_ijb.py --model-prefix work_dirs/r50/model.pt --network r50 \
        --image-path IJB_release/IJBC --target IJBC --result-dir results/r50
    python tools/eval_ijb.py --model-prefix model.onnx --image-path IJB_release/IJBC ...       # ONNX
    python tools/eval_ijb.py --features feats.npz --image-path IJB_release/IJBC --modes all    # no model

Writes to --result-dir: table.txt (the printed prettytable), tar_at_far.json ({method: {"1e-06": TAR,
...}}, TAR as a fraction), tar_at_far.csv, roc.png and, when the 1:N CSVs exist, identification.json.
"""
import argparse
import json
import logging
import os
import sys
import time


import numpy as np

from arcface.cli import exit_status
from arcface.errors import ConfigError
from arcface.eval import ijb, ijb_io, report
from arcface.eval.embedder import build_embedder
from arcface.eval.metrics import IJB_FARS, far_key

logger = logging.getLogger("eval_ijb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="IJB-B / IJB-C 1:1 verification and 1:N identification")
    p.add_argument("--model-prefix", default="", help="backbone checkpoint (model.pt) or an .onnx file")
    p.add_argument("--onnx", default="", help="an exported .onnx model (instead of --model-prefix)")
    p.add_argument("--image-path", required=True, help="the IJB_release/IJBC (or IJBB) folder")
    p.add_argument("--result-dir", default=".", help="where the table, json, csv and roc.png go")
    p.add_argument("--batch-size", default=128, type=int)
    p.add_argument("--network", default="r50", help="get_model name (iresnet50 is read as r50)")
    p.add_argument("--network-kwargs", default="{}", help='extra get_model keywords as JSON, e.g. \'{"width": 0.5}\'')
    p.add_argument("--input-size", default=None, type=int, help="side of the aligned crop the model takes "
                   "(default: an ONNX model's own input size, else 112)")
    p.add_argument("--job", default="insightface", help="job name, first part of the method name")
    p.add_argument("--target", default="IJBC", help="IJBC or IJBB")
    p.add_argument("--modes", default="N1D1F1", help="comma list of N<0|1>D<0|1>F<0|1> or 'all' (upstream: N1D1F1)")
    p.add_argument("--save-features", default="", help="write img_feats / faceness_scores to this .npz")
    p.add_argument("--features", default="", help="re-score from a --save-features .npz instead of a model")
    p.add_argument("--save-scores", action="store_true", help="also write the pair scores as .npy per mode")
    p.add_argument("--device", default=None, help="cuda or cpu for the model, torch or ONNX (default: cuda when "
                   "available)")
    p.add_argument("--workers", default=4, type=int, help="threads decoding and aligning crops")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    args.target = ijb_io.check_target(args.target)
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    if not isinstance(args.network_kwargs, dict):
        raise ConfigError("--network-kwargs must be a JSON object")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.modes = ijb.parse_modes(args.modes)
    if not args.modes:
        raise ConfigError("--modes names no mode")
    model = args.onnx or args.model_prefix
    if args.features and model:
        raise ConfigError("give either --features or a model (--model-prefix / --onnx), not both")
    if not args.features and not model:
        raise ConfigError("give a model (--model-prefix or --onnx) or --features FILE")
    args.model = model
    return args


def image_features(args, images):
    if args.features:
        return ijb.load_features(args.features, images.names)
    ijb_io.check_images_exist(args.image_path, images.names)
    embedder = build_embedder(args.model, args.network, args.input_size, args.network_kwargs, args.device)
    args.input_size = embedder.input_size
    folder = ijb_io.image_dir(args.image_path)
    paths = [os.path.join(folder, name) for name in images.names]
    feats = ijb.extract_features(embedder, paths, images.landmarks, args.batch_size, args.input_size,
                                 workers=args.workers, progress=not args.no_progress)
    if args.save_features:
        ijb.save_features(args.save_features, feats, images.faceness, images.names)
        logger.info("features saved to %s", args.save_features)
    return feats, images.faceness


def run(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    started = time.time()
    images = ijb_io.read_images(args.image_path, args.target)
    pairs = ijb_io.read_template_pairs(args.image_path, args.target)
    logger.info("%s: %d images, %d templates, %d pairs (%d genuine)", args.target, len(images.names),
                np.unique(images.templates).size, pairs.label.size, int(pairs.label.sum()))
    feats, faceness = image_features(args, images)

    rows, curves, csv_rows, results = {}, {}, [], {}
    pair_source = ijb_io.meta_path(args.image_path, args.target, "template_pair_label.txt")
    for mode in args.modes:
        t_feats, unique = ijb.template_features(feats, faceness, images.templates, images.medias, mode)
        scores = ijb.score_pairs(t_feats, unique, pairs.t1, pairs.t2, progress=progress, source=pair_source)
        res = ijb.verification_metrics(scores, pairs.label)
        method = f"{args.job}-{args.target}-{mode.name}"
        rows[method] = res["tar_at_far"]
        curves[method] = (res["fpr"], res["tpr"], res["auc"])
        results[method] = {"mode": mode.name, "tar_at_far": res["tar_at_far"], "auc": res["auc"]}
        csv_rows.append([method, mode.name] + [res["tar_at_far"][far_key(f)] for f in IJB_FARS] + [res["auc"]])
        if args.save_scores:
            os.makedirs(args.result_dir, exist_ok=True)
            np.save(os.path.join(args.result_dir, f"scores_{args.target.lower()}_{mode.name}.npy"), scores)

    keys = [far_key(f) for f in IJB_FARS]
    table = report.tar_table(rows, keys, impostor_pairs=int((pairs.label == 0).sum()))
    text = table.get_string()
    if ijb_io.has_search_protocol(args.image_path, args.target):
        galleries, probes = ijb_io.read_search_protocol(args.image_path, args.target)
        ident = ijb.evaluate_identification(feats, faceness, images.templates, images.medias, galleries, probes,
                                            args.modes[0], source=f"{args.target} 1:N ")
        report.write_json(os.path.join(args.result_dir, "identification.json"), ident)
        ident_table = report.identification_table(
            ident, [str(k) for k in ijb.IDENTIFICATION_RANKS], [far_key(f) for f in ijb.IDENTIFICATION_FPIRS])
        text += f"\n1:N identification ({args.target}, {ident['mode']}, {ident['probes']} probe templates)\n"
        text += ident_table.get_string()
        results["identification"] = ident
    print(text)
    report.atomic_write(os.path.join(args.result_dir, "table.txt"), text + "\n")
    report.write_json(os.path.join(args.result_dir, "tar_at_far.json"), rows)
    report.write_csv(os.path.join(args.result_dir, "tar_at_far.csv"),
                     ["method", "mode"] + keys + ["auc"], csv_rows)
    report.save_roc_png(os.path.join(args.result_dir, "roc.png"), curves, title=f"ROC on {args.target}")
    logger.info("done in %.1f s; results in %s", time.time() - started, args.result_dir)
    return results


def main(argv=None):
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
