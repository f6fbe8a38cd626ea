"""What ILED + RPSD add to a training step: their forward + backward (+ the bank enqueue) at the paper-scale
setting (global batch 512, 512-d, bank 65536, 256 hard negatives per anchor) against one MobileFaceNet
training step at the same batch, measured side by side in one run.

    python -m benchmarks.bench_kd_losses                    # CPU or the first GPU
    python -m benchmarks.bench_kd_losses --mbf-batch 64     # time MBF on 64 images and scale to --batch
    python -m benchmarks.bench_kd_losses --methods          # also ekd, mrd, adadistill, proxyless, head hooks

On CPU the MobileFaceNet step at 512 images is slow; --mbf-batch times a smaller batch and scales linearly
(printed as such). The teacher forward is not included: it is the same for every KD loss.

The relational RPSD section times rpsd with relation='student' (student-student similarities, in-batch and through a
student bank beside the teacher keys) in its three bank/mining settings, each against the same MBF step.
"""
import argparse
import os
import platform
import time

import torch

from plugins.ukd.batch import KDBatch
from plugins.ukd.composer import KDComposer


def machine(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"{platform.platform()} | {name} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | "
            f"torch {torch.__version__} | load average {os.getloadavg()[0]:.1f} (other jobs share the machine)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), sum(times) / len(times)


def mobilefacenet():
    """The engine's MobileFaceNet, or a stand-in of similar shape when the engine does not have it yet."""
    try:
        from arcface.backbones import get_model
        return get_model("mbf", num_features=512), "arcface.backbones.get_model('mbf')"
    except Exception as err:  # noqa: BLE001 - a benchmark must run on an unfinished tree too
        return _stand_in_mbf(), f"STAND-IN for MobileFaceNet (get_model('mbf') failed: {err})"


def _stand_in_mbf():
    def block(cin, cout, stride):
        return torch.nn.Sequential(
            torch.nn.Conv2d(cin, cin * 2, 1, bias=False), torch.nn.BatchNorm2d(cin * 2), torch.nn.PReLU(cin * 2),
            torch.nn.Conv2d(cin * 2, cin * 2, 3, stride, 1, groups=cin * 2, bias=False),
            torch.nn.BatchNorm2d(cin * 2), torch.nn.PReLU(cin * 2),
            torch.nn.Conv2d(cin * 2, cout, 1, bias=False), torch.nn.BatchNorm2d(cout))
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.PReLU(64),
        block(64, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1), block(128, 128, 2),
        block(128, 128, 1), torch.nn.Conv2d(128, 512, 1, bias=False), torch.nn.BatchNorm2d(512),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 512))


RELATIONAL_VARIANTS = {
    "RPSD student, FIFO student bank": {"relation": "student"},
    "RPSD student, momentum slots by index": {"relation": "student", "bank_update": "momentum"},
    "RPSD student, critical mining (FAR 1e-4)": {"relation": "student", "mining": "critical"},
    "RPSD both (cross + student)": {"relation": "both"},
}


def time_relational(args, device, labels, teacher, student):
    """(name, (min s, mean s)) of every relational variant: forward, backward and bank update on a full bank."""
    out = []
    for name, params in RELATIONAL_VARIANTS.items():
        spec = {"rpsd": {"weight": 10.0, "bank": args.bank, "k_neg": args.k_neg, **params}}
        composer = KDComposer(spec).to(device)
        fill = torch.randn(args.bank, args.dim, device=device)
        fill_student = fill + torch.randn_like(fill)
        fill_labels = torch.randint(0, args.identities, (args.bank,), device=device)
        composer.after_step(KDBatch(student=fill_student, teacher=fill, labels=fill_labels,
                                    index=torch.arange(args.bank, device=device)))
        step = {"n": 1}

        def run():
            start = (step["n"] * args.batch) % (args.bank - args.batch)
            index = torch.arange(start, start + args.batch, device=device)
            batch = KDBatch(student=student, teacher=teacher, labels=labels, step=step["n"], index=index)
            (composer.weight_at("rpsd", batch.step) * composer.terms["rpsd"](batch).loss).backward()
            student.grad = None
            batch.student = student.detach()
            composer.terms["rpsd"].after_step(batch)
            step["n"] += 1
        out.append((name, timed(run, device, args.repeats)))
        del composer, fill, fill_student
    return out


# ---- the face-recognition KD methods (ekd, mrd, adadistill, proxyless) and the head hooks (issue 15) ----------

FACE_KD_METHODS = {
    "ekd (critical pairs, 6 FPRs, k_neg 2000)": ("ekd", {}),
    "ekd (TFace's selection: all positives + 2000)": ("ekd", {"selection": "hard"}),
    "mrd (mse, 64 negatives per anchor)": ("mrd", {}),
    "mrd (kl, 64 negatives per anchor)": ("mrd", {"form": "kl"}),
}


