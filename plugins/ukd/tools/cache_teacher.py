"""Run a config's teacher once over its training .rec and store the embeddings for kd.teacher_backend='cache'.

    python tools/cache_teacher.py configs/ms1mv3_mbf_ukd.py --out /data/ms1mv3_r100.tcache
    torchrun --nproc_per_node=8 tools/cache_teacher.py configs/ms1mv3_mbf_ukd.py --batch-size 256

The teacher is the one the config's kd section names (teacher_network + teacher_weights, or teacher_onnx).
The output is one file: a JSON header and a memory-mapped float16 [N, 2, d] array of L2-normalised
embeddings of every image as stored and flipped (plus their norms). A killed run resumes where it stopped
when started again with the same arguments; the file only becomes usable when every chunk is written.
Then train with --set kd.teacher_backend="'cache'" kd.teacher_cache="'FILE'".
"""
import argparse
import logging
import os
import sys


from arcface.config import load_config
from arcface.cli import report_errors


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="python config file whose kd section names the teacher")
    parser.add_argument("--out", default=None, help="cache file to write (default: kd.teacher_cache)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per teacher batch (each also runs flipped; default: cfg.batch_size, or the "
                             "value of the partial file being resumed)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="images per resumable chunk, a multiple of --batch-size (default: 32 batches)")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers (default: cfg.num_workers)")
    parser.add_argument("--restart", action="store_true", help="discard an existing file at --out and build anew")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set kd.teacher_onnx=\"'r100.onnx'\"")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from arcface.engine import distributed as D
    from arcface.engine.device import pick_device
    from plugins.ukd.cache import build_teacher_cache

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cfg = load_config(args.config, args.set)
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched:
        D.init_distributed(cfg.get("dist_backend"), device.type)
    try:
        path = build_teacher_cache(cfg, out=args.out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                                   num_workers=args.num_workers, restart=args.restart,
                                   progress=not args.no_progress, device=device)
    finally:
        if launched:
            D.teardown()
    if not launched or int(os.environ.get("RANK", 0)) == 0:
        print(f"teacher cache: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
