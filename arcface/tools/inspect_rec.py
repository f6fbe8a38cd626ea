"""Show what a training .rec holds: layout, counts, identities, images per identity, a few samples.

    python tools/inspect_rec.py <dataset_dir or .rec> [--samples 5] [--dump N --out <folder>] [--json]
"""
import argparse
import sys


from arcface.data import packing
from arcface.cli import report_errors


@report_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="dataset folder with train.rec/train.idx, or a .rec file")
    p.add_argument("--samples", type=int, default=5, help="samples to describe, spread over the file")
    p.add_argument("--dump", type=int, default=0, help="write the first N images to --out")
    p.add_argument("--out", default=None, help="folder for --dump")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.dump and not args.out:
        p.error("--dump needs --out <folder>")
    info = packing.describe_rec(args.root, samples=args.samples)
    print(packing.to_json(info) if args.json else "\n".join(packing.format_description(info)))
    if args.dump:
        paths = packing.dump_images(args.root, args.out, args.dump)
        print(f"dumped {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
