"""Group 'kd': the distillation plugin on CUDA. The live teacher (torch backend, fp16 autocast) and the teacher
cache give the same KD terms, in the plugin directly and through the trainer; a cache built on the GPU equals one
built on the CPU within float16 tolerance."""
import os
import time

from .common import (
    base_cfg,
    faces,
    faces_count,
    finite,
    history_losses,
    image_size,
    random_teacher,
    rel_diff,
    run_trainer,
    sync,
)
from .core import check

# a wrong view or sample changes the KD terms by >= 7% (tests/test_teacher_cache.py); fp16 teachers on the GPU run
# different convolution algorithms at different batch sizes, then the cache rounds unit vectors to float16
TERMS_RTOL = {"cuda": 2e-2, "cpu": 1e-3}
ROW_COSINE_MIN = 0.999
# fp16 autocast teacher on the GPU vs float32 teacher on the CPU, per cached row (a BN-calibrated random r50 at 112
# in float16 against float32, emulated on a CPU: cosine >= 0.99999, norms within 3e-4)
GPU_CPU_COSINE_MIN = 0.999
GPU_CPU_NORM_RTOL = 1e-2


def teacher_spec(ctx):
    """(network, width): an r50 at 112 on the GPU, a quarter-width r18 at toy size."""
    return ("r18", 0.25) if ctx.toy else ("r50", 1.0)


def kd_cfg(ctx, rec_dir, classes, teacher, cache, output, fp16, backend="torch", **values):
    network, width = teacher_spec(ctx)
    cfg = base_cfg(ctx, output, rec=rec_dir, num_classes=classes, network="mbf",
                   network_kwargs={"width": 0.25} if ctx.toy else {}, embedding_size=512,
                   input_size=image_size(ctx), batch_size=8 if ctx.toy else 32, num_workers=0, fp16=fp16,
                   sampler="pk", pk_k=4, seed=7, **values)
    cfg.kd.update(enabled=True, teacher_network=network, teacher_weights=str(teacher), teacher_embedding_size=512,
                  teacher_network_kwargs={"width": width}, teacher_check=False, teacher_cache=str(cache),
                  teacher_backend=backend,
                  losses={"iled": {"weight": 10.0}, "l2": {"weight": 1.0},
                          "rpsd": {"weight": 10.0, "bank": 256, "k_neg": 16, "require_positives": False}})
    return cfg


def build_cache(cfg, out, device, batch):
    from arcface.config import validate
    from plugins.ukd.cache import build_teacher_cache
    start = time.perf_counter()
    build_teacher_cache(validate(cfg), out=str(out), batch_size=batch, chunk_size=batch * 4, num_workers=2,
                        restart=True, progress=False, device=device)
    sync(device)
    return time.perf_counter() - start


def plugin(cfg, device):
    from arcface.config import validate
    from arcface.engine.hooks import TrainContext
    from plugins.ukd.plugin import UKDPlugin
    cfg = validate(cfg)
    p = UKDPlugin(cfg)
    p.before_training(TrainContext(cfg=cfg, backbone=None, device=device, rank=0, world_size=1))
    return p


@check("kd.live_vs_cache", needs_cuda=False, budget_s=90, quick=True, quick_budget_s=75,
       what="UKDPlugin.after_forward with the live teacher (torch backend, fp16 autocast on CUDA) and with a cache "
            "built on the same device give the same KD terms (ILED, L2, RPSD with its bank) over 3 steps, and the "
            "same teacher rows.")
