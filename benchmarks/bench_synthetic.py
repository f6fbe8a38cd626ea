"""Procedural-face generation speed: images per second per core at each size (render, render + JPEG),
and train.rec writing with 1 vs N worker processes, measured side by side in one run.

    python -m benchmarks.bench_synthetic [--images 300] [--rec-images 600] [--workers 2]

Prints wall-clock and CPU-time rates (CPU time is what a busy shared machine does not distort) and the
projected time to write 100k 112x112 training images with the given workers.
"""
import argparse
import os
import platform
import shutil
import tempfile
import time


import numpy as np
from prettytable import PrettyTable

from arcface.data.synthetic import make_identity, render, sample_nuisance, sample_rng, write_train_rec


def _machine():
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return (f"{platform.platform()} | python {platform.python_version()} | {os.cpu_count()} cores | numpy "
            f"{np.__version__} | torch {torch_version} | load avg {os.getloadavg()[0]:.1f}")


def bench_render(size, n_images, mode="aligned", difficulty=0.5, encode=True):
    """(wall img/s, cpu img/s) for rendering n images of 50 identities in this process."""
    idents = [make_identity(0, i) for i in range(50)]
    nuisances = [sample_nuisance(sample_rng(0, i % 50, i), difficulty, 1.0, mode) for i in range(n_images)]
    render(idents[0], nuisances[0], size, mode)  # warm caches
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n_images):
        out = render(idents[i % 50], nuisances[i], size, mode)
        if encode:
            out.jpeg()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n_images / wall, n_images / cpu


def bench_rec(size, n_images, workers):
    per_id = 20
    tmp = tempfile.mkdtemp(prefix="bench_synth_")
    try:
        start = time.perf_counter()
        write_train_rec(tmp, 0, max(1, n_images // per_id), per_id, size, 0.5, workers, progress=False)
        return (n_images // per_id * per_id) / (time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images per size for the render benchmark")
    parser.add_argument("--rec-images", type=int, default=600, help="images for the train.rec benchmark")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(_machine())

    table = PrettyTable(["size", "mode", "render img/s (wall)", "render img/s (cpu)", "+JPEG img/s (wall)",
                         "+JPEG img/s (cpu)", "cpu ratio vs 112"])
    rates = {}
    for size, mode in ((112, "aligned"), (64, "aligned"), (48, "aligned"), (32, "aligned"), (112, "loose")):
        r_wall, r_cpu = bench_render(size, args.images, mode, encode=False)
        j_wall, j_cpu = bench_render(size, args.images, mode, encode=True)
        rates[(size, mode)] = j_cpu
        table.add_row([size, mode, f"{r_wall:.0f}", f"{r_cpu:.0f}", f"{j_wall:.0f}", f"{j_cpu:.0f}",
                       f"{j_cpu / rates[(112, 'aligned')]:.2f}x"])
    print(table)

    one = bench_rec(112, args.rec_images, 1)
    many = bench_rec(112, args.rec_images, args.workers)
    rec = PrettyTable(["train.rec at 112", "img/s (wall)", "speed-up"])
    rec.add_row(["1 worker", f"{one:.0f}", "1.00x"])
    rec.add_row([f"{args.workers} workers", f"{many:.0f}", f"{many / one:.2f}x"])
    print(rec)
    best = max(many, one)
    print(f"projected 100k images at 112 with {args.workers} workers: {100_000 / best / 60:.1f} min (wall, "
          f"this load); from CPU time alone: {100_000 / (rates[(112, 'aligned')] * args.workers) / 60:.1f} min")


if __name__ == "__main__":
    main()
