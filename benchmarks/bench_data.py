"""Data-layer speed: RecordIO read+decode vs mxnet, DataLoader workers, sampler build at WebFace42M scale.

    python -m benchmarks.bench_data [--images 2048] [--mxnet-python /tmp/mxenv/bin/python] [--skip-42m]

The mxnet side runs in a separate interpreter (mxnet needs numpy < 1.24), on the same file, keys and
decode-to-RGB-array work; it is skipped with a note when that interpreter is missing.
"""
import argparse
import io
import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch
from PIL import Image


from arcface.data.datasets import RecordDataset, decode_image
from arcface.data.packing import write_insightface_rec
from arcface.data.recordio import RecordIO, unpack
from arcface.data.samplers import DistributedSampler, PKBatchSampler

MXNET_SCRIPT = r"""
import sys, time, json, warnings
warnings.simplefilter("ignore")
import mxnet as mx
idx, rec, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
header, _ = mx.recordio.unpack(r.read_idx(0))
keys = list(range(1, int(header.label[0])))
best = 0
for _ in range(reps):
    t = time.perf_counter()
    for k in keys:
        h, img = mx.recordio.unpack(r.read_idx(k))
        a = mx.image.imdecode(img).asnumpy()
    best = max(best, len(keys) / (time.perf_counter() - t))
print(json.dumps({"img_per_s": best, "n": len(keys)}))
"""


def make_rec(root, n, size=112, ids=64):
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, ids, size=n))
    labels = np.searchsorted(np.unique(labels), labels)

    def payloads():
        for _ in range(n):
            small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
            buf = io.BytesIO()
            small.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            yield buf.getvalue()
    write_insightface_rec(root, labels, payloads(), (size, size))


def bench_ours(root, reps):
    ds = RecordDataset(root, input_size=112, flip=False)
    reader = RecordIO(ds.rec_path, "r")
    best_decode = best_item = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(len(ds)):
            _, payload = unpack(reader.read_at(int(ds.offsets[i]), int(ds.keys[i])))
            np.asarray(decode_image(payload, "bench").convert("RGB"))
        best_decode = max(best_decode, len(ds) / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        best_item = max(best_item, len(ds) / (time.perf_counter() - t))
    return best_decode, best_item


def bench_mxnet(python, root, reps):
    if not python or not os.path.isfile(python):
        return None, f"skipped: no mxnet interpreter at {python}"
    r = subprocess.run([python, "-c", MXNET_SCRIPT, os.path.join(root, "train.idx"), os.path.join(root, "train.rec"),
                        str(reps)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, "skipped: mxnet failed: " + r.stderr.strip().splitlines()[-1]
    return json.loads(r.stdout.strip().splitlines()[-1])["img_per_s"], ""


def bench_loader(root, workers, batch_size=128):
    ds = RecordDataset(root, input_size=112, flip=True, return_index=True)
    sampler = DistributedSampler(len(ds), 0, 1, seed=0, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True)
    t = time.perf_counter()
    n = sum(b[0].shape[0] for b in loader)
    return n / (time.perf_counter() - t)


def synthetic_labels(num_images, num_ids, seed=0):
    """Grouped labels with uneven identity sizes (at least 1 each), num_images in all."""
    rng = np.random.default_rng(seed)
    weights = rng.gamma(2.0, 1.0, size=num_ids)
    counts = 1 + np.floor(weights / weights.sum() * (num_images - num_ids)).astype(np.int64)
    counts[: num_images - counts.sum()] += 1
    return np.repeat(np.arange(num_ids, dtype=np.int64), counts)


def bench_samplers(num_images, num_ids, world_size=8, batch_size=128):
    labels = synthetic_labels(num_images, num_ids)
    t = time.perf_counter()
    pk = PKBatchSampler(labels, batch_size, 4, rank=0, world_size=world_size, seed=0, random_fraction=0.1)
    build = time.perf_counter() - t
    t = time.perf_counter()
    batches = pk.epoch_batches()
    epoch = time.perf_counter() - t
    shuffled = np.random.default_rng(1).permutation(labels)
    t = time.perf_counter()
    PKBatchSampler(shuffled, batch_size, 4, rank=0, world_size=world_size, seed=0)
    build_shuffled = time.perf_counter() - t
    ds = DistributedSampler(num_images, 0, world_size, seed=0, batch_size=batch_size)
    t = time.perf_counter()
    idx = ds.epoch_indices()
    dist_epoch = time.perf_counter() - t
    return dict(pk_build=build, pk_build_shuffled_labels=build_shuffled, pk_epoch=epoch, pk_batches=batches.shape[0],
                dist_epoch=dist_epoch, dist_samples=idx.size)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--mxnet-python", default="/tmp/mxenv/bin/python")
    p.add_argument("--skip-42m", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "rec")
        make_rec(root, args.images)
        print(f"\n[read + decode] {args.images} JPEG 112x112 records, insightface layout, 1 process")
        ours_decode, ours_item = bench_ours(root, args.reps)
        mx_rate, note = bench_mxnet(args.mxnet_python, root, args.reps)
        print(f"  ours  RecordIO + PIL decode to RGB array : {ours_decode:8.0f} img/s")
        print(f"  ours  RecordDataset[i] (decode+tensor)  : {ours_item:8.0f} img/s")
        if mx_rate:
            print(f"  mxnet MXIndexedRecordIO + imdecode      : {mx_rate:8.0f} img/s")
            print(f"  ratio ours / mxnet (read+decode)        : {ours_decode / mx_rate:8.2f}")
        else:
            print(f"  mxnet {note}")
        print("\n[DataLoader] RecordDataset + DistributedSampler, batch 128, flip on, 1 epoch")
        rates = {}
        for w in (0, 1, 2):
            rates[w] = bench_loader(root, w)
            print(f"  workers={w}: {rates[w]:8.0f} img/s  (x{rates[w] / rates[0]:.2f} vs workers=0)")
    sizes = [(5_179_510, 93_431)] + ([] if args.skip_42m else [(42_474_557, 2_059_906)])
    for n, c in sizes:
        r = bench_samplers(n, c)
        print(f"\n[samplers] {n:,} images / {c:,} identities, world_size 8, batch 128, rank 0")
        print(f"  PKBatchSampler build (grouped labels)   : {r['pk_build']:6.2f} s")
        print(f"  PKBatchSampler build (shuffled labels)  : {r['pk_build_shuffled_labels']:6.2f} s")
        print(f"  PKBatchSampler one epoch ({r['pk_batches']} batches): {r['pk_epoch']:6.2f} s")
        print(f"  DistributedSampler one epoch ({r['dist_samples']:,} idx): {r['dist_epoch']:6.2f} s")


if __name__ == "__main__":
    main()