def kd_live_vs_cache(ctx, rec):
    import numpy as np
    import torch

    from arcface.data.datasets import RecordDataset
    from arcface.engine.hooks import StepBatch
    device = ctx.torch_device()
    rec_dir = faces(ctx, "small")
    classes, n = faces_count(ctx, "small")
    network, width = teacher_spec(ctx)
    size = image_size(ctx)
    teacher = random_teacher(ctx, network, size, f"{network}_{size}", width=width, device=device)
    fp16 = device.type == "cuda"
    cache = ctx.path("kd", f"live_vs_cache_{device.type}.tcache")
    cfg = kd_cfg(ctx, rec_dir, classes, teacher, cache, ctx.path("kd", "out"), fp16)
    batch = cfg.batch_size
    rec["build_s"] = round(build_cache(cfg, cache, device, batch), 2)
    live = plugin(cfg, device)
    cached = plugin(kd_cfg(ctx, rec_dir, classes, teacher, cache, ctx.path("kd", "out"), fp16, backend="cache"),
                    device)
    rec["live_backend"] = type(live.teacher).__name__
    rec["cache_backend"] = type(cached.teacher).__name__
    dataset = RecordDataset(rec_dir, input_size=size, flip=False)
    g = torch.Generator().manual_seed(3)
    worst, worst_row = {}, 1.0
    for step in range(3):  # the RPSD bank is filled from each backend, then used
        index = torch.randperm(n, generator=g)[:batch]
        flip = torch.rand(batch, generator=g) < 0.5
        images = torch.stack([dataset[i][0].flip(-1) if f else dataset[i][0]
                              for i, f in zip(index.tolist(), flip.tolist())]).to(device)
        labels = torch.from_numpy(np.asarray(dataset.labels)[index.numpy()]).to(device)
        student = torch.randn(batch, 512, generator=g).to(device)
        terms = []
        for p in (live, cached):
            b = StepBatch(images=images, labels=labels, embeddings=student.clone().requires_grad_(True), step=step,
                          index=index.to(device), flip=flip.to(device))
            terms.append({k: float(v.detach()) for k, v in p.after_forward(b).items()})
            p.after_step(b)
        rec.require(set(terms[0]) == set(terms[1]) and terms[0], f"terms {sorted(terms[0])} vs {sorted(terms[1])}")
        for name in terms[0]:
            worst[name] = max(worst.get(name, 0.0), rel_diff(terms[1][name], terms[0][name]))
        with torch.no_grad():
            a = live.teacher(images).float()
            c = cached.teacher(images, index=index.to(device), flip=flip.to(device)).float()
        worst_row = min(worst_row, float(torch.nn.functional.cosine_similarity(a, c).min()))
    tol = TERMS_RTOL[device.type]
    rec.update(terms_rel_diff=worst, teacher_row_cosine_min=worst_row, terms_rtol=tol, teacher=f"{network} x{width}",
               precision="fp16 autocast" if fp16 else "float32", batch=batch)
    for name, value in worst.items():
        rec.expect(value <= tol, f"{name}: cache vs live differ by {value:.2e} (tolerance {tol})")
    rec.expect(worst_row >= ROW_COSINE_MIN, f"teacher rows: cosine {worst_row:.5f} < {ROW_COSINE_MIN}")
    rec.summary = (f"{', '.join(f'{k} {v:.1e}' for k, v in worst.items())} relative; rows cosine >= {worst_row:.5f} "
                   f"({rec['precision']} {network} teacher)")


@check("kd.trainer_live_vs_cache", budget_s=90,
       what="The trainer with kd.teacher_backend 'torch' and 'cache' on CUDA (fp16, P x K batches, the engine's "
            "RecordIO loader with its index and flips): the same first-step loss, finite losses, the KD terms "
            "in the log.")
def kd_trainer_live_vs_cache(ctx, rec):
    device = ctx.torch_device()
    rec_dir = faces(ctx, "small")
    classes, _ = faces_count(ctx, "small")
    network, width = teacher_spec(ctx)
    size = image_size(ctx)
    teacher = random_teacher(ctx, network, size, f"{network}_{size}", width=width, device=device)
    fp16 = device.type == "cuda"
    cache = ctx.path("kd", f"trainer_{device.type}.tcache")
    steps = 3 if ctx.toy else 8
    common = {"lr": 0.01, "num_epoch": 0, "max_steps": steps, "warmup_epoch": 0, "frequent": 1}
    cfg = kd_cfg(ctx, rec_dir, classes, teacher, cache, ctx.path("kd", "trainer_torch"), fp16, **common)
    rec["build_s"] = round(build_cache(cfg, cache, device, cfg.batch_size), 2)
    runs = {}
    for backend in ("torch", "cache"):
        cfg = kd_cfg(ctx, rec_dir, classes, teacher, cache, ctx.path("kd", f"trainer_{backend}"), fp16,
                     backend=backend, **common)
        log = ctx.path("kd", f"trainer_{backend}", "console.log")
        start = time.perf_counter()
        trainer = run_trainer(cfg, log)
        runs[backend] = history_losses(trainer)
        rec[f"{backend}_seconds"] = round(time.perf_counter() - start, 2)
        with open(os.path.join(cfg.output, "training.log")) as f:
            text = f.read()
        rec.expect("kd/iled" in text and "kd/rpsd" in text, f"{backend}: no KD terms in the training log")
    live, cached = runs["torch"], runs["cache"]
    rec.update(live_losses=live, cache_losses=cached)
    rec.require(len(live) == len(cached) == steps, f"steps: live {len(live)}, cache {len(cached)}, wanted {steps}")
    rec.expect(finite(live) and finite(cached), "non-finite losses")
    first = rel_diff(cached[0], live[0])
    rec["first_step_rel_diff"] = first
    tol = TERMS_RTOL[device.type]
    rec.expect(first <= tol, f"first-step loss: cache {cached[0]:.5f} vs live {live[0]:.5f} ({first:.1e} > {tol})")
    rec.summary = f"{steps} steps each; first-step loss cache vs live {first:.1e} relative; " \
                  f"live {live[0]:.3f} -> {live[-1]:.3f}, cache {cached[0]:.3f} -> {cached[-1]:.3f}"


