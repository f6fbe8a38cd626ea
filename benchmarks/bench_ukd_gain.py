"""Does UKD beat plain training and feature consistency at equal steps? The demo's students over several seeds.

Needs the demo's data, teacher and teacher cache (run `make demo` first). For each seed it trains the half-width
MobileFaceNet three ways (no KD, FC, UKD; same data order, same steps), evaluates each on the held-out .bin pairs and
the procedural IJB-C, and prints per-seed numbers and the mean differences. About 2 minutes per run on 2 cores.
    python -m benchmarks.bench_ukd_gain [--seeds 0,1] [--epochs 4]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools.demo import CACHE, DATA, SIZE

_CACHED = ["kd.teacher_backend=cache", f"kd.teacher_cache={CACHE}", "kd.teacher_check=False"]
VARIANTS = [("no KD", "synth_mbf", []),
            ("FC", "synth_mbf_fc", _CACHED),
            ("UKD", "synth_mbf_ukd", _CACHED)]
# ablations (--ablations): each UKD part alone (at the demo's weight 30), and UKD and FC at the research note's 10
ABLATIONS = [("ILED only", "synth_mbf_ukd", _CACHED + ["kd.losses={'iled': {'weight': 30.0}}"]),
             ("RPSD only", "synth_mbf_ukd", _CACHED + ["kd.losses={'rpsd': {'weight': 30.0, 'bank': 4096, "
                                                       "'k_neg': 128}}"]),
             ("UKD w10", "synth_mbf_ukd", _CACHED + ["kd.losses={'iled': {'weight': 10.0}, 'rpsd': {'weight': 10.0, "
                                                     "'bank': 4096, 'k_neg': 128}}"]),
             ("FC w10", "synth_mbf_fc", _CACHED + ["kd.losses={'fc': {'weight': 10.0}}"])]


def run(cmd):
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ablations", action="store_true", help="run ILED only, RPSD only, UKD and FC at weight 10")
    p.add_argument("--only", default="", help="comma list of variant labels to run, e.g. 'FC,UKD'")
    args = p.parse_args()
    variants = ABLATIONS if args.ablations else VARIANTS
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    if not os.path.isfile(os.path.join(ROOT, CACHE)):
        print(f"skipped: {CACHE} not found; run `make demo` first (it trains the teacher and builds the cache)")
        return
    from benchmarks.common import machine
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, config, overrides in variants:
            out = f"work_dirs/gain/{label.replace(' ', '_')}_seed{seed}"
            run([torchrun, "--standalone", "--nproc_per_node=2", "tools/train.py", f"configs/{config}.py", "--set",
                 f"seed={seed}", f"num_epoch={args.epochs}", f"output={out}", "val_targets=[]", *overrides])
            res = os.path.join(out, "eval")
            common = ["--model-prefix", f"{out}/model.pt", "--network", "mbf", "--network-kwargs", '{"width": 0.5}',
                      "--input-size", str(SIZE), "--result-dir", res, "--no-progress"]
            run([sys.executable, "tools/eval_verification.py", "--data-dir", DATA, "--targets", "synth_val", *common])
            run([sys.executable, "tools/eval_ijb.py", "--image-path", f"{DATA}/IJBC", "--target", "IJBC", *common])
            ver = json.load(open(os.path.join(ROOT, res, "verification.json")))["synth_val"]
            ijb = next(iter(json.load(open(os.path.join(ROOT, res, "tar_at_far.json"))).values()))
            rows[(seed, label)] = (ver["accuracy"], ver["tar_at_far"]["0.01"], ijb["0.001"], ijb["0.01"])
            print(f"seed {seed} {label:>6}: acc {rows[(seed, label)][0]*100:.2f}  valTAR@1e-2 "
                  f"{rows[(seed, label)][1]*100:.2f}  IJB TAR@1e-3 {rows[(seed, label)][2]*100:.2f}  "
                  f"IJB TAR@1e-2 {rows[(seed, label)][3]*100:.2f}", flush=True)
    print(machine())
    seeds = sorted({s for s, _ in rows})
    for label in [v[0] for v in variants]:
        mean = [sum(rows[(s, label)][i] for s in seeds) / len(seeds) * 100 for i in range(4)]
        print(f"mean {label:>6}: acc {mean[0]:.2f}  valTAR@1e-2 {mean[1]:.2f}  IJB TAR@1e-3 {mean[2]:.2f}  "
              f"IJB TAR@1e-2 {mean[3]:.2f}")
    labels = {label for _, label in rows}
    for other in [o for o in ("no KD", "FC") if "UKD" in labels and o in labels]:
        wins = sum(rows[(s, "UKD")][1] > rows[(s, other)][1] for s in seeds)
        print(f"UKD beats {other} on valTAR@1e-2 in {wins}/{len(seeds)} seeds")


if __name__ == "__main__":
    main()
