"""Group 'speed': the project's speed claims timed side by side on the device (docs/benchmarks.md has the CPU
figures of the same comparisons, from benchmarks/): backbone training and inference rates, the KD step with a
live teacher and from the cache, the KD losses against an MBF step, Partial FC at 1M and 2M classes, and
IJB-C-sized evaluation. Speed targets are reported as met or not; they never fail the run (the exit status is
about correctness)."""
import time

import numpy as np

from .common import (
    base_cfg,
    faces,
    faces_count,
    gpu_memory_mb,
    image_size,
    interleaved,
    median,
    random_teacher,
    reset_peak,
    time_calls,
)
from .core import check

BACKBONES = ("mbf", "r50", "r100", "vit_t", "vit_s")
QUICK_BACKBONES = ("mbf", "r100")


def _fp16_flag(device):
    from arcface.engine.precision import autocast_for
    return autocast_for(True, device)


def _model(name, size, width, device, fp16):
    from arcface.backbones import get_model
    return get_model(name, fp16=fp16, input_size=size, width=width, num_features=512).to(device)


def _optimizer(name, params):
    import torch
    if name.startswith("vit"):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _cudnn_benchmark(device):
    import torch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it


def _time_backbone(name, size, width, device, autocast, images, targets, repeat, warmup):
    """(median training step s, median inference s, peak training MB or None) of one backbone."""
    import torch

    from arcface.engine.precision import MixedPrecision
    torch.manual_seed(0)
    model = _model(name, size, width, device, autocast).train()
    opt = _optimizer(name, model.parameters())
    scaler = MixedPrecision(True, device)

    def step():
        opt.zero_grad(set_to_none=True)
        emb = torch.nn.functional.normalize(model(images))
        scaler.backward((1 - (emb * targets).sum(dim=1)).mean())
        scaler.step(opt, model.parameters(), 5.0)

    reset_peak(device)
    train_s = median(time_calls(step, device, repeat, warmup))
    peak = gpu_memory_mb(device)
    model.eval()

    def infer():
        with torch.no_grad():
            model(images)
    return train_s, median(time_calls(infer, device, repeat, warmup)), peak


@check("speed.backbones", budget_s=120, quick=True, quick_budget_s=60,
       what="Training steps (forward, a loss on the embeddings, backward, optimizer step with the GradScaler) and "
            "inference of mbf, r50, r100, vit_t and vit_s at 112, fp16 autocast, batch 128: images per second "
            "and peak GPU memory.")
def speed_backbones(ctx, rec):
    import torch
    device = ctx.torch_device()
    _cudnn_benchmark(device)
    size, width = image_size(ctx), (0.25 if ctx.toy else 1.0)
    batch = 4 if ctx.toy else 128
    repeat, warmup = (2, 1) if ctx.toy else ((5, 2) if ctx.quick else (10, 3))
    autocast, note = _fp16_flag(device)
    rec.update(batch=batch, size=size, precision=note, timed_steps=repeat)
    names = QUICK_BACKBONES if ctx.quick else BACKBONES
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randn(batch, 3, size, size, device=device, generator=g)
    targets = torch.nn.functional.normalize(torch.randn(batch, 512, device=device, generator=g))
    summary = []
    for name in names:
        if ctx.time_left() < 10:
            rec.note(f"{name}: not timed, the check's time budget ran out")
            continue
        train_s, infer_s, peak = _time_backbone(name, size, width, device, autocast, images, targets, repeat, warmup)
        rec[f"{name}_train_img_s"] = round(batch / train_s, 1)
        rec[f"{name}_infer_img_s"] = round(batch / infer_s, 1)
        if peak is not None:
            rec[f"{name}_train_peak_mb"] = round(peak)
        summary.append(f"{name} {batch / train_s:.0f}")
        reset_peak(device)
    rec.require(summary, "no backbone was timed")
    rec.summary = "training img/s: " + ", ".join(summary) + f" (batch {batch}, {size} px, {note})"


