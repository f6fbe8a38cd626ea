"""`get_dataloader(cfg, rank, world_size, device)`: upstream's dispatch on cfg.rec, one loader type out.

    'synthetic'                      -> SyntheticDataset (upstream's speed test; DALI ignored)
    folder with train.rec/train.idx  -> RecordDataset, or DALI when cfg.dali
    any other folder                 -> ImageFolderDataset (one sub-folder per identity)

The TrainLoader yields `Batch` records already on the device, always full batches (every rank the same
size and count, which Partial FC's all-gather needs), and can start an epoch at a given batch (resume).
"""
import functools
import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError
from .batch import Batch
from .datasets import ImageFolderDataset, RecordDataset, SyntheticDataset
from .layout import rec_paths
from .samplers import DistributedSampler, PKBatchSampler

log = logging.getLogger(__name__)

SYNTHETIC_LENGTH = 1_000_000  # upstream's SyntheticDataset length


def seed_worker(worker_id, base_seed):
    """Upstream's worker seeding: seed + rank * num_workers + worker_id, for numpy, random and torch. A worker
    decodes JPEGs and uses one thread: more would compete with the training process for the cores."""
    torch.set_num_threads(1)
    seed = base_seed + worker_id
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.manual_seed(seed)


class TrainLoader:
    """Iterable of Batch; `len()` is the number of batches of a whole epoch on this rank."""

    def __init__(self, dataset, batch_size, device, rank=0, world_size=1, seed=0, num_workers=0,
                 sampler="random", pk_k=4, pk_random_fraction=0.0):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        n = len(dataset)
        if n < self.batch_size * self.world_size:
            raise DataError(f"the training data has {n} images, fewer than one batch of {self.batch_size} "
                            f"on each of {self.world_size} ranks; lower batch_size or add data")
        if sampler == "pk":
            self.sampler = PKBatchSampler(dataset.labels, self.batch_size, pk_k, self.rank, self.world_size,
                                          self.seed, pk_random_fraction)
            self.batches_per_epoch = self.sampler.num_batches
            kwargs = dict(batch_sampler=self.sampler)
        elif sampler == "random":
            self.sampler = DistributedSampler(n, self.rank, self.world_size, self.seed, shuffle=True,
                                              batch_size=self.batch_size)
            self.batches_per_epoch = self.sampler.num_samples // self.batch_size
            kwargs = dict(sampler=self.sampler, batch_size=self.batch_size, drop_last=True)
        else:
            raise ConfigError(f"`sampler` must be 'random' or 'pk', got {sampler!r}")
        num_workers = int(num_workers)
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.rank)
        self.loader = DataLoader(
            dataset, num_workers=num_workers, pin_memory=self.device.type == "cuda",
            worker_init_fn=functools.partial(seed_worker, base_seed=self.seed + self.rank * num_workers),
            generator=generator, persistent_workers=False,  # fresh workers per epoch see set_epoch's flips
            **kwargs)
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_samples(self):
        """Images in the training set (all ranks together)."""
        return len(self.dataset)

    @property
    def labels(self):
        """int64 numpy labels of every training image, indexed like Batch.index."""
        return self.dataset.labels

    @property
    def bad_records(self):
        return getattr(self.dataset, "bad_records", 0)

    def __len__(self):
        return self.batches_per_epoch

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's order and flips; skip the first `start_batch` batches (resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ConfigError(f"start batch {start_batch} outside the epoch ({self.batches_per_epoch} batches)")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.sampler.set_epoch(epoch, start_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _to_batch(self, item):
        nb = self.device.type == "cuda"
        images = item[0].to(self.device, non_blocking=nb)
        labels = item[1].to(self.device, non_blocking=nb).long().view(-1)
        index = flip = None
        if len(item) >= 4:
            index = item[2].to(self.device, non_blocking=nb).long().view(-1)
            flip = item[3].to(self.device, non_blocking=nb).bool().view(-1)
        return Batch(images, labels, index, flip)

    def __iter__(self):
        remaining = self.batches_per_epoch - self.start_batch
        if self.device.type != "cuda":
            for i, item in enumerate(self.loader):
                if i >= remaining:
                    break
                yield self._to_batch(item)
            return
        # CUDA: copy batch i+1 on a side stream while batch i is being used (as upstream's DataLoaderX)
        stream = torch.cuda.Stream(self.device)
        pending = None
        for i, item in enumerate(self.loader):
            if i >= remaining:
                break
            with torch.cuda.stream(stream):
                moved = self._to_batch(item)
            if pending is not None:
                yield self._ready(pending, stream)
            pending = moved
        if pending is not None:
            yield self._ready(pending, stream)

    def _ready(self, batch, stream):
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for t in (batch.images, batch.labels, batch.index, batch.flip):
            if t is not None:
                t.record_stream(current)
        return batch


