"""Pack face images into MXNet RecordIO files (no mxnet needed).

    python tools/pack_rec.py folder  <image_folder> <out_dir> [--resize 112] [--workers 8]
    python tools/pack_rec.py list    <train.lst> <out_dir> [--root <image root>]
    python tools/pack_rec.py shuffle <dataset_dir or .rec> <out_dir> [--seed 0]     (DALI-ready)
    python tools/pack_rec.py reindex <train.rec> [--idx <train.idx>]

`folder` and `list` write the insightface layout (header, images grouped by identity, identity records,
`property`); `shuffle` writes image records only, in random order, from either layout.
"""
import argparse
import logging
import sys


from arcface.data import packing
from arcface.cli import report_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def image_options(q):
        q.add_argument("--resize", type=int, default=None, help="resize every image to N x N (default: keep)")
        q.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
        q.add_argument("--reencode", action="store_true", help="re-encode JPEG files even when nothing changes")
        q.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    q = sub.add_parser("folder", help="image folder (one sub-folder per identity) -> insightface-layout rec")
    q.add_argument("src")
    q.add_argument("out_dir")
    image_options(q)
    q = sub.add_parser("list", help="im2rec .lst (index, label, path) -> insightface-layout rec")
    q.add_argument("lst")
    q.add_argument("out_dir")
    q.add_argument("--root", default=None, help="folder the .lst paths are relative to (default: its folder)")
    image_options(q)
    q = sub.add_parser("shuffle", help="any rec -> shuffled image-only rec for DALI")
    q.add_argument("src")
    q.add_argument("out_dir")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true")
    q = sub.add_parser("reindex", help="rebuild a lost .idx from the .rec")
    q.add_argument("rec")
    q.add_argument("--idx", default=None)
    return p.parse_args(argv)


@report_errors
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.command in ("folder", "list"):
        common = dict(resize=args.resize, quality=args.quality, reencode=args.reencode, workers=args.workers,
                      progress=not args.quiet)
        if args.command == "folder":
            n, c = packing.pack_folder(args.src, args.out_dir, **common)
        else:
            n, c = packing.pack_list(args.lst, args.out_dir, root=args.root, **common)
        print(f"wrote {n} images of {c} identities to {args.out_dir}/train.rec (num_classes={c}, num_image={n})")
    elif args.command == "shuffle":
        n = packing.shuffle_rec(args.src, args.out_dir, seed=args.seed, progress=not args.quiet)
        print(f"wrote {n} shuffled images to {args.out_dir}/train.rec")
    else:
        path, n = packing.reindex_rec(args.rec, args.idx)
        print(f"wrote {path} ({n} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
