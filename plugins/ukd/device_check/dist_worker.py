"""The processes of the distributed checks, launched by torchrun (and the same functions run by the checks
themselves as the 1-process reference):

    python -m torch.distributed.run --standalone --nproc_per_node=N -m plugins.ukd.device_check.dist_worker \
        --job pfc|train --backend nccl|gloo --device cuda|cpu --out DIR [--share-gpu] [--fp16]

'pfc': Partial FC behind a DDP-wrapped linear backbone, one step at full and at sampled rate: each rank writes its
loss and gradients. 'train': the engine's trainer with the KD plugin (live teacher, ILED + FC + RPSD) for one epoch
on fixed tensors; the checkpoints are compared by the check. The backbone is BatchNorm-free (registered here as
'device_check_flat'), because BatchNorm normalises each rank's share of the batch on its own, a real difference
between 1 and N processes that these checks are not about.

--share-gpu: every rank on cuda:0 (one GPU, two processes); LOCAL_RANK is set to 0 in the workers because the
engine puts local rank r on cuda:r.
"""
import argparse
import json
import os
import sys

import torch

SIZE, DIM, CLASSES, PER_RANK, STEPS = 16, 16, 8, 8, 6
PFC_IN, PFC_DIM, PFC_CLASSES, PFC_PER_RANK = 48, 24, 60, 8


class FlatLinear(torch.nn.Module):
    """A BatchNorm-free backbone: one linear layer over the flattened image."""

    def __init__(self, dropout=0.0, fp16=False, num_features=DIM, input_size=SIZE, width=1.0):
        super().__init__()
        self.input_size, self.fp16 = input_size, fp16
        self.fc = torch.nn.Linear(3 * input_size * input_size, num_features)

    def forward(self, x):
        return self.fc(x.flatten(1))


def register_backbone():
    from arcface.backbones import BACKBONES
    if "device_check_flat" not in BACKBONES:
        BACKBONES.register("device_check_flat")(FlatLinear)


# ---- Partial FC -------------------------------------------------------------------------------------------------