def _cfg(cfg, key, default):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def get_dataloader(cfg, rank=0, world_size=1, device="cpu"):
    """The training loader of a config (keys rec, batch_size, num_workers, seed, flip, input_size, sampler,
    pk_k, pk_random_fraction, skip_bad_records, dali, dali_aug, num_classes, num_image)."""
    rec = cfg.rec
    if rec is None:
        raise ConfigError("`rec` is not set (a dataset folder with train.rec/train.idx, an image folder, or 'synthetic')")
    rec = str(rec)
    input_size = int(_cfg(cfg, "input_size", 112))
    seed = int(_cfg(cfg, "seed", 2048))
    num_classes = cfg.get("num_classes") if hasattr(cfg, "get") else None
    common = dict(input_size=input_size, flip=bool(_cfg(cfg, "flip", True)), return_index=True,
                  skip_bad_records=bool(_cfg(cfg, "skip_bad_records", False)), num_classes=num_classes, seed=seed)
    use_dali = bool(_cfg(cfg, "dali", False))
    if rec == "synthetic":
        if use_dali:
            log.info("rec='synthetic': DALI is not used (as upstream)")
        length = int(_cfg(cfg, "num_image", SYNTHETIC_LENGTH))
        dataset = SyntheticDataset(length, input_size, return_index=True, seed=seed)
    elif not os.path.exists(rec):
        raise DataError(f"training data not found: {rec}; expected a folder holding train.rec and train.idx, "
                        "an image folder with one sub-folder per identity, or rec='synthetic'")
    else:
        rec_file, idx_file = rec_paths(rec)
        if os.path.isfile(rec_file):
            if not os.path.isfile(idx_file):
                raise DataError(f"{rec_file} has no index {idx_file}; rebuild it with "
                                f"`python tools/pack_rec.py reindex {rec_file}`")
            if use_dali:
                from .dali import DaliTrainLoader
                return DaliTrainLoader.from_config(cfg, rank, world_size, device)
            dataset = RecordDataset(rec, **common)
        elif os.path.isdir(rec):
            if use_dali:
                raise ConfigError(f"dali=True needs train.rec/train.idx in {rec}; pack the image folder with "
                                  "`python tools/pack_rec.py folder` or set dali=False")
            dataset = ImageFolderDataset(rec, **common)
        else:
            raise DataError(f"{rec} is a file; `rec` must be a dataset folder (train.rec/train.idx), an image "
                            "folder or 'synthetic'")
    num_image = cfg.get("num_image") if hasattr(cfg, "get") else None
    if rec != "synthetic" and num_image is not None and int(num_image) != len(dataset):
        log.warning("config num_image=%d but %s holds %d images; the data decides (steps per epoch follow the "
                    "loader), num_image is not used for training", int(num_image), rec, len(dataset))
    return TrainLoader(dataset, int(cfg.batch_size), device, rank, world_size, seed,
                       num_workers=int(_cfg(cfg, "num_workers", 2)), sampler=_cfg(cfg, "sampler", "random"),
                       pk_k=int(_cfg(cfg, "pk_k", 4)), pk_random_fraction=float(_cfg(cfg, "pk_random_fraction", 0.0)))
