"""Generate a procedural-face data set: train.rec/.idx + property, verification .bin pairs of held-out
identities, an IJB-style folder, and manifest.json (a folder whose manifest matches is reused).

    python tools/make_synthetic.py --out data/synth --num-ids 1000 --per-id 40 --size 112 --seed 0 \\
        --val-ids 200 --pairs 3000 --hard-pairs 3000 --ijb-ids 100 --ijb-name IJBC
    python tools/make_synthetic.py --preview sheet.png --size 112 --difficulty 0.5
"""
import argparse
import sys
import time


from arcface.data.synthetic import dataset_spec, generate, manifest_matches, write_preview
from arcface.cli import report_errors


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (required unless only --preview is given)")
    p.add_argument("--num-ids", type=int, default=100, help="training identities")
    p.add_argument("--per-id", type=int, default=20, help="training images per identity")
    p.add_argument("--size", type=int, default=112, help="aligned crop side in pixels (IJB loose crops are 1.75x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.5, help="nuisance strength, 0 (clean) .. 1 (hardest)")
    p.add_argument("--val-ids", type=int, default=0, help="held-out identities for the .bin pairs (0 = no .bin)")
    p.add_argument("--pairs", type=int, default=3000, help="pairs in the .bin (a multiple of 20)")
    p.add_argument("--val-name", default="synth_val.bin")
    p.add_argument("--hard-pairs", type=int, default=0, help="pairs in a harder, larger-pose .bin (0 = none)")
    p.add_argument("--hard-name", default="synth_hard.bin")
    p.add_argument("--ijb-ids", type=int, default=0, help="held-out subjects of the IJB-style folder (0 = none)")
    p.add_argument("--ijb-name", default="IJBC", help="IJB folder name; file prefix is its lower case")
    p.add_argument("--ijb-templates", type=int, default=3, help="templates per subject (first = gallery)")
    p.add_argument("--ijb-media", type=int, default=3, help="at most this many media per template")
    p.add_argument("--ijb-frames", type=int, default=3, help="at most this many images per media")
    p.add_argument("--ijb-impostor-ratio", type=int, default=20, help="impostor template pairs per genuine pair")
    p.add_argument("--ijb-difficulty", type=float, default=0.6)
    p.add_argument("--val-ijb-name", default="", help="also an IJB-style folder of the --val-ids identities, its meta "
                   "files named like --ijb-name's (a validation split in the test's format; empty = none)")
    p.add_argument("--ijb-bin-pairs", type=int, default=0, help="also .bin pairs of the IJB identities (0 = none)")
    p.add_argument("--ijb-bin-name", default="", help="file name of those pairs, e.g. test.bin")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="regenerate even when the manifest matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet (ids x samples, first column clean)")
    p.add_argument("--preview-ids", type=int, default=8)
    p.add_argument("--preview-samples", type=int, default=6)
    p.add_argument("--preview-mode", choices=("aligned", "loose"), default="aligned")
    return p


@report_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.out and not args.preview:
        print("error: give --out DIR and/or --preview PNG", file=sys.stderr)
        return 2
    if args.preview:
        path = write_preview(args.preview, seed=args.seed, ids=args.preview_ids, samples=args.preview_samples,
                             size=args.size, difficulty=args.difficulty, mode=args.preview_mode)
        print(f"preview written to {path}")
    if args.out:
        kwargs = dict(seed=args.seed, num_ids=args.num_ids, per_id=args.per_id, size=args.size,
                      difficulty=args.difficulty, val_ids=args.val_ids, pairs=args.pairs, val_name=args.val_name,
                      hard_pairs=args.hard_pairs, hard_name=args.hard_name, ijb_ids=args.ijb_ids,
                      ijb_name=args.ijb_name, ijb_templates=args.ijb_templates, ijb_media=args.ijb_media,
                      ijb_frames=args.ijb_frames, ijb_impostor_ratio=args.ijb_impostor_ratio,
                      ijb_difficulty=args.ijb_difficulty, val_ijb_name=args.val_ijb_name,
                      ijb_bin_pairs=args.ijb_bin_pairs, ijb_bin_name=args.ijb_bin_name)
        if not args.force and manifest_matches(args.out, dataset_spec(**kwargs)):
            print(f"{args.out}: manifest matches, nothing to do (--force regenerates)")
            return 0
        start = time.time()
        manifest = generate(args.out, workers=args.workers, force=True, progress=not args.no_progress, **kwargs)
        took = time.time() - start
        counts = ", ".join(f"{k}={v}" for k, v in manifest["counts"].items())
        print(f"{args.out}: {counts} in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
