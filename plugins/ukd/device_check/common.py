"""Pieces several check groups use: generated data, random teachers with sound BatchNorm statistics, timing
that waits for the GPU, configs for the engine's trainer, and an in-memory loader."""
import contextlib
import io
import json
import os
import statistics
import time

# Procedural-face data sets (arcface.data.synthetic): (identities, images per identity) at the GPU sizes and at the
# toy sizes of a CPU run. 'train' feeds the training checks and the step timings, 'small' the checks that also
# run a teacher on the CPU (cache built on GPU vs CPU) or compare decoders image by image.
FACES = {"train": {"gpu": (100, 16), "toy": (16, 6)}, "small": {"gpu": (16, 8), "toy": (8, 4)}}
GPU_SIZE, TOY_SIZE = 112, 32
TOY_WIDTH = 0.25


def image_size(ctx):
    return TOY_SIZE if ctx.toy else GPU_SIZE


def faces(ctx, kind="train", seed=0):
    """Folder of a procedural-face train.rec (insightface layout) of this run's size: generated once into the work
    folder (a folder whose manifest matches is reused, also by other processes of the run)."""
    from arcface.data.synthetic import generate
    ids, per_id = FACES[kind]["toy" if ctx.toy else "gpu"]
    folder = ctx.path("data", f"faces_{kind}_{image_size(ctx)}", "")
    generate(folder, seed=seed, num_ids=ids, per_id=per_id, size=image_size(ctx), difficulty=0.5, val_ids=0,
             progress=False)
    return folder.rstrip(os.sep)


def faces_count(ctx, kind="train"):
    ids, per_id = FACES[kind]["toy" if ctx.toy else "gpu"]
    return ids, ids * per_id


def sync(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, repeat, warmup=1):
    """Wall seconds of each of `repeat` calls of fn() after `warmup` calls, waiting for the GPU each time."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values):
    return statistics.median(values) if values else float("nan")


def interleaved(fns, device, rounds, warmup=1):
    """{name: median seconds}: the functions timed in turns (a, b, c, a, b, c, ...) so that a change of the
    machine's state falls on all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: median(t) for name, t in times.items()}


def calibrate_bn(model, size, device, batches=2, batch=16):
    """BatchNorm running statistics from random images (cumulative average), then eval mode: a randomly
    initialised deep iResNet with unit running variances grows its activations layer by layer until float16
    overflows, which no trained teacher does."""
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(batch, 3, size, size, device=device) * 2 - 1)
    return model.eval()


def random_teacher(ctx, network, size, name, width=1.0, seed=1, device="cpu"):
    """Path of a saved randomly initialised, BN-calibrated backbone (made once per run and name)."""
    import torch

    from arcface.backbones import get_model
    path = ctx.path("teachers", f"{name}.pt")
    if not os.path.exists(path):
        torch.manual_seed(seed)
        model = get_model(network, num_features=512, input_size=size, width=width).to(device)
        calibrate_bn(model, size, device)
        tmp = path + ".tmp"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return path


def kd_modules():
    """Import the KD plugin so that its config section and plugin are registered also when this project runs
    from a checkout that is not installed (no entry points): a lent GPU machine."""
    import plugins.ukd.plugin  # noqa: F401  (registers 'ukd' and the 'kd' section)


def base_cfg(ctx, output, **values):
    """The engine's defaults (with the kd section) updated with `values`; not validated yet."""
    kd_modules()
    from arcface.config import base_config
    cfg = base_config()
    cfg.update(output=str(output), tensorboard=False, val_targets=[], frequent=10, device=ctx.device,
               save_all_states=False, dist_timeout=120)
    cfg.update(values)
    return cfg


@contextlib.contextmanager
def captured(path):
    """stdout (the trainer's log lines) to a file for the duration."""
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


@contextlib.contextmanager
def engine_logger_restored():
    """The trainer's init_logging replaces the 'arcface' logger's handlers (stdout as it is then, and a file): put
    back the previous ones afterwards and close the trainer's, so that later log lines go to no closed file."""
    import logging
    logger = logging.getLogger("arcface")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        for handler in logger.handlers:
            if handler not in saved[0]:
                handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def run_trainer(cfg, log_path, loader=None):
    """arcface.engine.trainer.train(cfg) with its log lines in log_path; the finished Trainer."""
    from arcface.config import validate
    from arcface.engine.trainer import train
    cfg = validate(cfg)
    with engine_logger_restored(), captured(log_path):
        return train(cfg, loader)


def history_losses(trainer):
    return [float(loss) for _, loss in trainer.history]


def finite(values):
    import math
    return all(math.isfinite(v) for v in values)


def falling(losses):
    """Mean of the last quarter below the mean of the first quarter (at least one step each)."""
    k = max(1, len(losses) // 4)
    return len(losses) >= 2 and sum(losses[-k:]) / k < sum(losses[:k]) / k


def rel_diff(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def tensor_rel_diff(a, b):
    """max |a - b| / max |b| (float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def save_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gpu_memory_mb(device):
    import torch
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def reset_peak(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryBatches:
    """The TrainLoader protocol over fixed tensors already on the device: a deterministic shuffle per epoch,
    sharded by rank (rank r takes every world-th sample), full batches only, so N ranks see the global batches of
    one process split between them."""

    def __init__(self, images, labels, batch_size, rank=0, world_size=1, seed=0):
        from arcface.data.batch import Batch
        self._batch = Batch
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = int(batch_size), rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def num_samples(self):
        return int(self.labels.shape[0])

    def __len__(self):
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        import torch
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        mine = order[self.rank::self.world_size][:len(self) * self.batch_size].to(self.images.device)
        for b in range(self.start_batch, len(self)):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._batch(self.images[idx], self.labels[idx], idx,
                              torch.zeros(len(idx), dtype=torch.bool, device=idx.device))


def tail(text, chars=1200):
    text = text or ""
    return text[-chars:]


def stdout_of(fn, *args, **kwargs):
    """(result, captured stdout) of fn(*args, **kwargs)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args, **kwargs)
    return out, buf.getvalue()
