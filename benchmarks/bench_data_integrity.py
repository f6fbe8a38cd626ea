"""What the integrity checks cost at start-up: the label scan and its cache on a million-record .rec, and the
teacher cache's per-chunk checksum verification.

    python -m benchmarks.bench_data_integrity [--images 1000000] [--ids 10000] [--cache-images 200000]

The .rec files hold tiny fake payloads (the label scan never decodes an image), in both layouts: insightface
(labels from the identity records) and plain (labels from every record's header). Timings are warm page cache
(the files were just written); a cold disk adds its read time to the first start only.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from arcface.data.layout import read_layout
from arcface.data.packing import RecWriter, write_property
from arcface.data.recordio import IRHeader, pack, read_index

from .common import machine


def fake_rec(folder, n, ids, insightface):
    """n records of ~100 bytes, labels grouped by identity (insightface) or shuffled (plain)."""
    rng = np.random.default_rng(0)
    labels = np.sort(np.arange(n) % ids)
    payload = b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 96, dtype=np.uint8))
    writer = RecWriter(folder)
    if insightface:
        writer.write(0, pack(IRHeader(0, [n + 1, n + 1 + ids], 0, 0), b""))
        for key in range(1, n + 1):
            writer.write(key, pack(IRHeader(0, float(labels[key - 1]), key, 0), payload))
        starts = np.searchsorted(labels, np.arange(ids)) + 1
        ends = np.append(starts[1:], n + 1)
        for i in range(ids):
            writer.write(n + 1 + i, pack(IRHeader(0, [int(starts[i]), int(ends[i])], n + 1 + i, 0), b""))
    else:
        for key, label in enumerate(rng.permutation(labels).tolist()):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), payload))
    writer.commit()
    write_property(folder, ids, (112, 112))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_label_scan(root, images, ids, repeat):
    rows = []
    for kind, insightface in (("insightface", True), ("plain", False)):
        folder = os.path.join(root, kind)
        fake_rec(folder, images, ids, insightface)
        firsts, agains = [], []
        for _ in range(repeat):
            cache = os.path.join(folder, "train.rec.labels.npy")
            if os.path.exists(cache):
                os.remove(cache)
            first, layout = timed(lambda: read_layout(folder))
            again, cached = timed(lambda: read_layout(folder))
            assert cached.label_source == "cache", cached.label_source
            assert np.array_equal(cached.labels, layout.labels)
            firsts.append(first)
            agains.append(again)
        index = statistics.median(timed(lambda: read_index(os.path.join(folder, "train.idx")))[0]
                                  for _ in range(repeat))
        rows.append((kind, layout.label_source, statistics.median(firsts), statistics.median(agains), index))
    print(f"label scan, {images} images / {ids} identities (read_layout wall time, s, median of {repeat})")
    print("| layout | first start (labels from) | first start | later starts (label cache) | of which read_index |")
    print("|---|---|---|---|---|")
    for kind, source, first, again, index in rows:
        print(f"| {kind} | {source} | {first:.2f} | {again:.2f} | {index:.2f} |")


def bench_cache_verification(root, images, dim):
    try:
        from plugins.ukd.cache import file_format
        verify = file_format.verify_chunks
    except (ImportError, AttributeError):
        print("teacher cache checksums: not in this version")
        return
    path = os.path.join(root, "bench.tcache")
    header = file_format.make_header(
        {"source": "torch", "file": "/dev/null", "sha256": "0" * 64, "embedding_size": dim, "precision": "fp32",
         "network": "r50", "network_kwargs": {}},
        {"rec": "/dev/null", "idx": "/dev/null", "images": images, "records": images, "idx_sha256": "0" * 64},
        112, 4096, 128)
    file_format.create_cache_file(path, header)
    cache = file_format.CacheFile.open(path, writable=True)
    rng = np.random.default_rng(0)
    step = 8192
    for start in range(0, images, step):
        rows = rng.standard_normal((min(step, images - start), 2, dim)).astype(np.float32)
        cache.norms[start:start + len(rows)] = np.linalg.norm(rows, axis=2)
        cache.embeddings[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=2, keepdims=True)
    cache.flush()
    table = [file_format.chunk_checksum(cache, c) for c in range(header["build"]["num_chunks"])]
    del cache
    file_format.write_checksums(path, header, table)
    file_format.mark_complete(path)
    size = os.path.getsize(path)
    seconds = min(timed(lambda: verify(file_format.CacheFile.open(path)))[0] for _ in range(3))
    print(f"teacher cache checksum verification: {size / 2**30:.2f} GiB in {seconds:.2f} s "
          f"({size / 2**30 / seconds:.2f} GiB/s with {file_format.verification_threads()} threads, warm page cache; "
          "best of 3)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=10_000)
    parser.add_argument("--cache-images", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    print(machine())
    root = args.keep or tempfile.mkdtemp(prefix="bench_integrity_")
    try:
        bench_label_scan(root, args.images, args.ids, args.repeat)
        if args.cache_images:
            bench_cache_verification(root, args.cache_images, args.dim)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
