"""The arcface_torch training log line, extended with the other loss terms and, on a second line, statistics.

    Training: 2026-11-30 12:00:00-Speed 5299.56 samples/sec   Loss 1.0965   LearningRate 0.200000   Epoch: 0   \
Global Step: 100   Required: 3 hours   total 1.4212   loss/kd/iled 0.2468   loss/kd/rpsd 0.0779
    Training: 2026-11-30 12:00:00-    kd/iled 0.02468   kd/iled/hard_frac 0.25   kd/teacher_ms 8.1   ...

`Loss` is the margin-softmax loss, as upstream prints it, so a KD run's line compares with a plain run's; the
total and each weighted extra term (scalars named `loss/<term>`) follow it; every other scalar (unweighted KD
terms, weights, mining statistics) goes to a second line and to TensorBoard.
Rank 0 writes stdout, <output>/training.log and TensorBoard; other ranks log warnings only.
"""
import logging
import os
import sys
import time
from collections import defaultdict

LOGGER_NAME = "arcface"


def init_logging(rank, output):
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("Training: %(asctime)s-%(message)s")
        os.makedirs(output, exist_ok=True)
        for handler in (logging.FileHandler(os.path.join(output, "training.log")), logging.StreamHandler(sys.stdout)):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)


class AverageMeter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / max(self.count, 1)


class TrainLogger:
    """Accumulates loss and named scalars between log lines; prints and writes TensorBoard every `frequent` steps."""

    def __init__(self, frequent, total_step, batch_size, world_size, start_step=0, writer=None, rank=0):
        self.frequent = max(int(frequent), 1)
        self.total_step = total_step
        self.batch_size = batch_size
        self.world_size = world_size
        self.writer = writer
        self.rank = rank
        self.start_step = start_step
        self.loss = AverageMeter()
        self.scalars = defaultdict(AverageMeter)
        self.tic = None
        self.init_time = None
        self.last_line = ""

    def update(self, loss, scalars):
        self.loss.update(loss)
        for name, value in scalars.items():
            self.scalars[name].update(value)

    def __call__(self, global_step, epoch, lr, grad_scale=None, micro_steps=1):
        if self.rank != 0:
            return
        now = time.time()
        if self.tic is None:
            self.tic = self.init_time = now
            return
        if global_step % self.frequent != 0:
            return
        elapsed = max(now - self.tic, 1e-9)
        speed = self.frequent * micro_steps * self.batch_size * self.world_size / elapsed
        done = global_step - self.start_step
        per_step = (now - self.init_time) / max(done, 1)
        hours_left = per_step * max(self.total_step - global_step, 0) / 3600
        line = (f"Speed {speed:.2f} samples/sec   Loss {self.loss.avg:.4f}   LearningRate {lr:.6f}   "
                f"Epoch: {epoch}   Global Step: {global_step}   ")
        if grad_scale is not None:
            line += f"Fp16 Grad Scale: {grad_scale:2.0f}   "
        line += f"Required: {hours_left:1.0f} hours"
        terms = sorted(n for n in self.scalars if n.startswith("loss/"))
        terms.sort(key=lambda n: n != "loss/total")  # the total first, then the terms by name
        for name in terms:
            line += f"   {'total' if name == 'loss/total' else name} {self.scalars[name].avg:.4f}"
        get_logger().info(line)
        stats = [f"{name} {self.scalars[name].avg:.4g}" for name in sorted(self.scalars) if name not in terms]
        if stats:
            get_logger().info("    " + "   ".join(stats))
        self.last_line = line
        if self.writer is not None:
            self.writer.add_scalar("loss", self.loss.avg, global_step)
            self.writer.add_scalar("learning_rate", lr, global_step)
            self.writer.add_scalar("time_for_end", hours_left, global_step)
            self.writer.add_scalar("samples_per_sec", speed, global_step)
            for name, meter in self.scalars.items():
                self.writer.add_scalar(name, meter.avg, global_step)
        self.loss.reset()
        for meter in self.scalars.values():
            meter.reset()
        self.tic = now
