"""What the teacher embedding cache buys: a KD training step reading the cache against a plain student step and
against a KD step running the live teacher, and building the cache against the teacher's plain inference.

    python -m benchmarks.bench_teacher_cache                        # CPU defaults below, ~1-2 minutes
    python -m benchmarks.bench_teacher_cache --input-size 112 --batch 128 --images 4096   # a GPU

Defaults fit a 2-core CPU: student MobileFaceNet (mbf, 512-d) and teacher iResNet-50 (r50, 512-d) at 56x56
input, batch 32, 128 random-JPEG training images, KD losses ILED + RPSD (bank 4096), one torch thread (on a
shared 2-core machine two OpenMP threads per process are many times slower than one).
Steps of the three kinds are timed interleaved in rounds and the medians compared, so a change in machine load
hits all of them alike. Targets: cache step <= 1.05x the plain step; cache build >= 0.9x the plain teacher
inference throughput (views per second; the build decodes the JPEGs, runs each image and its flip, and
writes float16 rows).
"""
import argparse
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from easydict import EasyDict as edict
from PIL import Image


from arcface.backbones import get_model
from arcface.config import base_config, validate
from arcface.data.datasets import RecordDataset
from arcface.data.packing import write_insightface_rec
from arcface.engine import distributed as D
from arcface.engine.hooks import StepBatch, TrainContext
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2
from plugins.ukd.cache import build_teacher_cache
from plugins.ukd.plugin import UKDPlugin


def machine(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"{platform.platform()} | {name} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | "
            f"torch {torch.__version__} | load average {os.getloadavg()[0]:.1f} (other jobs share the machine)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_rec(folder, n, size, classes, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.sort(np.arange(n) % classes)
    payloads = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=90)
        payloads.append(buf.getvalue())
    write_insightface_rec(folder, labels, payloads, image_size=(size, size))
    return labels


