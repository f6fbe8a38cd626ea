"""Mid-training .bin verification on rank 0, logging upstream's three lines per set.

Differences from arcface_torch's CallBackVerification, on purpose: a missing .bin is a warning naming the
file (upstream skips it silently); the model runs on its own parameters' device, so a bare module works
without DDP; the results come back as a dict for the trainer to use (best checkpoint, early stop).
"""
import logging
import os

import torch

from .embedder import TorchEmbedder
from .verification import evaluate_verification, load_bin

logger = logging.getLogger(__name__)


def _rank():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _unwrap(module):
    while isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        module = module.module
    return module


class VerificationCallback:
    def __init__(self, val_targets, rec_prefix, summary_writer=None, input_size=112, batch_size=64):
        self.rank = _rank()
        self.summary_writer = summary_writer
        self.batch_size = int(batch_size)
        self.input_size = int(input_size)
        self.datasets = []
        self.highest = {}
        if self.rank != 0:
            return
        for name in val_targets:
            path = os.path.join(rec_prefix, f"{name}.bin")
            if not os.path.isfile(path):
                logger.warning("verification set %s not found; '%s' will not be evaluated", path, name)
                continue
            self.datasets.append(load_bin(path, self.input_size, name=name))
            self.highest[name] = 0.0

    def __call__(self, global_step, backbone):
        """Evaluate every loaded set; returns {name: results} (empty on ranks other than 0)."""
        if self.rank != 0 or not self.datasets:
            return {}
        module = _unwrap(backbone)
        was_training = module.training
        module.eval()
        results = {}
        try:
            embedder = TorchEmbedder(module)
            for dataset in self.datasets:
                res = evaluate_verification(embedder, dataset, self.batch_size)
                name = dataset.name
                self.highest[name] = max(self.highest[name], res["accuracy"])
                res["highest"] = self.highest[name]
                logger.info("[%s][%d]XNorm: %f", name, global_step, res["xnorm"])
                logger.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", name, global_step, res["accuracy"], res["std"])
                logger.info("[%s][%d]Accuracy-Highest: %1.5f", name, global_step, res["highest"])
                if self.summary_writer is not None:
                    self.summary_writer.add_scalar(name, res["accuracy"], global_step)
                    self.summary_writer.add_scalar(f"{name}_xnorm", res["xnorm"], global_step)
                results[name] = res
        finally:
            module.train(was_training)
        return results
