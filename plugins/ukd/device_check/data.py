"""Group 'data': the generated faces every other check trains on, the CUDA side-stream prefetch of the PyTorch
loader, and DALI's 'mixed' (GPU) JPEG decoder against the CPU decoders."""
import os
import time

from .common import (
    FACES,
    base_cfg,
    faces,
    faces_count,
    finite,
    history_losses,
    image_size,
    run_trainer,
    sync,
)
from .core import Skip, check

# DALI's GPU decoder (nvJPEG, a hardware JPEG engine on Hopper) and libjpeg-turbo round the IDCT and upsample
# chroma differently: a few grey levels here and there, never a different image. In grey levels of 0..255:
DALI_MEAN_LEVELS = 1.5     # mean |difference| over all pixels
DALI_P99_LEVELS = 10.0     # 99th percentile of |difference|
CPU_DECODER_LEVELS = 0.01  # DALI's CPU decoder is libjpeg-turbo, as PIL: the same pixels


@check("data.faces", needs_cuda=False, budget_s=90, quick=True,
       what="Procedural faces (arcface.data.synthetic) written as insightface-layout train.rec files for the "
            "other checks; the rendering rate of this machine's cores.")
def data_faces(ctx, rec):
    for kind in FACES:
        start = time.perf_counter()
        folder = faces(ctx, kind)
        took = time.perf_counter() - start
        ids, images = faces_count(ctx, kind)
        rec[f"{kind}_images"] = images
        rec[f"{kind}_identities"] = ids
        rec[f"{kind}_seconds"] = round(took, 2)
        rec.expect(os.path.getsize(os.path.join(folder, "train.rec")) > 0, f"{folder}/train.rec is empty")
    rec["size"] = image_size(ctx)
    rec["workers"] = os.cpu_count()
    total = rec["train_images"] + rec["small_images"]
    seconds = rec["train_seconds"] + rec["small_seconds"]
    rec["images_per_s"] = round(total / max(seconds, 1e-9), 1)
    rec.summary = f"{total} faces at {rec['size']} px in {seconds:.1f} s ({rec['images_per_s']} img/s, " \
                  f"{os.cpu_count()} processes; 0 s when reused)"


def _loader(cfg, device):
    from arcface.data.loader import get_dataloader
    return get_dataloader(cfg, 0, 1, device)


@check("data.prefetch", budget_s=45, quick=True,
       what="The PyTorch loader's CUDA path (pinned memory, copy of batch i+1 on a side stream while batch i is "
            "used, record_stream) yields exactly the CPU loader's batches, also under a busy GPU and with batches "
            "kept alive.")
def data_prefetch(ctx, rec):
    import torch
    device = ctx.torch_device()
    rec_dir = faces(ctx, "train")
    ids, _ = faces_count(ctx, "train")
    batch = 8 if ctx.toy else 64
    cfg = base_cfg(ctx, ctx.path("prefetch", "out"), rec=rec_dir, num_classes=ids, input_size=image_size(ctx),
                   batch_size=batch, num_workers=2, seed=5, flip=True)
    steps = 4 if ctx.toy else 12
    work = torch.randn(2048 if not ctx.toy else 64, 2048 if not ctx.toy else 64, device=device)
    kept, got = [], []
    fast = _loader(cfg, device)
    fast.set_epoch(1)
    start = time.perf_counter()
    for i, b in enumerate(fast):
        if i >= steps:
            break
        for _ in range(4 if not ctx.toy else 1):  # keep the default stream busy: the next copy runs beside it
            work = torch.tanh(work @ work * 1e-3)
        kept.append(b)                            # batches stay alive past the next copies (record_stream)
        kept = kept[-3:]
        got.append([None if t is None else t.detach().cpu().clone() for t in (b.images, b.labels, b.index, b.flip)])
    sync(device)
    rec["seconds_device_loop"] = round(time.perf_counter() - start, 3)
    ref = _loader(cfg, "cpu")
    ref.set_epoch(1)
    want = []
    for i, b in enumerate(ref):
        if i >= steps:
            break
        want.append([b.images, b.labels, b.index, b.flip])
    rec["batches"] = len(got)
    rec["device"] = str(device)
    rec.require(len(got) == len(want) == steps, f"{len(got)} device batches, {len(want)} CPU batches, {steps} wanted")
    bad = []
    for i, (a, b) in enumerate(zip(got, want)):
        for name, x, y in zip(("images", "labels", "index", "flip"), a, b):
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                bad.append(f"batch {i} {name}")
    rec["mismatches"] = len(bad)
    rec.expect(not bad, f"the {device} loader's batches differ from the CPU loader's: {bad[:5]}")
    rec.summary = f"{steps} batches of {batch} on {device} equal the CPU loader's (images, labels, index, flip)"


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no DALI here
        raise Skip(f"NVIDIA DALI is not importable ({type(exc).__name__}: {exc}); pip install "
                   "nvidia-dali-cuda120 (the [dali] extra)") from None


@check("data.dali_mixed", budget_s=60, quick=True,
       what="DALI's 'mixed' decoder (GPU) on a generated .rec gives the images of the CPU pipeline and of the "
            "PyTorch loader (PIL) within decoder tolerance, with the same labels in the same order.")