def calibrated(model, size, batches=2):
    """BatchNorm statistics from random images: an untrained deep iResNet with unit running variances
    overflows to inf, which the cache builder rightly refuses."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, 3, size, size) * 2 - 1)
    return model.eval()


def make_cfg(args, rec, teacher_path, cache, device):
    cfg = base_config()
    cfg.update(dict(rec=str(rec), num_classes=args.classes, network=args.student, embedding_size=512,
                    input_size=args.input_size, batch_size=args.batch, num_workers=0, device=device.type,
                    fp16=False, val_targets=[], output=str(Path(cache).parent / "out")))
    cfg.kd = edict(enabled=True, teacher_network=args.teacher, teacher_weights=str(teacher_path),
                   teacher_embedding_size=512, teacher_check=False, teacher_cache=str(cache),
                   losses={"iled": {"weight": 10.0},
                           "rpsd": {"weight": 10.0, "bank": 4096, "k_neg": 256, "require_positives": False}})
    return validate(cfg)


class Step:
    """One optimizer step of the student (+ Partial FC), with or without a UKD plugin."""

    def __init__(self, cfg, device, plugin=None):
        torch.manual_seed(0)
        self.device = device
        self.student = get_model(cfg.network, num_features=512, input_size=cfg.input_size).to(device).train()
        margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
        self.pfc = PartialFC_V2(margin, 512, cfg.num_classes, 1.0).to(device)
        self.plugin = plugin
        params = list(self.student.parameters()) + list(self.pfc.parameters())
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def __call__(self, batch):
        images, labels, index, flip = batch
        self.opt.zero_grad(set_to_none=True)
        emb = self.student(images)
        loss = self.pfc(emb, labels)
        step_batch = StepBatch(images=images, labels=labels, embeddings=emb, step=0, index=index, flip=flip)
        if self.plugin is not None:
            loss = loss + sum(self.plugin.after_forward(step_batch).values())
        loss.backward()
        self.opt.step()
        if self.plugin is not None:
            self.plugin.after_step(step_batch)


def plugin_for(cfg, backend, device):
    cfg = edict(cfg)
    cfg.kd = edict(cfg.kd, teacher_backend=backend)
    plugin = UKDPlugin(cfg)
    plugin.before_training(TrainContext(cfg=cfg, backbone=None, device=device, rank=0, world_size=1))
    return plugin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="mbf")
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--input-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of step timings")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    D.init_distributed(None, device.type)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    labels = random_rec(tmp / "rec", args.images, args.input_size, args.classes)
    random_rec(tmp / "rec_half", args.images // 2, args.input_size, args.classes, seed=1)
    torch.manual_seed(1)
    teacher_path = tmp / "teacher.pt"
    teacher = get_model(args.teacher, num_features=512, input_size=args.input_size)
    torch.save(calibrated(teacher, args.input_size).state_dict(), teacher_path)
    cache = tmp / "teacher.tcache"
    cfg = make_cfg(args, tmp / "rec", teacher_path, cache, device)
    print(machine(device))
    print(f"student {args.student}, teacher {args.teacher}, input {args.input_size}x{args.input_size}, batch "
          f"{args.batch}, {args.images} images, KD losses iled + rpsd (bank 4096, k_neg 256)")

    # ---- building vs plain inference (views per second) ------------------------------------------------------
    live = plugin_for(cfg, "torch", device)
    dataset = RecordDataset(tmp / "rec", input_size=args.input_size, flip=False)
    decoded = torch.stack([dataset[i][0] for i in range(args.images)]).to(device)
    views = torch.cat([decoded, decoded.flip(-1)])
    per_batch = 2 * args.batch

    def plain_inference():
        for s in range(0, views.shape[0], per_batch):
            live.teacher(views[s:s + per_batch])
        sync(device)

    cfg_half = make_cfg(args, tmp / "rec_half", teacher_path, tmp / "half.tcache", device)

    def build(config, out):
        def run():
            build_teacher_cache(config, out=str(out), batch_size=args.batch, chunk_size=args.batch * 4,
                                num_workers=0, restart=True, progress=False, device=device)
            sync(device)
        return run

    plain_inference()  # warm-up
    timings = {"half": [], "full": [], "infer": []}
    for _ in range(2):
        for key, fn in (("half", build(cfg_half, tmp / "half.tcache")), ("full", build(cfg, cache)),
                        ("infer", plain_inference)):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)
    t_half, t_full, t_infer = (min(timings[k]) for k in ("half", "full", "infer"))
    n_half = args.images // 2
    infer_rate = 2 * args.images / t_infer
    build_rate = 2 * args.images / t_full
    marginal_rate = 2 * (args.images - n_half) / max(t_full - t_half, 1e-9)
    startup = max(t_full - 2 * args.images / marginal_rate, 0.0)

    # ---- training steps ---------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        index = rng.choice(args.images, args.batch, replace=False)
        flip = rng.random(args.batch) < 0.5
        images = torch.stack([decoded[i].flip(-1) if f else decoded[i] for i, f in zip(index, flip)])
        batches.append((images, torch.from_numpy(labels[index]).to(device), torch.from_numpy(index).to(device),
                        torch.from_numpy(flip).to(device)))
    steps = {"plain": Step(cfg, device), "kd cache": Step(cfg, device, plugin_for(cfg, "cache", device)),
             "kd live teacher": Step(cfg, device, live)}
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step(batches[0])
    sync(device)
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for k in range(args.steps):
                step(batches[(r + k) % len(batches)])
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}

    print(f"\n{'step':<18}{'median s/step':>14}{'vs plain':>10}")
    for name, t in med.items():
        print(f"{name:<18}{t:>14.4f}{t / med['plain']:>9.3f}x")
    print(f"kd cache / kd live teacher: {med['kd cache'] / med['kd live teacher']:.3f}x")
    ratio = med["kd cache"] / med["plain"]
    print(f"cache KD step vs plain step: {ratio:.3f}x (target <= 1.05x: {'met' if ratio <= 1.05 else 'NOT met'})")
    print(f"\ncache build, {args.images} images: {t_full:.2f} s = {build_rate:.1f} views/s end to end (hashing the "
          f"teacher file and .idx, building the teacher, decoding, image + flip, fp16 rows, flush)")
    print(f"cache build, marginal ({n_half} -> {args.images} images): {marginal_rate:.1f} views/s; fixed start-up "
          f"about {startup:.2f} s per build")
    print(f"teacher plain inference: {infer_rate:.1f} views/s (pre-decoded tensors, batch {per_batch})")
    build_ratio = marginal_rate / infer_rate
    print(f"build (marginal) / inference throughput: {build_ratio:.3f}x (target >= 0.9x: "
          f"{'met' if build_ratio >= 0.9 else 'NOT met'}); end to end incl. start-up: {build_rate / infer_rate:.3f}x")
    print(f"cache file: {os.path.getsize(cache) / 2**20:.2f} MiB for {args.images} images")
    D.teardown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