def pfc_data(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = PFC_PER_RANK * world
    x = torch.randn(rows, PFC_IN, generator=g)
    labels = torch.randint(0, PFC_CLASSES, (rows,), generator=g)
    w_backbone = torch.randn(PFC_DIM, PFC_IN, generator=g) * 0.2
    return x, labels, w_backbone, torch.randn(PFC_CLASSES, PFC_DIM, generator=g) * 0.1


def pfc_step(data, device, rank, world, sample_rate, step):
    """{loss, backbone_grad, class_start, centre_grad} of one forward + backward on this rank's rows; the classes
    are the rows of data[3]."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from arcface.losses import CombinedMarginLoss
    from arcface.partial_fc import PartialFC_V2
    x, labels, w_backbone, w_full = data
    backbone = torch.nn.Linear(PFC_IN, PFC_DIM, bias=False)
    with torch.no_grad():
        backbone.weight.copy_(w_backbone)
    backbone = backbone.to(device)
    model = backbone
    if world > 1:
        model = DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), PFC_DIM, w_full.shape[0], sample_rate=sample_rate,
                       sample_seed=PFC_SEED)
    with torch.no_grad():
        pfc.weight.copy_(w_full[pfc.class_start:pfc.class_start + pfc.num_local])
    pfc = pfc.to(device)
    b = x.shape[0] // world
    xs, ls = x[rank * b:(rank + 1) * b].to(device), labels[rank * b:(rank + 1) * b].to(device)
    loss = pfc(model(xs), ls, step=step)
    loss.backward()
    out = {"loss": float(loss.detach()), "backbone_grad": backbone.weight.grad.detach().cpu().double().numpy(),
           "class_start": pfc.class_start, "centre_grad": pfc.weight.grad.detach().cpu().double().numpy()}
    del model
    return out


PFC_CASES = {"full": (1.0, 0), "sampled": (0.3, 17)}
PFC_SEED = 5


def sampled_classes(labels, world, rate, step, num_classes=PFC_CLASSES):
    """The global class ids the shards of `world` ranks score in one step at `rate` (each shard samples its own
    int(rate * shard size) classes, so this is not what one process at `rate` samples)."""
    from arcface.partial_fc import sampled_centres, shard_range
    chosen = []
    for rank in range(world):
        start, n = shard_range(num_classes, rank, world)
        local = labels - start
        local[(local < 0) | (local >= n)] = -1
        chosen += (sampled_centres(local, start, n, int(rate * n), PFC_SEED, step) + start).tolist()
    return chosen


def pfc_reference(data, device, world, sample_rate, step):
    """One process's full-rate step over the classes the `world` shards score at `sample_rate`: the N-process
    step must give its loss and gradients (centre gradients scattered back to all classes, zero elsewhere)."""
    x, labels, w_backbone, w_full = data
    if sample_rate >= 1:
        return pfc_step(data, device, 0, 1, 1.0, step)
    classes = sampled_classes(labels, world, sample_rate, step, w_full.shape[0])
    position = {c: i for i, c in enumerate(classes)}
    remapped = torch.tensor([position[int(y)] for y in labels])
    out = pfc_step((x, remapped, w_backbone, w_full[classes]), device, 0, 1, 1.0, step)
    full = torch.zeros(w_full.shape, dtype=torch.float64)
    full[classes] = torch.from_numpy(out["centre_grad"])
    out["centre_grad"] = full.numpy()
    return out


def pfc_job(args, rank, world, device):
    import numpy as np

    from arcface.engine import distributed as D
    D.init_distributed(args.backend, device.type, timeout_s=40)
    data = pfc_data(world)
    arrays = {}
    for case, (rate, step) in PFC_CASES.items():
        out = pfc_step(data, device, rank, world, rate, step)
        for key, value in out.items():
            arrays[f"{case}/{key}"] = np.asarray(value)
    np.savez(os.path.join(args.out, f"pfc_rank{rank}.npz"), **arrays)
    D.teardown()


# ---- the trainer with KD ----------------------------------------------------------------------------------------

def train_data(world):
    g = torch.Generator().manual_seed(0)
    n = STEPS * PER_RANK * world
    labels = torch.arange(n) % CLASSES
    protos = torch.randn(CLASSES, 3, SIZE, SIZE, generator=g)
    return protos[labels] + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g), labels


def teacher_weights(path):
    if not os.path.exists(path):
        torch.manual_seed(11)
        torch.save(FlatLinear().state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def train_config(output, teacher, backend, device_type, fp16, batch):
    from .common import kd_modules
    kd_modules()
    register_backbone()
    from arcface.config import base_config, validate
    cfg = base_config()
    cfg.update(rec="synthetic", num_classes=CLASSES, network="device_check_flat", embedding_size=DIM,
               input_size=SIZE, batch_size=batch, lr=0.05, num_epoch=1, output=str(output), frequent=100,
               tensorboard=False, save_all_states=True, seed=3, num_workers=0, val_targets=[], device=device_type,
               dist_backend=backend, dist_timeout=60, fp16=bool(fp16))
    cfg.kd.update(enabled=True, teacher_network="device_check_flat", teacher_weights=str(teacher),
                  teacher_embedding_size=DIM, teacher_check=False,
                  losses={"iled": {"weight": 2.0, "ratio": 0.25}, "fc": {"weight": 1.0},
                          "rpsd": {"weight": 2.0, "bank": 64, "k_neg": 8, "require_positives": False}})
    cfg.config_name = "device_check_dist"
    return validate(cfg)


def train_job_run(output, teacher, backend, device, fp16, rank, world, data_world, log_path=None):
    """One KD training epoch on this rank's share of the data and global batches of a `data_world`-rank run
    (PER_RANK x data_world images each); the Trainer."""
    import contextlib

    from arcface.engine.trainer import train

    from .common import MemoryBatches
    batch = PER_RANK * data_world // world
    cfg = train_config(output, teacher, backend, device.type, fp16, batch)
    images, labels = train_data(data_world)
    loader = MemoryBatches(images.to(device), labels.to(device), batch, rank, world, seed=0)
    from .common import engine_logger_restored
    with contextlib.ExitStack() as stack:
        stack.enter_context(engine_logger_restored())
        if log_path:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(log_path, "a"))))
        return train(cfg, loader)


def train_job(args, rank, world, device):
    trainer = train_job_run(args.out, teacher_weights(args.teacher), args.backend, device, args.fp16, rank, world,
                            world)
    if trainer.global_step != STEPS:
        raise RuntimeError(f"rank {rank}: {trainer.global_step} steps, {STEPS} expected")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("pfc", "train"), required=True)
    parser.add_argument("--backend", choices=("nccl", "gloo"), required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--share-gpu", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.share_gpu:
        os.environ["LOCAL_RANK"] = "0"
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    status = {"rank": rank, "world": world, "backend": args.backend, "device": str(device), "ok": False}
    try:
        (pfc_job if args.job == "pfc" else train_job)(args, rank, world, device)
        status["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the check, which decides
        status["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        print(f"rank {rank}: {status['error']}", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, f"{args.job}_rank{rank}.json"), "w") as f:
        json.dump(status, f)
    return 0 if status["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