def _kd_plugin(ctx, device, teacher_net, width, bank, k_neg, batch, size, backend="torch", cache=None, rec_dir=None,
               classes=1000):
    from .kd import plugin
    cfg = base_cfg(ctx, ctx.path("speed", "kd_out"), embedding_size=512, input_size=size, batch_size=batch,
                   sampler="pk", fp16=True, rec=rec_dir or "synthetic", num_classes=classes, num_workers=0)
    teacher = random_teacher(ctx, teacher_net, size, f"{teacher_net}_{size}", width=width, device=device)
    cfg.kd.update(enabled=True, teacher_network=teacher_net, teacher_weights=teacher, teacher_embedding_size=512,
                  teacher_network_kwargs={"width": width}, teacher_check=False, teacher_backend=backend,
                  teacher_cache=cache,
                  losses={"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0, "bank": bank, "k_neg": k_neg,
                                                             "require_positives": False}})
    return cfg, plugin(cfg, device)


def _fill_banks(plugin, bank, classes, device):
    import torch
    with torch.no_grad():  # a full bank, so RPSD works at full size from the first timed step
        feats = torch.nn.functional.normalize(torch.randn(bank, 512, device=device), dim=1)
        for term in plugin.composer.terms.values():
            if hasattr(term, "bank"):
                term.bank.enqueue(feats, torch.randint(classes, 2 * classes, (bank,), device=device))


class _Student:
    """One optimizer step of the student and Partial FC, with the plugin's terms when given one."""

    def __init__(self, size, width, classes, device, fp16):
        import torch

        from arcface.engine.precision import MixedPrecision
        from arcface.losses import CombinedMarginLoss
        from arcface.partial_fc import PartialFC_V2
        torch.manual_seed(0)
        self.model = _model("mbf", size, width, device, fp16).train()
        self.pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 512, classes).to(device)
        self.opt = torch.optim.SGD(list(self.model.parameters()) + list(self.pfc.parameters()), lr=0.01,
                                   momentum=0.9)
        self.precision = MixedPrecision(True, device)
        self.steps = 0

    def __call__(self, images, labels, plugin=None, index=None, flip=None, teacher=None):
        from arcface.engine.hooks import StepBatch
        self.opt.zero_grad(set_to_none=True)
        emb = self.model(images)
        if teacher is not None:
            teacher(images)  # the teacher inside the step, no KD losses
        loss = self.pfc(emb, labels)
        batch = StepBatch(images=images, labels=labels, embeddings=emb, step=100 + self.steps, index=index, flip=flip)
        if plugin is not None:
            loss = loss + sum(plugin.after_forward(batch).values())
        self.precision.backward(loss)
        self.precision.step(self.opt, self.model.parameters(), 5.0)
        if plugin is not None:
            plugin.after_step(batch)
            plugin.scalars()
        self.steps += 1


@check("speed.kd_live", budget_s=90,
       what="A KD step with a live r100 teacher (UKDPlugin, ILED + RPSD with a full 16,384 bank) against "
            "(student step + teacher forward): mbf student, batch 128, 112, fp16; target <= 1.05x.")
def speed_kd_live(ctx, rec):
    import torch
    device = ctx.torch_device()
    _cudnn_benchmark(device)
    size = image_size(ctx)
    width, teacher_net = (0.25, "r18") if ctx.toy else (1.0, "r100")
    batch, bank, k_neg, classes = (8, 64, 8, 100) if ctx.toy else (128, 16384, 256, 10000)
    rounds = 2 if ctx.toy else 7
    _, plugin = _kd_plugin(ctx, device, teacher_net, width, bank, k_neg, batch, size, classes=classes)
    _fill_banks(plugin, bank, classes, device)
    student = _Student(size, width, classes, device, _fp16_flag(device)[0])
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) // 4
    fns = {"student step": lambda: student(images, labels),
           "teacher forward": lambda: plugin.teacher(images),
           "both in one step": lambda: student(images, labels, teacher=plugin.teacher),
           "KD step": lambda: student(images, labels, plugin=plugin)}
    med = interleaved(fns, device, rounds, warmup=2)
    ratio = med["KD step"] / (med["student step"] + med["teacher forward"])
    rec.update({f"{k.replace(' ', '_')}_s": v for k, v in med.items()})
    rec.update(ratio_kd_over_student_plus_teacher=ratio, target=1.05, target_met=ratio <= 1.05,
               ratio_kd_over_both_in_one_step=med["KD step"] / med["both in one step"], batch=batch, size=size,
               teacher=teacher_net, bank=bank, k_neg=k_neg, rounds=rounds)
    rec.summary = f"KD step / (student step + teacher forward) = {ratio:.3f} (target <= 1.05: " \
                  f"{'met' if ratio <= 1.05 else 'NOT met'}); KD step {med['KD step'] * 1000:.1f} ms"


