"""`make bench`: run every benchmark script once, side by side claims each, and keep their outputs.

Each script prints its own ratios and the machine; this runner only sequences them (one at a time, so they do
not compete for the cores) and writes each output to benchmarks/results/<name>.txt. docs/benchmarks.md records
the figures of the last full run with their interpretation.
    python -m benchmarks.run_all [--only kd_step,ijb] [--quick]
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (arguments for a full run, arguments for --quick)
BENCHMARKS = {
    "partial_fc": ([], ["--quick"]),
    "data": ([], ["--images", "512", "--skip-42m"]),
    "synthetic": ([], ["--images", "100", "--rec-images", "200"]),
    "kd_losses": (["--mbf-batch", "32"], ["--mbf-batch", "8", "--repeats", "1"]),
    "kd_step": ([], ["--batch", "8", "--size", "56", "--repeat", "3"]),
    "teacher_cache": ([], []),
    "ijb": ([], ["--images", "50000", "--templates", "2500", "--pairs", "1000000"]),
    "ukd_gain": ([], ["--seeds", "1", "--epochs", "1"]),  # needs `make demo` first; ~15 min in full
    "backbone_step": ([], ["--batch", "4", "--input-size", "56", "--repeat", "1"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of benchmark names")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    failed = []
    for name in names:
        extra = BENCHMARKS[name][1 if args.quick else 0]
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", *extra]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        text = proc.stdout + (f"\n[stderr]\n{proc.stderr[-4000:]}" if proc.returncode else "")
        print(text.rstrip())
        print(f"--- {name}: {time.time() - started:.0f} s, exit {proc.returncode}")
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
            f.write(text)
        if proc.returncode:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
