"""Group 'distributed': `torchrun --nproc_per_node=N` on the GPUs present gives the losses, gradients and trained
weights of one process, as tests/test_partial_fc.py and tests/test_kd_engine_distributed.py check with gloo on the
CPU.

N is the number of GPUs, one rank each, with NCCL. With one GPU two ranks share it: NCCL normally refuses two
ranks on one device ("Duplicate GPU detected"), so that is tried first and, when refused, gloo on CUDA tensors;
if gloo cannot do it either the checks are skipped with both reasons. The backend found by dist.partial_fc is kept
for the trainer checks. On the CPU (--rehearse) it is gloo with 2 processes.
"""
import os
import subprocess
import sys
import time

from . import dist_worker as W
from .common import load_json, save_json, tail, tensor_rel_diff
from .core import Skip, _kill_tree, check, child_env, register_process_group

LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4          # float32 shards sum in another order than one process
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5      # after the KD epoch, as tests/test_kd_engine_distributed.py
FP16_UPDATE_RTOL = 2e-2                    # fp16_compress_hook: gradients all-reduced in float16


def candidates(ctx):
    """[(backend, processes, share one GPU)] to try, best first."""
    import torch
    if ctx.device != "cuda":
        return [("gloo", 2, False)]
    count = torch.cuda.device_count()
    if count >= 2:
        return [("nccl", count, False)]
    return [("nccl", 2, True), ("gloo", 2, True)]