@check("speed.kd_cache", budget_s=90,
       what="A KD step reading the teacher cache against a plain student step (target <= 1.05x) and the live-teacher "
            "KD step; building the cache on the GPU (decoding, image + flip, fp16 rows) against plain teacher "
            "inference (target >= 0.9x); r100 teacher, batch 128, 112, fp16.")
def speed_kd_cache(ctx, rec):
    import torch

    from arcface.data.datasets import RecordDataset

    from .kd import build_cache
    device = ctx.torch_device()
    _cudnn_benchmark(device)
    size = image_size(ctx)
    width, teacher_net = (0.25, "r18") if ctx.toy else (1.0, "r100")
    batch, bank, k_neg = (8, 64, 8) if ctx.toy else (128, 4096, 256)
    rounds = 2 if ctx.toy else 5
    rec_dir = faces(ctx, "train")
    classes, n = faces_count(ctx, "train")
    cache = ctx.path("speed", "train.tcache")
    cfg, live = _kd_plugin(ctx, device, teacher_net, width, bank, k_neg, batch, size, rec_dir=rec_dir,
                           classes=classes, cache=cache)
    build_s = build_cache(cfg, cache, device, batch)
    _, cached = _kd_plugin(ctx, device, teacher_net, width, bank, k_neg, batch, size, backend="cache", cache=cache,
                           rec_dir=rec_dir, classes=classes)
    dataset = RecordDataset(rec_dir, input_size=size, flip=False)
    decoded = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    views = torch.cat([decoded, decoded.flip(-1)])

    def inference():
        for s in range(0, views.shape[0], 2 * batch):
            live.teacher(views[s:s + 2 * batch])
    infer_s = median(time_calls(inference, device, 2 if not ctx.toy else 1))
    g = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        index = g.choice(n, batch, replace=False)
        flip = g.random(batch) < 0.5
        images = torch.stack([decoded[i].flip(-1) if f else decoded[i] for i, f in zip(index, flip)])
        batches.append((images, torch.from_numpy(np.asarray(dataset.labels)[index]).to(device),
                        torch.from_numpy(index).to(device), torch.from_numpy(flip).to(device)))
    students = {k: _Student(size, width, classes, device, _fp16_flag(device)[0]) for k in ("plain", "cache", "live")}
    turn = {"i": 0}

    def stepper(kind, plugin):
        def run():
            images, labels, index, flip = batches[turn["i"] % len(batches)]
            turn["i"] += 1
            students[kind](images, labels, plugin=plugin, index=index, flip=flip)
        return run
    med = interleaved({"plain": stepper("plain", None), "cache": stepper("cache", cached),
                       "live": stepper("live", live)}, device, rounds, warmup=2)
    ratio = med["cache"] / med["plain"]
    build_ratio = (2 * n / build_s) / (2 * n / infer_s)
    rec.update(plain_step_s=med["plain"], cache_kd_step_s=med["cache"], live_kd_step_s=med["live"],
               ratio_cache_over_plain=ratio, target=1.05, target_met=ratio <= 1.05,
               ratio_cache_over_live=med["cache"] / med["live"], build_s=build_s,
               build_views_per_s=2 * n / build_s, inference_views_per_s=2 * n / infer_s,
               ratio_build_over_inference_end_to_end=build_ratio, build_target=0.9, build_target_met=build_ratio >= 0.9,
               images=n, batch=batch, teacher=teacher_net)
    rec.note("the build ratio is end to end (hashing the teacher file and the index, building the teacher, decoding "
             "with 2 workers, fp16 rows); benchmarks/bench_teacher_cache.py's target is on the marginal rate")
    met = "met" if ratio <= 1.05 else "NOT met"
    rec.summary = (f"cache KD step / plain step = {ratio:.3f} (target <= 1.05: {met});"
                   f" cache / live {med['cache'] / med['live']:.3f}; build / inference {build_ratio:.2f}x end to end")