def time_face_kd_methods(args, device, labels, teacher, student):
    """(name, (min s, mean s)) of each method's per-step work at the benchmark's batch: forward + backward for the
    pair losses; for adadistill the centre update of before_head over a full-size Partial FC shard (its margin
    softmax is the step's own classification loss); for proxyless its per-step term (the centres are loaded once)."""
    import shutil
    import tempfile

    from arcface.losses import CombinedMarginLoss
    from arcface.partial_fc import PartialFC_V2, shard_range
    from plugins.ukd import build_kd_loss

    out = []
    for name, (loss_name, params) in FACE_KD_METHODS.items():
        loss = build_kd_loss(loss_name, **params).to(device)

        def run(loss=loss):
            loss(KDBatch(student=student, teacher=teacher, labels=labels)).loss.backward()
            student.grad = None
        out.append((name, timed(run, device, args.repeats)))

    pfc = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.dim, args.identities, 1.0).to(device)
    ada = build_kd_loss("adadistill")
    ada.configure_head(pfc)

    def ada_step():
        batch = KDBatch(student=student, teacher=teacher, labels=labels)
        ada(batch)
        ada.before_head(pfc, batch)
    out.append((f"adadistill centre update ({args.identities} classes)", timed(ada_step, device, args.repeats)))

    folder = tempfile.mkdtemp(prefix="bench_proxyless_")
    try:
        world = 8
        table = torch.randn(args.identities, args.dim)
        for rank in range(world):
            start, rows = shard_range(args.identities, rank, world)
            torch.save({"state_dict_softmax_fc": {"weight": table[start:start + rows].clone()}},
                       os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
        del table
        proxy = build_kd_loss("proxyless", teacher_head=folder)
        out.append(("proxyless per step (zero term)",
                    timed(lambda: proxy(KDBatch(student=student, teacher=teacher, labels=labels)), device,
                          args.repeats)))
        head = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.dim, args.identities, 1.0)
        start = time.perf_counter()
        proxy.configure_head(head)
        once = time.perf_counter() - start
        out.append((f"proxyless start-up: {args.identities} centres from an 8-rank head (once)", (once, once)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


class _FixedBatches:
    """The TrainLoader protocol over one fixed batch, for timing trainer micro-steps."""

    def __init__(self, batch, count):
        self.batch, self.count = batch, count

    def __len__(self):
        return self.count

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __iter__(self):
        return iter([self.batch] * self.count)


def time_head_hooks(args, device):
    """A plain engine micro-step (MobileFaceNet + Partial FC, no plugin) as the trainer runs it when no plugin uses
    the head hooks (the guard is off), against the same step with the hook call made anyway (an empty driver's
    before_head): interleaved, median of --hook-repeats each, and the spread of the plain step as the noise."""
    import contextlib
    import io
    import statistics
    import tempfile

    from arcface.config import base_config, validate
    from arcface.data.batch import Batch
    from arcface.engine.hooks import StepBatch
    from arcface.engine.trainer import Trainer

    cfg = base_config()
    cfg.update({"rec": "synthetic", "num_classes": 1000, "num_image": 10 * args.hook_batch, "network": "mbf",
                "embedding_size": 512, "input_size": 112, "batch_size": args.hook_batch, "num_epoch": 1,
                "warmup_epoch": 0, "output": tempfile.mkdtemp(prefix="bench_hooks_"), "tensorboard": False,
                "save_all_states": False, "num_workers": 0, "val_targets": [], "device": str(device), "fp16": False,
                "frequent": 10 ** 9})
    cfg.config_name = "bench_head_hooks"
    cfg = validate(cfg)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(args.hook_batch, 3, 112, 112, generator=g).to(device),
                  torch.randint(0, 1000, (args.hook_batch,), generator=g).to(device))
    trainer = Trainer(cfg, _FixedBatches(batch, 10))
    with contextlib.redirect_stdout(io.StringIO()):   # the trainer's start-up log (every config key)
        trainer.setup()
    try:
        assert not trainer.head_hooks and not trainer.plugins.head_users

        def step(call_hooks):
            trainer.head_hooks = call_hooks
            start = time.perf_counter()
            trainer._micro_step(batch, 0)
            sync(device)
            elapsed = time.perf_counter() - start
            trainer.optimizer.zero_grad(set_to_none=True)
            return elapsed

        step(False), step(True)                       # warm-up
        plain, hooked = [], []
        for _ in range(args.hook_repeats):
            plain.append(step(False))
            hooked.append(step(True))
        trainer.head_hooks = False
        # the call itself, alone, many times: what the hook path costs per micro-step, free of the step's noise
        step_batch = StepBatch(images=batch.images, labels=batch.labels, embeddings=None, step=0)
        calls = 100000
        start = time.perf_counter()
        for _ in range(calls):
            trainer.plugins.before_head(trainer.pfc, step_batch)
        per_call = (time.perf_counter() - start) / calls
    finally:
        trainer.close()
    return statistics.median(plain), statistics.median(hooked), statistics.pstdev(plain), per_call


def report_face_kd_methods(args, device, labels, teacher, student, mbf_at_batch):
    print(f"face-recognition KD methods at batch {args.batch}, dim {args.dim} (P x K labels), ratio to the MBF step "
          f"at batch {args.batch}:")
    for name, (best, mean) in time_face_kd_methods(args, device, labels, teacher, student):
        print(f"{'  ' + name:60s} {best:9.4f} {mean:9.4f}   ratio {best / mbf_at_batch:.4f}")
    plain, hooked, noise, per_call = time_head_hooks(args, device)
    print(f"head hooks, plain engine micro-step (MBF + Partial FC 1000 classes, batch {args.hook_batch}, median of "
          f"{args.hook_repeats} interleaved):")
    print(f"{'  no plugin uses them (the guard is off)':60s} {plain:9.4f}")
    print(f"{'  the hook call made anyway (empty driver)':60s} {hooked:9.4f}   ratio {hooked / plain:.4f}, "
          f"spread of the plain step {noise / plain:.4f}")
    print(f"{'  the hook call alone (empty driver), per micro-step':60s} {per_call:9.2e}   ratio "
          f"{per_call / plain:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="global batch of the KD losses")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bank", type=int, default=65536)
    parser.add_argument("--k-neg", type=int, default=256)
    parser.add_argument("--identities", type=int, default=85742, help="label range of the bank (MS1MV2 size)")
    parser.add_argument("--mbf-batch", type=int, default=None, help="images per MBF step (default: --batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", action="store_true",
                        help="also time ekd, mrd, adadistill, proxyless and the head hooks (issue 15)")
    parser.add_argument("--hook-batch", type=int, default=32, help="images per engine step of the head-hook check")
    parser.add_argument("--hook-repeats", type=int, default=9)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"machine: {machine(device)}")

    spec = {"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0, "bank": args.bank, "k_neg": args.k_neg}}
    composer = KDComposer(spec).to(device)
    print(f"KD: {composer.formula()}")
    fill = torch.randn(args.bank, args.dim, device=device)
    fill_labels = torch.randint(0, args.identities, (args.bank,), device=device)
    composer.after_step(KDBatch(student=fill, teacher=fill, labels=fill_labels))
    # P x K batch: 4 images per identity, so RPSD sees positives as with cfg.sampler='pk'
    labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4)
    teacher = torch.randn(args.batch, args.dim, device=device)
    student = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    step = {"n": 1}

    def kd_step(names):
        def run():
            batch = KDBatch(student=student, teacher=teacher, labels=labels, step=step["n"])
            total = sum(composer.weight_at(n, batch.step) * composer.terms[n](batch).loss for n in names)
            total.backward()
            student.grad = None
            for n in names:
                composer.terms[n].after_step(batch)
            step["n"] += 1
        return run

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    both = timed(kd_step(["iled", "rpsd"]), device, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    iled = timed(kd_step(["iled"]), device, args.repeats)
    rpsd = timed(kd_step(["rpsd"]), device, args.repeats)
    del composer, fill
    relational = time_relational(args, device, labels, teacher, student)

    model, source = mobilefacenet()
    model = model.to(device).train()
    head = torch.nn.Linear(512, 1000, bias=False).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    mbf_batch = args.mbf_batch or args.batch
    images = torch.randn(mbf_batch, 3, 112, 112, device=device)
    targets = torch.randint(0, 1000, (mbf_batch,), device=device)

    def mbf_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(model(images)), targets)
        loss.backward()
        opt.step()

    mbf = timed(mbf_step, device, max(1, args.repeats - 1))
    scale = args.batch / mbf_batch
    mbf_at_batch = mbf[0] * scale

    print(f"MobileFaceNet: {source}")
    print(f"settings: batch {args.batch}, dim {args.dim}, bank {args.bank} (full), k_neg {args.k_neg}, "
          f"{args.repeats} timed repeats (min / mean), device {device}")
    print(f"{'what':48s} {'min s':>9s} {'mean s':>9s}")
    print(f"{'ILED fwd+bwd':48s} {iled[0]:9.4f} {iled[1]:9.4f}")
    print(f"{'RPSD fwd+bwd+enqueue':48s} {rpsd[0]:9.4f} {rpsd[1]:9.4f}")
    print(f"{'ILED + RPSD fwd+bwd+enqueue':48s} {both[0]:9.4f} {both[1]:9.4f}")
    label = f"MBF train step, {mbf_batch} images" + (f" (x{scale:g} -> {args.batch})" if scale != 1 else "")
    print(f"{label:48s} {mbf[0]:9.4f} {mbf[1]:9.4f}")
    if scale != 1:
        print(f"{'MBF train step at ' + str(args.batch) + ' images, scaled linearly':48s} {mbf_at_batch:9.4f}")
    print(f"ratio (ILED + RPSD) / (MBF step at batch {args.batch}): {both[0] / mbf_at_batch:.3f}")
    print(f"relational RPSD (fwd+bwd+bank update, full bank of {args.bank}, {args.k_neg} mined negatives):")
    for name, (best, mean) in relational:
        print(f"{'  ' + name:48s} {best:9.4f} {mean:9.4f}   ratio to MBF step {best / mbf_at_batch:.3f}")
    if peak is not None:
        print(f"peak GPU memory during ILED + RPSD (bank included): {peak:.0f} MiB")
    if args.methods:
        report_face_kd_methods(args, device, labels, teacher, student, mbf_at_batch)


if __name__ == "__main__":
    main()
