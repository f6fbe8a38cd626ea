"""A KD training step with a live teacher against (plain student step + teacher forward), side by side.

Claim checked (issue 4): the UKD plugin adds at most 5% on top of what it cannot avoid, i.e.
    t(KD step) <= 1.05 * (t(student step) + t(teacher forward)).
The three are timed interleaved in one process on the same batch, with the real UKDPlugin (ILED + RPSD with a
full bank) and the engine's Partial FC. Defaults fit a 2-core CPU: MobileFaceNet student, iResNet-50 teacher,
batch 32 at 112x112. Usage: python -m benchmarks.bench_kd_step [--batch 32] [--size 112] [--teacher r50]
"""
import argparse
import os
import tempfile
import time


import torch
from easydict import EasyDict as edict

from arcface.backbones import get_model
from arcface.config import base_config
from arcface.engine.hooks import StepBatch, TrainContext
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2
from benchmarks.common import machine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--student", default="mbf")
    p.add_argument("--teacher", default="r50")
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--bank", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    d = 512
    tmp = tempfile.mkdtemp()
    teacher_path = os.path.join(tmp, "teacher.pt")
    torch.save(get_model(args.teacher, input_size=args.size).state_dict(), teacher_path)

    cfg = base_config()
    cfg.update(embedding_size=d, input_size=args.size, batch_size=args.batch, sampler="pk", fp16=False)
    cfg.kd = edict(enabled=True, teacher_network=args.teacher, teacher_weights=teacher_path, teacher_check=False,
                   losses={"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0, "bank": args.bank, "k_neg": 256}})
    from plugins.ukd.plugin import UKDPlugin
    plugin = UKDPlugin(cfg)
    device = torch.device("cpu")
    plugin.before_training(TrainContext(cfg=cfg, backbone=None, device=device, rank=0, world_size=1))

    student = get_model(args.student, input_size=args.size, num_features=d)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, args.classes)
    opt = torch.optim.SGD([{"params": student.parameters()}, {"params": pfc.parameters()}], lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.arange(args.batch) // 4  # P x K batch: positives for RPSD

    with torch.no_grad():  # fill the bank so RPSD works at full size
        feats = torch.nn.functional.normalize(torch.randn(args.bank, d), dim=1)
        for term in plugin.composer.terms.values():
            if hasattr(term, "bank"):
                term.bank.enqueue(feats, torch.randint(args.classes, 2 * args.classes, (args.bank,)))

    def student_step():
        opt.zero_grad(set_to_none=True)
        pfc(student(images), labels).backward()
        opt.step()

    def teacher_forward():
        plugin.teacher(images)

    def student_step_with_teacher():  # the teacher's forward inside the step, no KD losses
        opt.zero_grad(set_to_none=True)
        emb = student(images)
        plugin.teacher(images)
        pfc(emb, labels).backward()
        opt.step()

    def kd_step():
        opt.zero_grad(set_to_none=True)
        emb = student(images)
        loss = pfc(emb, labels)
        batch = StepBatch(images=images, labels=labels, embeddings=emb, step=100)
        terms = plugin.after_forward(batch)
        (loss + sum(terms.values())).backward()
        opt.step()
        plugin.after_step(batch)
        plugin.scalars()

    fns = {"student step": student_step, "teacher forward": teacher_forward,
           "both in one step": student_step_with_teacher, "KD step": kd_step}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeat):  # interleaved, so machine noise hits all three alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(machine())
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, {args.size}x{args.size}, d={d}, "
          f"bank {args.bank}, 256 negatives, {args.classes} classes, median of {args.repeat}")
    for k, v in med.items():
        print(f"{k:>16}: {v:.3f} s")
    ratio = med["KD step"] / (med["student step"] + med["teacher forward"])
    print(f"ratio KD step / (student step + teacher forward) = {ratio:.3f}  (target <= 1.05)")
    print(f"  of which running both in one step (cache effects, no KD loss): "
          f"{med['both in one step'] / (med['student step'] + med['teacher forward']):.3f}; "
          f"the KD losses and plugin on top: {med['KD step'] / med['both in one step']:.3f}")


if __name__ == "__main__":
    main()
