"""Group 'training': the engine's trainer (arcface.engine.trainer.train with a config) on generated faces, in
float32, CUDA fp16 autocast with the GradScaler (the engine's `fp16=True`), and bf16 autocast.

The engine has no bf16 switch on CUDA (`fp16=True` means float16 there; arcface.backbones.iresnet.autocast_dtype
picks float16 for every non-CPU device), so the bf16 checks run the same trainer with that one function made to
answer bfloat16 in the three backbone modules: the rest of the path (trainer, GradScaler, Partial FC, loader) is
the engine's own.
"""
import contextlib
import os
import time
from unittest import mock

from .common import (
    base_cfg,
    faces,
    faces_count,
    falling,
    finite,
    history_losses,
    image_size,
    load_json,
    rel_diff,
    run_trainer,
    save_json,
)
from .core import Skip, check

# toy: 5 epochs of the 96 toy faces; at 20 steps (1.7 epochs, batch 8, s=64) batch noise could hide the fall
STEPS, QUICK_STEPS, TOY_STEPS = 40, 20, 60
BATCH, TOY_BATCH = 64, 8
# the first step's loss (before any update) under autocast against float32 (TF32 off), relative:
FIRST_STEP_RTOL = {"fp16": 1e-2, "bf16": 3e-2}


def _settings(ctx, network, steps):
    return {"network": network, "size": image_size(ctx), "toy": ctx.toy, "steps": steps, "device": ctx.device}


def _cfg(ctx, network, precision, steps, tag):
    root = faces(ctx, "train")
    ids, _ = faces_count(ctx, "train")
    return base_cfg(ctx, ctx.path("train", f"{network}_{precision}_{tag}", "out"), rec=root, num_classes=ids,
                    network=network, network_kwargs={"width": 0.25} if ctx.toy else {}, input_size=image_size(ctx),
                    embedding_size=64 if ctx.toy else 512, batch_size=TOY_BATCH if ctx.toy else BATCH,
                    num_workers=0 if ctx.toy else min(4, os.cpu_count() or 1), fp16=precision != "fp32", lr=0.1,
                    num_epoch=0,
                    max_steps=steps, warmup_epoch=0, seed=7, frequent=10)


@contextlib.contextmanager
def precision_mode(precision, device_type):
    """fp32: TF32 off on CUDA (a true float32 reference); bf16: the backbones autocast to bfloat16."""
    import torch

    from arcface.backbones import iresnet, mobilefacenet, vit
    stack = contextlib.ExitStack()
    with stack:
        if precision == "fp32" and device_type == "cuda":
            before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            stack.callback(lambda: (setattr(torch.backends.cudnn, "allow_tf32", before[0]),
                                    setattr(torch.backends.cuda.matmul, "allow_tf32", before[1])))
        if precision == "bf16":
            for module in (iresnet, mobilefacenet, vit):
                stack.enter_context(mock.patch.object(module, "autocast_dtype", lambda x: torch.bfloat16))
        yield


def train_once(ctx, network, precision, steps, tag="run"):
    """(Trainer, losses, seconds) of one run."""
    import torch
    cfg = _cfg(ctx, network, precision, steps, tag)
    start = time.perf_counter()
    with precision_mode(precision, ctx.torch_device().type):
        trainer = run_trainer(cfg, ctx.path("train", f"{network}_{precision}_{tag}", "train.log"))
    if ctx.device == "cuda":
        torch.cuda.synchronize()
    return trainer, history_losses(trainer), time.perf_counter() - start


def logged_speeds(path):
    """The 'Speed N samples/sec' figures of a training.log, in order."""
    import re
    try:
        with open(path) as f:
            return [float(v) for v in re.findall(r"Speed ([0-9.]+) samples/sec", f.read())]
    except OSError:
        return []


def fp32_first_step(ctx, network, steps):
    """The float32 run's first-step loss: from this run's fp32 check when it ran, else from a 1-step run."""
    saved = load_json(ctx.path("train", f"{network}_fp32.json"))
    if saved and saved.get("settings") == _settings(ctx, network, steps) and saved.get("losses"):
        return saved["losses"][0], "the fp32 check's run"
    _, losses, _ = train_once(ctx, network, "fp32", 1, tag="first_step")
    return losses[0], "a 1-step fp32 run"