def launch(ctx, job, backend, nproc, share, out, extra=(), limit=150.0):
    """Run the job under torchrun; (ok, per-rank status dicts, seconds, log tail)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(f"{job}_rank"):
            os.remove(os.path.join(out, name))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", f"{__package__}.dist_worker", "--job", job, "--backend", backend, "--device", ctx.device,
           "--out", out, *extra] + (["--share-gpu"] if share else [])
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("NCCL_DEBUG", "WARN")
    log_path = os.path.join(out, f"{job}_{backend}_torchrun.log")
    timeout = max(10.0, min(limit, ctx.time_left() - 10))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        register_process_group(ctx, proc.pid)  # killed with this check if the check is killed
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            code = None
    seconds = time.perf_counter() - start
    statuses = [load_json(os.path.join(out, f"{job}_rank{r}.json")) for r in range(nproc)]
    with open(log_path, errors="replace") as f:
        log_tail = tail(f.read(), 1500)
    ok = code == 0 and all(s and s.get("ok") for s in statuses)
    if code is None:
        log_tail = f"killed after {timeout:.0f} s (a hang). " + log_tail
    return ok, statuses, seconds, log_tail


def _errors(statuses, log_tail):
    found = [s["error"] for s in statuses if s and s.get("error")]
    return "; ".join(found)[:800] if found else f"no rank reported (log: {log_tail[-600:]})"


def _backend_file(ctx):
    return ctx.path("dist", "backend.json")


def find_backend(ctx, rec, job, run):
    """Try the candidates in turn with run(backend, nproc, share) -> (ok, statuses, seconds, log); the first that
    works is returned as (backend, nproc, share, result). None of them: Skip when one GPU is shared (the platform
    cannot), else the failure."""
    attempts = []
    saved = load_json(_backend_file(ctx))
    cands = candidates(ctx)
    if saved:
        cands = [tuple(saved["choice"])] + [c for c in cands if list(c) != saved["choice"]]
    for backend, nproc, share in cands:
        result = run(backend, nproc, share)
        ok, statuses, seconds, log_tail = result
        rec[f"{job}_{backend}_launch_s"] = round(seconds, 1)
        if ok:
            save_json(_backend_file(ctx), {"choice": [backend, nproc, share], "refused": attempts})
            rec.update(backend=backend, processes=nproc, share_one_gpu=share)
            if attempts:
                rec["refused"] = attempts
            return backend, nproc, share, result
        attempts.append(f"{backend} x{nproc}{' on one GPU' if share else ''}: {_errors(statuses, log_tail)}")
    rec["refused"] = attempts
    if all(share for _, _, share in cands):
        raise Skip("no backend runs 2 processes on the one GPU: " + " | ".join(attempts))
    rec.require(False, "torchrun failed: " + " | ".join(attempts))


@check("dist.partial_fc", budget_s=120, quick=True, quick_budget_s=75,
       what="Partial FC behind a DDP linear backbone under torchrun (NCCL, one rank per GPU; two ranks on a "
            "single GPU when the backend allows): loss and gradients equal one process's, at full and sampled rate.")
def dist_partial_fc(ctx, rec):
    import numpy as np
    import torch
    out = ctx.path("dist", "pfc", "")

    def run(backend, nproc, share):
        return launch(ctx, "pfc", backend, nproc, share, out, limit=45 if share and backend == "nccl" else 75)

    backend, nproc, share, _ = find_backend(ctx, rec, "pfc", run)
    device = ctx.torch_device()
    data = W.pfc_data(nproc)
    worst = {"loss": 0.0, "backbone_grad": 0.0, "centre_grad": 0.0}
    for case, (rate, step) in W.PFC_CASES.items():
        one = W.pfc_reference(data, device, nproc, rate, step)
        for r in range(nproc):
            got = np.load(os.path.join(out, f"pfc_rank{r}.npz"))
            start = int(got[f"{case}/class_start"])
            shard = got[f"{case}/centre_grad"]
            diffs = {"loss": abs(float(got[f"{case}/loss"]) - one["loss"]) / max(abs(one["loss"]), 1e-12),
                     "backbone_grad": tensor_rel_diff(torch.from_numpy(got[f"{case}/backbone_grad"]),
                                                      torch.from_numpy(one["backbone_grad"])),
                     "centre_grad": tensor_rel_diff(torch.from_numpy(shard), torch.from_numpy(
                         one["centre_grad"][start:start + shard.shape[0]]))}
            for key, value in diffs.items():
                worst[key] = max(worst[key], value)
    rec.update(loss_rel_diff=worst["loss"], backbone_grad_rel_diff=worst["backbone_grad"],
               centre_grad_rel_diff=worst["centre_grad"], cases=list(W.PFC_CASES))
    rec.expect(worst["loss"] <= LOSS_RTOL, f"loss differs from one process by {worst['loss']:.2e}")
    rec.expect(worst["backbone_grad"] <= GRAD_RTOL, f"backbone gradient differs by {worst['backbone_grad']:.2e}")
    rec.expect(worst["centre_grad"] <= GRAD_RTOL, f"centre gradients differ by {worst['centre_grad']:.2e}")
    rec.summary = (f"{backend} x{nproc}{' sharing one GPU' if share else ''}: loss {worst['loss']:.1e}, "
                   f"backbone grad {worst['backbone_grad']:.1e}, centre grad {worst['centre_grad']:.1e} from 1 process")


def _trained(folder, world):
    import torch
    model = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    ckpts = [torch.load(os.path.join(folder, f"checkpoint_gpu_{r}.pt"), weights_only=False, map_location="cpu")
             for r in range(world)]
    centres = torch.cat([c["state_dict_softmax_fc"]["weight"] for c in ckpts])
    composer = ckpts[0]["state_plugins"]["ukd"]["composer"]
    bank = composer["terms.rpsd.bank.feats"][composer["terms.rpsd.bank.valid"]].float()
    return model, centres, bank[bank[:, 0].argsort()]


def trainer_check(ctx, rec, fp16):
    import torch
    tag = "fp16" if fp16 else "fp32"
    root = ctx.path("dist", f"train_{tag}", "")
    teacher = W.teacher_weights(ctx.path("dist", "teacher.pt"))
    extra = ["--teacher", teacher] + (["--fp16"] if fp16 else [])

    def run(backend, nproc, share):
        return launch(ctx, "train", backend, nproc, share, os.path.join(root, f"world_{backend}_{nproc}"), extra,
                      limit=120)

    backend, nproc, share, _ = find_backend(ctx, rec, "train", run)
    many = os.path.join(root, f"world_{backend}_{nproc}")
    one = os.path.join(root, f"one_{backend}")
    W.train_job_run(one, teacher, backend, ctx.torch_device(), fp16, 0, 1, nproc,
                    log_path=os.path.join(root, "one.log"))
    model1, centres1, bank1 = _trained(one, 1)
    model2, centres2, bank2 = _trained(many, nproc)
    torch.manual_seed(3)  # the trainer seeds with cfg.seed before it builds the student
    initial = W.FlatLinear().fc.weight.detach()
    update = float((model1["fc.weight"] - initial).abs().max())
    rec["weight_update_max"] = update
    rec.require(update > 1e-4, f"the 1-process run did not train (largest weight change {update:.1e})")
    weight_diff = max(float((model2[k] - model1[k]).abs().max()) for k in model1)
    centre_diff = float((centres2 - centres1).abs().max())
    rec.update(weight_max_abs_diff=weight_diff, centre_max_abs_diff=centre_diff,
               bank_rows=[int(bank1.shape[0]), int(bank2.shape[0])], precision=tag)
    if fp16:  # gradients travel as float16 between ranks: compare against the size of the update
        rec["weight_diff_over_update"] = weight_diff / update
        rec.expect(weight_diff <= FP16_UPDATE_RTOL * update, f"weights differ by {weight_diff:.2e}, "
                   f"{weight_diff / update:.1e} of the update (tolerance {FP16_UPDATE_RTOL})")
    else:
        for key in model1:
            rec.expect(torch.allclose(model2[key], model1[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL),
                       f"weight {key} differs from one process by {float((model2[key] - model1[key]).abs().max()):.2e}")
        rec.expect(torch.allclose(centres2, centres1, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL),
                   f"Partial FC centres differ by {centre_diff:.2e}")
    rec.expect(bank1.shape == bank2.shape and torch.allclose(bank2, bank1, rtol=1e-3, atol=2e-3 if fp16 else 1e-5),
               "the RPSD memory banks differ from one process's")
    rec.summary = (f"{backend} x{nproc}{' sharing one GPU' if share else ''}, {tag}: trained weights "
                   f"{weight_diff:.1e}, centres {centre_diff:.1e} from 1 process (update {update:.1e})")


@check("dist.trainer_fp32", budget_s=120,
       what="The trainer with the KD plugin (live teacher, ILED + FC + RPSD) under torchrun on CUDA, float32: "
            "weights, Partial FC centres and the memory bank after an epoch equal one process's.")
def dist_trainer_fp32(ctx, rec):
    trainer_check(ctx, rec, fp16=False)


@check("dist.trainer_fp16", budget_s=120,
       what="The same with fp16=True: GradScaler and DDP's fp16_compress_hook (gradients all-reduced in float16): "
            "the trained weights differ from one process's by at most 2% of the update.")
def dist_trainer_fp16(ctx, rec):
    trainer_check(ctx, rec, fp16=True)