@check("kd.cache_gpu_vs_cpu", budget_s=90,
       what="The teacher cache built on the GPU (fp16 autocast) equals the cache built on the CPU (float32) within "
            "float16 tolerance: per-row cosine of the unit embeddings and relative norms, both views.")
def kd_cache_gpu_vs_cpu(ctx, rec):
    import numpy as np
    import torch

    from plugins.ukd.cache.file_format import CacheFile
    device = ctx.torch_device()
    rec_dir = faces(ctx, "small")
    classes, n = faces_count(ctx, "small")
    network, width = teacher_spec(ctx)
    size = image_size(ctx)
    teacher = random_teacher(ctx, network, size, f"{network}_{size}", width=width, device=device)
    batch = 8 if ctx.toy else 32
    gpu_out, cpu_out = ctx.path("kd", "built_on_device.tcache"), ctx.path("kd", "built_on_cpu.tcache")
    cfg_gpu = kd_cfg(ctx, rec_dir, classes, teacher, gpu_out, ctx.path("kd", "out"), fp16=True,
                     device=device.type)
    cfg_cpu = kd_cfg(ctx, rec_dir, classes, teacher, cpu_out, ctx.path("kd", "out"), fp16=False, device="cpu")
    rec["device_build_s"] = round(build_cache(cfg_gpu, gpu_out, device, batch), 2)
    rec["cpu_build_s"] = round(build_cache(cfg_cpu, cpu_out, torch.device("cpu"), batch), 2)
    a, b = CacheFile.open(gpu_out), CacheFile.open(cpu_out)
    rec.update(device_precision=a.header["teacher"]["precision"], cpu_precision=b.header["teacher"]["precision"],
               images=n, views=2 * n, teacher=f"{network} x{width}")
    ua, ub = np.asarray(a.embeddings, dtype=np.float64), np.asarray(b.embeddings, dtype=np.float64)
    na, nb = np.asarray(a.norms, dtype=np.float64), np.asarray(b.norms, dtype=np.float64)
    cosine = (ua * ub).sum(axis=2)
    norm_rel = np.abs(na - nb) / np.maximum(np.abs(nb), 1e-12)
    other = (ua * np.roll(ub, 1, axis=0)).sum(axis=2)  # each row against the next image's: what a mix-up would give
    rec.update(row_cosine_min=float(cosine.min()), row_cosine_mean=float(cosine.mean()),
               norm_rel_diff_max=float(norm_rel.max()), unit_component_max_abs_diff=float(np.abs(ua - ub).max()),
               device_views_per_s=round(2 * n / rec["device_build_s"], 1),
               cpu_views_per_s=round(2 * n / rec["cpu_build_s"], 1))
    rec.expect(np.isfinite(cosine).all() and cosine.min() >= GPU_CPU_COSINE_MIN,
               f"rows of the two caches: cosine down to {cosine.min():.5f} (< {GPU_CPU_COSINE_MIN})")
    rec["other_image_cosine_max"] = float(other.max())
    rec.expect(cosine.min() > other.max(), f"a row is closer to another image's row ({other.max():.5f}) than to its "
               f"own ({cosine.min():.5f}): rows are mixed up")
    rec.expect(norm_rel.max() <= GPU_CPU_NORM_RTOL, f"norms differ by up to {norm_rel.max():.2e} "
               f"(> {GPU_CPU_NORM_RTOL})")
    rec.summary = (f"{2 * n} views: cosine >= {cosine.min():.5f}, norms within {norm_rel.max():.1e} "
                   f"({rec['device_precision']} on {device.type} vs {rec['cpu_precision']} on cpu)")
