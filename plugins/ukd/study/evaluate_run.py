"""Score one trained model on a study's prepared splits (a subprocess of the study, one per run).

    python -m plugins.ukd.study.evaluate_run --model RUN/model.pt --network mbf --network-kwargs '{"width": 0.5}' \
        --input-size 32 --split val=OUT/splits/val --split test=OUT/splits/test --out RUN/eval

Writes OUT/metrics.json ({split: {'TAR@1e-4': x, ..., 'AUC', 'accuracy'}}) and OUT/<split>_templates.npy (the
template features, float32, rows in sorted template-id order), from which the study recomputes every pair score for
the bootstrap and the ROC plots. Its own process, so that --jobs N evaluations run side by side with their own
thread limits.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from arcface.cli import report_errors
from arcface.errors import ConfigError
from arcface.eval import report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="backbone checkpoint (model.pt)")
    p.add_argument("--network", required=True)
    p.add_argument("--network-kwargs", default="{}", help="get_model keywords as JSON")
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--split", action="append", default=[], metavar="NAME=FOLDER", help="a prepared split")
    p.add_argument("--fars", default="1e-3,1e-4,1e-5")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    splits = {}
    for item in args.split:
        if "=" not in item:
            raise ConfigError(f"--split {item!r} is not NAME=FOLDER")
        name, folder = item.split("=", 1)
        splits[name] = folder
    if not splits:
        raise ConfigError("give at least one --split NAME=FOLDER")
    args.splits = splits
    args.fars = tuple(float(f) for f in args.fars.split(","))
    return args


def build_model_embedder(model, network, input_size, network_kwargs):
    """The checkpoint in eval mode on the CPU, channels-last (2x faster convolutions there)."""
    import torch

    from arcface.eval.embedder import TorchEmbedder, build_network

    module = build_network(network, model, input_size, network_kwargs).to(memory_format=torch.channels_last)
    return TorchEmbedder(module, "cpu")


@report_errors
def main(argv=None):
    args = parse_args(argv)
    from .evaluation import EvalSplit, score_split

    started = time.time()
    embedder = build_model_embedder(args.model, args.network, args.input_size, args.network_kwargs)
    metrics = {}
    for name, folder in args.splits.items():
        split = EvalSplit(folder, name)
        values, t_feats, unique = score_split(embedder, split, args.fars, args.batch_size)
        metrics[name] = values
        os.makedirs(args.out, exist_ok=True)
        np.save(os.path.join(args.out, f"{name}_templates.npy"), t_feats)
        np.save(os.path.join(args.out, f"{name}_template_ids.npy"), unique)
    metrics["seconds"] = time.time() - started
    report.write_json(os.path.join(args.out, "metrics.json"), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