def _time_iled_rpsd(batch, bank, k_neg, ids, device, repeat):
    """(median s, peak MB or None) of ILED + RPSD forward, backward and enqueue on a full bank, P x K labels."""
    import torch

    from plugins.ukd.batch import KDBatch
    from plugins.ukd.composer import KDComposer
    composer = KDComposer({"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0, "bank": bank, "k_neg": k_neg}}).to(device)
    fill = torch.randn(bank, 512, device=device)
    composer.after_step(KDBatch(student=fill, teacher=fill, labels=torch.randint(0, ids, (bank,), device=device)))
    labels = torch.arange(batch // 4, device=device).repeat_interleave(4)
    teacher = torch.randn(batch, 512, device=device)
    student = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    count = {"n": 1}

    def kd_step():
        b = KDBatch(student=student, teacher=teacher, labels=labels, step=count["n"])
        total = sum(composer.weight_at(k, b.step) * composer.terms[k](b).loss for k in ("iled", "rpsd"))
        total.backward()
        student.grad = None
        for k in ("iled", "rpsd"):
            composer.terms[k].after_step(b)
        count["n"] += 1
    reset_peak(device)
    seconds = median(time_calls(kd_step, device, repeat))
    return seconds, gpu_memory_mb(device)


@check("speed.kd_losses", budget_s=90,
       what="ILED + RPSD forward, backward and bank enqueue at global batch 512, d 512, a full 65,536 bank and 256 "
            "hard negatives against an MBF training step at batch 512 (fp16): target <= 5%.")
def speed_kd_losses(ctx, rec):
    import torch

    from arcface.engine.precision import MixedPrecision
    device = ctx.torch_device()
    _cudnn_benchmark(device)
    batch, bank, k_neg, ids = (32, 256, 16, 1000) if ctx.toy else (512, 65536, 256, 85742)
    repeat = 2 if ctx.toy else 5
    kd_s, kd_peak = _time_iled_rpsd(batch, bank, k_neg, ids, device, repeat)
    size, width = image_size(ctx), (0.25 if ctx.toy else 1.0)
    autocast, note = _fp16_flag(device)
    model = _model("mbf", size, width, device, autocast).train()
    head = torch.nn.Linear(512, 1000, bias=False).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    scaler = MixedPrecision(True, device)
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)

    def mbf_step():
        opt.zero_grad(set_to_none=True)
        scaler.backward(torch.nn.functional.cross_entropy(head(model(images).float()), targets))
        scaler.step(opt)
    mbf_s = median(time_calls(mbf_step, device, repeat, warmup=2))
    ratio = kd_s / mbf_s
    rec.update(iled_rpsd_s=kd_s, mbf_step_s=mbf_s, ratio=ratio, target=0.05, target_met=ratio <= 0.05,
               batch=batch, bank=bank, k_neg=k_neg, mbf_precision=note)
    if kd_peak is not None:
        rec["iled_rpsd_peak_mb"] = round(kd_peak)
    rec.summary = f"ILED + RPSD {kd_s * 1000:.1f} ms vs MBF step {mbf_s * 1000:.1f} ms at batch {batch}: " \
                  f"{100 * ratio:.1f}% (target <= 5%: {'met' if ratio <= 0.05 else 'NOT met'})"


def _time_partial_fc(ctx, rec, classes, batch, dim, repeat, device, times, peaks):
    """Time one class count at sample rates 1.0 and 0.1 into times / peaks (keys like '1M@0.1')."""
    import torch

    from arcface.losses import CombinedMarginLoss
    from arcface.partial_fc import PartialFC_V2
    torch.manual_seed(0)
    start = time.perf_counter()
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes, sample_rate=1.0).to(device)
    rec[f"init_{classes}_s"] = round(time.perf_counter() - start, 2)
    emb = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step():
        pfc.weight.grad = None
        emb.grad = None
        pfc(emb, labels).backward()

    for rate in (1.0, 0.1):
        # one module for both rates: building 1M-2M initial centres costs seconds of CPU each time
        pfc.sample_rate, pfc.num_sample = rate, int(rate * pfc.num_local)
        sampled = pfc.sample(labels.clone(), step=0).numel() if rate < 1 else classes
        rec.expect(rate == 1.0 or sampled == pfc.num_sample, f"{classes}@{rate}: {sampled} centres sampled, "
                   f"{pfc.num_sample} expected")
        step()
        pfc.weight.grad = emb.grad = None  # the base: centres and inputs, no gradients
        reset_peak(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        seconds = median(time_calls(step, device, repeat))
        key = f"{classes // 1000}k@{rate}" if ctx.toy else f"{classes // 1_000_000}M@{rate}"
        times[key] = seconds
        rec[f"{key}_step_s"] = seconds
        if device.type == "cuda":
            peaks[key] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            rec[f"{key}_step_peak_extra_mb"] = round(peaks[key])
    rec[f"centres_{classes}_mb"] = round(classes * dim * 4 / 2 ** 20)


@check("speed.partial_fc", budget_s=120, quick=True, quick_budget_s=60,
       what="Partial FC forward + backward at 1M and 2M classes, sample rate 0.1 and 1.0, batch 128, d 512, one "
            "process: step time and peak GPU memory, and their ratios.")
def speed_partial_fc(ctx, rec):
    device = ctx.torch_device()
    batch, dim = (16, 64) if ctx.toy else (128, 512)
    million = 10_000 if ctx.toy else 1_000_000
    counts = (million,) if ctx.quick else (million, 2 * million)
    repeat = 2 if ctx.toy else 5
    times, peaks = {}, {}
    for classes in counts:
        if ctx.time_left() < 20:
            rec.note(f"{classes} classes: not timed, the check's time budget ran out")
            continue
        _time_partial_fc(ctx, rec, classes, batch, dim, repeat, device, times, peaks)
        reset_peak(device)  # the module is gone: its memory back to the device
    unit = "10k" if ctx.toy else "1M"
    double = "20k" if ctx.toy else "2M"
    if f"{unit}@0.1" in times and f"{unit}@1.0" in times:
        rec["ratio_time_0.1_over_1.0"] = times[f"{unit}@0.1"] / times[f"{unit}@1.0"]
        if peaks:
            rec["ratio_memory_0.1_over_1.0"] = peaks[f"{unit}@0.1"] / max(peaks[f"{unit}@1.0"], 1e-9)
    if f"{double}@0.1" in times and f"{unit}@0.1" in times:
        rec["ratio_time_2x_classes_at_0.1"] = times[f"{double}@0.1"] / times[f"{unit}@0.1"]
    rec.require(times, "nothing was timed")
    rec.summary = ", ".join(f"{k} {v * 1000:.1f} ms" + (f" / {peaks[k]:.0f} MB" if k in peaks else "")
                            for k, v in times.items())


IJB_C = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557}


def ijb_protocol(images, templates, pairs, genuine, dim, device, seed=0):
    """Random features of IJB-C's shape ([N, 2d] float32, original | flip), faceness, template and media ids,
    and template pairs; the features are drawn on `device` (fast on a GPU) and brought to the CPU."""
    import torch
    rng = np.random.default_rng(seed)
    of_image = np.concatenate([np.arange(templates), rng.integers(0, templates, images - templates)])
    template_ids = np.sort(rng.choice(np.arange(1, 10 * templates), templates, replace=False))
    medias = of_image * 8 + rng.integers(0, 8, images)
    g = torch.Generator(device=device).manual_seed(seed)
    feats = torch.randn(images, 2 * dim, device=device, generator=g).cpu().numpy()
    faceness = rng.uniform(0.1, 1.0, images).astype(np.float32)
    p1 = template_ids[rng.integers(0, templates, pairs)]
    p2 = template_ids[rng.integers(0, templates, pairs)]
    label = np.zeros(pairs, dtype=np.int64)
    label[rng.choice(pairs, genuine, replace=False)] = 1
    return feats, faceness, template_ids[of_image], medias, p1, p2, label


@check("speed.ijb", needs_cuda=False, budget_s=120,
       what="IJB-C-sized 1:1 evaluation (arcface/eval/ijb.py, mode N1D1F1): template aggregation and scoring of "
            "15.7M pairs (CPU code, this machine's cores), and the rate at which an r100 embeds IJB crops on the "
            "device (the part of an IJB run that uses the GPU).")
def speed_ijb(ctx, rec):
    import torch

    from arcface.eval import ijb
    from arcface.eval.embedder import TorchEmbedder
    from arcface.eval.metrics import tar_at_far
    device = ctx.torch_device()
    scale = 20 if ctx.toy else 1
    sizes = {k: max(1, v // scale) for k, v in IJB_C.items()}
    start = time.perf_counter()
    feats, faceness, tids, medias, p1, p2, label = ijb_protocol(sizes["images"], sizes["templates"], sizes["pairs"],
                                                                sizes["genuine"], 512, device)
    rec["data_s"] = round(time.perf_counter() - start, 2)
    rec.update({f"protocol_{k}": v for k, v in sizes.items()})
    rec["protocol"] = "IJB-C size" if scale == 1 else f"IJB-C / {scale} (CPU machine)"
    mode = ijb.Mode(True, True, True)
    start = time.perf_counter()
    t_feats, unique = ijb.template_features(feats, faceness, tids, medias, mode)
    agg = time.perf_counter() - start
    start = time.perf_counter()
    scores = ijb.score_pairs(t_feats, unique, p1, p2)
    score = time.perf_counter() - start
    start = time.perf_counter()
    tars = tar_at_far(label, scores)
    roc = time.perf_counter() - start
    rec.update(aggregation_s=agg, scoring_s=score, total_s=agg + score, roc_s=roc, cpu_threads=torch.get_num_threads())
    if scale == 1:
        rec.update(target_s=60, target_met=(agg + score) <= 60)
    rec.expect(np.isfinite(scores).all(), "non-finite scores")
    rec.expect(all(0.0 <= v <= 1.0 for v in tars.values()), f"TAR@FAR outside [0, 1]: {tars}")
    del feats
    # the device part: the embedder call extract_features makes per batch (crops and their mirrors, uint8)
    size, width = image_size(ctx), (0.25 if ctx.toy else 1.0)
    from arcface.backbones import get_model
    model = get_model("r18" if ctx.toy else "r100", input_size=size, width=width).to(device).eval()
    embedder = TorchEmbedder(model, device)
    per = 8 if ctx.toy else 128
    crops = np.random.default_rng(1).integers(0, 256, (2 * per, 3, size, size), dtype=np.uint8)
    seconds = median(time_calls(lambda: embedder(crops), device, 2 if ctx.toy else 10, warmup=2))
    rate = per / seconds
    rec.update(embed_images_per_s=rate, embed_network="r18 x0.25" if ctx.toy else "r100",
               embed_projected_ijbc_s=IJB_C["images"] / rate, embed_device=str(device))
    rec.summary = (f"{rec['protocol']}: aggregation {agg:.2f} s + scoring {score:.2f} s = {agg + score:.2f} s "
                   f"({torch.get_num_threads()} threads); {rec['embed_network']} embeds {rate:.0f} crops/s "
                   f"(+ mirror) on {device}: {IJB_C['images'] / rate:.0f} s for IJB-C's crops")
