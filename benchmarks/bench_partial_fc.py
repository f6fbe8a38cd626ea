"""Partial FC at 1M and 2M classes: forward+backward time and peak memory, side by side, as ratios.

Each configuration runs in its own subprocess so peak RSS is its own. Claims checked (issue 2):
- sampling (sample_rate 0.1) makes a step at 1M classes cost a fraction of the full-rate step at 1M;
- 2M classes at 0.1 cost about twice 1M at 0.1 (linear in the class count), nothing B x C is materialised;
- compared with full rate at 100k classes.
Usage: python -m benchmarks.bench_partial_fc [--batch 128] [--dim 512] [--quick]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(classes, rate, batch, dim, repeat):
    import torch

    from arcface.losses import CombinedMarginLoss
    from arcface.partial_fc import PartialFC_V2
    from benchmarks.common import peak_rss_mb, rss_mb, timeit

    torch.manual_seed(0)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes, sample_rate=rate)
    emb = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    base = rss_mb()

    def step():
        pfc.weight.grad = None
        emb.grad = None
        pfc(emb, labels).backward()

    seconds = timeit(step, repeat=repeat)
    return {"classes": classes, "rate": rate, "seconds": seconds, "param_mb": classes * dim * 4 / 2 ** 20,
            "step_peak_extra_mb": peak_rss_mb() - base}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10x fewer classes, for a smoke run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        classes, rate = args.one.split(":")
        print(json.dumps(run_one(int(classes), float(rate), args.batch, args.dim, args.repeat)))
        return
    from benchmarks.common import machine
    scale = 10 if args.quick else 1
    configs = [(100_000 // scale, 1.0), (1_000_000 // scale, 1.0), (1_000_000 // scale, 0.1), (2_000_000 // scale, 0.1)]
    results = {}
    for classes, rate in configs:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_partial_fc", "--one", f"{classes}:{rate}",
                              "--batch", str(args.batch), "--dim", str(args.dim), "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results[(classes, rate)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(machine())
    print(f"Partial FC forward+backward, batch {args.batch}, d={args.dim}, one CPU process")
    print(f"{'classes':>10} {'rate':>5} {'step s':>8} {'centres MB':>11} {'step peak extra MB':>19}")
    for (classes, rate), r in results.items():
        print(f"{classes:>10} {rate:>5} {r['seconds']:>8.3f} {r['param_mb']:>11.0f} {r['step_peak_extra_mb']:>19.0f}")
    c1, c2, c100 = 1_000_000 // scale, 2_000_000 // scale, 100_000 // scale
    full_1m, pfc_1m, pfc_2m, full_100k = (results[(c1, 1.0)], results[(c1, 0.1)], results[(c2, 0.1)],
                                          results[(c100, 1.0)])
    print(f"ratio time  1M@0.1 / 1M@1.0   = {pfc_1m['seconds'] / full_1m['seconds']:.2f}")
    print(f"ratio time  2M@0.1 / 1M@0.1   = {pfc_2m['seconds'] / pfc_1m['seconds']:.2f}")
    print(f"ratio time  1M@0.1 / 100k@1.0 = {pfc_1m['seconds'] / full_100k['seconds']:.2f}")
    print(f"ratio step-peak-memory 1M@0.1 / 1M@1.0 = "
          f"{pfc_1m['step_peak_extra_mb'] / max(full_1m['step_peak_extra_mb'], 1):.2f}")


if __name__ == "__main__":
    main()