def data_dali_mixed(ctx, rec):
    _import_dali()
    import numpy as np
    import torch

    from arcface.data.dali import DaliTrainLoader
    from arcface.data.datasets import RecordDataset
    device = ctx.torch_device()
    root = faces(ctx, "small")
    size = image_size(ctx)
    batch = 8 if ctx.toy else 32
    kwargs = {"batch_size": batch, "input_size": size, "flip": False, "shuffle": False, "num_threads": 4,
              "cache_dir": ctx.path("dali_index", "")}
    dali_dev = DaliTrainLoader(root, device=str(device), **kwargs)
    dali_cpu = DaliTrainLoader(root, device="cpu", **kwargs)
    dataset = RecordDataset(root, input_size=size, flip=False)
    dali_dev.set_epoch(0)
    dali_cpu.set_epoch(0)
    dev_batches = [(b.images.float().cpu(), b.labels.cpu()) for b in dali_dev]
    cpu_batches = [(b.images, b.labels) for b in dali_cpu]
    n = len(dev_batches) * batch
    rec["images"] = n
    rec["decoder"] = "mixed (GPU)" if device.type == "cuda" else "cpu (rehearsal: no GPU)"
    rec.require(n > 0 and len(cpu_batches) == len(dev_batches), "the DALI loaders yielded no or unequal batches")
    pil = torch.stack([dataset[i][0] for i in range(n)])
    labels = torch.as_tensor(np.asarray([int(dataset.labels[i]) for i in range(n)]))
    dev = torch.cat([b[0] for b in dev_batches])
    cpu = torch.cat([b[0] for b in cpu_batches])
    rec.expect(torch.equal(torch.cat([b[1] for b in dev_batches]), labels), "DALI mixed labels differ from the .rec's")
    rec.expect(torch.equal(torch.cat([b[1] for b in cpu_batches]), labels), "DALI CPU labels differ from the .rec's")
    rec.require(dev.shape == pil.shape, f"DALI gave images {list(dev.shape)}, the dataset {list(pil.shape)}")
    for name, other in (("vs_dali_cpu", cpu), ("vs_pil", pil)):
        levels = (dev - other).abs() * 127.5
        rec[f"{name}_mean_levels"] = float(levels.mean())
        rec[f"{name}_p99_levels"] = float(torch.quantile(levels.flatten()[::7], 0.99))
        rec[f"{name}_max_levels"] = float(levels.max())
        rec[f"{name}_frac_over_2_levels"] = float((levels > 2).float().mean())
        rec.expect(rec[f"{name}_mean_levels"] <= DALI_MEAN_LEVELS and rec[f"{name}_p99_levels"] <= DALI_P99_LEVELS,
                   f"DALI {rec['decoder']} {name}: mean {rec[f'{name}_mean_levels']:.2f} / p99 "
                   f"{rec[f'{name}_p99_levels']:.2f} grey levels (tolerance {DALI_MEAN_LEVELS} / {DALI_P99_LEVELS})")
    cpu_vs_pil = float((cpu - pil).abs().max() * 127.5)
    rec["dali_cpu_vs_pil_max_levels"] = cpu_vs_pil
    rec.expect(cpu_vs_pil <= CPU_DECODER_LEVELS, f"DALI's CPU pipeline differs from PIL by {cpu_vs_pil:.3f} levels")
    rec.summary = (f"{n} images: {rec['decoder']} vs CPU pipeline mean {rec['vs_dali_cpu_mean_levels']:.3f} / p99 "
                   f"{rec['vs_dali_cpu_p99_levels']:.2f} / max {rec['vs_dali_cpu_max_levels']:.1f} grey levels; "
                   "labels equal")


@check("data.dali_train", budget_s=60,
       what="The trainer with dali=True (DALI 'mixed' decoder feeding CUDA fp16 training of mbf): every loss "
            "finite, the run completes.")
def data_dali_train(ctx, rec):
    _import_dali()
    root = faces(ctx, "train")
    ids, _ = faces_count(ctx, "train")
    steps = 3 if ctx.toy else 12
    cfg = base_cfg(ctx, ctx.path("dali_train", "out"), rec=root, num_classes=ids, network="mbf",
                   network_kwargs={"width": 0.25} if ctx.toy else {}, input_size=image_size(ctx),
                   embedding_size=64 if ctx.toy else 512, batch_size=8 if ctx.toy else 64, dali=True,
                   num_workers=4, fp16=True, lr=0.1, num_epoch=0, max_steps=steps, warmup_epoch=0, seed=3)
    start = time.perf_counter()
    trainer = run_trainer(cfg, ctx.path("dali_train", "train.log"))
    losses = history_losses(trainer)
    rec["steps"] = len(losses)
    rec["losses"] = losses
    rec["seconds_run"] = round(time.perf_counter() - start, 2)
    rec["loader"] = type(trainer.train_loader).__name__
    rec["precision"] = trainer.precision_note
    rec.expect(rec["loader"] == "DaliTrainLoader", f"the trainer used {rec['loader']}, not the DALI loader")
    rec.expect(len(losses) == steps and finite(losses), f"{len(losses)} of {steps} steps, losses {losses}")
    rec.summary = f"{len(losses)} steps from DALI, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({rec['precision']})" \
        if losses else "no steps"