def training_check(ctx, rec, network, precision):
    import torch
    steps = TOY_STEPS if ctx.toy else (QUICK_STEPS if ctx.quick else STEPS)
    if precision == "bf16" and ctx.device == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name(0)} does not support bf16")
    trainer, losses, seconds = train_once(ctx, network, precision, steps)
    batch = trainer.cfg.batch_size
    rec.update(network=network, precision=trainer.precision_note, device=str(trainer.device), steps=len(losses),
               batch=batch, size=image_size(ctx), first_loss=losses[0] if losses else None,
               last_loss=losses[-1] if losses else None, losses=losses, seconds_run=round(seconds, 2),
               images_per_s_incl_setup=round(len(losses) * batch / max(seconds, 1e-9), 1))
    if trainer.precision.scale is not None:
        rec["grad_scale_final"] = trainer.precision.scale
    speeds = logged_speeds(os.path.join(trainer.cfg.output, "training.log"))
    if speeds:  # the trainer's own figure over its last `frequent` steps: loader and step together
        rec["trainer_samples_per_s_last"] = speeds[-1]
    rec.require(len(losses) == steps, f"{len(losses)} of {steps} steps ran")
    rec.expect(finite(losses), f"non-finite losses: {losses}")
    rec.expect(falling(losses), f"the loss did not fall: first steps {losses[:3]}, last steps {losses[-3:]}")
    if precision == "fp32":
        save_json(ctx.path("train", f"{network}_fp32.json"), {"settings": _settings(ctx, network, steps),
                                                             "losses": losses})
    else:
        ref, source = fp32_first_step(ctx, network, steps)
        diff = rel_diff(losses[0], ref)
        # the dtype that ran: fp16=True autocasts to bfloat16 on a CPU (a rehearsal), bf16 is patched in
        ran = "bf16" if precision == "bf16" or "bfloat16" in trainer.precision_note else "fp16"
        if not trainer.autocast:
            ran = "fp32"
        tol = FIRST_STEP_RTOL.get(ran, FIRST_STEP_RTOL["fp16"])
        rec.update(autocast_dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "none"}[ran], fp32_first_loss=ref,
                   fp32_reference=source, first_step_rel_diff=diff, first_step_rtol=tol)
        rec.expect(ran != "fp32" or ctx.device != "cuda", "the trainer did not autocast on CUDA with fp16=True")
        rec.expect(diff <= tol, f"first-step loss {losses[0]:.5f} vs float32 {ref:.5f}: relative difference "
                   f"{diff:.2e} > {tol}")
    extra = f", first step vs fp32 {rec['first_step_rel_diff']:.1e}" if "first_step_rel_diff" in rec.numbers else ""
    rec.summary = (f"{network} {precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps of "
                   f"{batch}{extra}; {rec['precision']}")


def _register(network, precision, budget, quick=False, quick_budget=None):
    what = {"fp32": f"{network} at 112 through the trainer in float32 (TF32 off) on generated faces: finite, "
                    "falling loss; the reference of the autocast checks' first step.",
            "fp16": f"{network} at 112 through the trainer with CUDA fp16 autocast and the GradScaler: finite, "
                    "falling loss; the first step's loss equals the float32 step's within 1e-2.",
            "bf16": f"{network} at 112 through the trainer with bf16 autocast (the backbones' autocast dtype "
                    "switched to bfloat16): finite, falling loss; first step equals float32 within 3e-2."}[precision]
    needs_cuda = precision != "fp32" or network != "mbf"  # mbf in float32 is meaningful on a CPU too
    check(f"train.{network}.{precision}", what=what, budget_s=budget, needs_cuda=needs_cuda,
          quick=quick, quick_budget_s=quick_budget)(lambda ctx, rec: training_check(ctx, rec, network, precision))


_register("mbf", "fp32", 60)
_register("mbf", "fp16", 60, quick=True, quick_budget=45)
_register("mbf", "bf16", 50)
_register("r50", "fp32", 60)
_register("r50", "fp16", 60)
_register("r50", "bf16", 60)
